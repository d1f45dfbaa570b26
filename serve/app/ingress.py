"""The HTTP front door: one FastAPI app with the retrieval and chat routers, API keys, JSON errors
and /healthz. The ingress deployment (serve.app.deployments.RetrievalIngress) serves it; tests
serve it in-process with local clients.

    POST /v1/retrieve, /v1/embeddings; GET /v1/experts     serve.app.retrieval.router
    POST /v1/chat/completions; GET /v1/models              serve.app.chat.router
    GET /healthz                                           here (both halves)
"""

from __future__ import annotations

import hmac
import os

from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from .chat.router import ChatClient, chat_router
from .errors import error_response, install_error_handlers
from .retrieval.router import retrieval_router
from .retrieval.service import RetrievalService


def api_keys_from_env(name: str | None) -> frozenset[str] | None:
    """The keys in ``$name`` (comma-separated); None when no variable is configured."""
    if name is None:
        return None
    keys = frozenset(k.strip() for k in os.environ.get(name, "").split(",") if k.strip())
    if not keys:
        raise RuntimeError(f"http.api_keys_env: environment variable {name} is not set or holds no key")
    return keys


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is a 413, refused before it is read
    when Content-Length says so; a body without one (chunked) is read up to the limit first, then
    handed on, or refused as soon as it passes the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over {self.max_bytes} bytes (limits.max_body_bytes)"
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit():
            if int(length) > self.max_bytes:
                return await error_response(413, message)(scope, receive, send)
            return await self.app(scope, receive, send)  # the server stops at Content-Length
        messages, seen = [], 0
        while True:
            msg = await receive()
            messages.append(msg)
            seen += len(msg.get("body", b"")) if msg["type"] == "http.request" else 0
            if seen > self.max_bytes:
                return await error_response(413, message)(scope, receive, send)
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


class HealthStatus(BaseModel):
    """/healthz: ``ok`` (200) when every part answers, else ``unavailable`` (503) with the reason;
    the other keys describe the parts (documents, experts, shards, LLM engines)."""

    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "unavailable"]


def _declare_bearer_auth(app: FastAPI) -> None:
    """With API keys on, the OpenAPI spec says so: a bearer scheme on every path but /healthz."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = build()
            spec.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            for path, ops in spec.get("paths", {}).items():
                if path != "/healthz":
                    for op in ops.values():
                        op["security"] = [{"apiKey": []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


def create_app(service: RetrievalService | None, chat: ChatClient | None = None, metrics=None,
               api_keys: frozenset[str] | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """``metrics``: a serve.app.metrics.Metrics (inside the ingress replica) counting error answers
    by endpoint and reason; None records nothing. ``api_keys``: when given, every endpoint except
    /healthz (the probes') answers 401 without ``Authorization: Bearer <one of them>``."""

    def count(request: Request, status: int, reason: str) -> None:
        if metrics is not None:  # the route's template, not the raw path: bounded label values
            endpoint = getattr(request.scope.get("route"), "path", "<unmatched>")
            metrics.inc("routerserve_errors", endpoint=endpoint, reason=f"{status}:{reason}")

    app = FastAPI(
        title="routerserve",
        version="0.1.0",
        description="RouterRetriever-style routed retrieval: base encoder + LoRA experts + sharded FAISS; "
        "Router-R1 multi-round LLM routing.",
    )
    if api_keys is not None:
        keys = [k.encode("utf-8") for k in api_keys]

        @app.middleware("http")
        async def _require_key(request: Request, call_next):
            if request.url.path != "/healthz":
                scheme, _, key = request.headers.get("authorization", "").partition(" ")
                sent = key.strip().encode("utf-8", "surrogateescape")  # bytes: any header value compares
                if scheme.lower() != "bearer" or not any(hmac.compare_digest(sent, k) for k in keys):
                    count(request, 401, "api_key")
                    return error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                          None, "authentication_error")
            return await call_next(request)

        _declare_bearer_auth(app)

    install_error_handlers(app, count)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if service is not None:
        app.include_router(retrieval_router(service))
    if chat is not None:
        app.include_router(chat_router(chat))

    @app.get("/healthz", response_model=HealthStatus, responses={503: {"model": HealthStatus, "description": "not ready"}})
    async def healthz():
        ok, detail = True, {}
        if service is not None:
            ok, detail = await service.health()
        if chat is not None:
            chat_ok, chat_detail = await chat.health()
            ok, detail = ok and chat_ok, {**detail, **chat_detail}
        return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "unavailable", **detail})

    return app

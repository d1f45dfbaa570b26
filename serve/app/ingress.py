"""The HTTP front door: one FastAPI app with the retrieval and chat routers, API keys, JSON errors
and /healthz. The ingress deployment (serve.app.deployments.RetrievalIngress) serves it; tests
serve it in-process with local clients.

    POST /v1/retrieve, /v1/embeddings; GET /v1/experts     serve.app.retrieval.router
    POST /v1/chat/completions; GET /v1/models              serve.app.chat.router
    /admin/v1/experts/… (generations, activate, rollback, remove, register, train), /admin/v1/jobs   serve.app.admin.router
    GET /healthz                                           here (both halves)
"""

from __future__ import annotations

import hmac
import os

from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from .admin.router import ADMIN_PREFIX, admin_router
from .admin.service import AdminService
from .chat.router import ChatClient, chat_router
from .errors import error_response, install_error_handlers
from .retrieval.router import retrieval_router
from .retrieval.service import RetrievalService


def api_keys_from_env(name: str | None, key: str = "http.api_keys_env") -> frozenset[str] | None:
    """The keys in ``$name`` (comma-separated); None when no variable is configured."""
    if name is None:
        return None
    keys = frozenset(k.strip() for k in os.environ.get(name, "").split(",") if k.strip())
    if not keys:
        raise RuntimeError(f"{key}: environment variable {name} is not set or holds no key")
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


def _declare_bearer_auth(app: FastAPI, query_keys: bool, admin_keys: bool) -> None:
    """With keys on, the OpenAPI spec says so: a bearer scheme on every path but /healthz, the
    admin keys' own scheme on the admin paths."""
    build = app.openapi
    bearer = {"type": "http", "scheme": "bearer"}

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = build()
            schemes = spec.setdefault("components", {}).setdefault("securitySchemes", {})
            if query_keys:
                schemes["apiKey"] = bearer
            if admin_keys:
                schemes["adminKey"] = {**bearer, "description": "an admin key (http.admin_keys_env)"}
            for path, ops in spec.get("paths", {}).items():
                scheme = ("adminKey" if admin_keys else None) if path.startswith(ADMIN_PREFIX) else (
                    "apiKey" if query_keys and path != "/healthz" else None)
                if scheme is not None:
                    for op in ops.values():
                        op["security"] = [{scheme: []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


def _route_path(request: Request) -> str:
    """The path the app's routes match: without Serve's route prefix (``root_path``), which Serve's
    proxy leaves in the path. The key checks use this, so a prefix cannot hide an admin route."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "") or ""
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root.rstrip("/")):] or "/"
    return path


def _bearer_ok(request: Request, keys: list[bytes]) -> bool:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    sent = key.strip().encode("utf-8", "surrogateescape")  # bytes: any header value compares
    return scheme.lower() == "bearer" and any(hmac.compare_digest(sent, k) for k in keys)


def create_app(service: RetrievalService | None, chat: ChatClient | None = None, metrics=None,
               api_keys: frozenset[str] | None = None, max_body_bytes: int = 1 << 20,
               admin: AdminService | None = None, admin_keys: frozenset[str] | None = None,
               admin_open: bool = False) -> FastAPI:
    """``metrics``: a serve.app.metrics.Metrics (inside the ingress replica) counting error answers
    by endpoint and reason; None records nothing. ``api_keys``: when given, every endpoint except
    /healthz (the probes') and the admin routes answers 401 without ``Authorization: Bearer <one of
    them>``. The admin routes (/admin/…, when ``admin`` is given) take only ``admin_keys``; without
    admin keys they answer 403 unless ``admin_open`` (local use)."""

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
    query_keys = [k.encode("utf-8") for k in api_keys] if api_keys is not None else None
    admin_key_bytes = [k.encode("utf-8") for k in admin_keys] if admin_keys is not None else None

    @app.middleware("http")
    async def _require_key(request: Request, call_next):
        path = _route_path(request)
        if path.startswith(ADMIN_PREFIX):
            if admin_key_bytes is None and not admin_open:
                count(request, 403, "admin_off")
                return error_response(403, "the admin API is off: set http.admin_keys_env (admin keys, separate "
                                      "from the query keys), or http.admin_open for local use", None, "permission_error")
            if admin_key_bytes is not None and not _bearer_ok(request, admin_key_bytes):
                count(request, 401, "admin_key")
                return error_response(401, "missing or invalid admin key (send 'Authorization: Bearer <admin key>'; "
                                      "query keys are not admin keys)", None, "authentication_error")
        elif query_keys is not None and path != "/healthz" and not _bearer_ok(request, query_keys):
            count(request, 401, "api_key")
            return error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                  None, "authentication_error")
        return await call_next(request)

    if query_keys is not None or admin_key_bytes is not None:
        _declare_bearer_auth(app, query_keys is not None, admin_key_bytes is not None)

    install_error_handlers(app, count)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if service is not None:
        app.include_router(retrieval_router(service, metrics))
    if chat is not None:
        app.include_router(chat_router(chat))
    if admin is not None:
        app.include_router(admin_router(admin))

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

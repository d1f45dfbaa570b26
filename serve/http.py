"""The HTTP router: maps endpoints to RetrievalService and every error to a JSON body.

Errors are ``{"error": {"message", "type", "param", "code"}}`` (OpenAI style). Request validation
failures (wrong types, malformed JSON, unknown fields) are 422; limits 413/422; unknown
experts/models 404. An unexpected exception is logged and answered 500 with its type, never a hang.
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_protocol import ChatCompletionRequest, ChatCompletionResponse, ModelList
from .protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ExpertsResponse,
    RetrieveRequest,
    RetrieveResponse,
)
from .serving import RequestError, RetrievalService

logger = logging.getLogger(__name__)

_ERRORS = {r: {"model": ErrorResponse} for r in (404, 413, 422)}


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": status}},
    )


class ChatClient(Protocol):
    """What the HTTP layer needs from the chat side: serve.chat_serving.ChatService in-process,
    or the Router-R1 controller deployment through a handle. ``chat`` returns a response dict;
    ``stream`` yields SSE lines; both raise RequestError for client errors."""

    async def chat(self, req: ChatCompletionRequest) -> dict: ...
    def stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]: ...
    async def models(self) -> dict: ...
    async def health(self) -> tuple[bool, dict]: ...


def api_keys_from_env(name: str | None) -> frozenset[str] | None:
    """The keys in ``$name`` (comma-separated); None when no variable is configured."""
    if name is None:
        return None
    keys = frozenset(k.strip() for k in os.environ.get(name, "").split(",") if k.strip())
    if not keys:
        raise RuntimeError(f"http.api_keys_env: environment variable {name} is not set or holds no key")
    return keys


def create_app(service: RetrievalService | None, chat: ChatClient | None = None, metrics=None,
               api_keys: frozenset[str] | None = None) -> FastAPI:
    """``metrics``: a serve.metrics.Metrics (inside the ingress replica) counting error answers by
    endpoint and reason; None records nothing. ``api_keys``: when given, every endpoint except
    /healthz (the probes') answers 401 without ``Authorization: Bearer <one of them>``."""

    def count(request: Request, status: int, reason: str) -> None:
        if metrics is not None:  # the route's template, not the raw path: bounded label values
            endpoint = getattr(request.scope.get("route"), "path", "<unmatched>")
            metrics.inc("routerserve_errors", endpoint=endpoint, reason=f"{status}:{reason}")

    app = FastAPI(
        title="routerserve",
        version="0.1.0",
        description="RouterRetriever-style routed retrieval: base encoder + LoRA experts + sharded FAISS.",
    )

    if api_keys is not None:

        @app.middleware("http")
        async def _require_key(request: Request, call_next):
            if request.url.path != "/healthz":
                scheme, _, key = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip(), k) for k in api_keys):
                    count(request, 401, "api_key")
                    return _error(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                  None, "authentication_error")
            return await call_next(request)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        count(request, exc.status, exc.param or "request")
        return _error(exc.status, exc.message, exc.param, "server_error" if exc.status >= 500 else "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        count(request, 422, "validation")
        parts, param = [], None
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            where = ".".join(loc) or "body"
            param = param or where
            msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
            parts.append(f"{where}: {msg}")
        return _error(422, "; ".join(parts) or "invalid request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        count(request, exc.status_code, "http")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error")
        count(request, 500, type(exc).__name__)
        return _error(500, f"internal error ({type(exc).__name__})", kind="server_error")

    if service is not None:

        @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=_ERRORS)
        async def retrieve(req: RetrieveRequest) -> RetrieveResponse:
            return await service.retrieve(req)

        @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
        async def embeddings(req: EmbeddingRequest) -> EmbeddingResponse:
            return await service.embeddings(req)

        @app.get("/v1/experts", response_model=ExpertsResponse)
        async def experts() -> ExpertsResponse:
            return await service.experts()

    if chat is not None:

        @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_ERRORS, 503: {"model": ErrorResponse}})
        async def chat_completions(req: ChatCompletionRequest):
            if not req.stream:
                return JSONResponse(await chat.chat(req))
            events = chat.stream(req)
            first = await anext(events)  # a client error (unknown model, ...) surfaces here, before any byte is sent

            async def body():
                yield first
                async for event in events:
                    yield event

            return StreamingResponse(body(), media_type="text/event-stream")

        @app.get("/v1/models", response_model=ModelList)
        async def models():
            return JSONResponse(await chat.models())

    @app.get("/healthz")
    async def healthz():
        ok, detail = True, {}
        if service is not None:
            ok, detail = await service.health()
        if chat is not None:
            chat_ok, chat_detail = await chat.health()
            ok, detail = ok and chat_ok, {**detail, **chat_detail}
        return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "unavailable", **detail})

    return app

"""The HTTP router: maps endpoints to RetrievalService and every error to a JSON body.

Errors are ``{"error": {"message", "type", "param", "code"}}`` (OpenAI style). Request validation
failures (wrong types, malformed JSON, unknown fields) are 422; limits 413/422; unknown
experts/models 404. An unexpected exception is logged and answered 500 with its type, never a hang.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def create_app(service: RetrievalService) -> FastAPI:
    app = FastAPI(
        title="routerserve",
        version="0.1.0",
        description="RouterRetriever-style routed retrieval: base encoder + LoRA experts + sharded FAISS.",
    )

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        parts, param = [], None
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            where = ".".join(loc) or "body"
            param = param or where
            msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
            parts.append(f"{where}: {msg}")
        return _error(422, "; ".join(parts) or "invalid request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unhandled error")
        return _error(500, f"internal error ({type(exc).__name__})", kind="server_error")

    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=_ERRORS)
    async def retrieve(req: RetrieveRequest) -> RetrieveResponse:
        return await service.retrieve(req)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
    async def embeddings(req: EmbeddingRequest) -> EmbeddingResponse:
        return await service.embeddings(req)

    @app.get("/v1/experts", response_model=ExpertsResponse)
    async def experts() -> ExpertsResponse:
        return await service.experts()

    @app.get("/healthz")
    async def healthz():
        ok, detail = await service.health()
        return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "unavailable", **detail})

    return app

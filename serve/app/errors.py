"""Errors of the HTTP API and the one place that turns them into JSON.

Every error answer is ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape):
``RequestError`` raised anywhere on a request's path (service, controller replica, engine call)
becomes that body with its status; request validation failures are 422; routing errors (404/405)
keep their status (405 with ``Allow``); anything unexpected is logged and answered 500 with its
type only.

``RequestError`` pickles with all its fields, so one raised inside a Serve replica reaches the
ingress as itself (Ray re-raises it as a subclass of its class whose attributes are the
original's) — no error dicts travel between deployments.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


class RequestError(Exception):
    """A client error (4xx) or an unavailable dependency (503), answered as JSON naming the problem."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, extra: dict | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.extra = extra  # more top-level keys of the error body (e.g. the routing spent so far)
        self.headers = headers  # e.g. Retry-After on a 503 refusal

    def __reduce__(self):  # Exception pickles only ``args``; keep every field across Ray hops
        return type(self), (self.message, self.param, self.status, self.extra, self.headers)


def overloaded(message: str, retry_after_s: int) -> RequestError:
    """503 + Retry-After: refused early, nothing queued."""
    return RequestError(message, None, 503, headers={"Retry-After": str(retry_after_s)})


class EngineUnavailable(RequestError):
    """An LLM engine (router, or a candidate called directly) failed or is down: 503."""

    def __init__(self, message: str, param: str | None = "model", status: int = 503, extra: dict | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, param, status, extra, headers)


_ERROR_MEANINGS = {
    401: "missing or invalid API key (only when http.api_keys_env is set)",
    404: "unknown model or expert",
    413: "request body over limits.max_body_bytes",
    422: "the request does not match this schema (the field is named in error.param)",
    503: "overloaded, or a replica behind the ingress failed: retry after Retry-After seconds",
    504: "no answer within the deadline (limits.request_timeout_s; llm.router.request_timeout_s for Router-R1)",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*statuses: int, meanings: dict[int, str] | None = None) -> dict[int, dict]:
    """OpenAPI ``responses`` for the error answers an endpoint gives: each the JSON error body
    (described by ``meanings`` where a router's statuses mean something else); a 503 also
    declares its Retry-After header."""
    out: dict[int, dict] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": (meanings or {}).get(status) or _ERROR_MEANINGS[status]}
        if status == 503:
            out[status]["headers"] = RETRY_AFTER
    return out


REQUEST_ERRORS = error_responses(401, 404, 413, 422, 503, 504)  # an endpoint that takes a body and calls replicas


def error_body(status: int, message: str, param: str | None = None, kind: str | None = None,
               extra: dict | None = None) -> dict:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}, **(extra or {})}


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None,
                   headers: dict[str, str] | None = None, extra: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param, kind, extra), headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """'field: problem; …' and the first offending field, from FastAPI's validation errors."""
    parts, param = [], None
    for err in exc.errors():
        where = ""
        for p in err.get("loc", ()):
            if p != "body" and (where or not isinstance(p, int)):  # ("body", 0): the body itself
                where += f"[{p}]" if isinstance(p, int) else f".{p}" if where else str(p)
        where = where or "body"
        param = param or where
        msg = {"extra_forbidden": "unknown field", "string_pattern_mismatch": "must not be blank"}.get(
            err.get("type"), err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")  # our validators' messages, as written
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI, count: Callable[[Request, int, str], None]) -> None:
    """Every error path of ``app`` answers JSON; ``count(request, status, reason)`` records it."""

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        count(request, exc.status, exc.param or "request")
        return error_response(exc.status, exc.message, exc.param, headers=exc.headers, extra=exc.extra)

    @app.exception_handler(BackPressureError)
    async def _back_pressure(request: Request, exc: BackPressureError):  # a deployment behind us is full
        count(request, 503, "backpressure")
        refusal = overloaded("the service is at capacity; retry later", math.ceil(getattr(exc, "retry_after_s", None) or 1))
        return error_response(refusal.status, refusal.message, headers=refusal.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        count(request, 422, "validation")
        message, param = validation_message(exc)
        return error_response(422, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not decode the body: the same answer as malformed JSON
            count(request, 422, "validation")
            return error_response(422, "body: not valid JSON (it must be UTF-8 text)", "body")
        count(request, exc.status_code, "http")
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error")
        count(request, 500, type(exc).__name__)
        return error_response(500, f"internal error ({type(exc).__name__})", kind="server_error")

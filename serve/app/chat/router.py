"""The chat endpoints: POST /v1/chat/completions (JSON or SSE), GET /v1/models."""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import ERROR_RESPONSES, ErrorResponse
from .protocol import ChatCompletionRequest, ChatCompletionResponse, ModelList

ERRORS = {**ERROR_RESPONSES, 503: {"model": ErrorResponse}}


class ChatClient(Protocol):
    """What the HTTP layer needs from the chat side: serve.app.chat.service.LocalChatClient over an
    in-process ChatService, or the Router-R1 controller deployment through a handle. ``chat``
    returns a response dict; ``stream`` yields SSE lines; both raise RequestError for client errors."""

    async def chat(self, req: ChatCompletionRequest) -> dict: ...
    def stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]: ...
    async def models(self) -> dict: ...
    async def health(self) -> tuple[bool, dict]: ...


def chat_router(chat: ChatClient) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
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

    @router.get("/v1/models", response_model=ModelList)
    async def models():
        return JSONResponse(await chat.models())

    return router

"""The chat endpoints: POST /v1/chat/completions (JSON or SSE), GET /v1/models."""

# no `from __future__ import annotations`: FastAPI reads the body type (a local class) at run time

from typing import AsyncIterator, Protocol, Sequence

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, create_model

from ..errors import REQUEST_ERRORS, error_responses
from ..validation import LaxText
from .protocol import ChatCompletionRequest, ChatCompletionResponse, ModelList

SSE_EVENT = {  # with stream: true, each server-sent event (OpenAPI 3.1: the schema describes one event)
    "type": "object",
    "properties": {"data": {"type": "string", "description": "a chat.completion.chunk as JSON, or [DONE]"},
                   "event": {"type": "string"}},
    "required": ["data"],
}


class ChatClient(Protocol):
    """What the HTTP layer needs from the chat side: serve.app.chat.service.LocalChatClient over an
    in-process ChatService, or the Router-R1 controller deployment through a handle. ``chat``
    returns a response dict; ``stream`` yields SSE lines; both raise RequestError for client errors.
    ``model_names``: the served model names (the router's and the candidates'), the spec's examples."""

    model_names: Sequence[str]

    async def chat(self, req: ChatCompletionRequest) -> dict: ...
    def stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]: ...
    async def models(self) -> dict: ...
    async def health(self) -> tuple[bool, dict]: ...


def chat_router(chat: ChatClient) -> APIRouter:
    router = APIRouter()
    ChatBody = create_model(  # the request model, with this deployment's model names as examples
        "ChatCompletionRequest", __base__=ChatCompletionRequest, __doc__=ChatCompletionRequest.__doc__,
        model=(LaxText, Field(..., min_length=1, max_length=128, examples=list(chat.model_names) or None,
                              description="the router's served name (Router-R1) or a candidate's (a direct call)")),
    )

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
                 responses={**REQUEST_ERRORS, 200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}})
    async def chat_completions(req: ChatBody):
        if not req.stream:
            return JSONResponse(await chat.chat(req))
        events = chat.stream(req)
        first = await anext(events)  # a client error (unknown model, ...) surfaces here, before any byte is sent

        async def body():
            yield first
            async for event in events:
                yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    @router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
    async def models():
        return JSONResponse(await chat.models())

    return router

"""OpenAI-compatible request/response models of /v1/chat/completions and /v1/models.

``model`` is the router (``router-r1`` by default: the Router-R1 loop over the candidate pool) or
a candidate's name (a direct call, priced the same way). Extensions: ``budget`` (a hard cost cap
for this request, in the candidates' currency) in the request; ``routing`` (rounds, cost, budget
left) in the response and in streamed chunks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import re

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictStr, field_validator

from ..validation import NOT_BLANK, LaxText, integer

# "at least one user message with text that is not blank", as JSON Schema (``contains``) and as code
_NOT_BLANK_TEXT = {"type": "string", "pattern": NOT_BLANK}
HAS_USER_TEXT = {
    "type": "object",
    "properties": {
        "role": {"const": "user"},
        "content": {"anyOf": [_NOT_BLANK_TEXT, {"type": "array", "contains": {
            "type": "object", "properties": {"text": _NOT_BLANK_TEXT}, "required": ["text"]}}]},
    },
    "required": ["role", "content"],
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: LaxText


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: LaxText | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def has_user_text(m: ChatMessage) -> bool:
    parts = [m.content] if isinstance(m.content, str) else [p.text for p in m.content]
    return any(re.search(NOT_BLANK, p) for p in parts)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send fields we do not use (e.g. user, n=1); unknown ones are rejected by name
    model_config = ConfigDict(extra="forbid")

    model: LaxText = Field(..., min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256, json_schema_extra={"contains": HAS_USER_TEXT},
                                        description="at least one user message whose text is not blank")
    # strict types: JSON's types as the schema states them (true is not 1, "5" is not 5)
    max_tokens: integer(ge=1, le=32768) | None = None
    max_completion_tokens: integer(ge=1, le=32768) | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: integer(ge=1, le=1) = 1
    user: Annotated[StrictStr, Field(max_length=256)] | None = None
    budget: Annotated[StrictFloat, Field(gt=0)] | None = Field(None, description="routerserve: hard cost cap for this request")
    max_route_calls: integer(ge=0, le=32) | None = Field(
        None, description="routerserve: at most this many route calls (≤ the server's cap); 0 = the router answers alone"
    )

    @field_validator("messages")
    @classmethod
    def _has_user(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and has_user_text(m) for m in value):
            raise ValueError("needs at least one user message whose text is not blank")
        return value

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RoutingInfo(BaseModel):
    """How the answer was produced and what it cost (routerserve extension)."""

    router: str | None = None
    rounds: list[dict[str, Any]] = Field(default_factory=list)
    route_calls: int = 0
    calls: dict[str, int] = Field(default_factory=dict)
    cost: float = 0.0  # the bill: candidates' prompt + completion tokens × their prices, in `currency`
    # Router-R1's own training-time figure, in its own unit: completion tokens × price per 1M,
    # not divided by 1e6, prompt ignored. Not money; the router's tokens are in router_tokens.
    upstream_cost: float = 0.0
    currency: str = "USD"
    budget: float | None = None
    budget_left: float | None = None
    stopped: str = "answer"  # answer | answer_truncated | no_answer | budget | max_tokens | context (errors: router_failed | deadline)
    candidate_tokens: dict[str, int] = Field(default_factory=dict)
    router_tokens: dict[str, int] = Field(default_factory=dict)
    latency_s: float = 0.0


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    routing: RoutingInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "routerserve"
    kind: Literal["router", "candidate"]
    description: str | None = None
    price: dict[str, Any] | None = None
    engine: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

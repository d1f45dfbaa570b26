"""Request and response models of the HTTP API (pydantic; FastAPI renders them into OpenAPI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ..validation import Text


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrieveRequest(_Request):
    query: Text = Field(..., description="the search query (non-empty)")
    top_k: StrictInt = Field(10, description="number of hits, 1..limits.max_top_k")
    expert: Text | None = Field(None, description="force an expert by name, or 'base'; null = route")
    include_text: StrictBool = Field(False, description="return each hit's text")


class Hit(BaseModel):
    doc_id: str
    dataset: str
    score: float
    title: str
    text: str | None = None


class RetrieveResponse(BaseModel):
    query: str
    expert: str = Field(..., description="the expert whose adapter encoded the query ('base' = none)")
    forced: bool = Field(..., description="true when the request named the expert")
    routing_scores: dict[str, float] = Field(..., description="policy score per expert (higher wins)")
    policy: str
    hits: list[Hit]
    timings_ms: dict[str, float]


class EmbeddingRequest(_Request):
    model: Text = Field(..., description="'<served name>' (base) or '<served name>:<expert>'; 'base' works as the served name")
    input: Text | list[Text] = Field(..., description="one text or a list of texts")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ExpertInfo(BaseModel):
    name: str
    num_pilots: int


class ExpertsResponse(BaseModel):
    base_model: str
    policy: str
    pilot_rule: str = ""  # how the pilots were grouped ("" = not recorded in the pilot file)
    experts: list[ExpertInfo]

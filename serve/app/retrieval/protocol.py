"""Request and response models of the HTTP API (pydantic; FastAPI renders them into OpenAPI).

The request models here carry the constraints that hold everywhere (non-blank text, top_k >= 1);
``limited_request_models`` derives the served ones, which also declare this deployment's limits
(query length, top_k, number of inputs, the embedding size), so the published OpenAPI spec says
exactly what the service accepts and a request outside it is a 422 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, create_model, field_validator

from serve.config import LimitsConfig

from ..validation import Integer, Text, integer, one_or_many, query_text


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


QueryText = query_text()


class RetrieveRequest(_Request):
    query: QueryText = Field(..., description="the search query (not blank)")
    top_k: Integer = Field(10, ge=1, description="number of hits, 1..limits.max_top_k")
    expert: Text | None = Field(None, description="force an expert by name, or 'base'; null or '' = route")
    include_text: StrictBool = Field(False, description="return each hit's text")
    nprobe: integer(ge=1) | None = Field(None, description="IVF indexes: lists to visit (recall for speed); null: "
                                         "the configured search.nprobe")
    ef_search: integer(ge=1) | None = Field(None, description="HNSW indexes: candidate list size; null: the configured "
                                            "search.ef_search")


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
    selected_by: Literal["forced", "routed", "floor", "guard", "corpus"] = Field(
        ..., description="forced: the request named the expert; routed: the policy's pick; floor: the query reached no "
        "pilot's confidence floor (a domain no expert knows), so base; guard: the policy's pick is held back by its "
        "base guard, so base; corpus: the corpus guard — its base top 10 hits come mostly from corpora no expert is "
        "named after (experts.unknown_corpus_share), so base")
    routing_scores: dict[str, float] = Field(..., description="policy score per expert (higher wins)")
    policy: str
    hits: list[Hit]
    index: str = Field(..., description="the FAISS index type searched (its faiss.index_factory string; Flat = exact)")
    search_params: dict[str, int] = Field(..., description="the search knobs this answer ran with ({} for Flat)")
    timings_ms: dict[str, float]
    experts_generation: str | None = Field(None, description="the expert generation that served it (gNNNNNN; null: no experts published)")


class EmbeddingRequest(_Request):
    model: Text = Field(..., description="'<served name>' (base) or '<served name>:<expert>'; 'base' works as the served name")
    input: one_or_many(QueryText) = Field(..., description="one text or a list of texts")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Integer | None = Field(None, description="the model's embedding size, or null")
    user: StrictStr | None = None


def _knob_fields(limits: LimitsConfig, index: str | None, knobs) -> tuple[dict, dict]:
    """The search knob fields of the served RetrieveRequest: bounded by the limits; a knob the
    index lacks is declared null-only, and a value for it is refused naming the index."""
    fields, validators = {}, {}
    for name, limit, what in (("nprobe", limits.max_nprobe, "IVF indexes: lists to visit"),
                              ("ef_search", limits.max_ef_search, "HNSW indexes: candidate list size")):
        if knobs is None or name in knobs:
            fields[name] = (integer(ge=1, le=limit) | None,
                            Field(None, description=f"{what}, 1..{limit}; null: the configured search.{name}"))
            continue
        fields[name] = (None, Field(None, description=f"this deployment's index ({index}) has no {name}: omit it"))

        def refuse(value, name=name):
            if value is not None:
                raise ValueError(f"the index is {index!r}, which has no {name}")
            return value

        validators[f"_no_{name}"] = field_validator(name, mode="before")(refuse)
    return fields, validators


def limited_request_models(limits: LimitsConfig, dim: int | None, served_name: str | None = None,
                           index: str | None = None, knobs=None,
                           ) -> tuple[type[RetrieveRequest], type[EmbeddingRequest]]:
    """RetrieveRequest and EmbeddingRequest with this deployment's limits declared (and enforced
    by validation); ``dim``: the embedding size, when known; ``served_name``: the model name,
    given as the example of ``model``; ``index``/``knobs``: the index type and its search knobs,
    when known (a request may set only those)."""
    text = query_text(limits.max_query_chars)
    knob_fields, knob_validators = _knob_fields(limits, index, knobs)
    retrieve = create_model(
        "RetrieveRequest", __base__=RetrieveRequest, __doc__=RetrieveRequest.__doc__, __validators__=knob_validators,
        query=(text, Field(..., description=f"the search query (not blank, at most {limits.max_query_chars} characters)")),
        top_k=(Integer, Field(10, ge=1, le=limits.max_top_k, description=f"number of hits, 1..{limits.max_top_k}")),
        **knob_fields,
    )
    size = integer(ge=dim, le=dim) if dim else Integer
    size_doc = f"must be {dim} (this model's size) or null" if dim else "the model's embedding size, or null"
    embedding = create_model(
        "EmbeddingRequest", __base__=EmbeddingRequest, __doc__=EmbeddingRequest.__doc__,
        input=(one_or_many(text, limits.max_embedding_inputs),
               Field(..., description=f"one text or 1..{limits.max_embedding_inputs} texts")),
        dimensions=(size | None, Field(None, description=size_doc)),
        model=(Text, Field(..., description=EmbeddingRequest.model_fields["model"].description,
                           examples=[served_name] if served_name else None)),
    )
    return retrieve, embedding


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
    experts_generation: str | None = Field(None, description="the expert generation that served it (gNNNNNN; null: no experts published)")


class ExpertInfo(BaseModel):
    name: str
    num_pilots: int
    routed: bool = Field(True, description="false: the base guard holds it back (it did not beat the base model on "
                         "its domain's dev queries in the served index); its queries go to base, forcing it still works")
    guard: dict[str, Any] | None = Field(None, description="the guard's evidence: dev nDCG@10 of base and expert, "
                                         "the dev queries, the index searched (null: pilots built before the guard)")


class ExpertsResponse(BaseModel):
    base_model: str
    policy: str
    pilot_rule: str = ""  # how the pilots were grouped ("" = not recorded in the pilot file)
    confidence_floor: bool = Field(False, description="queries below every pilot's confidence floor go to base")
    confidence_floor_kind: str | None = Field(None, description="what the floor measures a query's cosine to: "
                                              "'member' (the pilots' training queries) or 'pilot'; null: no floor")
    unknown_corpus_share: float | None = Field(None, description="the corpus guard's share (null: off)")
    corpora_without_expert: list[str] = Field([], description="the index's corpora no expert is named after: routed "
                                              "queries that read like them go to base (empty: the guard has nothing to do)")
    experts: list[ExpertInfo]
    experts_generation: str | None = Field(None, description="the generation these experts belong to (gNNNNNN)")

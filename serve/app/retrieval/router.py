"""The retrieval endpoints: POST /v1/retrieve, POST /v1/embeddings, GET /v1/experts.

The request bodies are the service's limited models (serve.app.retrieval.protocol), so the
OpenAPI spec declares this deployment's limits; ``responses`` lists every status each endpoint
can answer besides 200 (401 only matters when API keys are on).
"""

# no `from __future__ import annotations`: FastAPI reads the body types (local classes) at run time

from fastapi import APIRouter

from ..errors import REQUEST_ERRORS, error_responses
from .protocol import EmbeddingResponse, ExpertsResponse, RetrieveResponse
from .service import RetrievalService


def retrieval_router(service: RetrievalService, metrics=None) -> APIRouter:
    """``metrics`` (serve.app.metrics.Metrics, in the ingress replica): counts the corpus guard's
    answers (the encoder counts the policy's picks before the guard sees the hits)."""
    router = APIRouter()
    RetrieveBody, EmbeddingBody = service.retrieve_model, service.embedding_model

    @router.post("/v1/retrieve", response_model=RetrieveResponse, responses=REQUEST_ERRORS)
    async def retrieve(req: RetrieveBody) -> RetrieveResponse:
        response = await service.retrieve(req)
        if metrics is not None and response.selected_by == "corpus":
            scores = response.routing_scores  # the policy's pick: the expert the guard held back
            metrics.inc("routerserve_corpus_guard", expert=max(scores, key=scores.get) if scores else "")
        return response

    @router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=REQUEST_ERRORS)
    async def embeddings(req: EmbeddingBody) -> EmbeddingResponse:
        return await service.embeddings(req)

    @router.get("/v1/experts", response_model=ExpertsResponse, responses=error_responses(401, 503, 504))
    async def experts() -> ExpertsResponse:
        return await service.experts()

    return router

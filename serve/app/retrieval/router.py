"""The retrieval endpoints: POST /v1/retrieve, POST /v1/embeddings, GET /v1/experts."""

from __future__ import annotations

from fastapi import APIRouter

from ..errors import ERROR_RESPONSES as ERRORS
from .protocol import EmbeddingRequest, EmbeddingResponse, ExpertsResponse, RetrieveRequest, RetrieveResponse
from .service import RetrievalService


def retrieval_router(service: RetrievalService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/retrieve", response_model=RetrieveResponse, responses=ERRORS)
    async def retrieve(req: RetrieveRequest) -> RetrieveResponse:
        return await service.retrieve(req)

    @router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
    async def embeddings(req: EmbeddingRequest) -> EmbeddingResponse:
        return await service.embeddings(req)

    @router.get("/v1/experts", response_model=ExpertsResponse)
    async def experts() -> ExpertsResponse:
        return await service.experts()

    return router

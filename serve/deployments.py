"""Ray Serve deployments: thin wrappers over the plain classes in actors/ and serve.serving.

    HTTP proxy -> RetrievalIngress (FastAPI; GreedyBatcher over concurrent requests)
                    -> ExpertEncoder   (one call per batch: base pass, routing, mixed-expert pass)
                    -> SearchShard0..S-1 (one call per shard per batch, in parallel) -> exact merge
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.encoder import EncoderEngine, EncoderSettings
from actors.index_store import DocStore
from actors.routed_encoder import RoutedEncoder, encoder_info, route_and_encode_requests
from actors.routing import PilotSet
from actors.search import ShardSearcher

from .batching import GreedyBatcher
from .config import BatchConfig, LimitsConfig
from .http import create_app
from .serving import RetrievalService

logger = logging.getLogger(__name__)


@serve.deployment(name="ExpertEncoder")
class ExpertEncoderDeployment:
    """Base encoder + every expert adapter in one replica; batches route+encode across callers
    (several ingress replicas' batches merge here)."""

    def __init__(
        self,
        model_path: str,
        adapters: dict[str, str],
        pilots_path: str | None,
        settings: EncoderSettings,
        policy: str,
        base_model_ref: str,
        batching: dict,
    ):
        engine = EncoderEngine(model_path, adapters, settings)
        pilots = PilotSet.load(pilots_path) if pilots_path else None
        self.encoder = RoutedEncoder(engine, pilots, policy)
        self.base_model_ref = base_model_ref
        b = BatchConfig(**batching)
        self._batched = GreedyBatcher(
            self._run_batch,
            b.max_batch_size,
            b.max_concurrent_batches,
            b.batch_wait_timeout_s,
            size_fn=lambda request: len(request["queries"]),
        )

    async def _run_batch(self, requests: list[dict]) -> list[dict]:
        # torch runs in a worker thread so the replica keeps accepting the next batch meanwhile.
        return await asyncio.to_thread(route_and_encode_requests, self.encoder, requests)

    async def route_and_encode(self, request: dict) -> dict:
        return await self._batched(request)

    async def embed(self, texts: list[str], expert: str | None) -> dict:
        vectors, tokens = await asyncio.to_thread(self.encoder.embed, texts, expert)
        return {"embeddings": vectors, "tokens": tokens}

    def info(self) -> dict:
        return encoder_info(self.encoder, self.base_model_ref)


@serve.deployment(name="SearchShard")
class SearchShardDeployment:
    """One FAISS shard (exact inner product), answering with global row ids."""

    def __init__(self, index_path: str, offset: int, use_gpu: str, num_threads: int | None):
        self.shard = ShardSearcher(index_path, offset, use_gpu=use_gpu, num_threads=num_threads)

    async def search(self, queries: np.ndarray, k: int):
        return await asyncio.to_thread(self.shard.search, queries, k)

    def info(self) -> dict:
        return self.shard.info()


class _HandleEncoderClient:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def route_and_encode(self, request: dict) -> dict:
        return await self.handle.route_and_encode.remote(request)

    async def embed(self, texts, expert):
        return await self.handle.embed.remote(texts, expert)

    async def info(self) -> dict:
        return await self.handle.info.remote()


class _HandleShardClient:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def search(self, queries, k):
        return await self.handle.search.remote(queries, k)

    async def info(self) -> dict:
        return await self.handle.info.remote()


@serve.deployment(name="RetrievalIngress")
@serve.ingress()
class RetrievalIngress:
    def __init__(
        self,
        encoder: DeploymentHandle,
        shards: list[DeploymentHandle],
        docs_path: str,
        limits: dict,
        served_name: str,
        batching: dict,
    ):
        b = BatchConfig(**batching)
        self.service = RetrievalService(
            _HandleEncoderClient(encoder),
            [_HandleShardClient(h) for h in shards],
            DocStore(docs_path),
            LimitsConfig(**limits),
            served_name,
        )
        self.service.enable_batching(
            lambda fn: GreedyBatcher(fn, b.max_batch_size, b.max_concurrent_batches, b.batch_wait_timeout_s)
        )

    def __serve_build_asgi_app__(self):
        return create_app(self.service)

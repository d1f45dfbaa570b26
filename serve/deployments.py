"""Ray Serve deployments: thin wrappers over the plain classes in actors/ and serve.*_serving.

    HTTP proxy -> RetrievalIngress (FastAPI; GreedyBatcher over concurrent requests)
                    -> ExpertEncoder   (one call per batch: base pass, routing, mixed-expert pass)
                    -> SearchShard0..S-1 (one call per shard per batch, in parallel) -> exact merge
               -> RetrievalIngress /v1/chat/completions
                    -> RouterR1Controller (the Router-R1 loop per request, concurrently)
                         -> LLM-<engine> (router and candidate engines: vLLM / transformers / remote)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.encoder import EncoderEngine, EncoderSettings
from actors.index_store import DocStore
from actors.llm_engines import OpenAIEngine, RetrieverEngine
from actors.router_r1 import Completion
from actors.routed_encoder import RoutedEncoder, encoder_info, route_and_encode_requests
from actors.routing import PilotSet
from actors.search import ShardSearcher

from .batching import GreedyBatcher
from .chat_protocol import ChatCompletionRequest
from .chat_serving import ChatService
from .config import BatchConfig, LimitsConfig, LLMConfig, LLMEngineConfig
from .http import api_keys_from_env, create_app
from .metrics import Metrics, record_routing
from .serving import RequestError, RetrievalService

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

        self.metrics = Metrics()

    async def _run_batch(self, requests: list[dict]) -> list[dict]:
        # torch runs in a worker thread so the replica keeps accepting the next batch meanwhile.
        results = await asyncio.to_thread(route_and_encode_requests, self.encoder, requests)
        queries = sum(len(r["queries"]) for r in requests)
        self.metrics.observe("routerserve_encoder_batch_size", queries, stage="route")
        for result in results:
            if "error" not in result:
                record_routing(self.metrics, result)
        return results

    async def route_and_encode(self, request: dict) -> dict:
        return await self._batched(request)

    async def embed(self, texts: list[str], expert: str | None) -> dict:
        vectors, tokens = await asyncio.to_thread(self.encoder.embed, texts, expert)
        self.metrics.observe("routerserve_encoder_batch_size", len(texts), stage="embed")
        return {"embeddings": vectors, "tokens": tokens}

    def info(self) -> dict:
        return encoder_info(self.encoder, self.base_model_ref)


@serve.deployment(name="SearchShard")
class SearchShardDeployment:
    """One FAISS shard (exact inner product), answering with global row ids."""

    def __init__(self, index_path: str, offset: int, use_gpu: str, num_threads: int | None):
        self.shard = ShardSearcher(index_path, offset, use_gpu=use_gpu, num_threads=num_threads)
        self.label = Path(index_path).stem
        self.metrics = Metrics()

    async def search(self, queries: np.ndarray, k: int):
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self.shard.search, queries, k)
        self.metrics.observe("routerserve_shard_search_latency_ms", (time.perf_counter() - t0) * 1e3, shard=self.label)
        return out

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
        chat: DeploymentHandle | None = None,
        api_keys_env: str | None = None,
    ):
        self.api_keys = api_keys_from_env(api_keys_env)  # fails the replica start when the variable is missing
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
        self.chat = _HandleChatClient(chat) if chat is not None else None

    def __serve_build_asgi_app__(self):
        return create_app(self.service, self.chat, Metrics(), self.api_keys)


@serve.deployment(name="LLMEngine")
class LLMEngineDeployment:
    """One LLM engine (router or candidate); Serve's health check is the engine's."""

    async def __init__(self, name: str, engine: dict, model_cache_dir: str):
        from .llm_pool import make_engine

        self.name = name
        self.engine = make_engine(name, LLMEngineConfig.model_validate(engine), Path(model_cache_dir))
        await self.engine.start()

    async def complete(self, prompt: str, max_tokens: int, temperature: float, stop: list[str], regex: str | None) -> dict:
        out = await self.engine.complete(prompt, max_tokens=max_tokens, temperature=temperature, stop=stop, regex=regex)
        return asdict(out)

    async def chat(self, messages: list[dict], max_tokens: int, temperature: float) -> dict:
        return asdict(await self.engine.chat(messages, max_tokens=max_tokens, temperature=temperature))

    async def check_health(self) -> None:
        """Serve's replica health check: a local engine that died restarts the replica; a remote
        one (openai, retriever) is probed by the controller's /healthz instead."""
        if not isinstance(self.engine, (OpenAIEngine, RetrieverEngine)):
            await self.engine.check_health()

    async def probe(self) -> None:
        await self.engine.check_health()


class _HandleEngineClient:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def complete(self, prompt, *, max_tokens, temperature=0.0, stop=(), regex=None) -> Completion:
        return Completion(**await self.handle.complete.remote(prompt, max_tokens, temperature, list(stop), regex))

    async def chat(self, messages, *, max_tokens, temperature=0.0) -> Completion:
        return Completion(**await self.handle.chat.remote(messages, max_tokens, temperature))

    async def check_health(self) -> None:
        await self.handle.probe.remote()


def _error_dict(exc: RequestError) -> dict:
    return {"__error__": {"message": exc.message, "param": exc.param, "status": exc.status}}


@serve.deployment(name="RouterR1Controller")
class RouterR1ControllerDeployment:
    """Runs the Router-R1 loop per request (asyncio: requests interleave, none blocks another),
    calling the engines through handles; tokenizers (chat template, cost bounds) live here."""

    def __init__(self, llm: dict, engines: dict[str, DeploymentHandle]):
        from .llm_pool import chat_template, load_tokenizers, token_counters

        cfg = LLMConfig.model_validate(llm)
        tokenizers = load_tokenizers(cfg)
        router_tok = tokenizers.get(cfg.router.engine) if cfg.router else None
        if cfg.router is not None and router_tok is None:
            raise ValueError(f"llm.engines.{cfg.router.engine}.tokenizer: the router needs a local tokenizer for its chat template")
        self.service = ChatService(
            cfg,
            {name: _HandleEngineClient(h) for name, h in engines.items()},
            chat_template(router_tok, cfg.engines[cfg.router.engine].chat_template) if router_tok is not None else (lambda m: ""),
            token_counters(tokenizers),
        )
        self.service.metrics = Metrics()

    async def chat(self, request: dict) -> dict:
        try:
            return (await self.service.chat(ChatCompletionRequest.model_validate(request))).model_dump()
        except RequestError as exc:
            return _error_dict(exc)

    async def stream(self, request: dict):
        try:
            async for event in self.service.stream(ChatCompletionRequest.model_validate(request)):
                yield event
        except RequestError as exc:
            yield _error_dict(exc)

    def models(self) -> dict:
        return self.service.models().model_dump()

    async def health(self) -> tuple[bool, dict]:
        return await self.service.health()


class _HandleChatClient:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    @staticmethod
    def _raise(out):
        if isinstance(out, dict) and "__error__" in out:
            e = out["__error__"]
            raise RequestError(e["message"], e["param"], e["status"])
        return out

    async def chat(self, req: ChatCompletionRequest) -> dict:
        return self._raise(await self.handle.chat.remote(req.model_dump()))

    async def stream(self, req: ChatCompletionRequest):
        async for event in self.handle.options(stream=True).stream.remote(req.model_dump()):
            yield self._raise(event)

    async def models(self) -> dict:
        return await self.handle.models.remote()

    async def health(self) -> tuple[bool, dict]:
        try:
            return tuple(await self.handle.health.remote())
        except Exception as exc:  # noqa: BLE001 - controller down: unhealthy, not a 500
            return False, {"llm_controller": f"{type(exc).__name__}: {exc}"[:200]}

"""Ray Serve deployments: thin wrappers over the plain classes in actors/ and the services in
serve.app.retrieval / serve.app.chat, each constructed from one settings object (serve.app.settings).

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
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from actors.index_store import DocStore
from actors.llm_engines import OpenAIEngine, RetrieverEngine, TokenizerTokens
from actors.router_r1 import Completion
from actors.routed_encoder import embed_requests, encoder_info, route_and_encode_requests
from actors.search import ShardSearcher

from serve.artifacts.generations import GenerationStore
from serve.artifacts.jobs import JobStore

from .admin.jobs import AdminJobs
from .admin.service import AdminService
from .batching import GreedyBatcher, ServeBatcher
from .chat.llm_pool import chat_template, load_tokenizers, make_engine, prompt_counters
from .chat.protocol import ChatCompletionRequest
from .chat.service import ChatService
from .errors import overloaded
from .health import InFlight
from .ingress import api_keys_from_env, create_app
from .live_experts import LiveExperts, encoder_builder
from .metrics import Metrics, knob_label, record_routing
from .retrieval.service import RetrievalService
from .settings import CONTROLLER, ENCODER, INGRESS
from .settings import ControllerSettings, EncoderDeploymentSettings, EngineDeploymentSettings, IngressSettings, ShardDeploymentSettings


logger = logging.getLogger(__name__)


def _batcher(fn, b, size_fn=None, max_waiting=None, max_queue_wait_s=None) -> GreedyBatcher | ServeBatcher:
    cls = ServeBatcher if b.batcher == "serve_batch" else GreedyBatcher
    return cls(fn, b.max_batch_size, b.max_concurrent_batches, b.batch_wait_timeout_s, size_fn=size_fn,
               max_waiting=max_waiting, max_queue_wait_s=max_queue_wait_s)


@serve.deployment(name=ENCODER)
class ExpertEncoderDeployment:
    """Base encoder + the served generation's expert adapters in one replica; batches route+encode
    across callers (several ingress replicas' batches merge here). The generation switches live
    (serve.app.live_experts): user_config pins one, or the replica follows CURRENT.json."""

    async def __init__(self, settings: EncoderDeploymentSettings):
        s = settings
        self.metrics = Metrics()
        store = GenerationStore(s.experts_dir) if s.experts_dir else None
        # loads nothing yet: Serve calls reconfigure() with the user_config (the pin) right after
        # this constructor, and that first call loads the generation (LiveExperts.start)
        self.live = LiveExperts(store, encoder_builder(s.model_path, s.encoder, s.policy, s.enabled),
                                on_reload=self._record_reload)
        self._watcher = asyncio.get_running_loop().create_task(self.live.watch(s.watch_interval_s))
        self.base_model_ref = s.base_model_ref
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._batched = _batcher(self._run_batch, s.batching, size_fn=lambda request: len(request["queries"]))
        # /v1/embeddings callers share forward passes too (one mixed-adapter pass per batch)
        self._embed_batched = _batcher(self._run_embed_batch, s.batching, size_fn=lambda request: len(request["texts"]))
        self.in_flight = InFlight()
        self.stuck_after_s = s.stuck_after_s

    def _record_generation(self) -> None:
        gen = self.live.active[0]
        self.metrics.set("routerserve_experts_generation", 0 if gen is None else int(gen[1:]))

    def _record_reload(self, generation: str, seconds: float, ok: bool) -> None:
        self.metrics.inc("routerserve_experts_reloads", outcome="ok" if ok else "failed")
        if ok:
            self.metrics.observe("routerserve_experts_reload_seconds", seconds)
            self._record_generation()

    async def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config ({"generation": "current" | "gNNNNNN"}): the first load, or a switch
        off the request path (a generation that does not load leaves the old one serving)."""
        await self.live.reconfigure(user_config)
        self._record_generation()

    async def _run_batch(self, requests: list[dict]) -> list[dict]:
        generation, encoder = self.live.active  # the whole batch runs on one generation
        # torch runs in a worker thread so the replica keeps accepting the next batch meanwhile.
        with self.in_flight.track():
            results = await asyncio.to_thread(route_and_encode_requests, encoder, requests)
        queries = sum(len(r["queries"]) for r in requests)
        self.metrics.observe("routerserve_encoder_batch_size", queries, stage="route")
        for result in results:
            result["generation"] = generation
            if "error" not in result:
                record_routing(self.metrics, result)
        return results

    async def route_and_encode(self, request: dict) -> dict:
        return await self._batched(request)

    async def _run_embed_batch(self, requests: list[dict]) -> list[dict]:
        generation, encoder = self.live.active  # the whole batch runs on one generation
        with self.in_flight.track():
            results = await asyncio.to_thread(embed_requests, encoder, requests)
        self.metrics.observe("routerserve_encoder_batch_size", sum(len(r["texts"]) for r in requests), stage="embed")
        for result in results:  # an expert removed since the ingress checked its (older) list: {"error"}
            result["generation"] = generation
        return results

    async def embed(self, texts: list[str], expert: str | None) -> dict:
        return await self._embed_batched({"texts": texts, "expert": expert})

    async def embed_many(self, requests: list[dict]) -> list[dict]:
        """An ingress's batch of /v1/embeddings requests: each joins this replica's batcher, so
        batches from several ingress replicas merge into one forward pass too."""
        results = await asyncio.gather(*(self._embed_batched(r) for r in requests), return_exceptions=True)
        # one request's failure is its own (the batcher retried it alone), never its neighbours'
        return [{"exception": r} if isinstance(r, BaseException) else r for r in results]

    def check_health(self) -> None:
        """Serve's health check: fails when a torch call has been running past limits.stuck_after_s."""
        self.in_flight.check(ENCODER, self.stuck_after_s)

    def info(self) -> dict:
        generation, encoder = self.live.active
        return {**encoder_info(encoder, self.base_model_ref), "generation": generation, "replica": self.replica,
                "generation_pin": self.live.pin, "failed_generations": dict(self.live.failed)}


@serve.deployment(name="SearchShard")  # named SearchShard<i> by the builder (settings.shard_name)
class SearchShardDeployment:
    """One FAISS shard (index.factory, inner product), answering with global row ids."""

    def __init__(self, settings: ShardDeploymentSettings):
        s = settings
        self.shard = ShardSearcher(s.index_path, s.offset, use_gpu=s.use_gpu, num_threads=s.num_threads,
                                   factory=s.factory, defaults=s.search_defaults, mmap=s.mmap)
        self.label = Path(s.index_path).stem
        self.metrics = Metrics()
        self.in_flight = InFlight()
        self.stuck_after_s = s.stuck_after_s

    async def search(self, queries: np.ndarray, k: int, knobs: dict[str, int] | None = None):
        t0 = time.perf_counter()
        extra = sorted(set(knobs or {}) - set(self.shard.knobs))
        if extra:  # the ingress validated the request against another index (a rollout changing index.factory)
            logger.warning("shard %s (%s) has no search knob %s: searching with its own", self.label, self.shard.factory, extra)
            knobs = {n: v for n, v in knobs.items() if n in self.shard.knobs}
        knobs = self.shard.resolve_knobs(knobs)
        with self.in_flight.track():
            out = await asyncio.to_thread(self.shard.search, queries, k, knobs)
        self.metrics.observe("routerserve_shard_search_latency_ms", (time.perf_counter() - t0) * 1e3, shard=self.label,
                             index=self.shard.factory, knob=knob_label(knobs, self.shard.defaults))
        return out

    def check_health(self) -> None:
        """Serve's health check: fails when a FAISS search has been running past limits.stuck_after_s."""
        self.in_flight.check(f"search shard {self.label}", self.stuck_after_s)

    def info(self) -> dict:
        return self.shard.info()


class _ReplicaCalls:
    """Calls to a deployment through its handle. A replica that dies or is unreachable while it
    holds the call (Ray's RayActorError: killed, crashed, node lost) is a 503 + Retry-After naming
    the deployment — Serve is replacing it, a retry will find another — never a 500."""

    def __init__(self, handle: DeploymentHandle, retry_after_s: int):
        self.handle, self.retry_after_s = handle, retry_after_s

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.handle, method).remote(*args)
        except RayActorError as exc:
            raise overloaded(f"a {self.handle.deployment_name} replica was lost during the call ({type(exc).__name__}); "
                             "retry", self.retry_after_s) from None


class _HandleEncoderClient(_ReplicaCalls):
    async def route_and_encode(self, request: dict) -> dict:
        return await self._call("route_and_encode", request)

    async def embed(self, texts, expert):
        return await self._call("embed", texts, expert)

    async def embed_many(self, requests):
        return await self._call("embed_many", requests)

    async def info(self) -> dict:
        return await self._call("info")


class _HandleShardClient(_ReplicaCalls):
    async def search(self, queries, k, knobs=None):
        return await self._call("search", queries, k, knobs)

    async def info(self) -> dict:
        return await self._call("info")


@serve.deployment(name=INGRESS)
@serve.ingress()
class RetrievalIngress:
    """The HTTP app (serve.app.ingress) over the encoder, the shards and, when enabled, the
    Router-R1 controller."""

    def __init__(
        self,
        settings: IngressSettings,
        encoder: DeploymentHandle,
        shards: list[DeploymentHandle],
        chat: DeploymentHandle | None = None,
    ):
        s = settings
        self.api_keys = api_keys_from_env(s.api_keys_env)  # fails the replica start when the variable is missing
        self.admin_keys = api_keys_from_env(s.admin_keys_env, "http.admin_keys_env")
        self.admin_open = s.admin_open
        self.max_body_bytes = s.limits.max_body_bytes
        encoder_client = _HandleEncoderClient(encoder, s.limits.retry_after_s)
        self.service = RetrievalService(
            encoder_client,
            [_HandleShardClient(h, s.limits.retry_after_s) for h in shards],
            DocStore(s.docs_path),
            s.limits,
            s.served_name,
            s.dim,
            s.index_factory,
            s.search_defaults,
            s.unknown_corpus_share,
            s.corpora,
        )
        admission = dict(max_waiting=s.limits.max_waiting, max_queue_wait_s=s.limits.max_queue_wait_s)
        self.service.enable_batching(lambda fn: _batcher(fn, s.batching, **admission),
                                     lambda fn: _batcher(fn, s.batching, size_fn=lambda r: len(r["texts"]), **admission))
        self.chat = _HandleChatClient(chat, s.chat_models) if chat is not None else None
        jobs = AdminJobs(JobStore(s.experts_dir), s.jobs) if s.experts_dir is not None and s.jobs is not None else None
        self.admin = (AdminService(GenerationStore(s.experts_dir), s.generation_pin, encoder_client.info, jobs)
                      if s.experts_dir is not None else None)

    def __serve_build_asgi_app__(self):
        return create_app(self.service, self.chat, Metrics(), self.api_keys, self.max_body_bytes,
                          admin=self.admin, admin_keys=self.admin_keys, admin_open=self.admin_open)


@serve.deployment(name="LLMEngine")
class LLMEngineDeployment:
    """One LLM engine (router or candidate); Serve's health check is the engine's."""

    async def __init__(self, settings: EngineDeploymentSettings):
        self.name = settings.name
        self.engine = make_engine(settings.name, settings.engine, Path(settings.model_cache_dir),
                                  settings.model_cache_writable)
        await self.engine.start()

    async def complete(self, prompt: str, max_tokens: int, temperature: float, stop: list[str], regex: str | None) -> dict:
        out = await self.engine.complete(prompt, max_tokens=max_tokens, temperature=temperature, stop=stop, regex=regex)
        return asdict(out)

    async def chat(self, messages: list[dict], max_tokens: int, temperature: float, seed: int | None = None) -> dict:
        return asdict(await self.engine.chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed))

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

    async def chat(self, messages, *, max_tokens, temperature=0.0, seed=None) -> Completion:
        return Completion(**await self.handle.chat.remote(messages, max_tokens, temperature, seed))

    async def check_health(self) -> None:
        await self.handle.probe.remote()


@serve.deployment(name=CONTROLLER)
class RouterR1ControllerDeployment:
    """Runs the Router-R1 loop per request (asyncio: requests interleave, none blocks another),
    calling the engines through handles; tokenizers (chat template, cost bounds) live here.
    A RequestError raised here (unknown model, engine down) reaches the ingress as itself."""

    def __init__(self, settings: ControllerSettings, engines: dict[str, DeploymentHandle]):
        cfg = settings.llm
        tokenizers = load_tokenizers(cfg)
        router_tok = tokenizers.get(cfg.router.engine) if cfg.router else None
        if cfg.router is not None and router_tok is None:
            raise ValueError(f"llm.engines.{cfg.router.engine}.tokenizer: the router needs a local tokenizer for its chat template")
        self.service = ChatService(
            cfg,
            {name: _HandleEngineClient(h) for name, h in engines.items()},
            chat_template(router_tok, cfg.engines[cfg.router.engine].chat_template) if router_tok is not None else (lambda m: ""),
            prompt_counters(tokenizers, cfg),
            router_tokens=TokenizerTokens(router_tok) if router_tok is not None else None,
        )
        self.service.metrics = Metrics()

    async def chat(self, request: dict) -> dict:
        return (await self.service.chat(ChatCompletionRequest.model_validate(request))).model_dump()

    async def stream(self, request: dict):
        async for event in self.service.stream(ChatCompletionRequest.model_validate(request)):
            yield event

    def models(self) -> dict:
        return self.service.models().model_dump()

    async def health(self) -> tuple[bool, dict]:
        return await self.service.health()


class _HandleChatClient:
    def __init__(self, handle: DeploymentHandle, model_names: list[str]):
        self.handle, self.model_names = handle, model_names

    async def chat(self, req: ChatCompletionRequest) -> dict:
        return await self.handle.chat.remote(req.model_dump())

    async def stream(self, req: ChatCompletionRequest):
        async for event in self.handle.options(stream=True).stream.remote(req.model_dump()):
            yield event

    async def models(self) -> dict:
        return await self.handle.models.remote()

    async def health(self) -> tuple[bool, dict]:
        try:
            return tuple(await self.handle.health.remote())
        except Exception as exc:  # noqa: BLE001 - controller down: unhealthy, not a 500
            return False, {"llm_controller": f"{type(exc).__name__}: {exc}"[:200]}

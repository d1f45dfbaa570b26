"""RetrievalService: the request logic behind /v1/retrieve, /v1/embeddings, /v1/experts, /healthz.

Plain class, no Ray: it talks to an encoder and to S shards through the small async client
protocols below. In Serve those clients wrap deployment handles (serve.app.deployments); in tests
and the in-process benchmark they are local objects (LocalEncoderClient, LocalShardClient).

Per batch of concurrent requests there is ONE encoder call (route + expert re-encode for every
query of the batch) and ONE call per shard (the stacked query matrix; one per shard per distinct set
of search knobs when requests set nprobe/ef_search), then an exact merge per set. While the index
holds a corpus no expert is named after, the rows routed to an expert ride along in that shard call
a second time, with their base embedding: the corpus guard (actors.routing.unknown_corpus_guard)
reads those hits' corpora and sends a query that reads like an unknown corpus to base, answering
with the base hits it already has.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from actors.encoder import BASE
from actors.index_store import DocStore
from actors.routed_encoder import RoutedEncoder, embed_requests, encoder_info, route_and_encode_requests
from actors.routing import CORPUS_VOTE_K, unknown_corpora, unknown_corpus_guard
from actors.search import ShardSearcher, merge_topk

from serve.config import LimitsConfig

from ..batching import QueueFull
from ..errors import RequestError, overloaded
from .protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ExpertInfo,
    ExpertsResponse,
    Hit,
    RetrieveRequest,
    RetrieveResponse,
    Usage,
    limited_request_models,
)


class EncoderClient(Protocol):
    async def route_and_encode(self, request: dict) -> dict: ...
    async def embed(self, texts: list[str], expert: str | None) -> dict: ...
    async def embed_many(self, requests: list[dict]) -> list[dict]: ...
    async def info(self) -> dict: ...


class ShardClient(Protocol):
    async def search(self, queries: np.ndarray, k: int, knobs: dict[str, int] | None = None,
                     ) -> tuple[np.ndarray, np.ndarray]: ...
    async def info(self) -> dict: ...


class LocalEncoderClient:
    """EncoderClient over an in-process RoutedEncoder (tests, in-process benchmark)."""

    def __init__(self, encoder: RoutedEncoder, base_model: str = ""):
        self.encoder = encoder
        self.base_model = base_model

    async def route_and_encode(self, request: dict) -> dict:
        return route_and_encode_requests(self.encoder, [request])[0]

    async def embed(self, texts: list[str], expert: str | None) -> dict:
        vectors, tokens = self.encoder.embed(texts, expert)
        return {"embeddings": vectors, "tokens": tokens}

    async def embed_many(self, requests: list[dict]) -> list[dict]:
        return embed_requests(self.encoder, requests)

    async def info(self) -> dict:
        return encoder_info(self.encoder, self.base_model)


class LocalShardClient:
    def __init__(self, shard: ShardSearcher):
        self.shard = shard

    async def search(self, queries: np.ndarray, k: int, knobs: dict[str, int] | None = None):
        return self.shard.search(queries, k, knobs)

    async def info(self) -> dict:
        return self.shard.info()


SHARD_SHARE = 0.9  # of limits.request_timeout_s, counted from the batch's start: the shards' deadline


@dataclass
class RetrieveItem:
    query: str
    top_k: int
    expert: str | None
    include_text: bool
    knobs: tuple[tuple[str, int], ...] = ()  # the search knobs it runs with (sorted (name, value) pairs)
    arrived: float = field(default_factory=time.perf_counter)


class RetrievalService:
    def __init__(
        self,
        encoder: EncoderClient,
        shards: list[ShardClient],
        docs: DocStore,
        limits: LimitsConfig,
        served_name: str,
        dim: int | None = None,
        index: str = "Flat",
        search_defaults: dict[str, int] | None = None,
        unknown_corpus_share: float | None = None,
        corpora: list[str] | None = None,
    ):
        """``dim``: the embedding size (the index's), declared in the API's request models;
        ``index``: the shards' factory string; ``search_defaults``: its search knobs and their
        configured values (a request may set only these); ``unknown_corpus_share``: the corpus
        guard's share (experts.unknown_corpus_share; None: off); ``corpora``: the index's datasets
        (its manifest's; None: read from the doc store, a pass over one column)."""
        if not shards:
            raise ValueError("at least one shard is required")
        self.encoder = encoder
        self.shards = shards
        self.docs = docs
        self.limits = limits
        self.served_name = served_name
        self.index = index
        self.search_defaults = dict(search_defaults or {})
        self.unknown_corpus_share = unknown_corpus_share
        self.corpora = list(corpora) if corpora is not None else docs.corpora() if unknown_corpus_share is not None else []
        # the request models the HTTP API validates with: this deployment's limits declared
        self.retrieve_model, self.embedding_model = limited_request_models(limits, dim, served_name, index,
                                                                           tuple(self.search_defaults))
        # Alone each request is its own batch; Serve's ingress calls enable_batching(GreedyBatcher).
        self._submit: Callable[[RetrieveItem], Awaitable[dict]] = self._single
        self._submit_embed: Callable[[dict], Awaitable[dict]] = self._embed_single
        self._info: dict | None = None
        self._info_lock = asyncio.Lock()

    def enable_batching(self, decorate: Callable, decorate_embed: Callable | None = None) -> None:
        """Batch concurrent requests: ``decorate`` wraps retrieve_many, ``decorate_embed`` (when
        given) embed_many (serve.app.batching.GreedyBatcher, with the ingress's admission; the
        embeddings batcher sized by texts, so a one-text request never waits behind a batch of
        thousands): one encoder call per batch of /v1/retrieve requests, one per batch of
        /v1/embeddings requests."""
        self._submit = decorate(self.retrieve_many)
        if decorate_embed is not None:
            self._submit_embed = decorate_embed(self.embed_many)

    async def _single(self, item: RetrieveItem) -> dict:
        return (await self.retrieve_many([item]))[0]

    async def _embed_single(self, request: dict) -> dict:
        return (await self.embed_many([request]))[0]

    async def embed_many(self, requests: list[dict]) -> list[dict]:
        """One encoder call for a batch of /v1/embeddings requests ({"texts", "expert"}). A failure
        that is not one request's fault (the encoder down, the deadline passed) comes back as each
        request's ``exception`` instead of raising (see retrieve_many)."""
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                return list(await self.encoder.embed_many(requests))
        except TimeoutError:
            return [{"exception": self._deadline_error()} for _ in requests]
        except RequestError as exc:
            return [{"exception": exc} for _ in requests]

    async def encoder_info(self, refresh: bool = False) -> dict:
        """The encoder's experts, dim and policy, cached until a response shows another expert
        generation (``_saw_generation``) or ``refresh``."""
        stale = self._info
        if self._info is None or refresh:
            async with self._info_lock:
                if self._info is None or self._info is stale:
                    self._info = await self._within_deadline(self.encoder.info())
        return self._info

    def _saw_generation(self, generation: str | None) -> None:
        """An encoder answered from ``generation``: the cached expert list is dropped when it is
        another one, so the next request checks against the new list."""
        if self._info is not None and self._info.get("generation") != generation:
            self._info = None

    async def _check_expert_fresh(self, name: str | None, message: str, param: str, ok: bool = True) -> dict:
        """``check_expert`` against the cached list; an expert the cache does not know is looked up
        once more (an expert added since) before it is refused."""
        info = await self.encoder_info()
        known = {e["name"] for e in info["experts"]}
        if ok and name and name != BASE and name not in known:
            info = await self.encoder_info(refresh=True)
        self.check_expert(info, name, message, param, ok)
        return info

    @staticmethod
    def check_expert(info: dict, name: str | None, message: str, param: str, ok: bool = True) -> None:
        """404 unless ``ok`` and ``name`` is None, 'base' or a loaded expert (the encoder's list): the
        one expert check of the API (the encoder re-checks only to fail a bad row alone in a batch)."""
        known = [e["name"] for e in info["experts"]]
        if not ok or (name and name != BASE and name not in known):
            raise RequestError(f"{message}; available: {[BASE, *known]}", param, 404)

    # -- /v1/retrieve ------------------------------------------------------------------------

    async def retrieve(self, req: RetrieveRequest) -> RetrieveResponse:
        """``req`` has passed ``self.retrieve_model`` (the limits, declared in the spec); what
        needs the encoder (the expert's name) is checked here."""
        query = req.query.strip()
        info = await self._check_expert_fresh(req.expert, f"unknown expert {req.expert!r}", "expert")
        item = RetrieveItem(query, req.top_k, req.expert, req.include_text, self.search_knobs(req))
        result = await self._within_deadline(self._submit(item))
        if "error" in result:
            raise result["error"]
        result["timings_ms"]["total_ms"] = (time.perf_counter() - item.arrived) * 1e3
        return RetrieveResponse(query=query, policy=info["policy"], **result)

    def search_knobs(self, req: RetrieveRequest) -> tuple[tuple[str, int], ...]:
        """The configured knobs, overridden by the request's (bounded by its model); a knob this
        index does not have is a 422 naming it."""
        knobs = dict(self.search_defaults)
        for name in ("nprobe", "ef_search"):
            value = getattr(req, name, None)
            if value is None:
                continue
            if name not in knobs:
                has = f"its knob: {next(iter(knobs))}" if knobs else "exact search has no knob"
                raise RequestError(f"{name}: the index is {self.index!r}, which has no {name} ({has})", name, 422)
            knobs[name] = int(value)
        return tuple(sorted(knobs.items()))

    async def _within_deadline(self, awaitable):
        """Every request answers within limits.request_timeout_s (504 past it) and is refused at
        once (503 + Retry-After) when too many wait for a batch slot already."""
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                return await awaitable
        except TimeoutError:
            raise self._deadline_error() from None
        except QueueFull as exc:
            raise overloaded(f"the service is at capacity ({exc}); retry later", self.limits.retry_after_s) from None

    async def retrieve_many(self, items: list[RetrieveItem]) -> list[dict]:
        """One encoder call and one call per shard for the whole batch. A failure that is not one
        item's fault (a shard down, the deadline passed) comes back as each item's ``error``
        instead of raising, so the batcher does not retry the batch item by item against the same
        outage. The batch has the request deadline too: a stuck downstream call is cancelled and
        frees the batch slot, instead of holding it for every later request."""
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                return await self._retrieve_batch(items)
        except TimeoutError:
            return [{"error": self._deadline_error()} for _ in items]

    def _deadline_error(self) -> RequestError:
        return RequestError(f"no answer within {self.limits.request_timeout_s:g} s (limits.request_timeout_s)", None, 504)

    async def _retrieve_batch(self, items: list[RetrieveItem]) -> list[dict]:
        t0 = time.perf_counter()
        request = {"queries": [it.query for it in items], "forced": [it.expert for it in items]}
        if self.unknown_corpus_share is not None:  # the encoder names the corpora its experts leave unknown
            request["corpora"] = self.corpora
        routed = await self.encoder.route_and_encode(request)
        self._saw_generation(routed.get("generation"))
        if "error" in routed:
            return [{"error": RequestError(routed["error"], "expert", 404)} for _ in items]
        t1 = time.perf_counter()
        matrix = np.asarray(routed["embeddings"], dtype=np.float32)
        kmax = max(it.top_k for it in items)
        unknown = routed.get("unknown_corpora") or []
        # the corpus guard's voters: items the policy routed to an expert, searched again as base rows below
        voters = [i for i, (e, how) in enumerate(zip(routed["experts"], routed["how"]))
                  if how == "routed" and e != BASE] if unknown else []
        if voters:
            matrix = np.vstack([matrix, np.asarray(routed["base_embeddings"], dtype=np.float32)[voters]])
            kmax = max(kmax, CORPUS_VOTE_K)
        item_of = list(range(len(items))) + voters  # matrix row -> item
        groups: dict[tuple, list[int]] = {}  # rows by search knobs: one call per shard per group (mostly one)
        for row, i in enumerate(item_of):
            groups.setdefault(items[i].knobs, []).append(row)
        # the shards get what is left of the batch's deadline, less a margin for the answer: a shard
        # that does not answer in time is named in a 503, not hidden behind a 504 for the request
        budget = max(0.01, SHARD_SHARE * self.limits.request_timeout_s - (time.perf_counter() - t0))
        calls = [(knobs, rows, shard) for knobs, rows in groups.items() for shard in range(len(self.shards))]
        tasks = [asyncio.ensure_future(self.shards[shard].search(matrix if len(groups) == 1 else matrix[rows], kmax,
                                                                 dict(knobs)))
                 for knobs, rows, shard in calls]
        try:
            _, late = await asyncio.wait(tasks, timeout=budget)
        finally:  # late shards, or all of them when this batch is cancelled
            for task in tasks:
                task.cancel()
        parts = [TimeoutError(f"no answer within {budget:.2g} s") if t in late else t.exception() or t.result()
                 for t in tasks]
        failed = sorted({shard for (_, _, shard), p in zip(calls, parts) if isinstance(p, BaseException)})
        if failed:  # never a silently partial result: the answer names the missing shards
            cause = next(p for p in parts if isinstance(p, BaseException))
            why = (cause.message if isinstance(cause, RequestError)
                   else f"TimeoutError: {cause}" if isinstance(cause, TimeoutError) else type(cause).__name__)
            error = overloaded(f"search shard(s) {failed} failed ({why}); no partial results are returned",
                               self.limits.retry_after_s)
            return [{"error": error} for _ in items]
        scores = np.full((len(item_of), kmax), -np.inf, dtype=np.float32)
        ids = np.full((len(item_of), kmax), -1, dtype=np.int64)
        for knobs, rows in groups.items():
            s, r = merge_topk([p for (k, _, _), p in zip(calls, parts) if k == knobs], kmax)
            scores[rows, : s.shape[1]], ids[rows, : r.shape[1]] = s, r
        t2 = time.perf_counter()
        timings = {
            "encode_ms": (t1 - t0) * 1e3,
            "search_ms": (t2 - t1) * 1e3,
            "batch_size": float(len(items)),
            "corpus_guard_rows": float(len(voters)),
            **{k: float(v) for k, v in routed["timings_ms"].items()},
        }
        # the doc store is memory-mapped: a hit may wait on the disk, so the answers are made off the event loop
        return await asyncio.to_thread(self._answers, items, scores, ids, routed, timings, t0, voters, unknown)

    def _corpus_guard(self, scores: np.ndarray, ids: np.ndarray, routed: dict, voters: list[int],
                      unknown: list[str]) -> tuple[list[str], list[str]]:
        """(expert, selected_by) per item after the corpus guard: a voter whose base hits (the rows
        after the items') come mostly from unknown corpora answers with those hits, as base."""
        experts, how = list(routed["experts"]), list(routed["how"])
        n = len(experts)
        corpora = [[self.docs.field("dataset", int(r)) for r in ids[n + j, :CORPUS_VOTE_K] if r >= 0]
                   for j in range(len(voters))]
        for j, held in enumerate(unknown_corpus_guard(corpora, unknown, self.unknown_corpus_share)):
            if held:
                i = voters[j]
                scores[i], ids[i] = scores[n + j], ids[n + j]
                experts[i], how[i] = BASE, "corpus"
        return experts, how

    def _answers(self, items: list[RetrieveItem], scores: np.ndarray, ids: np.ndarray, routed: dict, timings: dict,
                 t0: float, voters: list[int], unknown: list[str]) -> list[dict]:
        experts, how = self._corpus_guard(scores, ids, routed, voters, unknown)
        out = []
        for i, it in enumerate(items):
            hits = [
                self.docs.hit(int(r), float(s), it.include_text)
                for s, r in zip(scores[i, : it.top_k], ids[i, : it.top_k])
                if r >= 0
            ]
            out.append(
                {
                    "expert": experts[i],
                    "forced": routed["forced"][i],
                    "selected_by": how[i],
                    "routing_scores": routed["routing_scores"][i],
                    "hits": [Hit(**h) for h in hits],
                    "index": self.index,
                    "search_params": dict(it.knobs),
                    "timings_ms": dict(timings, queue_ms=(t0 - it.arrived) * 1e3),
                    "experts_generation": routed.get("generation"),
                }
            )
        return out

    # -- /v1/embeddings ------------------------------------------------------------------------

    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse:
        model, _, expert = req.model.partition(":")
        info = await self._check_expert_fresh(expert or None, f"unknown model {req.model!r} (use {self.served_name!r} "
                                              f"or '{self.served_name}:<expert>')", "model",
                                              ok=model in (self.served_name, BASE))
        texts = [req.input] if isinstance(req.input, str) else list(req.input)  # validated: 1..max texts
        if req.dimensions is not None and req.dimensions != info["dim"]:
            raise RequestError(f"dimensions must be {info['dim']} (this model's size) or omitted", "dimensions", 422)
        result = await self._within_deadline(self._submit_embed({"texts": texts, "expert": expert or None}))
        if "exception" in result:
            raise result["exception"]
        self._saw_generation(result.get("generation"))
        if "error" in result:  # the expert left the served generation after the check above
            raise RequestError(f"{result['error']} (generation {result.get('generation')})", "model", 404)
        vectors = np.asarray(result["embeddings"], dtype=np.float32)
        data = [
            EmbeddingData(
                index=i,
                embedding=base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64" else v.tolist(),
            )
            for i, v in enumerate(vectors)
        ]
        tokens = int(sum(result["tokens"]))
        return EmbeddingResponse(data=data, model=req.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
                                 experts_generation=result.get("generation"))

    # -- /v1/experts, /healthz -------------------------------------------------------------------

    async def experts(self) -> ExpertsResponse:
        info = await self.encoder_info(refresh=True)  # one small call: never a stale list
        return ExpertsResponse(
            base_model=info["base_model"],
            policy=info["policy"],
            pilot_rule=info.get("pilot_rule", ""),
            confidence_floor=info.get("confidence_floor", False),
            confidence_floor_kind=info.get("confidence_floor_kind"),
            unknown_corpus_share=self.unknown_corpus_share,
            corpora_without_expert=(unknown_corpora(self.corpora, [e["name"] for e in info["experts"]])
                                    if self.unknown_corpus_share is not None else []),
            experts=[ExpertInfo(**e) for e in info["experts"]],
            experts_generation=info.get("generation"),
        )

    async def health(self, timeout_s: float = 5.0) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {"num_docs": len(self.docs)}
        try:
            enc, *shards = await asyncio.wait_for(
                asyncio.gather(self.encoder.info(), *(s.info() for s in self.shards)), timeout_s
            )
        except Exception as exc:  # any part not loaded/answering → not ready
            return False, {**detail, "error": f"{type(exc).__name__}: {exc}"}
        total = sum(int(s["ntotal"]) for s in shards)
        detail.update(
            experts=[e["name"] for e in enc["experts"]],
            experts_generation=enc.get("generation"),
            encoder_device=enc.get("device"),
            shards=shards,
        )
        if total != len(self.docs):
            return False, {**detail, "error": f"shards hold {total} vectors for {len(self.docs)} documents"}
        return True, detail


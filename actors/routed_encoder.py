"""RoutedEncoder: the RouterRetriever query path inside one encoder replica.

1. embed every query with the base model (adapters disabled);
2. score experts with the routing policy over the pilot embeddings, pick the best per query —
   or the base model, below every pilot's confidence floor or for an expert its base guard holds
   back (actors.routing.route);
3. encode the queries again in ONE mixed-adapter forward pass (each row with its own expert).

Queries routed to (or forced to) the base model reuse their first-pass embedding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .encoder import BASE, EncoderEngine
from .routing import DEFAULT_POLICY, PilotSet, get_policy, route, unknown_corpora


@dataclass
class RoutedQuery:
    embedding: np.ndarray
    expert: str
    routing_scores: dict[str, float]
    forced: bool
    how: str = "routed"  # forced | routed | floor (no pilot's floor reached) | guard (held back by its base guard)
    base_embedding: np.ndarray | None = None  # the first pass: what the corpus guard searches (service)


@dataclass
class RoutedBatch:
    queries: list[RoutedQuery]
    timings_ms: dict[str, float] = field(default_factory=dict)


class UnknownExpertError(KeyError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown expert {self.name!r}; available: {[BASE, *self.known]}"


class RoutedEncoder:
    def __init__(self, engine: EncoderEngine, pilots: PilotSet | None, policy: str = DEFAULT_POLICY):
        self.engine = engine
        self.policy = get_policy(policy)
        experts = engine.experts
        pilots = pilots if pilots is not None else PilotSet.empty(engine.dim)
        missing = [e for e in experts if e not in pilots.expert_names]
        if missing:
            raise ValueError(f"experts without pilot embeddings: {missing} (run 'routerserve experts train --domain NAME')")
        self.pilots = pilots.restrict(experts)
        if self.pilots.embeddings.shape[0] and self.pilots.dim != engine.dim:
            raise ValueError(
                f"pilot dim {self.pilots.dim} != encoder dim {engine.dim}: pilots were built with another base model"
            )
        self.experts = self.pilots.expert_names  # routing column order

    def check_expert(self, name: str | None) -> None:
        if name is not None and name != BASE and name not in self.experts:
            raise UnknownExpertError(name, self.experts)

    def route_and_encode(
        self, queries: list[str], forced: list[str | None] | None = None
    ) -> RoutedBatch:
        forced = forced or [None] * len(queries)
        for name in forced:
            self.check_expert(name)
        t0 = time.perf_counter()
        base = self.engine.encode(queries, BASE)
        t1 = time.perf_counter()
        chosen, scores, how = route(base, self.pilots, self.policy)
        final_expert = [f if f is not None else c for f, c in zip(forced, chosen)]
        t2 = time.perf_counter()
        out = base.copy()
        rows = [i for i, e in enumerate(final_expert) if e != BASE]
        if rows:
            out[rows] = self.engine.encode([queries[i] for i in rows], [final_expert[i] for i in rows])
        t3 = time.perf_counter()
        results = [
            RoutedQuery(
                embedding=out[i],
                expert=final_expert[i],
                routing_scores={n: float(scores[i, j]) for j, n in enumerate(self.experts)},
                forced=forced[i] is not None,
                how="forced" if forced[i] is not None else how[i],
                base_embedding=base[i],
            )
            for i in range(len(queries))
        ]
        return RoutedBatch(
            results,
            {
                "base_encode_ms": (t1 - t0) * 1e3,
                "route_ms": (t2 - t1) * 1e3,
                "expert_encode_ms": (t3 - t2) * 1e3,
            },
        )

    def embed(self, texts: list[str], expert: str | None) -> tuple[np.ndarray, list[int]]:
        self.check_expert(expert)
        return self.engine.encode(texts, expert or BASE), self.engine.count_tokens(texts)


def embed_requests(encoder: RoutedEncoder, requests: list[dict]) -> list[dict]:
    """Serve one batch made of several /v1/embeddings callers ({"texts": [...], "expert": name or
    None}): every text of every request in one mixed-adapter pass (each row with its request's
    expert, base rows untouched), split back per request ({"embeddings", "tokens"}). An unknown
    expert fails its request alone ({"error"}), not the batch."""
    results: list[dict | None] = [None] * len(requests)
    good: list[int] = []
    texts: list[str] = []
    adapters: list[str] = []
    for i, req in enumerate(requests):
        try:
            encoder.check_expert(req.get("expert"))
        except UnknownExpertError as exc:
            results[i] = {"error": str(exc)}
            continue
        good.append(i)
        texts += list(req["texts"])
        adapters += [req.get("expert") or BASE] * len(req["texts"])
    if texts:
        vectors = encoder.engine.encode(texts, adapters)
        tokens = encoder.engine.count_tokens(texts)
        pos = 0
        for i in good:
            n = len(requests[i]["texts"])
            results[i] = {"embeddings": vectors[pos : pos + n], "tokens": tokens[pos : pos + n]}
            pos += n
    return results  # type: ignore[return-value]


def route_and_encode_requests(encoder: RoutedEncoder, requests: list[dict]) -> list[dict]:
    """Serve one batch made of several callers' requests ({"queries": [...], "forced": [...]},
    optionally "corpora": the index's datasets, for the corpus guard).

    All queries of all requests go through one base pass and one mixed-expert pass; the results
    are split back per request. An invalid request (unknown expert) fails alone, not the batch.
    Where the request's corpora include some no expert of this batch is named after
    (actors.routing.unknown_corpora), the result names them and carries the base pass's
    embeddings, which the corpus guard searches; otherwise neither travels back.
    """
    results: list[dict | None] = [None] * len(requests)
    good: list[int] = []
    for i, req in enumerate(requests):
        try:
            for name in req.get("forced") or []:
                encoder.check_expert(name)
            good.append(i)
        except UnknownExpertError as exc:
            results[i] = {"error": str(exc)}
    queries: list[str] = []
    forced: list[str | None] = []
    for i in good:
        qs = list(requests[i]["queries"])
        queries += qs
        forced += list(requests[i].get("forced") or [None] * len(qs))
    if queries:
        batch = encoder.route_and_encode(queries, forced)
        pos = 0
        for i in good:
            n = len(requests[i]["queries"])
            part = batch.queries[pos : pos + n]
            pos += n
            unknown = unknown_corpora(requests[i]["corpora"], encoder.experts) if requests[i].get("corpora") else []
            results[i] = {
                "embeddings": np.stack([q.embedding for q in part]),
                "experts": [q.expert for q in part],
                "forced": [q.forced for q in part],
                "routing_scores": [q.routing_scores for q in part],
                "how": [q.how for q in part],
                "timings_ms": dict(batch.timings_ms, encoder_batch_queries=float(len(queries))),
            }
            if unknown:
                results[i].update(unknown_corpora=unknown, base_embeddings=np.stack([q.base_embedding for q in part]))
    return results  # type: ignore[return-value]


def encoder_info(encoder: RoutedEncoder, base_model: str) -> dict:
    counts = {}
    for e in encoder.pilots.experts:
        counts[e] = counts.get(e, 0) + 1
    return {
        "base_model": base_model,
        "policy": encoder.policy.name,
        "pilot_rule": encoder.pilots.rule,
        "dim": encoder.engine.dim,
        "device": encoder.engine.device,
        "experts": [{"name": e, "num_pilots": counts.get(e, 0), "routed": e not in encoder.pilots.unrouted,
                     "guard": encoder.pilots.guards.get(e)} for e in encoder.experts],
        "confidence_floor": encoder.pilots.floored,
        "confidence_floor_kind": encoder.pilots.floor_kind if encoder.pilots.floored else None,
    }

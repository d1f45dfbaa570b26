"""Routing policies: score each expert for each query from the query's base embedding.

A policy is one small class with one method, registered by name (RouteLLM style):

    @register_policy("my_policy")
    class MyPolicy(RoutingPolicy):
        def score(self, queries, pilots) -> np.ndarray: ...   # [n_queries, n_experts]

Pilot embeddings (RouterRetriever, arXiv 2409.02685) are base-model embeddings of representative
training queries, each labelled with the expert it should go to: the mean of a group of training
queries. The pilot file also keeps the groups' **members** (each training query's base embedding
and the pilot it joined), which ``pilot_knn`` routes by. Similarity is cosine: queries, pilots and
members are L2-normalised here whatever the encoder's own convention.

Two safeguards sit around the policy (``route``), both recorded in the pilot file when the pilots
are built (serve.offline.pilots), both chosen on training queries only:

* the **confidence floor** — each pilot carries its domain's floor, set at
  ``experts.confidence_quantile`` of one of two cosines (``experts.confidence_floor``, the pilot
  file's ``floor_kind``): ``member``, each training query's cosine to its nearest OTHER training
  query of the domain (a query reaches the floor through any member of the pilot), or ``pilot``,
  its cosine to the nearest own-domain pilot (a query reaches it through the pilot). A query that
  reaches no floor belongs to no known domain and goes to the base model (unseen domains are not
  handed to an expert trained for another);
* the **base guard** — an expert that did not beat the base model on its domain's dev queries in
  the served index is not routed to (``guards[expert]["routed"]`` false): its queries go to base.

A third one needs the index, so the retrieval service applies it after a base search
(``unknown_corpus_guard``): the **corpus guard** — when the index holds a corpus no expert is
named after (an expert removed while its corpus stays, a corpus indexed before its expert is
trained), a routed query whose base top ``CORPUS_VOTE_K`` hits come at least
``experts.unknown_corpus_share`` from such corpora goes to base: it reads like that corpus, and a
neighbour domain's expert pulls its own documents over it (benchmarks/corpus_guard.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar, Collection, Literal, NamedTuple, get_args

import numpy as np

PILOTS_FILE = "pilots.npz"
FloorKind = Literal["member", "pilot"]  # experts.confidence_floor: what a query's cosine to a domain is measured to
FLOOR_KINDS: tuple[str, ...] = get_args(FloorKind)
DEFAULT_POLICY = "pilot_knn"  # experts.policy's default, chosen on dev queries (benchmarks/confidence_floor.py)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass
class PilotSet:
    """Pilot embeddings [P, D] with the expert each pilot points to (and optionally its domain)."""

    embeddings: np.ndarray
    experts: list[str]
    domains: list[str] = field(default_factory=list)
    base_model: str = ""
    rule: str = ""  # how the pilots were grouped (serve.artifacts.experts.pilot_rule); "" = not recorded
    floors: np.ndarray | None = None  # [P] confidence floor per pilot (cosine); NaN / None: no floor
    guards: dict[str, dict] = field(default_factory=dict)  # expert -> its base guard (dev nDCG@10, routed)
    members: np.ndarray | None = None  # [M, D] base embeddings of the training queries behind the pilots
    member_pilot: np.ndarray | None = None  # [M] the pilot (row) each member joined; None / empty: no members
    floor_kind: str = "pilot"  # FLOOR_KINDS: floors measured to pilots (files from before the kind) or members

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2:
            raise ValueError("pilot embeddings must be a 2-D array [P, D]")
        if len(self.experts) != self.embeddings.shape[0]:
            raise ValueError("one expert name per pilot embedding is required")
        if self.domains and len(self.domains) != len(self.experts):
            raise ValueError("domains, when given, must have one entry per pilot")
        n = self.embeddings.shape[0]
        if self.floor_kind not in FLOOR_KINDS:
            raise ValueError(f"floor_kind must be one of {FLOOR_KINDS}, not {self.floor_kind!r}")
        self.floors = np.full(n, np.nan, np.float32) if self.floors is None else np.asarray(self.floors, np.float32).reshape(-1)
        if self.floors.shape[0] != n:
            raise ValueError("floors, when given, must have one entry per pilot")
        self.experts = [str(e) for e in self.experts]
        self.domains = [str(d) for d in self.domains]
        self.guards = {str(k): dict(v) for k, v in (self.guards or {}).items()}
        dim = self.embeddings.shape[1]
        self.members = (np.zeros((0, dim), np.float32) if self.members is None
                        else np.asarray(self.members, np.float32).reshape(-1, dim))
        self.member_pilot = (np.zeros(0, np.int64) if self.member_pilot is None
                             else np.asarray(self.member_pilot, np.int64).reshape(-1))
        if self.member_pilot.shape[0] != self.members.shape[0]:
            raise ValueError("member_pilot must name one pilot per member")
        if self.member_pilot.size and (self.member_pilot.min() < 0 or self.member_pilot.max() >= n):
            raise ValueError("member_pilot names a pilot that does not exist")
        self._unit_members = l2_normalize(self.members)  # once per pilot set, not per routed batch

    @property
    def floored(self) -> bool:
        """Some pilot carries a confidence floor (files from before the floor, or
        experts.confidence_quantile null: none — the floor gates nothing)."""
        return bool((~np.isnan(self.floors)).any())

    @property
    def unrouted(self) -> set[str]:
        """Experts the base guard keeps out of routing (forcing one by name still works)."""
        return {e for e, g in self.guards.items() if not g.get("routed", True)}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def expert_names(self) -> list[str]:
        """Experts in first-seen order (the column order of every policy's scores)."""
        return list(dict.fromkeys(self.experts))

    def restrict(self, experts: list[str]) -> "PilotSet":
        """Only the pilots of ``experts`` (an expert removed from service loses its pilots)."""
        keep = [i for i, e in enumerate(self.experts) if e in set(experts)]
        return self._rows(keep, {e: g for e, g in self.guards.items() if e in set(experts)})

    def without_domains(self, domains: list[str]) -> "PilotSet":
        """Without the pilots built from ``domains``' queries (leave-one-domain-out evaluation)."""
        return self._rows([i for i, d in enumerate(self.domains) if d not in set(domains)], self.guards)

    def without_members(self, rows: np.ndarray) -> "PilotSet":
        """Without the members at ``rows`` (an evaluation on queries that are members: no query
        may find itself)."""
        keep = np.setdiff1d(np.arange(self.members.shape[0]), np.asarray(rows, np.int64))
        return replace(self, members=self.members[keep], member_pilot=self.member_pilot[keep])

    def _rows(self, keep: list[int], guards: dict) -> "PilotSet":
        new_row = np.full(self.embeddings.shape[0], -1, np.int64)
        new_row[keep] = np.arange(len(keep))
        mine = new_row[self.member_pilot] >= 0  # members follow their pilot
        return PilotSet(
            self.embeddings[keep],
            [self.experts[i] for i in keep],
            [self.domains[i] for i in keep] if self.domains else [],
            self.base_model,
            self.rule,
            self.floors[keep],
            guards,
            self.members[mine],
            new_row[self.member_pilot[mine]],
            self.floor_kind,
        )

    @classmethod
    def empty(cls, dim: int) -> "PilotSet":
        return cls(np.zeros((0, dim), dtype=np.float32), [])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / PILOTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            embeddings=self.embeddings,
            experts=np.array(self.experts, dtype=str),
            domains=np.array(self.domains, dtype=str),
            base_model=np.array(self.base_model, dtype=str),
            rule=np.array(self.rule, dtype=str),
            floors=self.floors,
            guards=np.array(json.dumps(self.guards, sort_keys=True), dtype=str),
            members=self.members,
            member_pilot=self.member_pilot,
            floor_kind=np.array(self.floor_kind, dtype=str),
        )
        with open(tmp, "rb") as fh:  # on disk before it replaces the old file
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PilotSet":
        path = Path(path)
        if path.is_dir():
            path = path / PILOTS_FILE
        with np.load(path, allow_pickle=False) as data:
            return cls(
                data["embeddings"],
                data["experts"].tolist(),
                data["domains"].tolist() if "domains" in data else [],
                str(data["base_model"]) if "base_model" in data else "",
                str(data["rule"]) if "rule" in data else "",
                data["floors"] if "floors" in data else None,  # files from before the floor: none
                json.loads(str(data["guards"])) if "guards" in data else {},
                data["members"] if "members" in data else None,  # files from before members: none
                data["member_pilot"] if "member_pilot" in data else None,
                str(data["floor_kind"]) if "floor_kind" in data else "pilot",  # files from before the kind: pilot
            )


def replace_domains(current: PilotSet | None, new: PilotSet) -> PilotSet:
    """``current`` with every pilot of ``new``'s domains replaced by ``new``'s pilots. The pilots
    kept must follow ``new``'s grouping rule: one pilot file, one rule."""
    if current is None or current.embeddings.shape[0] == 0:
        return new
    if not current.domains:
        raise ValueError("current pilots carry no domains; rebuild them with 'routerserve pilots build'")
    doomed = set(new.domains)
    keep = [i for i, d in enumerate(current.domains) if d not in doomed]
    kept = current._rows(keep, current.guards)
    if keep and current.dim != new.dim:
        raise ValueError("pilot dimensions differ")
    if keep and (current.rule, current.floor_kind) != (new.rule, new.floor_kind):
        raise ValueError(
            f"pilots of {sorted({current.domains[i] for i in keep})} were grouped by {current.rule or 'an unrecorded rule'!r} "
            f"({current.floor_kind} floors), the new ones by {new.rule!r} ({new.floor_kind} floors): rebuild every domain's pilots"
        )
    return PilotSet(
        np.concatenate([current.embeddings[keep], new.embeddings]),
        [current.experts[i] for i in keep] + new.experts,
        [current.domains[i] for i in keep] + new.domains,
        new.base_model or current.base_model,
        new.rule,
        np.concatenate([current.floors[keep], new.floors]),
        {**current.guards, **new.guards},
        np.concatenate([kept.members, new.members]),
        np.concatenate([kept.member_pilot, new.member_pilot + len(keep)]),
        new.floor_kind,
    )


class RoutingPolicy:
    """Scores experts for a batch of queries; higher is better."""

    name: ClassVar[str] = ""

    def score(self, queries: np.ndarray, pilots: PilotSet) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


_POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(name: str) -> Callable[[type[RoutingPolicy]], type[RoutingPolicy]]:
    def deco(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
        if name in _POLICIES:
            raise ValueError(f"routing policy {name!r} already registered")
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return deco


def get_policy(name: str) -> RoutingPolicy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise KeyError(f"unknown routing policy {name!r}; registered: {sorted(_POLICIES)}") from None


def registered_policies() -> list[str]:
    return sorted(_POLICIES)


def _pilot_similarities(queries: np.ndarray, pilots: PilotSet) -> tuple[np.ndarray, list[str], np.ndarray]:
    q = l2_normalize(np.atleast_2d(queries))
    p = l2_normalize(pilots.embeddings)
    names = pilots.expert_names
    col = {n: i for i, n in enumerate(names)}
    owner = np.array([col[e] for e in pilots.experts], dtype=np.int64)
    return q @ p.T, names, owner


def _per_expert(queries: np.ndarray, pilots: PilotSet, reduce) -> np.ndarray:
    """[n_queries, n_experts]: ``reduce`` over each expert's pilot similarities."""
    sims, names, owner = _pilot_similarities(queries, pilots)
    out = np.zeros((sims.shape[0], len(names)), dtype=np.float32)
    for j in range(len(names)):
        out[:, j] = reduce(sims[:, owner == j], axis=1)
    return out


@register_policy("pilot_mean")
class PilotMeanPolicy(RoutingPolicy):
    """The paper's rule: an expert's score is the mean cosine similarity over its pilots."""

    def score(self, queries: np.ndarray, pilots: PilotSet) -> np.ndarray:
        return _per_expert(queries, pilots, np.mean)


@register_policy("pilot_nearest")
class PilotNearestPolicy(RoutingPolicy):
    """The released code's rule: an expert's score is its nearest pilot's cosine similarity."""

    def score(self, queries: np.ndarray, pilots: PilotSet) -> np.ndarray:
        return _per_expert(queries, pilots, np.max)


@register_policy("pilot_knn")
class PilotKnnPolicy(RoutingPolicy):
    """Instance-level pilots: an expert's score is the mean cosine of the query's ``K`` most similar
    pilot MEMBERS (training queries) labelled with it — each training query votes where the pilot
    rule put it, so a domain's queries are not averaged into one point. An expert with fewer members
    averages over those it has; a pilot set without members (a file from before them) scores by the
    pilots themselves (nearest pilot). K chosen on dev queries (benchmarks/confidence_floor.py)."""

    K: ClassVar[int] = 1

    def score(self, queries: np.ndarray, pilots: PilotSet) -> np.ndarray:
        names = pilots.expert_names
        if pilots.members.shape[0]:
            members, member_pilot = pilots._unit_members, pilots.member_pilot
        else:  # each pilot its own member
            members, member_pilot = l2_normalize(pilots.embeddings), np.arange(len(pilots.experts))
        sims = l2_normalize(np.atleast_2d(queries)) @ members.T
        col = {n: i for i, n in enumerate(names)}
        label = np.array([col[e] for e in pilots.experts], dtype=np.int64)[member_pilot]  # member → expert column
        out = np.full((sims.shape[0], len(names)), -1.0, dtype=np.float32)  # an expert without members: never first
        for j in range(len(names)):
            own = sims[:, label == j]
            if own.shape[1]:
                k = min(self.K, own.shape[1])
                out[:, j] = -np.mean(np.partition(-own, k - 1, axis=1)[:, :k], axis=1)
        return out


def describe_guard(expert: str, g: dict) -> str:
    """One line: the base guard's figures and verdict for ``expert``."""
    return (f"base guard of {expert}: nDCG@10 {100 * g['expert_ndcg10']:.1f} vs base {100 * g['base_ndcg10']:.1f} on "
            f"{g['num_queries']} {g['queries']} queries of {g['domain']} in {'+'.join(g['index'])} → "
            + ("routed" if g["routed"] else "NOT routed: its queries go to the base model"))


def confident(queries: np.ndarray, pilots: PilotSet) -> np.ndarray:
    """[n_queries] bool: the query reaches the floor of at least one pilot — through the pilot
    itself (``floor_kind`` "pilot") or through any of its members ("member"; a pilot set without
    members: through the pilot). A pilot set without any floor (a file from before the floor, or
    experts.confidence_quantile null) gates nothing; in a floored set a pilot without a floor cannot
    be reached (it never turns the gate off)."""
    q = l2_normalize(np.atleast_2d(queries))
    if not pilots.floored:
        return np.ones(q.shape[0], bool)
    floors = np.where(np.isnan(pilots.floors), np.inf, pilots.floors)
    if pilots.floor_kind == "member" and pilots.members.shape[0]:
        sims, floors = q @ pilots._unit_members.T, floors[pilots.member_pilot]
    else:
        sims = q @ l2_normalize(pilots.embeddings).T
    return (sims >= floors[None, :]).any(axis=1) if sims.shape[1] else np.zeros(sims.shape[0], bool)


def domain_floor(queries: np.ndarray, domain_pilots: np.ndarray, quantile: float) -> float:
    """The ``pilot`` confidence floor of one domain's pilots: the ``quantile`` of its training
    queries' cosine to their nearest pilot of the domain (quantile 0.05: 95 % of them clear it)."""
    sims = l2_normalize(np.atleast_2d(queries)) @ l2_normalize(np.atleast_2d(domain_pilots)).T
    return float(np.quantile(sims.max(axis=1), quantile))


def member_floor(queries: np.ndarray, quantile: float, block: int = 1024) -> float:
    """The ``member`` confidence floor of one domain: the ``quantile`` of its training queries'
    cosine to their nearest OTHER training query (leave-one-out: a query is not its own neighbour).
    A domain of one query has no neighbour: no floor (NaN, never reached)."""
    q = l2_normalize(np.atleast_2d(queries))
    if q.shape[0] < 2:
        return float("nan")
    nearest = np.empty(q.shape[0], np.float32)
    for a in range(0, q.shape[0], block):  # [block, n] at a time: memory stays linear in n
        sims = q[a:a + block] @ q.T
        sims[np.arange(sims.shape[0]), np.arange(a, a + sims.shape[0])] = -np.inf
        nearest[a:a + block] = sims.max(axis=1)
    return float(np.quantile(nearest, quantile))


def floor_of(kind: str, queries: np.ndarray, domain_pilots: np.ndarray, quantile: float) -> float:
    """A domain's confidence floor of ``kind`` (FLOOR_KINDS) at ``quantile`` of its training queries."""
    if kind not in FLOOR_KINDS:
        raise ValueError(f"confidence floor kind must be one of {FLOOR_KINDS}, not {kind!r}")
    return member_floor(queries, quantile) if kind == "member" else domain_floor(queries, domain_pilots, quantile)


class Routing(NamedTuple):
    """Per query: the encoder chosen, the policy's scores [n, n_experts], and how it was chosen —
    ``routed`` (the policy's pick), ``floor`` (below every pilot's confidence floor: base) or
    ``guard`` (the policy's pick is held back by its base guard: base)."""

    chosen: list[str]
    scores: np.ndarray
    how: list[str]


def route(queries: np.ndarray, pilots: PilotSet, policy: RoutingPolicy, gate: bool = True) -> Routing:
    """The policy's best expert per query, or the base model where the query is below every
    pilot's confidence floor or the best expert is held back by its base guard. ``gate=False``:
    the bare policy (the paper's rule)."""
    from .encoder import BASE

    names = pilots.expert_names
    scores = policy.score(queries, pilots) if names else np.zeros((np.atleast_2d(queries).shape[0], 0), np.float32)
    chosen = choose(scores, names)
    how = ["routed"] * len(chosen)
    if gate and names:
        held = pilots.unrouted
        for i, ok in enumerate(confident(queries, pilots)):
            if not ok or chosen[i] in held:
                chosen[i], how[i] = BASE, "guard" if ok else "floor"
    return Routing(chosen, scores, how)


CORPUS_VOTE_K = 10  # the base model's top hits whose corpora vote (unknown_corpus_guard)


def unknown_corpora(index_corpora: Collection[str], experts: Collection[str]) -> list[str]:
    """The index's corpora no expert is named after (an expert trained on a dataset carries its
    name), or none when no expert is named after any of them (names that do not map say nothing
    about corpora: the corpus guard stays off rather than send every query to base)."""
    if not set(experts) & set(index_corpora):
        return []
    return sorted(set(index_corpora) - set(experts))


def unknown_corpus_guard(hit_corpora: list[list[str]], unknown: Collection[str], share: float) -> list[bool]:
    """Per query: True when at least ``share`` of its base top hits (``hit_corpora``, the corpus of
    each, best first; the first CORPUS_VOTE_K count) come from ``unknown`` corpora — the query reads
    like a corpus no expert knows, so it goes to base. No hits: False."""
    out = []
    for corpora in hit_corpora:
        top = corpora[:CORPUS_VOTE_K]
        out.append(bool(top) and sum(c in unknown for c in top) >= share * len(top) - 1e-9)
    return out


def choose(scores: np.ndarray, names: list[str]) -> list[str]:
    """Best expert per row (first one on ties). No experts → every row goes to the base model."""
    from .encoder import BASE

    if not names:
        return [BASE] * scores.shape[0]
    return [names[int(i)] for i in np.argmax(scores, axis=1)]


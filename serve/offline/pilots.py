"""`routerserve pilots build`: pilot embeddings by the RouterRetriever rule.

For each domain: take its training queries (the same sample the expert was trained on), find for
each query the expert whose adapter gives the best nDCG@10 on the domain's corpus, group the
domain's queries by that best expert, and average each group's BASE-model embeddings. That gives
at most one pilot per (domain, expert) pair; each group's queries are kept as the pilot's members
(the ``pilot_knn`` policy routes by them). Rebuilding a domain replaces only that domain's
pilots; adding a domain needs no router training.

With the pilots, two safeguards are recorded (actors.routing.route applies them):
* each pilot's **confidence floor** (``experts.confidence_quantile``): the cosine its domain's
  training queries reach, at that quantile, to their nearest other training query of the domain
  (``experts.confidence_floor: member``) or to their nearest own-domain pilot (``pilot``);
* the owner expert's **base guard** (``experts.base_guard``): its nDCG@10 and the base model's on
  the domain's dev queries (the ones training held out to choose the step), searched in the index
  the service searches (every ``corpus.datasets`` corpus when the domain is one of them). An
  expert that does not beat base there is not routed to.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from actors.encoder import BASE, EncoderEngine
from actors.routing import PilotSet, floor_of, replace_domains

from serve.artifacts.experts import enabled_experts, load_pilots, pilot_rule, pilots_follow_config, pilots_path, serving_datasets
from serve.artifacts.models import encoder_settings, resolve_model
from serve.config import RouterServeConfig

from .indexing import load_corpus_vectors
from .ir import (SELF_RETRIEVAL_DOMAINS, dev_scorer, domain_examples, examples_qrels, per_query, search_run, shift_rows,
                 split_dev, union_offset)

logger = logging.getLogger(__name__)


def best_experts(table: np.ndarray, own: int, margin: float = 0.0, min_queries: int = 1,
                 names: list[str] | None = None) -> np.ndarray:
    """Per training query (rows of ``table``: nDCG@10 per expert), the expert whose pilot it joins:
    the best one, ties to the domain's own (``own``). Deviation knobs (paper: 0 and 1): another
    expert wins only when it beats the own expert by more than ``margin``; groups smaller than
    ``min_queries`` fold into the own group. A tie between OTHER experts (common: one judged doc,
    several experts rank it first) goes to the first by ``names`` when given, else the first
    column — so with names the pilots do not depend on the order the experts were loaded in."""
    if names is not None:
        order = np.argsort(np.asarray(names, dtype=str), kind="stable")
        inverse = int(np.flatnonzero(order == own)[0])
        return order[best_experts(table[:, order], inverse, margin, min_queries)]
    best = np.where(table.max(axis=1) - table[:, own] > margin, table.argmax(axis=1), own)
    if min_queries > 1:
        sizes = np.bincount(best, minlength=table.shape[1])
        best = np.where((sizes[best] < min_queries) & (best != own), own, best)
    return best


def pilots_from_groups(base: np.ndarray, best: np.ndarray, experts: list[str], domain: str,
                       base_model: str, rule: str = "", floor_quantile: float | None = None,
                       floor_kind: str = "pilot") -> tuple[PilotSet, dict[str, int]]:
    """One pilot per (domain, expert) group: the mean BASE embedding of the group's queries; the
    queries themselves are kept as the pilots' members (in ``base``'s row order); with
    ``floor_quantile``, every pilot of the domain gets the domain's confidence floor of ``floor_kind``
    (actors.routing.FLOOR_KINDS)."""
    embs, names, wins = [], [], {}
    member_pilot = np.zeros(len(best), np.int64)
    for j, e in enumerate(experts):
        members = best == j
        if members.any():
            member_pilot[members] = len(embs)
            embs.append(base[members].mean(axis=0))
            names.append(e)
            wins[e] = int(members.sum())
    embs = np.stack(embs)
    floor = np.nan if floor_quantile is None else floor_of(floor_kind, base, embs, floor_quantile)
    return PilotSet(embs, names, [domain] * len(names), base_model, rule, np.full(len(names), floor),
                    members=base, member_pilot=member_pilot,
                    floor_kind=floor_kind if floor_quantile is not None else "pilot"), wins  # no floor: as files before the kind


def expert_table(engine: EncoderEngine, domain: str, qids: list[str], texts: list[str], qrels: dict, corpus) -> np.ndarray:
    """nDCG@10 of every expert (columns, ``engine.experts`` order) on each query (rows)."""
    from ir_measures import nDCG

    drop_self = domain in SELF_RETRIEVAL_DOMAINS
    table = np.zeros((len(qids), len(engine.experts)))
    for j, e in enumerate(engine.experts):
        run = search_run(engine.encode(texts, e), qids, corpus, 10, drop_self, domain)
        scores = per_query(qrels, run, nDCG @ 10)
        table[:, j] = [scores[q] for q in qids]
    return table


def domain_pilots(
    engine: EncoderEngine,
    domain: str,
    qids: list[str],
    texts: list[str],
    qrels: dict,
    corpus,
    base_model: str,
    owner: str | None = None,
    margin: float = 0.0,
    min_queries: int = 1,
    rule: str = "",
    floor_quantile: float | None = None,
    floor_kind: str = "pilot",
) -> tuple[PilotSet, dict[str, int]]:
    """Pilots of one domain and how many of its queries each expert won. Ties (e.g. every expert
    scores 0) go to the domain's own expert: ``owner``, else the expert named like the domain."""
    experts = engine.experts
    if not experts:
        raise ValueError("no experts loaded: train one first ('routerserve experts train --domain NAME')")
    base = engine.encode(texts, BASE)
    table = expert_table(engine, domain, qids, texts, qrels, corpus)
    owner = owner or domain
    own = experts.index(owner) if owner in experts else 0
    best = best_experts(table, own, margin, min_queries, names=experts)
    return pilots_from_groups(base, best, experts, domain, base_model, rule, floor_quantile, floor_kind)


GUARD_EPSILON = 1e-4  # nDCG@10 (0-1): a smaller edge over base is float noise (e.g. a step-0 adapter), not a win


def base_guard(engine: EncoderEngine, expert: str, domain: str, examples: list, corpus, serving, dev_fraction: float) -> dict:
    """The base guard of ``expert`` (owner of ``domain``): mean nDCG@10 of the base model and of the
    expert on the domain's dev queries (``split_dev``, the queries training held out), searched in
    ``serving`` (the served index's vectors; ``corpus`` is the domain's own). A domain too small to
    hold dev queries out is judged on all its training queries (said in ``queries``: the expert
    trained on those, so that verdict favours it). Routed only when the expert wins by more than
    ``GUARD_EPSILON``."""
    _, dev = split_dev(examples, dev_fraction)
    which = "dev" if dev else "training"
    dev = dev or examples
    if serving is not corpus:
        dev = shift_rows(dev, union_offset(serving, domain, corpus))
    texts, score = dev_scorer(domain, dev, serving)
    base, own = score(engine.encode(texts, BASE)), score(engine.encode(texts, expert))
    return {"domain": domain, "queries": which, "num_queries": len(texts), "index": sorted(set(serving.datasets)),
            "base_ndcg10": round(base, 6), "expert_ndcg10": round(own, 6), "routed": bool(own > base + GUARD_EPSILON)}


def build_pilots(
    cfg: RouterServeConfig,
    data_dir: Path,
    domains: list[str] | None = None,
    progress: bool = True,
    owners: dict[str, str] | None = None,
) -> dict[str, dict[str, int]]:
    """Rebuild the pilots of ``domains`` (default: every expert's domain); returns wins per domain.
    ``owners``: domain → its own expert where the names differ (``experts add --domain``).
    When the pilots on disk were grouped by another rule than the config's (``experts.pilot_margin``,
    ``pilot_min_queries``, ``confidence_quantile``, ``confidence_floor``, ``base_guard``; files without a recorded rule
    count as another), every domain that has pilots is rebuilt too, so the file never mixes rules."""
    adapters = enabled_experts(cfg)
    current = load_pilots(cfg)
    rule = pilot_rule(cfg)
    # each domain's own expert: as given, else as its last guard recorded (``experts add --domain``
    # names it differently from the domain), else the expert named like the domain
    owners = {**{g["domain"]: e for e, g in (current.guards if current is not None else {}).items() if e in adapters},
              **(owners or {})}
    if not domains:  # the domains that have pilots, plus every expert named after a dataset
        domains = list(dict.fromkeys(current.domains)) if current is not None else []
        domains += [a for a in adapters if a not in domains and (Path(data_dir) / a / "corpus.jsonl").is_file()]
    if current is not None and not pilots_follow_config(current, cfg):  # rebuild every domain on disk, under this rule
        stale = [d for d in dict.fromkeys(current.domains) if d not in domains]
        if stale:
            logger.warning("pilots on disk were grouped by %r (guards judged in %s), the config asks %r (index %s): "
                           "rebuilding %s too", current.rule or "an unrecorded rule",
                           sorted({"+".join(g["index"]) for g in current.guards.values()}), rule, cfg.corpus.datasets, stale)
        domains, current = [*domains, *stale], None
    engine = EncoderEngine(resolve_model(cfg.model.ref), adapters, encoder_settings(cfg))
    report = {}
    served: dict[tuple[str, ...], object] = {}
    for domain in domains:
        corpus = load_corpus_vectors(cfg, data_dir, [domain], progress)
        examples = domain_examples(cfg, data_dir, domain, corpus)
        qids = [q for q, _, _, _ in examples]
        qrels = examples_qrels(domain, examples, corpus)
        owner = owners.get(domain, domain)
        new, wins = domain_pilots(
            engine, domain, qids, [t for _, t, _, _ in examples], qrels, corpus, cfg.model.ref, owner,
            cfg.experts.pilot_margin, cfg.experts.pilot_min_queries, rule, cfg.experts.confidence_quantile,
            cfg.experts.confidence_floor,
        )
        if cfg.experts.base_guard and owner in engine.experts:
            names = serving_datasets(cfg, domain)
            if names == [domain]:
                serving = corpus
            else:  # the served index's vectors: loaded once for every domain searched in it
                if tuple(names) not in served:
                    served[tuple(names)] = load_corpus_vectors(cfg, data_dir, names, progress)
                serving = served[tuple(names)]
            new.guards[owner] = guard = base_guard(engine, owner, domain, examples, corpus, serving,
                                                   cfg.experts.training.dev_fraction)
            if not guard["routed"]:
                logger.warning("expert %s does not beat the base model on %s's %s queries in %s (nDCG@10 %.4f vs %.4f): "
                               "not routed to", owner, domain, guard["queries"], names, guard["expert_ndcg10"], guard["base_ndcg10"])
        current = replace_domains(current, new)
        report[domain] = wins
    current.save(pilots_path(cfg))
    return report

"""`routerserve pilots build`: pilot embeddings by the RouterRetriever rule.

For each domain: take its training queries (the same sample the expert was trained on), find for
each query the expert whose adapter gives the best nDCG@10 on the domain's corpus, group the
domain's queries by that best expert, and average each group's BASE-model embeddings. That gives
at most one pilot per (domain, expert) pair. Rebuilding a domain replaces only that domain's
pilots; adding a domain needs no router training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from actors.encoder import BASE, EncoderEngine
from actors.routing import PilotSet, replace_domains

from serve.artifacts.experts import enabled_experts, load_pilots, pilot_rule, pilots_path
from serve.artifacts.models import encoder_settings, resolve_model
from serve.config import RouterServeConfig

from .indexing import load_corpus_vectors
from .ir import SELF_RETRIEVAL_DOMAINS, domain_examples, examples_qrels, per_query, search_run

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
                       base_model: str, rule: str = "") -> tuple[PilotSet, dict[str, int]]:
    """One pilot per (domain, expert) group: the mean BASE embedding of the group's queries."""
    embs, names, wins = [], [], {}
    for j, e in enumerate(experts):
        members = best == j
        if members.any():
            embs.append(base[members].mean(axis=0))
            names.append(e)
            wins[e] = int(members.sum())
    return PilotSet(np.stack(embs), names, [domain] * len(names), base_model, rule), wins


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
    return pilots_from_groups(base, best, experts, domain, base_model, rule)


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
    ``experts.pilot_min_queries``; files without a recorded rule count as another), every domain
    that has pilots is rebuilt too, so the file never mixes rules."""
    adapters = enabled_experts(cfg)
    current = load_pilots(cfg)
    rule = pilot_rule(cfg)
    if not domains:  # the domains that have pilots, plus every expert named after a dataset
        domains = list(dict.fromkeys(current.domains)) if current is not None else []
        domains += [a for a in adapters if a not in domains and (Path(data_dir) / a / "corpus.jsonl").is_file()]
    if current is not None and current.rule != rule:  # rebuild every domain on disk, under this rule
        stale = [d for d in dict.fromkeys(current.domains) if d not in domains]
        if stale:
            logger.warning("pilots on disk were grouped by %r, the config asks %r: rebuilding %s too",
                           current.rule or "an unrecorded rule", rule, stale)
        domains, current = [*domains, *stale], None
    engine = EncoderEngine(resolve_model(cfg.model.ref), adapters, encoder_settings(cfg))
    report = {}
    for domain in domains:
        corpus = load_corpus_vectors(cfg, data_dir, [domain], progress)
        examples = domain_examples(cfg, data_dir, domain, corpus)
        qids = [q for q, _, _, _ in examples]
        qrels = examples_qrels(domain, examples, corpus)
        new, wins = domain_pilots(
            engine, domain, qids, [t for _, t, _, _ in examples], qrels, corpus, cfg.model.ref, (owners or {}).get(domain),
            cfg.experts.pilot_margin, cfg.experts.pilot_min_queries, rule,
        )
        current = replace_domains(current, new)
        report[domain] = wins
    current.save(pilots_path(cfg))
    return report

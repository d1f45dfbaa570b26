"""`routerserve eval beir`: nDCG@10 / Recall@100 of routing policies on BEIR-layout domains.

Every policy answers one question per test query: which encoder (an expert's adapter, or the base
model) embeds it. Queries are embedded once per expert; documents once, by the base model (the
same cached index `routerserve index build` writes). Metrics come from ir-measures (pytrec_eval).

Settings:
* ``per_domain`` — BEIR style: each domain's test queries against its own corpus;
* ``union`` — all corpora in one index, as a served deployment sees them (a hit from another
  domain's corpus is simply not relevant);
* ``lodo`` — the union, leave-one-domain-out: each domain's queries are routed as if its expert
  and its pilots did not exist (a domain no expert knows); the other experts are the candidates.

Policies here (more register the same way):
  base            the base model for every query
  pilot_mean      RouterRetriever: mean cosine to each expert's pilots (paper), as served: below
                  every pilot's confidence floor, or to an expert its base guard holds back → base;
                  and, as served, the corpus guard (experts.unknown_corpus_share): in the union
                  while a corpus has no expert (lodo), a query whose base top 10 hits come mostly
                  from such corpora → base
  pilot_mean_ungated  the same policy without the floor and the guard (the paper's bare rule)
  pilot_nearest   nearest pilot (released code), with the floor and the guard
  pilot_knn       the K most similar pilot members (training queries), with the floor and the guard
  dataset_router  the expert trained on the query's own dataset (knows the dataset label)
  classifier      ExpertClassifierRouter-style: softmax regression on base embeddings trained to
                  predict the expert of each training query's domain
  multitask       one adapter trained on every domain's data (`experts train-multitask`)
  dataset_oracle  per domain, the single encoder with the best test nDCG@10 (upper bound, eval only)
  instance_oracle per query, the encoder with the best nDCG@10 (upper bound, eval only)

Besides each policy's figures, a result keeps every test query's nDCG@10 under each policy
(``per_query_ndcg@10``, in ``query_ids`` order): two policies' difference is then paired query by
query, and its interval (serve/offline/significance.py) says whether a goal's margin is more than
sampling noise — the report's "Δ avg vs base" column, benchmarks/beir_goals.py's verdicts.

Test queries never include a query used for training or pilots: the 'test' split where a 'train'
split exists, else the test half of actors.beir.seeded_half_split (serve.offline.ir) (training uses the other half).
ArguAna: a query's own id is removed from its ranking (BEIR practice).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from actors.encoder import BASE, EncoderEngine
from actors.routing import describe_guard, get_policy, route, unknown_corpora, unknown_corpus_guard

from serve.artifacts.experts import MULTITASK, multitask_dir, pilot_rule, served_experts, stale_guards
from serve.artifacts.models import encoder_settings, resolve_model
from serve.config import RouterServeConfig

from .classifier_router import LinearExpertClassifier
from .indexing import load_corpus_vectors
from .ir import SELF_RETRIEVAL_DOMAINS, domain_examples, eval_queries, measures, per_query, qualify, ranked_corpora, search_run
from .significance import LEVEL, macro_interval, paired

logger = logging.getLogger(__name__)

DEFAULT_POLICIES = ["base", "pilot_mean", "pilot_knn", "pilot_nearest", "dataset_router", "classifier", "dataset_oracle", "instance_oracle"]


@dataclass
class DomainRun:
    """Everything a policy may look at for one domain's test queries."""

    domain: str
    qids: list[str]
    embeddings: dict[str, np.ndarray]  # encoder name -> [n, D]
    qrels: dict[str, dict[str, int]]
    per_query_ndcg: dict[str, np.ndarray] = field(default_factory=dict)  # encoder -> [n]
    pilots: object = None
    experts: list[str] = field(default_factory=list)
    classifier: object = None
    base_hit_corpora: list[list[str]] = field(default_factory=list)  # per query: its base top hits' corpora, best first
    unknown_corpora: list[str] = field(default_factory=list)  # the searched corpora no candidate expert is named after
    unknown_corpus_share: float | None = None  # experts.unknown_corpus_share (None: no corpus guard)


PolicyFn = Callable[[DomainRun], list[str]]
_EVAL_POLICIES: dict[str, PolicyFn] = {}


def eval_policy(name: str):
    def deco(fn: PolicyFn) -> PolicyFn:
        _EVAL_POLICIES[name] = fn
        return fn

    return deco


def eval_policies() -> list[str]:
    return sorted(_EVAL_POLICIES)


@eval_policy("base")
def _base(run: DomainRun) -> list[str]:
    return [BASE] * len(run.qids)


def _pilot_policy(name: str, gate: bool = True) -> PolicyFn:
    def fn(run: DomainRun) -> list[str]:
        if not run.experts:
            return [BASE] * len(run.qids)
        chosen = route(run.embeddings[BASE], run.pilots.restrict(run.experts), get_policy(name), gate).chosen
        if gate and run.unknown_corpora and run.unknown_corpus_share is not None:  # as the service does after its search
            held = unknown_corpus_guard(run.base_hit_corpora, run.unknown_corpora, run.unknown_corpus_share)
            chosen = [BASE if h else c for c, h in zip(chosen, held)]
        return chosen

    return fn


eval_policy("pilot_mean")(_pilot_policy("pilot_mean"))
eval_policy("pilot_mean_ungated")(_pilot_policy("pilot_mean", gate=False))
eval_policy("pilot_nearest")(_pilot_policy("pilot_nearest"))
eval_policy("pilot_knn")(_pilot_policy("pilot_knn"))


@eval_policy("dataset_router")
def _dataset_router(run: DomainRun) -> list[str]:
    return [run.domain if run.domain in run.experts else BASE] * len(run.qids)


@eval_policy("multitask")
def _multitask(run: DomainRun) -> list[str]:
    if MULTITASK not in run.embeddings:
        raise ValueError("policy multitask needs the multi-task adapter ('routerserve experts train-multitask')")
    return [MULTITASK] * len(run.qids)


@eval_policy("classifier")
def _classifier(run: DomainRun) -> list[str]:
    if run.classifier is None:
        return [BASE] * len(run.qids)
    return run.classifier.predict(run.embeddings[BASE])


@eval_policy("dataset_oracle")
def _dataset_oracle(run: DomainRun) -> list[str]:
    best = max(run.per_query_ndcg, key=lambda e: (run.per_query_ndcg[e].mean(), e == BASE))
    return [best] * len(run.qids)


@eval_policy("instance_oracle")
def _instance_oracle(run: DomainRun) -> list[str]:
    names = list(run.per_query_ndcg)
    table = np.stack([run.per_query_ndcg[n] for n in names], axis=1)
    return [names[int(i)] for i in np.argmax(table, axis=1)]


def _train_classifier(cfg: RouterServeConfig, data_dir: Path, engine: EncoderEngine, experts: list[str]):
    """The classifier router learns expert = training domain from the experts' training queries."""
    xs, ys = [], []
    for e in experts:
        corpus = load_corpus_vectors(cfg, data_dir, [e], progress=False)
        texts = [t for _, t, _, _ in domain_examples(cfg, data_dir, e, corpus)]
        xs.append(engine.encode(texts, BASE))
        ys += [e] * len(texts)
    if len(experts) < 2:
        return None
    return LinearExpertClassifier.fit(np.concatenate(xs), ys, seed=cfg.experts.training.seed)


def rule_summary(cfg: RouterServeConfig) -> dict:
    """The config's pilot rule and safeguards, as a result file records them (``pilot_rule``)."""
    e = cfg.experts
    return {"margin": e.pilot_margin, "min_queries": e.pilot_min_queries, "confidence_quantile": e.confidence_quantile,
            "confidence_floor": e.confidence_floor, "base_guard": e.base_guard}


def evaluate(
    cfg: RouterServeConfig,
    data_dir: Path,
    domains: list[str],
    policies: list[str] | None = None,
    setting: str = "per_domain",
    max_queries: int | None = None,
    progress: bool = True,
    embedding_cache: dict | None = None,
) -> dict:
    """Evaluate ``policies`` on ``domains``; returns the result dict (see module docstring).
    ``embedding_cache``: a dict shared by calls over the same experts (e.g. the per-domain and the
    union setting of one benchmark) so each test query is encoded once per encoder."""
    from tqdm.auto import tqdm

    policies = policies or DEFAULT_POLICIES
    unknown = [p for p in policies if p not in _EVAL_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; available: {eval_policies()}")
    if setting not in ("per_domain", "union", "lodo"):
        raise ValueError("setting must be 'per_domain', 'union' or 'lodo'")
    trained_on_all = [p for p in ("classifier", "multitask") if p in policies]
    if setting == "lodo" and trained_on_all:
        raise ValueError(f"policies {trained_on_all} are trained on every domain: they have no leave-one-domain-out form")
    t0 = time.perf_counter()
    gen, adapters, pilots = served_experts(cfg)  # what the service serves: the current (or pinned) generation
    if pilots is not None and pilots.rule != pilot_rule(cfg):
        raise ValueError(
            f"the pilots of generation {gen.id} in {cfg.experts.dir} were grouped by {pilots.rule or 'an unrecorded rule'!r}, the config "
            f"(experts.pilot_margin, experts.pilot_min_queries) asks {pilot_rule(cfg)!r}: "
            "rebuild them first ('routerserve pilots build')"
        )
    if pilots is not None and stale_guards(pilots, cfg):
        raise ValueError(
            f"the base guards of {stale_guards(pilots, cfg)} in generation {gen.id} were judged in another index than "
            f"corpus.datasets {cfg.corpus.datasets} serves: rebuild the pilots first ('routerserve pilots build')"
        )
    if "pilot_knn" in policies and pilots is not None and not pilots.members.shape[0]:
        raise ValueError(f"policy pilot_knn routes by the pilots' members, which the pilots of generation {gen.id} lack "
                         "(a file from before them): rebuild them first ('routerserve pilots build')")
    experts = [e for e in (pilots.expert_names if pilots else []) if e in adapters]
    extra = {}
    if "multitask" in policies:
        mt = multitask_dir(cfg)
        if mt is None or not (mt / "adapter_config.json").is_file():
            raise ValueError("policy multitask needs the multi-task adapter ('routerserve experts train-multitask')")
        extra[MULTITASK] = mt
    engine = EncoderEngine(resolve_model(cfg.model.ref), {**{e: adapters[e] for e in experts}, **extra}, encoder_settings(cfg))
    classifier = _train_classifier(cfg, data_dir, engine, experts) if "classifier" in policies else None
    ndcg_m, recall_m = measures()
    union = load_corpus_vectors(cfg, data_dir, domains, progress) if setting != "per_domain" else None
    # a domain's own expert (lodo drops it): as its base guard recorded, else named like the domain
    owner_of = {g["domain"]: e for e, g in (pilots.guards if pilots is not None else {}).items()}
    scores: dict[str, dict[str, float]] = {p: {} for p in policies}
    recall: dict[str, dict[str, float]] = {p: {} for p in policies}
    confusion: dict[str, dict[str, int]] = {p: {} for p in policies}
    query_ndcg: dict[str, dict[str, list[float]]] = {p: {} for p in policies}  # in ``query_ids`` order
    query_ids: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for domain in tqdm(domains, desc=f"eval {setting}", disable=not progress):
        corpus = union or load_corpus_vectors(cfg, data_dir, [domain], progress)
        queries, qrels = eval_queries(data_dir, domain)
        if cfg.corpus.max_docs_per_dataset:
            # Smoke runs on a capped corpus: keep only queries with a judged doc inside it.
            docset = {qualify(ds, d) for ds, d in zip(corpus.datasets, corpus.doc_ids)}
            qrels = {q: r for q, r in qrels.items() if any(v > 0 and qualify(domain, d) in docset for d, v in r.items())}
        qids = sorted(qrels)
        qrels = {q: {qualify(domain, d): v for d, v in r.items()} for q, r in qrels.items()}
        if max_queries:
            qids = qids[:max_queries]
            qrels = {q: qrels[q] for q in qids}
        counts[domain], query_ids[domain] = len(qids), qids
        texts = [queries[q] for q in qids]
        known, known_pilots = experts, pilots
        if setting == "lodo":  # the domain's own expert and every pilot built from its queries: gone
            own = owner_of.get(domain, domain)
            known = [e for e in experts if e != own]
            known_pilots = pilots.without_domains([domain]) if pilots is not None else None
        candidates = [BASE, *known]  # the oracles choose among these
        scored = candidates + list(extra)
        cache = embedding_cache if embedding_cache is not None else {}
        emb = {}
        for name in scored:
            key = (domain, name, tuple(qids))
            if key not in cache:
                cache[key] = engine.encode(texts, name)
            emb[name] = cache[key]
        drop_self = domain in SELF_RETRIEVAL_DOMAINS
        runs = {name: search_run(emb[name], qids, corpus, 100, drop_self, domain) for name in scored}
        pq_ndcg = {name: per_query(qrels, runs[name], ndcg_m) for name in scored}
        pq_recall = {name: per_query(qrels, runs[name], recall_m) for name in scored}
        unknown = unknown_corpora(set(corpus.datasets), known)  # the corpus guard's: none where every corpus has an expert
        ctx = DomainRun(
            domain, qids, emb, qrels, {n: np.array([pq_ndcg[n][q] for q in qids]) for n in candidates}, known_pilots, known,
            classifier, ranked_corpora(runs[BASE], qids) if unknown else [], unknown, cfg.experts.unknown_corpus_share,
        )
        for policy in policies:
            chosen = _EVAL_POLICIES[policy](ctx)
            ndcg = [pq_ndcg[c][q] for c, q in zip(chosen, qids)]
            query_ndcg[policy][domain] = [round(float(v), 6) for v in ndcg]
            scores[policy][domain] = float(np.mean(ndcg))
            recall[policy][domain] = float(np.mean([pq_recall[c][q] for c, q in zip(chosen, qids)]))
            row = confusion[policy].setdefault(domain, {})
            for c in chosen:
                row[c] = row.get(c, 0) + 1
    for table in (scores, recall):
        for policy, per in table.items():
            per["avg"] = float(np.mean([per[d] for d in domains]))
    return {
        "policies": scores,
        "recall@100": recall,
        "routing": confusion,
        "setting": setting,
        "experts_generation": gen.id if gen is not None else None,
        "domains": domains,
        "experts": experts,
        "num_queries": counts,
        "query_ids": query_ids,
        "per_query_ndcg@10": query_ndcg,
        "capped_corpus": cfg.corpus.max_docs_per_dataset,
        "pilot_rule": {**rule_summary(cfg), "num_pilots": 0 if pilots is None else len(pilots.restrict(experts).experts)},
        "guards": {e: g for e, g in (pilots.guards if pilots is not None else {}).items() if e in experts},
        "unknown_corpus_share": cfg.experts.unknown_corpus_share,
        "seconds": time.perf_counter() - t0,
    }


def write_report(result: dict, stem: Path) -> list[Path]:
    """JSON + markdown table + PNG (per-domain bars per policy; routing confusion matrix)."""
    from ..artifacts.atomic import write_text_atomic
    from .reports import save_figure, start_report

    paths, plt = start_report(result, stem)
    domains = result["domains"]
    lines = [
        f"# BEIR evaluation ({result['setting']}) — nDCG@10 (Recall@100 in brackets)",
        "",
        f"Command: `{result.get('command', '')}`",
        f"Experts: {result['experts']}; test queries per domain: {result['num_queries']}",
    ]
    rule = result.get("pilot_rule")
    if rule:
        paper = rule["margin"] == 0 and rule["min_queries"] == 1
        lines.append(f"Pilots: {rule['num_pilots']}, grouping rule " + ("of the paper (best expert per training query)" if paper else
                     f"with margin {rule['margin']} and groups of ≥ {rule['min_queries']} queries (a deviation from "
                     f"the paper, selected on training queries: benchmarks/pilot_margin.py)"))
        if rule.get("confidence_quantile") is not None:
            to = ("their nearest other training query of the domain (reached through any pilot member)"
                  if rule.get("confidence_floor") == "member" else "their nearest own pilot")  # results from before: pilot
            lines.append(f"Confidence floor: each domain's pilots at the {rule['confidence_quantile']:g} quantile of its training "
                         f"queries' cosine to {to}; below every floor → base (pilot_mean, pilot_nearest, pilot_knn)")
    share = result.get("unknown_corpus_share")
    if share is not None and result["setting"] == "lodo":  # elsewhere every searched corpus has its expert: no effect
        lines.append(f"Corpus guard: the held-out domain's corpus has no expert; a query routed to an expert whose base top "
                     f"10 hits come at least {share:g} from it → base (pilot_mean, pilot_nearest, pilot_knn; "
                     f"experts.unknown_corpus_share)")
    for e, g in (result.get("guards") or {}).items():
        lines.append(describe_guard(e, g))
    if result["setting"] == "lodo":
        lines.append("Leave-one-domain-out: each domain's queries are routed without its own expert and its pilots "
                     "(the oracles choose among base and the other experts).")
    per_q = result.get("per_query_ndcg@10")  # results from before it: no interval column
    against = "base" if per_q and "base" in per_q else None
    if against:
        lines.append(f"Δ avg: the policy's nDCG@10 average minus base's on the same queries, with its {LEVEL:.0%} interval "
                     "(paired, normal approximation: serve/offline/significance.py).")
    lines += [
        "",
        "| policy | " + " | ".join(domains) + " | avg |" + (" Δ avg vs base |" if against else ""),
        "|---|" + "---|" * (len(domains) + 1 + bool(against)),
    ]
    for policy, per in result["policies"].items():
        rec = result["recall@100"][policy]
        cells = [f"{100 * per[d]:.1f} ({100 * rec[d]:.1f})" for d in [*domains, "avg"]]
        if against and policy == against:
            cells.append("–")
        elif against:
            iv = macro_interval(paired(policy, against, per_q, domains))
            cells.append(f"{100 * iv.mean:+.2f} [{100 * iv.low:+.2f}, {100 * iv.high:+.2f}]")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    write_text_atomic(paths[1], "\n".join(lines) + "\n")

    policies = list(result["policies"])
    routed = [p for p in policies if p in ("pilot_mean", "pilot_nearest", "pilot_knn")] or policies[:1]
    fig, axes = plt.subplots(1, 1 + len(routed), figsize=(6 + 4 * len(routed), 4.2))
    ax = axes[0]
    width = 0.8 / max(len(policies), 1)
    x = np.arange(len(domains) + 1)
    for i, p in enumerate(policies):
        ax.bar(x + i * width, [100 * result["policies"][p][d] for d in [*domains, "avg"]], width, label=p)
    ax.set_xticks(x + 0.4 - width / 2, [*domains, "avg"], rotation=20)
    ax.set_ylabel("nDCG@10")
    ax.set_title(f"per domain ({result['setting']})")
    ax.legend(fontsize=7)
    cols = [BASE, *result["experts"]]
    for ax, p in zip(axes[1:], routed):
        m = np.array([[result["routing"][p][d].get(c, 0) for c in cols] for d in domains], dtype=float)
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(cols)), cols, rotation=30)
        ax.set_yticks(range(len(domains)), domains)
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"routing: true domain × chosen ({p})")
    fig.tight_layout()
    save_figure(fig, paths[2])
    plt.close(fig)
    return paths

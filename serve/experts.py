"""Expert artifacts on disk, expert training, and the default experts `routerserve up` trains.

    <experts.dir>/adapters/<name>/     peft LoRA adapter folder (+ train_report.json, loss.png)
    <experts.dir>/pilots.npz           pilot embeddings with the expert and domain of each
    <experts.dir>/multitask/           the multi-task baseline adapter (evaluation only)

Adding an expert = training its adapter and building its domain's pilots (serve.pilots); nothing
else is retrained and the corpus index is untouched. Removing one = deleting its adapter and every
pilot pointing to it (``remove_expert``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

from actors.beir import available_splits, dataset_dir, file_sha256, load_qrels, load_queries, seeded_half_split
from actors.encoder import EncoderEngine, adapter_dirs
from actors.expert_training import (
    AdapterTrainSettings,
    mine_hard_negatives,
    plot_losses,
    train_query_adapter,
)
from actors.routing import PILOTS_FILE, PilotSet

from .config import ExpertTrainConfig, RouterServeConfig
from .indexing import encoder_settings, load_corpus_vectors
from .models import resolve_model

logger = logging.getLogger(__name__)


def adapters_root(cfg: RouterServeConfig) -> Path | None:
    return None if cfg.experts.dir is None else Path(cfg.experts.dir) / "adapters"


def pilots_path(cfg: RouterServeConfig) -> Path | None:
    return None if cfg.experts.dir is None else Path(cfg.experts.dir) / PILOTS_FILE


def enabled_experts(cfg: RouterServeConfig) -> dict[str, Path]:
    """Adapter folders the service loads: every one found, or those in experts.enabled."""
    root = adapters_root(cfg)
    found = adapter_dirs(root) if root is not None else {}
    if cfg.experts.enabled is None:
        return found
    missing = [e for e in cfg.experts.enabled if e not in found]
    if missing:
        raise FileNotFoundError(f"experts.enabled names {missing}, which have no adapter folder under {root}")
    return {e: found[e] for e in cfg.experts.enabled}


def load_pilots(cfg: RouterServeConfig) -> PilotSet | None:
    path = pilots_path(cfg)
    return PilotSet.load(path) if path is not None and path.is_file() else None


def training_queries(data_dir: Path, domain: str, max_queries: int | None = None) -> list[tuple[str, str, dict[str, int]]]:
    """(query id, query text, judged docs) for the domain's training queries.

    The 'train' split where one exists; otherwise the train half of a seeded split of the judged
    queries (actors.beir.seeded_half_split), so the other half stays unseen for evaluation.
    A deterministic sample (by hash of the query id) of at most ``max_queries``.
    """
    queries = load_queries(data_dir, domain)
    splits = available_splits(data_dir, domain)
    if "train" in splits:
        qrels = load_qrels(data_dir, domain, "train")
        qids = sorted(qrels)
    else:
        qrels = load_qrels(data_dir, domain, "test" if "test" in splits else splits[0])
        qids, _ = seeded_half_split(sorted(qrels))
    qids = [q for q in qids if q in queries and any(s > 0 for s in qrels[q].values())]
    qids.sort(key=lambda q: hashlib.sha256(q.encode()).hexdigest())
    return [(qid, queries[qid], {d: s for d, s in qrels[qid].items() if s > 0}) for qid in qids[:max_queries]]


def domain_examples(cfg: RouterServeConfig, data_dir: Path, domain: str, corpus) -> list[tuple[str, str, int, set[int]]]:
    """(qid, text, best judged row, all judged rows) for the domain's training queries whose judged
    docs are in ``corpus``; the same deterministic sample for training and for pilots."""
    row_of = {d: i for i, d in enumerate(corpus.doc_ids)}
    examples = []
    for qid, text, judged in training_queries(data_dir, domain):
        rows = {row_of[d] for d in judged if d in row_of}
        if rows:
            best = max((d for d in judged if d in row_of), key=lambda d: (judged[d], d))
            examples.append((qid, text, row_of[best], rows))
        if len(examples) == cfg.experts.training.max_queries:
            break
    if len(examples) < 2:
        raise ValueError(f"domain {domain!r}: fewer than 2 training queries with a judged document in the corpus")
    return examples


def split_dev(examples: list, fraction: float, minimum: int = 10) -> tuple[list, list]:
    """Hold out a deterministic slice of the TRAINING queries to choose the best step."""
    # at least ``minimum`` dev queries when the domain has 3× that many (npl: 46 training queries
    # → 10 dev), none below that: a smaller dev set would choose the step by noise
    n_dev = max(int(len(examples) * fraction), minimum)
    if fraction <= 0 or len(examples) < 3 * minimum:
        return examples, []
    ranked = sorted(examples, key=lambda e: hashlib.sha256(f"dev:{e[0]}".encode()).hexdigest())
    dev = {e[0] for e in ranked[:n_dev]}
    return [e for e in examples if e[0] not in dev], [e for e in examples if e[0] in dev]


def examples_qrels(domain: str, examples: list, corpus) -> dict[str, dict[str, int]]:
    """{qid: {dataset/doc_id: 1}} for (qid, text, best row, judged rows) examples (judged = relevant)."""
    from .evaluation import qualify

    return {q: {qualify(domain, corpus.doc_ids[r]): 1 for r in rows} for q, _, _, rows in examples}


def dev_scorer(domain: str, dev_examples: list, corpus):
    """(dev queries, score_fn): mean nDCG@10 (ir-measures, judged docs binary) over the domain."""
    from ir_measures import nDCG

    from .evaluation import SELF_RETRIEVAL_DOMAINS, per_query, search_run

    qids = [q for q, _, _, _ in dev_examples]
    qrels = examples_qrels(domain, dev_examples, corpus)

    def score(vectors: np.ndarray) -> float:
        run = search_run(vectors, qids, corpus, 10, domain in SELF_RETRIEVAL_DOMAINS, domain)
        return float(np.mean(list(per_query(qrels, run, nDCG @ 10).values())))

    return [t for _, t, _, _ in dev_examples], score


def adapter_settings(train: ExpertTrainConfig, step_scale: int = 1, has_dev: bool = True) -> AdapterTrainSettings:
    """The adapter hyper-parameters of ``experts.training``; ``step_scale`` multiplies the step
    budget and the patience (the multi-task adapter gets both × its number of domains). Without
    dev queries (a domain too small to hold some out) there is nothing to stop on: every step runs."""
    return AdapterTrainSettings(
        steps=train.steps * step_scale, batch_size=train.batch_size, lr=train.lr, seed=train.seed,
        positives=train.positives, rank=train.rank, alpha=train.alpha, target_modules=tuple(train.target_modules),
        patience=None if train.patience is None or not has_dev else train.patience * step_scale,
    )


def train_domain_expert(
    cfg: RouterServeConfig, data_dir: Path, domain: str, progress: bool = True, pilots: bool = True
) -> dict:
    """Train the adapter for ``domain`` and add/replace its pilots; other experts are untouched.

    Document vectors (positives and mined hard negatives) come from the domain's base index
    (built and cached as a Ray Data job if missing): no document is re-encoded here.
    """
    if cfg.experts.dir is None:
        raise ValueError("experts.dir is null: set it to the folder that holds expert adapters and pilots")
    train = cfg.experts.training
    model_path = resolve_model(cfg.model.ref)
    corpus = load_corpus_vectors(cfg, data_dir, [domain], progress)
    examples = domain_examples(cfg, data_dir, domain, corpus)
    examples, dev_examples = split_dev(examples, train.dev_fraction)
    settings = encoder_settings(cfg)
    base = EncoderEngine(model_path, None, settings)
    texts = [t for _, t, _, _ in examples]
    positives = corpus.vectors[[best for _, _, best, _ in examples]]
    hard = full = None
    if train.objective == "full_corpus":
        full = (corpus.vectors, [b for _, _, b, _ in examples], [rows for _, _, _, rows in examples])
    elif train.hard_negatives > 0:
        query_vecs = base.encode(texts)
        neg_rows = mine_hard_negatives(
            query_vecs, corpus.vectors, [rows for _, _, _, rows in examples], train.hard_negatives, train.skip_top
        )
        hard = corpus.vectors[neg_rows]
    out_dir = adapters_root(cfg) / domain
    report = train_query_adapter(
        model_path,
        settings,
        texts,
        positives,
        out_dir,
        adapter_settings(train, has_dev=bool(dev_examples)),
        progress=progress,
        hard_negatives=hard,
        corpus=full,
        dev=dev_scorer(domain, dev_examples, corpus) if dev_examples else None,
        eval_every=train.eval_every,
    )
    report.update(
        domain=domain,
        dev_query_ids=[q for q, _, _, _ in dev_examples],
        data_hash=hashlib.sha256(
            json.dumps([(q, sorted(r)) for q, _, _, r in examples]).encode()
            + file_sha256(dataset_dir(data_dir, domain) / "corpus.jsonl").encode()
        ).hexdigest(),
        query_ids_sha256=hashlib.sha256(",".join(q for q, _, _, _ in examples).encode()).hexdigest(),
        skip_top=train.skip_top,
    )
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2))
    plot_losses(report["losses"], out_dir / "loss.png", f"expert {domain}: {len(examples)} queries")
    if pilots:  # this domain's pilots, against every expert present now
        from .pilots import build_pilots

        build_pilots(cfg, data_dir, [domain], progress)
    return report


MULTITASK = "multitask"


def multitask_dir(cfg: RouterServeConfig) -> Path | None:
    """The multi-task baseline adapter lives outside adapters/: it is never routed to."""
    return None if cfg.experts.dir is None else Path(cfg.experts.dir) / MULTITASK


def _joint_dev(parts: list[tuple[list[str], object]]):
    """One dev set over several domains: the mean of each domain's dev score."""
    queries = [q for qs, _ in parts for q in qs]
    bounds = np.cumsum([0] + [len(qs) for qs, _ in parts])

    def score(vectors: np.ndarray) -> float:
        return float(np.mean([fn(vectors[a:b]) for (_, fn), a, b in zip(parts, bounds[:-1], bounds[1:])]))

    return queries, score


def train_multitask_expert(cfg: RouterServeConfig, data_dir: Path, domains: list[str], progress: bool = True) -> dict:
    """One adapter trained on every domain's training data (the paper's multi-task baseline);
    positives and hard negatives come from each query's own domain index."""
    if cfg.experts.dir is None:
        raise ValueError("experts.dir is null: set it to the folder that holds expert adapters and pilots")
    train = cfg.experts.training
    model_path = resolve_model(cfg.model.ref)
    base = EncoderEngine(model_path, None, encoder_settings(cfg))
    texts, positives, hard, groups = [], [], [], []
    vectors, targets, judged, offset = [], [], [], 0
    dev_parts = []  # (dev queries, score_fn) per domain: the same dev selection as the experts get
    for domain in domains:
        corpus = load_corpus_vectors(cfg, data_dir, [domain], progress)
        examples, dev_examples = split_dev(domain_examples(cfg, data_dir, domain, corpus), train.dev_fraction)
        if dev_examples:
            dev_parts.append(dev_scorer(domain, dev_examples, corpus))
        t = [x for _, x, _, _ in examples]
        texts += t
        groups += [domains.index(domain)] * len(t)  # one domain per batch
        positives.append(corpus.vectors[[b for _, _, b, _ in examples]])
        vectors.append(corpus.vectors)
        targets += [offset + b for _, _, b, _ in examples]
        judged += [{offset + r for r in rows} for _, _, _, rows in examples]
        offset += corpus.vectors.shape[0]
        if train.objective == "mined" and train.hard_negatives > 0:
            rows = mine_hard_negatives(base.encode(t), corpus.vectors, [r for _, _, _, r in examples], train.hard_negatives, train.skip_top)
            hard.append(corpus.vectors[rows])
    out_dir = multitask_dir(cfg)
    report = train_query_adapter(
        model_path,
        encoder_settings(cfg),
        texts,
        np.concatenate(positives),
        out_dir,
        adapter_settings(train, step_scale=len(domains), has_dev=bool(dev_parts)),
        progress=progress,
        hard_negatives=np.concatenate(hard) if hard else None,
        # full corpus: every domain's docs (other domains' docs are easy negatives)
        corpus=(np.concatenate(vectors), targets, judged) if train.objective == "full_corpus" else None,
        dev=_joint_dev(dev_parts) if dev_parts else None,
        eval_every=train.eval_every,
        groups=groups,
    )
    report.update(domain="+".join(domains))
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2))
    plot_losses(report["losses"], out_dir / "loss.png", f"multi-task adapter: {len(texts)} queries")
    return report


def train_default_experts(cfg: RouterServeConfig, data_dir: Path, progress: bool = True) -> list[str]:
    """Train the configured default experts that are missing, then rebuild the pilots of every
    default domain against the full expert set (the paper builds pilots once all experts exist).
    Pilots grouped by another rule than the config's are rebuilt as well. Returns the domains
    trained now."""
    trained = []
    root = adapters_root(cfg)
    domains = cfg.experts.training.default_domains
    pilots = load_pilots(cfg)
    for domain in domains:
        if root is not None and (root / domain / "adapter_config.json").is_file():
            continue
        logger.info("training default expert %s", domain)
        train_domain_expert(cfg, data_dir, domain, progress, pilots=False)
        trained.append(domain)
    from .pilots import build_pilots, pilots_follow_config

    have = set(pilots.domains) if pilots is not None else set()
    if trained or not set(domains) <= have or not pilots_follow_config(pilots, cfg):
        build_pilots(cfg, data_dir, list(domains), progress)  # other rule on disk: every domain
    return trained


EXPERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_expert_name(name: str) -> str:
    if not EXPERT_NAME.match(name or "") or name.lower() == "base":
        raise ValueError(
            f"invalid expert name {name!r}: 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and not 'base'"
        )
    return name


def add_expert(
    cfg: RouterServeConfig,
    data_dir: Path,
    name: str,
    adapter_dir: Path,
    domain: str | None = None,
    replace: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Register an adapter trained elsewhere as expert ``name`` and build ``domain``'s pilots.

    The adapter must be a peft LoRA folder that loads onto the configured base model (checked by
    loading it and encoding a probe before anything is written). It is copied to
    ``<experts.dir>/adapters/<name>`` (atomically: a partial copy is never visible), then the
    pilots of ``domain`` (default: ``name``; its training queries from the data dir) are rebuilt
    against every expert present. Other domains' pilots and the other adapters are untouched.
    Returns how many of the domain's training queries each expert won.
    """
    from .pilots import build_pilots

    root = adapters_root(cfg)
    if root is None:
        raise ValueError("experts.dir is null: set it to the folder that holds expert adapters and pilots")
    check_expert_name(name)
    domain = domain or name
    src = Path(adapter_dir)
    config_file = src / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{src} is not a peft adapter folder (no adapter_config.json)")
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{config_file}: peft_type is {peft_type!r}; experts are LoRA adapters ('LORA')")
    dest = root / name
    if dest.exists() and not replace:
        raise FileExistsError(f"expert {name!r} exists at {dest}; pass replace=True (--replace) to overwrite it")
    if not training_queries(data_dir, domain, 1):
        raise ValueError(f"domain {domain!r} has no judged training query under {data_dir}: pilots need some")
    try:  # fails here, before any write, when the adapter does not fit the base model
        EncoderEngine(resolve_model(cfg.model.ref), {name: src}, encoder_settings(cfg)).encode(["probe"], name)
    except Exception as exc:  # noqa: BLE001 - re-raised with what to fix
        raise ValueError(f"adapter {src} does not load onto base model {cfg.model.ref!r}: {exc}") from exc
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{name}.adding"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
    return build_pilots(cfg, data_dir, [domain], progress, owners={domain: name})[domain]


def remove_expert(cfg: RouterServeConfig, name: str) -> None:
    root = adapters_root(cfg)
    if root is None or not (root / name).is_dir():
        raise FileNotFoundError(f"no expert {name!r} under {root}")
    shutil.rmtree(root / name)
    pilots = load_pilots(cfg)
    if pilots is not None:
        pilots.restrict([e for e in pilots.expert_names if e != name]).save(pilots_path(cfg))

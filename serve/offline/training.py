"""Expert training, the default experts `routerserve up` trains, and adding/removing experts.

The files live in the expert store (serve.artifacts.experts). Adding an expert = training its
adapter and building its domain's pilots (serve.offline.pilots); nothing
else is retrained and the corpus index is untouched. Removing one = deleting its adapter and every
pilot pointing to it (``remove_expert``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from actors.beir import check_dataset_name, dataset_dir, file_sha256, iter_corpus
from actors.encoder import EncoderEngine
from actors.expert_training import (
    AdapterTrainSettings,
    mine_hard_negatives,
    plot_losses,
    train_query_adapter,
)

from serve.artifacts.experts import (
    MULTITASK,
    adapters_root,
    draft_follows_current,
    ensure_generation,
    load_pilots,
    multitask_dir,
    pilots_follow_config,
    publish_draft,
    serving_datasets,
)
from serve.artifacts.atomic import staged_dir
from serve.artifacts.generations import check_expert_name
from serve.artifacts.models import encoder_settings, resolve_model
from serve.config import ExpertTrainConfig, RouterServeConfig

from .indexing import load_corpus_vectors
from .ir import dev_scorer, domain_examples, shift_rows, split_dev, training_queries, union_offset
from .pilots import build_pilots

OnProgress = Callable[..., None]  # (stage, done=None, total=None): an admin job's progress (JobReporter.progress)

logger = logging.getLogger(__name__)


def check_domain(domain: str) -> str:
    """A domain names a dataset folder under the data dir and its expert's adapter folder."""
    return check_expert_name(check_dataset_name(domain))


def adapter_settings(train: ExpertTrainConfig, step_scale: int = 1, has_dev: bool = True) -> AdapterTrainSettings:
    """The adapter hyper-parameters of ``experts.training``; ``step_scale`` multiplies the step
    budget and the patience (the multi-task adapter gets both × its number of domains). Without
    dev queries (a domain too small to hold some out) there is nothing to stop on: every step runs."""
    return AdapterTrainSettings(
        steps=train.steps * step_scale, batch_size=train.batch_size, lr=train.lr, seed=train.seed,
        positives=train.positives, rank=train.rank, alpha=train.alpha, target_modules=tuple(train.target_modules),
        patience=None if train.patience is None or not has_dev else train.patience * step_scale,
    )


def preserve_datasets(cfg: RouterServeConfig, domain: str) -> list[str]:
    """The corpora whose passages an expert of ``domain`` is trained to leave alone
    (``experts.training.preserve_weight``): the served index's other corpora."""
    return [d for d in cfg.corpus.datasets if d != domain] if cfg.experts.training.preserve_weight > 0 else []


def preserve_passages(cfg: RouterServeConfig, data_dir: Path, domain: str) -> list[str]:
    """Up to ``experts.training.preserve_texts`` passages of the served index's corpora other than
    ``domain``'s, evenly over them, each cut to its first ``experts.training.preserve_words`` words (deterministic sample)."""
    import random

    train = cfg.experts.training
    others = preserve_datasets(cfg, domain)
    rng = random.Random(train.seed)
    out: list[str] = []
    for i, name in enumerate(others):
        share = (train.preserve_texts - len(out)) // (len(others) - i)
        texts = [" ".join(doc.as_passage().split()[:train.preserve_words])
                 for doc in iter_corpus(data_dir, name, cfg.corpus.max_docs_per_dataset)]  # the docs the index serves
        out += rng.sample(texts, min(share, len(texts)))
    return out


def train_domain_expert(
    cfg: RouterServeConfig, data_dir: Path, domain: str, progress: bool = True, pilots: bool = True,
    publish: bool = True, on_progress: OnProgress | None = None,
) -> dict:
    """Train the adapter for ``domain`` and add/replace its pilots; other experts are untouched.
    With its pilots built, the draft is published as a new generation and made current (a running
    service switches to it live) unless ``publish`` is false.

    Document vectors (positives and mined hard negatives) come from the domain's base index
    (built and cached as a Ray Data job if missing): no document is re-encoded here.
    """
    if cfg.experts.dir is None:
        raise ValueError("experts.dir is null: set it to the folder that holds expert adapters and pilots")
    check_domain(domain)
    draft_follows_current(cfg)  # after a rollback: train onto what is served
    stage = on_progress or (lambda *_: None)
    train = cfg.experts.training
    model_path = resolve_model(cfg.model.ref)
    stage(f"base vectors of {domain}")
    corpus = load_corpus_vectors(cfg, data_dir, [domain], progress,
                                 on_docs=lambda done, total: stage(f"base vectors of {domain}", done, total))
    examples = domain_examples(cfg, data_dir, domain, corpus)
    examples, dev_examples = split_dev(examples, train.dev_fraction)
    own_rows = None
    dev = dev_scorer(domain, dev_examples, corpus) if dev_examples else None
    dev_by_setting: dict[str, list[float]] = {}
    if train.negatives in ("union", "both"):  # train and choose the step against what serving searches
        names = serving_datasets(cfg, domain)
        stage(f"base vectors of {', '.join(names)}")
        union = load_corpus_vectors(cfg, data_dir, names, progress)
        offset = union_offset(union, domain, corpus)
        examples, dev_union = shift_rows(examples, offset), shift_rows(dev_examples, offset)
        in_union = dev_scorer(domain, dev_union, union) if dev_examples else None
        if train.negatives == "both":  # ... and keep the domain's own order: its own softmax, its own dev
            own_rows = [(offset, offset + len(corpus.doc_ids))] * len(examples)
            if dev_examples:
                dev = _joint_dev([in_union, dev], dev_by_setting, ["union", "domain"])
        else:
            dev = in_union
        dev_examples, corpus = dev_union, union
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
    passages = preserve_passages(cfg, data_dir, domain)
    with staged_dir(adapters_root(cfg) / domain) as out_dir:  # the old adapter stays until the new one is whole
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
            dev=dev,
            eval_every=train.eval_every,
            name=domain,
            on_step=lambda done, total: stage("training", done, total),
            preserve=(passages, train.preserve_weight),
            own_rows=own_rows,
        )
        if dev_by_setting:  # negatives: both — each dev check's nDCG@10 in either setting
            report["dev_curve_by_setting"] = dev_by_setting
        _finish_report(out_dir, report, f"expert {domain}: {len(examples)} queries", dict(
            domain=domain,
            dev_query_ids=[q for q, _, _, _ in dev_examples],
            data_hash=hashlib.sha256(
                json.dumps([(q, sorted(r)) for q, _, _, r in examples]).encode()
                + file_sha256(dataset_dir(data_dir, domain) / "corpus.jsonl").encode()
            ).hexdigest(),
            query_ids_sha256=hashlib.sha256(",".join(q for q, _, _, _ in examples).encode()).hexdigest(),
            skip_top=train.skip_top,
            negatives=train.negatives,
            negatives_datasets=sorted(set(corpus.datasets)),
            preserve_datasets=preserve_datasets(cfg, domain),
            preserve_words=train.preserve_words if train.preserve_weight > 0 else None,
        ))
    if pilots:  # this domain's pilots, against every expert present now
        stage(f"pilots of {domain}")
        build_pilots(cfg, data_dir, [domain], progress)
        if publish:
            stage("publishing")
            report["generation"] = publish_draft(cfg, f"trained expert {domain}").id
    return report


def _finish_report(out_dir: Path, report: dict, title: str, extra: dict) -> None:
    report.update(extra)
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2))
    plot_losses(report["losses"], out_dir / "loss.png", title)


def _joint_dev(parts: list[tuple[list[str], object]], history: dict[str, list[float]] | None = None,
               names: list[str] | None = None):
    """One dev set over several parts (domains, or one domain's settings): the mean of each part's
    dev score. ``history``: each part's score per evaluation is appended under its name."""
    queries = [q for qs, _ in parts for q in qs]
    bounds = np.cumsum([0] + [len(qs) for qs, _ in parts])

    def score(vectors: np.ndarray) -> float:
        scores = [fn(vectors[a:b]) for (_, fn), a, b in zip(parts, bounds[:-1], bounds[1:])]
        if history is not None:
            for name, value in zip(names or range(len(parts)), scores):
                history.setdefault(str(name), []).append(float(value))
        return float(np.mean(scores))

    return queries, score


def train_multitask_expert(cfg: RouterServeConfig, data_dir: Path, domains: list[str], progress: bool = True) -> dict:
    """One adapter trained on every domain's training data (the paper's multi-task baseline).
    ``negatives: domain``: positives, hard negatives and dev scoring in each query's own domain
    index, the full-corpus softmax over every domain's documents side by side. ``negatives: union``:
    all of them in the served index (``corpus.datasets`` + the domains), as the experts get it;
    ``negatives: both``: as ``union`` plus each query's own-domain softmax, dev scored in both."""
    if cfg.experts.dir is None:
        raise ValueError("experts.dir is null: set it to the folder that holds expert adapters and pilots")
    train = cfg.experts.training
    model_path = resolve_model(cfg.model.ref)
    base = EncoderEngine(model_path, None, encoder_settings(cfg))
    texts, positives, hard, groups = [], [], [], []
    vectors, targets, judged, offset = [], [], [], 0
    dev_parts = []  # (dev queries, score_fn) per domain: the same dev selection as the experts get
    union = None
    own_rows: list[tuple[int, int]] = []  # negatives: both — each query's own domain's rows in the union
    if train.negatives in ("union", "both"):
        union = load_corpus_vectors(cfg, data_dir, list(dict.fromkeys([*cfg.corpus.datasets, *domains])), progress)
    for domain in domains:
        corpus = load_corpus_vectors(cfg, data_dir, [domain], progress)
        examples, dev_examples = split_dev(domain_examples(cfg, data_dir, domain, corpus), train.dev_fraction)
        space = corpus
        if union is not None:  # rows of the served index, which is also the softmax's
            shift = union_offset(union, domain, corpus)
            if train.negatives == "both" and dev_examples:  # its own corpus's dev score beside the union's
                dev_parts.append(dev_scorer(domain, dev_examples, corpus))
            examples, dev_examples, space = shift_rows(examples, shift), shift_rows(dev_examples, shift), union
            if train.negatives == "both":
                own_rows += [(shift, shift + len(corpus.doc_ids))] * len(examples)
        if dev_examples:
            dev_parts.append(dev_scorer(domain, dev_examples, space))
        t = [x for _, x, _, _ in examples]
        texts += t
        groups += [domains.index(domain)] * len(t)  # one domain per batch
        positives.append(space.vectors[[b for _, _, b, _ in examples]])
        if union is None:  # the domains' corpora side by side
            vectors.append(corpus.vectors)
            targets += [offset + b for _, _, b, _ in examples]
            judged += [{offset + r for r in rows} for _, _, _, rows in examples]
            offset += corpus.vectors.shape[0]
        else:
            targets += [b for _, _, b, _ in examples]
            judged += [set(rows) for _, _, _, rows in examples]
        if train.objective == "mined" and train.hard_negatives > 0:
            rows = mine_hard_negatives(base.encode(t), space.vectors, [r for _, _, _, r in examples], train.hard_negatives, train.skip_top)
            hard.append(space.vectors[rows])
    softmax = union.vectors if union is not None else (np.concatenate(vectors) if vectors else None)
    with staged_dir(multitask_dir(cfg)) as out_dir:
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
            corpus=(softmax, targets, judged) if train.objective == "full_corpus" else None,
            dev=_joint_dev(dev_parts) if dev_parts else None,
            eval_every=train.eval_every,
            groups=groups,
            name=MULTITASK,
            own_rows=own_rows or None,
        )
        _finish_report(out_dir, report, f"multi-task adapter: {len(texts)} queries", {
            "domain": "+".join(domains), "negatives": train.negatives,
            "negatives_datasets": sorted(set(union.datasets)) if union is not None else sorted(domains)})
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
    have = set(pilots.domains) if pilots is not None else set()
    if trained or not set(domains) <= have or not pilots_follow_config(pilots, cfg):
        build_pilots(cfg, data_dir, list(domains), progress)  # other rule on disk: every domain
        publish_draft(cfg, f"default experts: trained {trained}, pilots of {list(domains)} built")
    else:
        ensure_generation(cfg)  # an expert store from before generations: its first one
    return trained


def add_expert(
    cfg: RouterServeConfig,
    data_dir: Path,
    name: str,
    adapter_dir: Path,
    domain: str | None = None,
    replace: bool = False,
    progress: bool = True,
    publish: bool = True,
    on_progress: OnProgress | None = None,
) -> dict[str, int]:
    """Register an adapter trained elsewhere as expert ``name`` and build ``domain``'s pilots, then
    publish the draft as a new current generation (unless ``publish`` is false).

    The adapter must be a peft LoRA folder that loads onto the configured base model (checked by
    loading it and encoding a probe before anything is written). It is copied to
    ``<experts.dir>/adapters/<name>`` (atomically: a partial copy is never visible), then the
    pilots of ``domain`` (default: ``name``; its training queries from the data dir) are rebuilt
    against every expert present. Other domains' pilots and the other adapters are untouched.
    Returns how many of the domain's training queries each expert won.
    """
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
    draft_follows_current(cfg)  # after a rollback: add to what is served
    dest = root / name
    if dest.exists() and not replace:
        raise FileExistsError(f"expert {name!r} exists at {dest}; pass replace=True (--replace) to overwrite it")
    if not training_queries(data_dir, domain, 1):
        raise ValueError(f"domain {domain!r} has no judged training query under {data_dir}: pilots need some")
    stage = on_progress or (lambda *_: None)
    stage("loading the adapter onto the base model")
    try:  # fails here, before any write, when the adapter does not fit the base model
        EncoderEngine(resolve_model(cfg.model.ref), {name: src}, encoder_settings(cfg)).encode(["probe"], name)
    except Exception as exc:  # noqa: BLE001 - re-raised with what to fix
        raise ValueError(f"adapter {src} does not load onto base model {cfg.model.ref!r}: {exc}") from exc
    with staged_dir(dest) as staging:  # the old adapter (--replace) stays until the copy is whole
        shutil.copytree(src, staging, dirs_exist_ok=True, symlinks=False)
    stage(f"pilots of {domain}")
    wins = build_pilots(cfg, data_dir, [domain], progress, owners={domain: name})[domain]
    if publish:
        stage("publishing")
        publish_draft(cfg, f"added expert {name} (pilots of {domain})")
    return wins

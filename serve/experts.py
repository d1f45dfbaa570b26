"""Expert artifacts on disk and the small default experts that `routerserve up` trains.

    <experts.dir>/adapters/<name>/     peft LoRA adapter folder (adapter_config.json, weights)
    <experts.dir>/pilots.npz           pilot embeddings with the expert each pilot points to

Adding an expert = adding its adapter folder and its pilots; nothing else is retrained and the
corpus index is untouched. Removing one = deleting both (``remove_expert``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np

from actors.beir import available_splits, iter_corpus, load_qrels, load_queries, seeded_half_split
from actors.encoder import EncoderEngine, adapter_dirs
from actors.expert_training import AdapterTrainSettings, domain_mean_pilots, train_query_adapter
from actors.routing import PILOTS_FILE, PilotSet

from .config import RouterServeConfig
from .indexing import encoder_settings
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


def training_queries(data_dir: Path, domain: str, max_queries: int) -> list[tuple[str, str, str]]:
    """(query id, query text, positive doc id) for the domain's training queries.

    The 'train' split where one exists; otherwise the train half of a seeded split of the judged
    queries (actors.beir.seeded_half_split), so the other half stays unseen for evaluation.
    """
    queries = load_queries(data_dir, domain)
    if "train" in available_splits(data_dir, domain):
        qrels = load_qrels(data_dir, domain, "train")
        qids = sorted(qrels)
    else:
        split = "test" if "test" in available_splits(data_dir, domain) else available_splits(data_dir, domain)[0]
        qrels = load_qrels(data_dir, domain, split)
        qids, _ = seeded_half_split(sorted(qrels))
    qids = [q for q in qids if q in queries and any(s > 0 for s in qrels[q].values())]
    qids.sort(key=lambda q: hashlib.sha256(q.encode()).hexdigest())
    out = []
    for qid in qids[:max_queries]:
        best = max(qrels[qid].items(), key=lambda kv: (kv[1], kv[0]))[0]
        out.append((qid, queries[qid], best))
    return out


def train_domain_expert(
    cfg: RouterServeConfig, data_dir: Path, domain: str, progress: bool = True
) -> dict:
    """Train the adapter for ``domain`` and add/replace its pilots; other experts are untouched."""
    if cfg.experts.dir is None:
        raise ValueError("experts.dir is null: set it to the folder that holds expert adapters and pilots")
    boot = cfg.experts.bootstrap
    model_path = resolve_model(cfg.model.ref)
    examples = training_queries(data_dir, domain, boot.max_queries)
    wanted = {doc for _, _, doc in examples}
    docs = {d.doc_id: d for d in iter_corpus(data_dir, domain) if d.doc_id in wanted}
    examples = [e for e in examples if e[2] in docs]
    if len(examples) < 2:
        raise ValueError(f"domain {domain!r}: fewer than 2 training queries with a judged document")
    settings = encoder_settings(cfg)
    base = EncoderEngine(model_path, None, settings)
    doc_ids = sorted(wanted & set(docs))
    doc_vecs = base.encode([docs[d].as_passage() for d in doc_ids])
    row = {d: i for i, d in enumerate(doc_ids)}
    positives = np.stack([doc_vecs[row[doc]] for _, _, doc in examples])
    out_dir = adapters_root(cfg) / domain
    report = train_query_adapter(
        model_path,
        settings,
        [q for _, q, _ in examples],
        positives,
        out_dir,
        AdapterTrainSettings(steps=boot.steps, batch_size=boot.batch_size, lr=boot.lr, seed=boot.seed),
        progress=progress,
    )
    new = domain_mean_pilots(base, {domain: [q for _, q, _ in examples]}, base_model=cfg.model.ref)
    current = load_pilots(cfg)
    merged = current.merged_with(new) if current is not None else new
    merged.save(pilots_path(cfg))
    return report


def bootstrap_experts(cfg: RouterServeConfig, data_dir: Path, progress: bool = True) -> list[str]:
    """Train the configured default experts that are missing (adapter or pilots); returns those trained."""
    trained = []
    root = adapters_root(cfg)
    for domain in cfg.experts.bootstrap.domains:
        pilots = load_pilots(cfg)
        have_adapter = root is not None and (root / domain / "adapter_config.json").is_file()
        have_pilots = pilots is not None and domain in pilots.expert_names
        if have_adapter and have_pilots:
            continue
        logger.info("training default expert %s", domain)
        train_domain_expert(cfg, data_dir, domain, progress)
        trained.append(domain)
    return trained


def remove_expert(cfg: RouterServeConfig, name: str) -> None:
    root = adapters_root(cfg)
    if root is None or not (root / name).is_dir():
        raise FileNotFoundError(f"no expert {name!r} under {root}")
    shutil.rmtree(root / name)
    pilots = load_pilots(cfg)
    if pilots is not None:
        pilots.restrict([e for e in pilots.expert_names if e != name]).save(pilots_path(cfg))

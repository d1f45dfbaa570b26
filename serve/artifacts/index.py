"""Where the corpus index for a config lives (a content hash of model, corpus and settings); the
online builder finds it here, the offline indexing job writes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from actors.beir import dataset_dir, file_sha256
from actors.index_store import IndexNotBuiltError, index_key, shards_dir

from serve.config import RouterServeConfig

from .models import model_fingerprint, resolve_model


@dataclass
class IndexLocation:
    root: Path  # <index.dir>/<key>
    key: str
    model_path: Path
    model_fingerprint: str


def locate_index(cfg: RouterServeConfig, data_dir: Path) -> IndexLocation:
    """Where the index for this (model, corpus, settings) lives; computing it reads no vectors."""
    model_path = resolve_model(cfg.model.ref)
    fp = model_fingerprint(model_path)
    corpus_hashes = {
        name: file_sha256(dataset_dir(data_dir, name) / "corpus.jsonl") for name in cfg.corpus.datasets
    }
    settings = {
        "pooling": cfg.model.pooling,
        "similarity": cfg.model.similarity,
        "max_seq_length": cfg.model.max_seq_length,
        "max_docs_per_dataset": cfg.corpus.max_docs_per_dataset,
        "datasets": list(cfg.corpus.datasets),
        "chunk_size": cfg.index.chunk_size,
    }
    key = index_key(fp, corpus_hashes, settings)
    return IndexLocation(Path(cfg.index.dir) / key, key, model_path, fp)


def manifest_dir(cfg: RouterServeConfig, data_dir: Path) -> Path:
    loc = locate_index(cfg, data_dir)
    return shards_dir(loc.root, cfg.index.num_shards, cfg.index.factory, cfg.index.train_size)


def require_index(cfg: RouterServeConfig, data_dir: Path) -> Path:
    folder = manifest_dir(cfg, data_dir)
    if not (folder / "manifest.json").is_file():
        raise IndexNotBuiltError(
            f"index for datasets {cfg.corpus.datasets} ({cfg.index.factory}, {cfg.index.num_shards} shard(s)) is not built "
            f"(expected {folder}); run 'routerserve index build'"
        )
    return folder

"""`routerserve index build`: encode a BEIR corpus with the base model (a Ray Data job) and write
FAISS shard files plus the doc store. Cached and resumable by content hash; see actors.index_store.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from actors.beir import iter_corpus
from actors.encoder import EncoderSettings
from actors.index_store import (
    DOCS_FILE,
    DocStore,
    IndexManifest,
    ShardEntry,
    shards_dir,
    trained_path,
)
from actors.search import build_flat_index, factory_knobs, split_ranges, training_sample

from serve.artifacts.atomic import staged_dir
from serve.artifacts.index import IndexLocation, locate_index
from serve.artifacts.models import encoder_settings
from serve.config import ConfigError, RouterServeConfig

logger = logging.getLogger(__name__)


class _EncodeBatch:
    """Ray Data callable class: one EncoderEngine per actor, base model only."""

    def __init__(self, model_path: str, settings: EncoderSettings):
        from actors.encoder import EncoderEngine

        self.engine = EncoderEngine(model_path, None, settings)

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        vectors = self.engine.encode(texts)
        return {"row": np.asarray(batch["row"], dtype=np.int64), "vector": vectors}


def build_index(cfg: RouterServeConfig, data_dir: Path, progress: bool = True) -> Path:
    """Build (or reuse) the index; returns the folder holding manifest.json.

    index.factory Flat: exact shards, written here. Any other type: one index trained on a seeded
    sample of index.train_size vectors (cached under trained/ by content hash), then every shard
    filled from that template — both Ray tasks, so the same command runs on a cluster. The shard
    folder appears whole or not at all (staged, then swapped in)."""
    ix = cfg.index
    loc = locate_index(cfg, data_dir)
    out = shards_dir(loc.root, ix.num_shards, ix.factory, ix.train_size)
    if (out / "manifest.json").is_file():
        logger.info("index %s is up to date", out)
        return out
    declared = _model_dim(loc.model_path)
    if declared is not None:  # a factory that cannot hold these vectors fails before hours of encoding
        _index_knobs(ix.factory, declared)
    vectors, encode_seconds = _corpus_vectors(cfg, data_dir, loc, progress)
    n, dim = vectors.shape
    knobs = _index_knobs(ix.factory, dim)
    ranges = split_ranges(n, ix.num_shards)
    names = [f"shard_{i:03d}.faiss" for i in range(len(ranges))]
    manifest = IndexManifest(
        key=loc.key,
        model_ref=cfg.model.ref,
        model_fingerprint=loc.model_fingerprint,
        dim=int(dim),
        similarity=cfg.model.similarity,
        pooling=cfg.model.pooling,
        max_seq_length=cfg.model.max_seq_length,
        datasets=list(cfg.corpus.datasets),
        num_docs=n,
        shards=[ShardEntry(name, a, b - a) for name, (a, b) in zip(names, ranges)],
        encode_seconds=encode_seconds,
        factory=ix.factory,
        knobs=list(knobs),
    )
    import faiss

    with staged_dir(out) as staging:
        if ix.factory == "Flat":
            t0 = time.perf_counter()
            for name, (a, b) in zip(names, ranges):
                faiss.write_index(build_flat_index(vectors[a:b]), str(staging / name))
            manifest.fill_seconds = time.perf_counter() - t0
        else:
            _build_trained(cfg, loc, vectors, ranges, names, staging, manifest, progress)
        manifest.save(staging)
    return out


def _model_dim(model_path: Path) -> int | None:
    """The embedding size the model declares (transformers config.json: hidden_size), if it does."""
    import json

    try:
        return int(json.loads((Path(model_path) / "config.json").read_text())["hidden_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _index_knobs(factory: str, dim: int) -> tuple[str, ...]:
    try:
        return factory_knobs(factory, dim)
    except ValueError as exc:
        raise ConfigError(f"index.factory: {exc} (the model's vectors have {dim} dimensions)") from None


def _train_task(factory: str, sample: np.ndarray) -> np.ndarray:
    import faiss

    from actors.search import train_index

    return faiss.serialize_index(train_index(factory, sample))


def _fill_task(template: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    import faiss

    from actors.search import fill_shard

    return faiss.serialize_index(fill_shard(faiss.deserialize_index(template), vectors))


def _build_trained(cfg: RouterServeConfig, loc: IndexLocation, vectors: np.ndarray, ranges, names, staging: Path,
                   manifest: IndexManifest, progress: bool) -> None:
    """Train the template once (or reuse it) and fill every shard from it, as Ray tasks."""
    import ray
    from tqdm.auto import tqdm

    from serve.deploy.cluster import ensure_ray

    ix = cfg.index
    ensure_ray(cfg.ray)
    task = {"num_cpus": ix.encode_num_cpus}
    template_file = trained_path(loc.root, ix.factory, ix.train_size)
    size = min(ix.train_size, len(vectors))
    if template_file.is_file():
        template = np.fromfile(template_file, dtype=np.uint8)
    else:
        t0 = time.perf_counter()
        logger.info("training %s on %d of %d vectors", ix.factory, size, len(vectors))
        try:
            template = ray.get(ray.remote(**task)(_train_task).remote(ix.factory, training_sample(vectors, size)))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ValueError):  # too few vectors for the lists/codebooks: actors.search
                raise ConfigError(f"index.factory: {cause}") from None
            raise
        manifest.train_seconds = time.perf_counter() - t0
        template_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = template_file.with_suffix(f".tmp-{os.getpid()}")
        template.tofile(tmp)
        os.replace(tmp, template_file)
    manifest.trained_file = str(template_file.relative_to(loc.root))
    manifest.train_size = size
    t0 = time.perf_counter()
    template_ref = ray.put(template)
    fill = ray.remote(**task)(_fill_task)  # each task is sent its own rows only
    pending = {fill.remote(template_ref, ray.put(np.ascontiguousarray(vectors[a:b], dtype=np.float32))): name
               for name, (a, b) in zip(names, ranges)}
    bar = tqdm(total=len(pending), desc=f"fill {ix.factory} shards", unit="shard", disable=not progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ray.get(done[0]).tofile(staging / pending.pop(done[0]))
            bar.update(1)
    finally:  # a failed shard: the others stop too (the staged folder is then discarded)
        for ref in pending:
            ray.cancel(ref)
        bar.close()
    manifest.fill_seconds = time.perf_counter() - t0


def _corpus_vectors(cfg: RouterServeConfig, data_dir: Path, loc: IndexLocation, progress: bool,
                    ) -> tuple[np.ndarray, float]:
    """The corpus's base-model vectors. A union of datasets is the concatenation of the
    per-dataset caches (what expert training encoded already): nothing is encoded twice."""
    if len(cfg.corpus.datasets) == 1:
        return _encode_corpus(cfg, data_dir, loc, progress)
    t0 = time.perf_counter()
    corpus = load_corpus_vectors(cfg, data_dir, list(cfg.corpus.datasets), progress)
    docs_path = loc.root / DOCS_FILE
    if not docs_path.is_file():
        loc.root.mkdir(parents=True, exist_ok=True)
        DocStore.write(docs_path, (d for name in cfg.corpus.datasets
                                   for d in iter_corpus(data_dir, name, cfg.corpus.max_docs_per_dataset)))
    import pyarrow.parquet as pq

    listed = pq.read_table(docs_path, columns=["dataset", "doc_id"])  # two columns, not the store's text
    if (listed.column("dataset").to_pylist() != corpus.datasets
            or listed.column("doc_id").to_pylist() != corpus.doc_ids):  # row i of the store is row i of the vectors
        raise RuntimeError(f"{docs_path} does not list the documents of {cfg.corpus.datasets} in the order of their "
                           f"vectors ({listed.num_rows} rows for {len(corpus.vectors)} vectors); delete it and rebuild")
    return np.ascontiguousarray(corpus.vectors, dtype=np.float32), time.perf_counter() - t0


def _encode_corpus(cfg: RouterServeConfig, data_dir: Path, loc: IndexLocation, progress: bool,
                   on_docs: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, float]:
    """docs.parquet + every chunk of base-model vectors (encoding only the missing chunks)."""
    loc.root.mkdir(parents=True, exist_ok=True)
    docs_path = loc.root / DOCS_FILE
    docs = [
        d
        for name in cfg.corpus.datasets
        for d in iter_corpus(data_dir, name, cfg.corpus.max_docs_per_dataset)
    ]
    if not docs:
        raise ValueError(f"corpus.datasets {cfg.corpus.datasets}: no documents found")
    if not docs_path.is_file():
        DocStore.write(docs_path, docs)
    n = len(docs)
    chunk = cfg.index.chunk_size
    chunk_dir = loc.root / "chunks"
    chunk_dir.mkdir(exist_ok=True)
    chunk_ids = list(range((n + chunk - 1) // chunk))
    chunk_file = lambda c: chunk_dir / f"chunk_{c:05d}.npy"  # noqa: E731
    pending = [c for c in chunk_ids if not chunk_file(c).is_file()]
    t0 = time.perf_counter()
    if pending:
        _encode_pending(cfg, loc, docs, pending, chunk, chunk_file, progress, on_docs)
    encode_seconds = time.perf_counter() - t0
    vectors = np.concatenate([np.load(chunk_file(c)) for c in chunk_ids])
    if vectors.shape[0] != n:
        raise RuntimeError(f"encoded {vectors.shape[0]} vectors for {n} documents; delete {chunk_dir} and rebuild")
    return vectors, encode_seconds


def _encode_pending(cfg, loc, docs, pending, chunk, chunk_file, progress, on_docs=None) -> None:
    import ray
    from tqdm.auto import tqdm

    from serve.deploy.cluster import ensure_ray

    ensure_ray(cfg.ray)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar below counts documents
    rows = [
        {"row": r, "text": docs[r].as_passage()}
        for c in pending
        for r in range(c * chunk, min((c + 1) * chunk, len(docs)))
    ]
    ds = ray.data.from_items(rows).map_batches(
        _EncodeBatch,
        fn_constructor_kwargs={"model_path": str(loc.model_path), "settings": encoder_settings(cfg)},
        batch_size=cfg.model.batch_size,
        concurrency=cfg.index.encode_workers,
        num_cpus=cfg.index.encode_num_cpus,
        batch_format="numpy",
    )
    buffers: dict[int, dict[int, np.ndarray]] = {c: {} for c in pending}
    bar = tqdm(total=len(rows), desc="encode corpus", unit="doc", disable=not progress)
    encoded = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for row, vec in zip(batch["row"], batch["vector"]):
            c = int(row) // chunk
            buffers[c][int(row)] = vec
            size = min((c + 1) * chunk, len(docs)) - c * chunk
            if len(buffers[c]) == size:
                ordered = np.stack([buffers[c][r] for r in range(c * chunk, c * chunk + size)])
                tmp = chunk_file(c).with_suffix(".tmp.npy")
                np.save(tmp, ordered.astype(np.float32))
                tmp.replace(chunk_file(c))
                del buffers[c]
        bar.update(len(batch["row"]))
        encoded += len(batch["row"])
        if on_docs is not None:  # (documents encoded, documents to encode): an admin job's progress
            on_docs(encoded, len(rows))
    bar.close()
    if buffers:
        raise RuntimeError(f"encoding finished with incomplete chunks {sorted(buffers)}")


@dataclass
class Corpus:
    name: str
    doc_ids: list[str]
    datasets: list[str]
    vectors: np.ndarray


def load_corpus_vectors(cfg: RouterServeConfig, data_dir: Path, datasets: list[str], progress: bool = True,
                        on_docs: Callable[[int, int], None] | None = None) -> Corpus:
    """Base-model vectors of these datasets, from (or into) the shared index cache (no shards
    written; encoding only what is missing, as a Ray Data job)."""
    import pyarrow.parquet as pq

    if len(datasets) > 1:  # a union is the concatenation of the per-dataset caches: encode nothing twice
        parts = [load_corpus_vectors(cfg, data_dir, [d], progress, on_docs) for d in datasets]
        return Corpus(
            "+".join(datasets),
            [i for p in parts for i in p.doc_ids],
            [x for p in parts for x in p.datasets],
            np.concatenate([p.vectors for p in parts]),
        )
    sub = cfg.model_copy(deep=True)
    sub.corpus.datasets = list(datasets)
    loc = locate_index(sub, data_dir)
    vectors, _ = _encode_corpus(sub, data_dir, loc, progress, on_docs)
    table = pq.read_table(loc.root / "docs.parquet", columns=["doc_id", "dataset"])
    return Corpus("+".join(datasets), table.column("doc_id").to_pylist(), table.column("dataset").to_pylist(), vectors)

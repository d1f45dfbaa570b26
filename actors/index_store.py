"""On-disk layout of a corpus index (written by `routerserve index build`, read by the service).

    <index.dir>/<key>/                 key = content hash of (model, corpus files, encode settings)
        docs.parquet                   row -> doc_id, title, text, dataset
        chunks/chunk_00000.npy         base-model vectors, one file per encoding chunk (resumable)
        shards-<S>/manifest.json       what the service loads (index.factory Flat)
        shards-<S>/shard_000.faiss     exact inner-product index of rows [offset, offset+count)
        trained/<type>-<h>.faiss       a trained empty index (index.factory + train_size: h), the
                                       template every shard of that type is filled from
        shards-<S>-<type>-<h>/…        the shards of a trained/approximate type

Changing the shard count re-splits the cached vectors and refills the cached trained index; it
never re-encodes nor re-trains.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DOCS_FILE = "docs.parquet"


class IndexNotBuiltError(FileNotFoundError):
    pass


@dataclass
class ShardEntry:
    file: str
    offset: int
    count: int


@dataclass
class IndexManifest:
    key: str
    model_ref: str
    model_fingerprint: str
    dim: int
    similarity: str
    pooling: str
    max_seq_length: int
    datasets: list[str]
    num_docs: int
    shards: list[ShardEntry] = field(default_factory=list)
    encode_seconds: float = 0.0
    factory: str = "Flat"  # the faiss.index_factory string of every shard (inner product)
    knobs: list[str] = field(default_factory=list)  # its search knobs (actors.search.index_knobs)
    trained_file: str | None = None  # the trained template the shards were filled from (relative to the key folder)
    train_size: int = 0  # vectors it was trained on
    train_seconds: float = 0.0  # 0 when the template was cached
    fill_seconds: float = 0.0  # adding the vectors to every shard

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, folder / MANIFEST)
        return folder / MANIFEST

    @classmethod
    def load(cls, folder: Path) -> "IndexManifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise IndexNotBuiltError(f"no index manifest at {path}; run 'routerserve index build'")
        data = json.loads(path.read_text())
        data["shards"] = [ShardEntry(**s) for s in data["shards"]]
        return cls(**data)


def index_key(model_fingerprint: str, corpus_hashes: dict[str, str], settings: dict) -> str:
    payload = json.dumps(
        {"model": model_fingerprint, "corpus": corpus_hashes, "settings": settings}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def index_type_tag(factory: str, train_size: int) -> str:
    """A path-safe name for an index type: the factory string's letters and digits, and a hash of
    (factory, train_size), so two strings never share a folder."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", factory).strip("_")[:40] or "index"
    digest = hashlib.sha256(json.dumps([factory, int(train_size)]).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def shards_dir(index_root: Path, num_shards: int, factory: str = "Flat", train_size: int = 0) -> Path:
    if factory == "Flat":  # the exact index keeps its folder of before index types existed
        return Path(index_root) / f"shards-{num_shards}"
    return Path(index_root) / f"shards-{num_shards}-{index_type_tag(factory, train_size)}"


def trained_path(index_root: Path, factory: str, train_size: int) -> Path:
    return Path(index_root) / "trained" / f"{index_type_tag(factory, train_size)}.faiss"


class DocStore:
    """Row id -> (doc_id, title, text, dataset), read on demand from a memory-mapped Arrow file.

    docs.parquet is the artifact `index build` writes (compact, portable); beside it docs.arrow,
    the same table as an uncompressed Arrow IPC file, is what a replica maps: opening it reads
    nothing, a hit reads its own row, and replicas on one node share the pages — so a replica's
    memory does not grow with the corpus (100 M documents' text would not fit in each ingress).
    docs.arrow carries the fingerprint of the parquet it was made from (size and row count, in
    its schema metadata): written by ``write``, and converted again by a reader only when it is
    missing or its fingerprint differs (one process at a time: a lock file beside it). On a
    volume where it cannot be written (read-only: EROFS, EACCES, EPERM) the parquet is loaded into
    memory instead, with a warning — correct, but the memory the map would have saved."""

    COLUMNS = ("doc_id", "title", "text", "dataset")
    FINGERPRINT = b"routerserve.parquet"

    def __init__(self, path: str | os.PathLike):
        import pyarrow as pa

        arrow, parquet = self.arrow_path(path), Path(path)
        table = None
        if not self._fresh(parquet, arrow):
            try:
                self._convert_once(parquet, arrow)
            except OSError as exc:
                if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                import pyarrow.parquet as pq

                logger.warning("doc store %s: its Arrow copy is missing or stale and cannot be written (%s): loading "
                               "it into memory; rebuild the index where the volume is writable to map it", parquet, exc)
                table = pq.read_table(str(parquet))
        if table is None:
            table = pa.ipc.open_file(pa.memory_map(str(arrow), "r")).read_all()  # zero-copy: views into the map
        self._columns = {c: table.column(c) for c in self.COLUMNS}
        self._rows = table.num_rows
        self._corpora: list[str] | None = None

    @staticmethod
    def arrow_path(path: str | os.PathLike) -> Path:
        return Path(path).with_suffix(".arrow")

    @classmethod
    def _fingerprint(cls, parquet: Path) -> bytes:
        import pyarrow.parquet as pq

        return json.dumps([parquet.stat().st_size, pq.ParquetFile(str(parquet)).metadata.num_rows]).encode()

    @classmethod
    def _fresh(cls, parquet: Path, arrow: Path) -> bool:
        """docs.arrow exists and was made from this docs.parquet (or there is no parquet beside it)."""
        import pyarrow as pa

        if not arrow.is_file():
            return False
        if not parquet.is_file():
            return True
        try:
            meta = pa.ipc.open_file(pa.memory_map(str(arrow), "r")).schema.metadata or {}
        except pa.ArrowInvalid:  # torn or foreign: convert again
            return False
        return meta.get(cls.FINGERPRINT) == cls._fingerprint(parquet)

    @classmethod
    def _convert_once(cls, parquet: Path, arrow: Path) -> None:
        """Convert under an exclusive lock; a process that waited finds it done."""
        import fcntl

        with open(arrow.with_name(f".{arrow.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not cls._fresh(parquet, arrow):
                cls._convert(parquet, arrow)

    @classmethod
    def _convert(cls, parquet: Path, arrow: Path, batch_rows: int = 65536) -> None:
        import socket
        import uuid

        import pyarrow as pa
        import pyarrow.parquet as pq

        source = pq.ParquetFile(str(parquet))
        schema = source.schema_arrow.with_metadata({cls.FINGERPRINT: cls._fingerprint(parquet)})
        tmp = arrow.with_name(f".{arrow.name}.tmp-{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
        try:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for batch in source.iter_batches(batch_size=batch_rows):
                    writer.write_batch(batch)
            os.replace(tmp, arrow)
        finally:
            tmp.unlink(missing_ok=True)

    def __len__(self) -> int:
        return self._rows

    def field(self, column: str, row: int):
        return self._columns[column][row].as_py()

    def corpora(self) -> list[str]:
        """The datasets the documents come from (computed once: a pass over one column)."""
        if self._corpora is None:
            import pyarrow.compute as pc

            self._corpora = sorted(pc.unique(self._columns["dataset"]).to_pylist())
        return self._corpora

    def hit(self, row: int, score: float, include_text: bool) -> dict:
        out = {
            "doc_id": self.field("doc_id", row),
            "dataset": self.field("dataset", row),
            "score": float(score),
            "title": self.field("title", row),
        }
        if include_text:
            out["text"] = self.field("text", row)
        return out

    @staticmethod
    def write(path: str | os.PathLike, docs) -> int:
        """docs.parquet and its docs.arrow, each written to a temporary name and renamed."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {"doc_id": [], "title": [], "text": [], "dataset": []}
        for d in docs:
            cols["doc_id"].append(d.doc_id)
            cols["title"].append(d.title)
            cols["text"].append(d.text)
            cols["dataset"].append(d.dataset)
        tmp = Path(str(path) + ".tmp")
        pq.write_table(pa.table(cols), str(tmp))
        os.replace(tmp, path)
        DocStore._convert(Path(path), DocStore.arrow_path(path))
        return len(cols["doc_id"])

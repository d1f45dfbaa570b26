"""Reading BEIR-layout datasets (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class Doc:
    doc_id: str
    title: str
    text: str
    dataset: str

    def as_passage(self) -> str:
        """The text the encoder sees: title and body, as BEIR encoders do."""
        return f"{self.title}. {self.text}" if self.title else self.text


DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one path component, never '.' or '..'


def check_dataset_name(name: str) -> str:
    """A dataset name becomes a folder under the data dir: one plain path component, no
    separators (``--domain ../x`` or an absolute path never leaves the data dir)."""
    if not DATASET_NAME.match(name or ""):
        raise DatasetError(f"invalid dataset name {name!r}: letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit (a folder under the data dir)")
    return name


def dataset_dir(data_dir: str | os.PathLike, name: str) -> Path:
    path = Path(data_dir) / check_dataset_name(name)
    if not (path / "corpus.jsonl").is_file():
        raise DatasetError(
            f"dataset {name!r} not found: {path / 'corpus.jsonl'} does not exist "
            f"(set --data-dir or ROUTERSERVE_DATA_DIR to a folder of BEIR-layout datasets)"
        )
    return path


def iter_corpus(data_dir: str | os.PathLike, name: str, limit: int | None = None) -> Iterator[Doc]:
    path = dataset_dir(data_dir, name) / "corpus.jsonl"
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and lineno > limit:
                return
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield Doc(str(row["_id"]), row.get("title") or "", row.get("text") or "", name)
            except (json.JSONDecodeError, KeyError) as exc:
                raise DatasetError(f"{path}:{lineno}: bad corpus line ({exc})") from exc


def load_queries(data_dir: str | os.PathLike, name: str) -> dict[str, str]:
    path = dataset_dir(data_dir, name) / "queries.jsonl"
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["_id"])] = row["text"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise DatasetError(f"{path}:{lineno}: bad query line ({exc})") from exc
    return out


def available_splits(data_dir: str | os.PathLike, name: str) -> list[str]:
    qrels = dataset_dir(data_dir, name) / "qrels"
    return sorted(p.stem for p in qrels.glob("*.tsv")) if qrels.is_dir() else []


def load_qrels(data_dir: str | os.PathLike, name: str, split: str) -> dict[str, dict[str, int]]:
    path = dataset_dir(data_dir, name) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise DatasetError(f"qrels split {split!r} of {name!r} not found: {path}")
    out: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None or header[:2] != ["query-id", "corpus-id"]:
            raise DatasetError(f"{path}: expected header 'query-id\\tcorpus-id\\tscore'")
        for row in reader:
            if len(row) < 3:
                continue
            out.setdefault(row[0], {})[row[1]] = int(row[2])
    return out


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def seeded_half_split(query_ids: list[str], seed: int = 13) -> tuple[list[str], list[str]]:
    """Deterministic train/test halves for datasets without a train split.

    A query goes to train when sha256(f"{seed}:{qid}") is even; stable across runs and machines,
    independent of file order.
    """
    train, test = [], []
    for qid in query_ids:
        digest = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
        (train if digest[0] % 2 == 0 else test).append(qid)
    return train, test

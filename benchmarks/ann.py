"""Approximate search, measured (issue 18, step 1: in-process, no serving): for each FAISS index
type and search knob, recall@10 against exact search, QPS at batch 1 and 64 on one thread, build
(train + add) time and memory, on the real base-model embeddings of every corpus in the data
directory, queried with the real test queries' base-model embeddings.

    .venv/bin/python benchmarks/ann.py [--datasets scifact,nfcorpus,cranfield,arguana,npl]
        [--indexes "Flat;IVF512,Flat;IVF512,SQ8;HNSW32"] [--synthetic 0] [--out benchmarks/results]

--synthetic N adds a set of N vectors drawn to resemble the real ones: k-means (faiss.Kmeans,
64 centroids) on the real document vectors, then per centroid a diagonal Gaussian with that
cluster's per-dimension residual standard deviation; each vector picks a cluster with the
clusters' real frequencies, draws centroid + noise, and is L2-normalised (as the encoder's are).

Writes <out>/ann.{json,md}: one row per (vector set, index type, knob) with index, vectors, knob,
recall_at_10, qps_batch1, qps_batch64, speedup_vs_flat, memory_mib, build_s.
Still to come (issue 18): nDCG@10 with ANN vs flat, 1 M vectors, sharded ANN through Serve.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, git_commit, machine, write_json, write_markdown  # noqa: E402

app = typer.Typer(add_completion=False)
KNOBS = {"IVF": ("nprobe", [1, 4, 16, 64]), "HNSW": ("efSearch", [16, 32, 64, 128])}


def knob_of(factory: str) -> tuple[str | None, list]:
    """The search-time knob of a factory string and the values to try (Flat: none)."""
    for prefix, (name, values) in KNOBS.items():
        if prefix in factory:
            return name, values
    return None, [None]


def set_knob(index, name: str | None, value) -> None:
    import faiss

    if name is not None:
        faiss.ParameterSpace().set_index_parameter(index, name, value)


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's exact top-k ids that the approximate top-k holds."""
    hits = [len(set(f[:k]) & set(e[:k])) for f, e in zip(found, exact)]
    return float(np.mean(hits)) / k


def qps(index, queries: np.ndarray, batch: int, k: int = 10, min_s: float = 1.0) -> float:
    """Queries per second searching ``batch`` at a time, over at least ``min_s`` seconds."""
    n, t0 = 0, time.perf_counter()
    while True:
        for start in range(0, len(queries), batch):
            index.search(queries[start : start + batch], k)
            n += len(queries[start : start + batch])
            if time.perf_counter() - t0 >= min_s and n >= batch:
                return n / (time.perf_counter() - t0)


def build(factory: str, vectors: np.ndarray, train_max: int = 100_000, seed: int = 0):
    """``faiss.index_factory`` with inner product, trained on a sample of at most ``train_max``."""
    import faiss

    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(len(vectors), min(train_max, len(vectors)), replace=False)]
        index.train(sample)
    index.add(vectors)
    return index, time.perf_counter() - t0


def memory_mib(index) -> float:
    import faiss

    return faiss.serialize_index(index).nbytes / 2**20


def synthetic(vectors: np.ndarray, n: int, clusters: int = 64, seed: int = 0) -> np.ndarray:
    """N vectors resembling ``vectors`` (see the module doc): per-cluster diagonal Gaussians."""
    import faiss

    km = faiss.Kmeans(vectors.shape[1], clusters, niter=20, seed=seed, spherical=True)
    km.train(vectors)
    _, assign = km.index.search(vectors, 1)
    assign = assign[:, 0]
    rng = np.random.default_rng(seed)
    weights = np.bincount(assign, minlength=clusters) / len(assign)
    std = np.stack([vectors[assign == c].std(axis=0) if (assign == c).sum() > 1 else np.full(vectors.shape[1], 1e-3)
                    for c in range(clusters)])
    pick = rng.choice(clusters, n, p=weights)
    out = km.centroids[pick] + rng.standard_normal((n, vectors.shape[1])).astype(np.float32) * std[pick]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.astype(np.float32)


def measure(name: str, vectors: np.ndarray, queries: np.ndarray, factories: list[str]) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(1)  # per shard replica: one thread (the serving default)
    flat, flat_build = build("Flat", vectors)
    _, exact = flat.search(queries, 10)
    flat_qps1 = qps(flat, queries, 1)
    rows = []
    for factory in factories:
        index, build_s = (flat, flat_build) if factory == "Flat" else build(factory, vectors)
        knob, values = knob_of(factory)
        for value in values:
            set_knob(index, knob, value)
            _, found = index.search(queries, 10)
            row = {"vectors": name, "n": len(vectors), "index": factory, "knob": None if knob is None else f"{knob}={value}",
                   "recall_at_10": recall_at_k(found, exact), "qps_batch1": qps(index, queries, 1),
                   "qps_batch64": qps(index, queries, 64), "memory_mib": memory_mib(index), "build_s": build_s}
            row["speedup_vs_flat"] = row["qps_batch1"] / flat_qps1
            rows.append(row)
            print(f"  {name} {factory:16s} {row['knob'] or '':12s} recall@10 {row['recall_at_10']:.3f} "
                  f"qps b1 {row['qps_batch1']:8.0f} b64 {row['qps_batch64']:8.0f} ×{row['speedup_vs_flat']:.1f} "
                  f"{row['memory_mib']:.0f} MiB build {build_s:.1f} s", flush=True)
    return rows


def real_vectors(datasets: list[str], max_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Every listed corpus's cached base-model document vectors, and base-model embeddings of
    up to ``max_queries`` test queries spread over the datasets."""
    from actors.encoder import EncoderEngine
    from retrieval_load import _queries
    from serve.artifacts.models import encoder_settings, resolve_model
    from serve.config import load_config
    from serve.offline.indexing import load_corpus_vectors

    cfg = load_config(None, ["llm.enabled=false"]).absolutized()
    data_dir = cfg.resolve_data_dir(None)
    corpus = load_corpus_vectors(cfg, data_dir, datasets)
    qs = _queries(data_dir, datasets, max_queries)
    engine = EncoderEngine(resolve_model(cfg.model.ref), None, encoder_settings(cfg))
    return np.ascontiguousarray(corpus.vectors, dtype=np.float32), engine.encode(qs)


@app.command()
def main(
    datasets: str = typer.Option("scifact,nfcorpus,cranfield,arguana,npl"),
    indexes: str = typer.Option("Flat;IVF512,Flat;IVF512,SQ8;IVF512,PQ32x8;HNSW32;HNSW32,SQ8",
                                help="faiss.index_factory strings, ';'-separated"),
    queries: int = typer.Option(1000, help="test queries (spread over the datasets)"),
    synthetic_n: int = typer.Option(0, "--synthetic", help="also a synthetic set of this many vectors (module doc)"),
    synthetic_indexes: Optional[str] = typer.Option(None, help="index strings for the synthetic set (default: --indexes)"),
    out: Path = typer.Option(RESULTS),
):
    stamp = {"command": command_line(), "commit": git_commit()}
    docs, qv = real_vectors(datasets.split(","), queries)
    print(f"[real] {len(docs)} document vectors, {len(qv)} queries", flush=True)
    rows = measure("real", docs, qv, indexes.split(";"))
    if synthetic_n:
        syn = synthetic(docs, synthetic_n)
        print(f"[synthetic] {len(syn)} vectors", flush=True)
        rows += measure(f"synthetic-{synthetic_n}", syn, qv, (synthetic_indexes or indexes).split(";"))
    doc = {**stamp, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "datasets": datasets.split(","), "queries": len(qv), "threads": 1, "rows": rows}
    print(write_json("ann", doc, out))
    render(doc, out)


def render(doc: dict, out: Path) -> None:
    lines = ["# Approximate search, in-process (issue 18, step 1)", "",
             f"`{doc['command']}` · commit {doc['commit']} · {doc['date']}", "",
             f"Machine: {doc['machine'].get('cpu', '?')}, {doc['machine'].get('logical_cpus', '?')} CPUs; FAISS on "
             f"{doc['threads']} thread (one shard replica's default). Vectors: the base model's document embeddings of "
             f"{', '.join(doc['datasets'])}; {doc['queries']} real test queries (base-model pass). Recall@10 against exact "
             "inner-product search on the same vectors; speedup: batch-1 QPS over the flat index's. synthetic-N: "
             "k-means (64 centroids) on the real document vectors, then per cluster a diagonal Gaussian with its "
             "residual standard deviation per dimension, L2-normalised (benchmarks/ann.py), queried with the same real "
             "queries.", "",
             "| vectors | index | knob | recall@10 | QPS batch 1 | QPS batch 64 | × flat (batch 1) | MiB | build s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['vectors']} ({r['n']:,}) | `{r['index']}` | {r['knob'] or '–'} | {r['recall_at_10']:.3f} | "
                     f"{r['qps_batch1']:.0f} | {r['qps_batch64']:.0f} | {r['speedup_vs_flat']:.1f} | {r['memory_mib']:.0f} | "
                     f"{r['build_s']:.1f} |")
    write_markdown("ann", "\n".join(lines) + "\n", out)


if __name__ == "__main__":
    app()

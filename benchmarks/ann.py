"""Approximate search, measured (issue 18): for each FAISS index type and search knob, recall@10
against exact search, QPS at batch 1 and 64 on one thread (a shard replica's default), build
(train + fill) time, size, and a replica's start (file read vs memory-mapped); the quality users
see (nDCG@10 on the real corpora, ANN vs flat); and the same through Serve at 1 M vectors.

    .venv/bin/python benchmarks/ann.py measure [--synthetic 1000000] [--indexes "Flat;IVF512,SQ8;HNSW32"]
        [--synthetic-indexes "Flat;IVF4096,SQ8;HNSW32"] [--nprobe 1,4,16,64] [--ef-search 16,32,64,128]
    .venv/bin/python benchmarks/ann.py serve [--vectors 1000000] [--shards 4] [--ann IVF4096,SQ8 --knob nprobe=64]

Everything is searched through the serving code: ``actors.search`` (train_index on a seeded sample,
fill_shard, ShardSearcher with per-call knobs, read_index with mmap) — the functions `index build`
and the SearchShard replicas run.

Vectors. Real: the cached base-model embeddings of every corpus in the data directory
(``serve.offline.indexing.load_corpus_vectors``; nothing re-encoded). Queries: the test queries of
those datasets, up to --queries, spread evenly over the datasets, each in two passes — the base
model's and the routed expert's (the served generation's experts and policy): what the shards are
searched with. Synthetic (--synthetic N): a Gaussian mixture fitted to the real document vectors
— spherical k-means with 256 components; each component is a Gaussian with the mean and the full
covariance (rank ≤ its members − 1) of its members; N draws with the components' real
frequencies, L2-normalised like the encoder's output. ``calibration`` in ann.json compares a
synthetic set of the real set's size with the real one (recall of the same indexes, mean top-1 and
top-10 similarity of the same queries): how far it resembles them. The queries stay the real ones.

Writes <out>/ann.{json,md,png}; `measure` and `serve` each replace their own sections of ann.json
and keep the other's. One row per (vector set, index type, knob): index, vectors, n, knob,
recall_at_10, qps_batch1, qps_batch64, speedup_vs_flat (batch-1 QPS over the flat index's on the
same vectors), memory_mib (the shard file), build_s (train_s + add_s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, fmt, git_commit, machine, write_json, write_markdown  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True)
GOAL = {"recall_at_10": 0.95, "speedup_vs_flat": 10.0, "ndcg_drop": 0.5}  # issue 18's goal at 1 M vectors


# -- vectors ---------------------------------------------------------------------------------------


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's exact top-k ids that the approximate top-k holds."""
    hits = [len(set(f[:k]) & set(e[:k])) for f, e in zip(found, exact)]
    return float(np.mean(hits)) / k


def synthetic(vectors: np.ndarray, n: int, components: int = 256, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """N vectors from a Gaussian mixture fitted to ``vectors`` (module doc), L2-normalised."""
    import faiss

    d = vectors.shape[1]
    km = faiss.Kmeans(d, components, niter=20, seed=seed, spherical=True)
    km.train(vectors)
    _, assign = km.index.search(vectors, 1)
    assign = assign[:, 0]
    rng = np.random.default_rng(seed)
    weights = np.bincount(assign, minlength=components) / len(assign)
    pick = rng.choice(components, n, p=weights)
    out = np.empty((n, d), dtype=np.float32)
    for c in range(components):
        members = vectors[assign == c]
        rows = np.flatnonzero(pick == c)
        if not len(rows):
            continue
        mean = members.mean(axis=0)
        cov = np.cov(members, rowvar=False) if len(members) > 1 else np.zeros((d, d))
        ev, basis = np.linalg.eigh(cov)
        scale = (basis * np.sqrt(np.clip(ev, 0, None))).astype(np.float32)  # x = mean + scale @ z
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            out[part] = mean + rng.standard_normal((len(part), d)).astype(np.float32) @ scale.T
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    from actors.search import build_flat_index

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # ground truth only: every core
    try:
        return build_flat_index(vectors).search(queries, k)
    finally:
        faiss.omp_set_num_threads(1)


def calibration(real: np.ndarray, queries: np.ndarray) -> list[dict]:
    """The real set and a synthetic set of its size, side by side (module doc)."""
    rows = []
    for name, vecs in (("real", real), ("synthetic", synthetic(real, len(real)))):
        scores, exact = exact_topk(vecs, queries)
        row = {"vectors": name, "n": len(vecs), "top1_similarity": float(scores[:, 0].mean()),
               "top10_similarity": float(scores[:, 9].mean())}
        for factory, knob, value in (("IVF512,Flat", "nprobe", 4), ("IVF512,Flat", "nprobe", 16),
                                     ("HNSW32", "ef_search", 32), ("HNSW32", "ef_search", 64)):
            searcher = _searcher(*build(factory, vecs)[:1], factory)
            row[f"{factory} {knob}={value}"] = recall_at_k(searcher.search(queries, 10, {knob: value})[1], exact)
        rows.append(row)
        print(f"  calibration {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


def eval_sets(datasets: list[str]) -> dict:
    """The test queries of every dataset (qid, text, qrels) and the served encoder's passes of
    them: base and routed (the generation's experts and policy)."""
    from actors.encoder import EncoderEngine
    from actors.routed_encoder import RoutedEncoder
    from serve.artifacts.experts import served_experts
    from serve.artifacts.models import encoder_settings, resolve_model
    from serve.config import load_config
    from serve.offline.ir import eval_queries, qualify

    cfg = load_config(None, ["llm.enabled=false"]).absolutized()
    data_dir = cfg.resolve_data_dir(None)
    _, adapters, pilots = served_experts(cfg)
    engine = EncoderEngine(resolve_model(cfg.model.ref), adapters, encoder_settings(cfg))
    routed = RoutedEncoder(engine, pilots, cfg.experts.policy)
    out = {"cfg": cfg, "data_dir": data_dir, "domains": {}}
    for name in datasets:
        queries, qrels = eval_queries(data_dir, name)
        qids = sorted(qrels)
        texts = [queries[q] for q in qids]
        base, expert, chosen = [], [], []
        for i in range(0, len(texts), 64):
            batch = routed.route_and_encode(texts[i : i + 64])
            expert += [q.embedding for q in batch.queries]
            chosen += [q.expert for q in batch.queries]
            base.append(engine.encode(texts[i : i + 64]))
        out["domains"][name] = {
            "qids": qids, "qrels": {q: {qualify(name, d): v for d, v in qrels[q].items()} for q in qids},
            "base": np.concatenate(base), "routed": np.stack(expert), "experts": chosen,
        }
        print(f"  [{name}] {len(qids)} test queries encoded (base + routed)", flush=True)
    return out


def query_sample(sets: dict, n: int, seed: int = 0) -> np.ndarray:
    """``n`` queries spread evenly over the datasets, half base passes and half routed ones."""
    rng = np.random.default_rng(seed)
    per = max(1, n // (2 * len(sets["domains"])))
    parts = []
    for d in sets["domains"].values():
        rows = rng.choice(len(d["qids"]), min(per, len(d["qids"])), replace=False)
        parts += [d["base"][rows], d["routed"][rows]]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


# -- index types -------------------------------------------------------------------------------------


def build(factory: str, vectors: np.ndarray, train_size: int = 100_000):
    """(index, train_s, add_s): trained on the seeded sample `index build` uses, then filled (on
    every core, as `index build`'s tasks may; searches below run on one)."""
    import faiss

    from actors.search import fill_shard, train_index, training_sample

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        t0 = time.perf_counter()
        template = train_index(factory, training_sample(vectors, train_size))
        t1 = time.perf_counter()
        index = fill_shard(template, vectors)
        return index, t1 - t0, time.perf_counter() - t1
    finally:
        faiss.omp_set_num_threads(1)


def _searcher(index, factory: str, defaults: dict | None = None):
    from actors.search import ShardSearcher

    return ShardSearcher(index=index, factory=factory, use_gpu="never", num_threads=1,
                         defaults=defaults or {"nprobe": 1, "ef_search": 16})


def qps(searcher, queries: np.ndarray, batch: int, knobs: dict, k: int = 10, min_s: float = 1.0) -> float:
    """Queries per second searching ``batch`` at a time, over at least ``min_s`` seconds."""
    n, t0 = 0, time.perf_counter()
    while True:
        for start in range(0, len(queries), batch):
            searcher.search(queries[start : start + batch], k, knobs)
            n += len(queries[start : start + batch])
            if time.perf_counter() - t0 >= min_s and n >= batch:
                return n / (time.perf_counter() - t0)


START_PROBE = r"""
import json, sys, time
import faiss, numpy as np
t0 = time.perf_counter()
index = faiss.read_index(sys.argv[1], faiss.IO_FLAG_MMAP_IFC if sys.argv[2] == "1" else 0)
t1 = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
mib = lambda key: int(status[key].split()[0]) / 1024
q = np.load(sys.argv[3])[:1]
t2 = time.perf_counter(); index.search(q, 10); t3 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "rss_anon_mib": mib("RssAnon"), "rss_file_mib": mib("RssFile"),
                  "first_search_ms": (t3 - t2) * 1e3}))
"""


def replica_start(path: Path, queries_file: Path) -> dict:
    """A fresh process loading the shard file (read vs mapped): seconds, private and file-backed
    resident memory after the load, the first search (page cache warm: the file was just written)."""
    out = {}
    for mode, flag in (("read", "0"), ("mmap", "1")):
        done = subprocess.run([sys.executable, "-c", START_PROBE, str(path), flag, str(queries_file)],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def measure_set(name: str, vectors: np.ndarray, queries: np.ndarray, factories: list[str], knob_values: dict,
                train_size: int, start_dir: Path | None = None, min_s: float = 1.0) -> list[dict]:
    """One row per (index type, knob value) on these vectors (QPS over ``min_s`` seconds each)."""
    import faiss

    faiss.omp_set_num_threads(1)
    _, exact = exact_topk(vectors, queries)
    rows, flat_qps1 = [], None
    for factory in ["Flat", *[f for f in factories if f != "Flat"]]:
        index, train_s, add_s = build(factory, vectors, train_size)
        searcher = _searcher(index, factory)
        file_mib, start = None, None
        with tempfile.TemporaryDirectory(dir=start_dir) as tmp:
            path = Path(tmp) / "shard.faiss"
            faiss.write_index(index, str(path))
            file_mib = path.stat().st_size / 2**20
            if start_dir is not None:
                np.save(Path(tmp) / "q.npy", queries[:8])
                start = replica_start(path, Path(tmp) / "q.npy")
        knobs = searcher.knobs
        for value in knob_values[knobs[0]] if knobs else [None]:
            kv = {knobs[0]: value} if knobs else {}
            found = searcher.search(queries, 10, kv)[1]
            row = {"vectors": name, "n": len(vectors), "index": factory,
                   "knob": f"{knobs[0]}={value}" if knobs else None,
                   "recall_at_10": recall_at_k(found, exact), "qps_batch1": qps(searcher, queries, 1, kv, min_s=min_s),
                   "qps_batch64": qps(searcher, queries, 64, kv, min_s=min_s), "memory_mib": file_mib,
                   "build_s": train_s + add_s, "train_s": train_s, "add_s": add_s}
            if start is not None:
                row["start"] = start
            flat_qps1 = flat_qps1 or row["qps_batch1"]
            row["speedup_vs_flat"] = row["qps_batch1"] / flat_qps1
            rows.append(row)
            print(f"  {name} {factory:14s} {row['knob'] or '':14s} recall@10 {row['recall_at_10']:.3f} "
                  f"qps b1 {row['qps_batch1']:7.0f} b64 {row['qps_batch64']:7.0f} x{row['speedup_vs_flat']:5.1f} "
                  f"{file_mib:6.0f} MiB build {row['build_s']:6.1f} s", flush=True)
        del index, searcher
    return rows


class _WithKnobs:
    """A ShardSearcher whose search(queries, k) runs with these knobs (what search_run calls)."""

    def __init__(self, searcher, knobs: dict):
        self.searcher, self.knobs = searcher, knobs

    def search(self, queries, k):
        return self.searcher.search(queries, k, self.knobs)


def ndcg_rows(sets: dict, corpus, configs: list[tuple[str, dict]], train_size: int) -> list[dict]:
    """nDCG@10 of the routed test queries over ``corpus`` (the union of every dataset), per index config."""
    from serve.offline.beir_eval import SELF_RETRIEVAL_DOMAINS
    from serve.offline.ir import measures, per_query, search_run

    ndcg_m, _ = measures()
    rows, built = [], {}
    for factory, knobs in configs:
        if factory not in built:
            built[factory] = _searcher(build(factory, corpus.vectors, train_size)[0], factory)
        searcher = _WithKnobs(built[factory], knobs)
        per = {}
        for name, d in sets["domains"].items():
            run = search_run(d["routed"], d["qids"], corpus, 10, name in SELF_RETRIEVAL_DOMAINS, name, searcher=searcher)
            per[name] = 100 * float(np.mean(list(per_query(d["qrels"], run, ndcg_m).values())))
        row = {"index": factory, "knob": ",".join(f"{k}={v}" for k, v in knobs.items()) or None,
               "ndcg_at_10": per, "avg": float(np.mean(list(per.values())))}
        rows.append(row)
        print(f"  nDCG@10 {factory:14s} {row['knob'] or '':14s} avg {row['avg']:.2f} "
              + " ".join(f"{k} {v:.1f}" for k, v in per.items()), flush=True)
    flat = next(r["avg"] for r in rows if r["index"] == "Flat")
    for r in rows:
        r["vs_flat"] = r["avg"] - flat
    return rows


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _load(out: Path) -> dict:
    path = out / "ann.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@app.command()
def measure(
    datasets: str = typer.Option("scifact,nfcorpus,cranfield,arguana,npl"),
    indexes: str = typer.Option("Flat;IVF512,Flat;IVF512,SQ8;IVF512,PQ32x8;HNSW32;HNSW32,SQ8",
                                help="faiss.index_factory strings for the real vectors, ';'-separated"),
    queries: int = typer.Option(1000, help="queries for recall and QPS: half base passes, half routed"),
    nprobe: str = typer.Option("1,4,16,64"),
    ef_search: str = typer.Option("16,32,64,128"),
    ndcg: str = typer.Option("Flat;IVF512,SQ8 nprobe=16;IVF512,SQ8 nprobe=64;HNSW32 ef_search=64;HNSW32 ef_search=128",
                             help="'<factory> [knob=value]' configs scored by nDCG@10 on the real union"),
    synthetic_n: int = typer.Option(0, "--synthetic", help="also a synthetic set of this many vectors (module doc)"),
    synthetic_indexes: str = typer.Option("Flat;IVF4096,Flat;IVF4096,SQ8;HNSW32"),
    synthetic_nprobe: str = typer.Option("16,32,64,128"),
    synthetic_ef_search: str = typer.Option("32,64,128,256"),
    train_size: int = typer.Option(100_000, help="vectors an index is trained on (index.train_size)"),
    out: Path = typer.Option(RESULTS),
):
    """In-process: recall, QPS, size, build time, replica start; nDCG@10 ANN vs flat."""
    from serve.offline.indexing import load_corpus_vectors

    names = datasets.split(",")
    sets = eval_sets(names)
    corpus = load_corpus_vectors(sets["cfg"], sets["data_dir"], names, progress=False)
    docs = np.ascontiguousarray(corpus.vectors, dtype=np.float32)
    qv = query_sample(sets, queries)
    print(f"[real] {len(docs)} document vectors, {len(qv)} queries (base + routed)", flush=True)
    rows = measure_set("real", docs, qv, indexes.split(";"), {"nprobe": _ints(nprobe), "ef_search": _ints(ef_search)},
                       train_size)
    configs = []
    for item in ndcg.split(";"):
        factory, *knob = item.split()
        configs.append((factory, {k: int(v) for k, v in (x.split("=") for x in knob)}))
    ndcg_table = ndcg_rows(sets, corpus, configs, train_size)
    calib = None
    if synthetic_n:
        print("[calibration] synthetic vs real at the real size", flush=True)
        calib = calibration(docs, qv)
        t0 = time.perf_counter()
        syn = synthetic(docs, synthetic_n)
        print(f"[synthetic] {len(syn)} vectors in {time.perf_counter() - t0:.0f} s", flush=True)
        rows += measure_set(f"synthetic-{synthetic_n}", syn, qv, synthetic_indexes.split(";"),
                            {"nprobe": _ints(synthetic_nprobe), "ef_search": _ints(synthetic_ef_search)}, train_size,
                            start_dir=Path(tempfile.gettempdir()))
    doc = {**_load(out), "command": command_line(), "commit": git_commit(), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "datasets": names, "queries": len(qv),
           "threads": 1, "train_size": train_size, "rows": rows, "ndcg": ndcg_table, "calibration": calib}
    print(write_json("ann", doc, out))
    render(doc, out)


# -- through Serve ------------------------------------------------------------------------------------


def _texts(data_dir: Path, datasets: list[str], n: int) -> list[str]:
    """``n`` test query texts, taken from the datasets in turn."""
    from serve.offline.ir import eval_queries

    lists = [[q for _, q in sorted(eval_queries(data_dir, d)[0].items())] for d in datasets]
    out = [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]
    return (out * (n // len(out) + 1))[:n]


def synthetic_dataset(root: Path, name: str, vectors: np.ndarray, sets: list[str]) -> Path:
    """A BEIR-layout dataset of len(vectors) placeholder documents whose base-model vectors are
    ``vectors``, put in the index cache where `index build` looks for encoded chunks: the real
    build (training, shard filling, the doc store) then runs on them, nothing is encoded."""
    from serve.artifacts.index import locate_index
    from serve.config import load_config

    folder = root / "data" / name
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    if not corpus.is_file() or sum(1 for _ in corpus.open()) != len(vectors):
        with open(corpus.with_suffix(".tmp"), "w") as fh:
            for i in range(len(vectors)):
                fh.write(json.dumps({"_id": f"v{i}", "title": "", "text": f"synthetic vector {i}"}) + "\n")
        os.replace(corpus.with_suffix(".tmp"), corpus)
    cfg = load_config(None, sets).absolutized()
    loc = locate_index(cfg, root / "data")
    chunk = loc.root / "chunks" / "chunk_00000.npy"
    if not chunk.is_file():
        chunk.parent.mkdir(parents=True, exist_ok=True)
        np.save(chunk.with_suffix(".tmp.npy"), vectors)
        os.replace(chunk.with_suffix(".tmp.npy"), chunk)
    return loc.root


@app.command("serve")
def serve_command(
    vectors: int = typer.Option(1_000_000, help="synthetic vectors (the measure command's generator, same seed)"),
    shards: int = typer.Option(4),
    ann: str = typer.Option("IVF4096,SQ8", help="the approximate index served against Flat"),
    knob: str = typer.Option("nprobe=64", help="its search knob (search.<name>=<value>)"),
    concurrency: str = typer.Option("16,32"),
    duration: float = typer.Option(15.0),
    warmup: float = typer.Option(3.0),
    repeats: int = typer.Option(3),
    queries: int = typer.Option(512),
    datasets: str = typer.Option("scifact,nfcorpus,cranfield,arguana,npl", help="the real vectors the synthetic set is fitted to"),
    query_datasets: str = typer.Option("scifact", help="whose test queries are sent (compare.py's: encoder cost as there)"),
    workdir: Path = typer.Option(Path(tempfile.gettempdir()) / "routerserve-ann"),
    port: int = typer.Option(8000),
    out: Path = typer.Option(RESULTS),
):
    """Through Serve: /v1/retrieve QPS and p99 over N synthetic vectors in S shards, Flat vs ANN."""
    from compare import closed_run, started, _median

    from serve.config import load_config
    from serve.offline.indexing import load_corpus_vectors

    cfg = load_config(None, ["llm.enabled=false"]).absolutized()
    names = datasets.split(",")
    real = load_corpus_vectors(cfg, cfg.resolve_data_dir(None), names, progress=False).vectors
    t0 = time.perf_counter()
    syn = synthetic(np.ascontiguousarray(real, dtype=np.float32), vectors)
    print(f"[synthetic] {len(syn)} vectors in {time.perf_counter() - t0:.0f} s", flush=True)
    name = f"synthetic-{vectors}"
    base_sets = ["llm.enabled=false", f"data_dir={workdir / 'data'}", f"corpus.datasets=[{name}]",
                 f"index.dir={workdir / 'index'}", f"index.num_shards={shards}", f"index.chunk_size={vectors}",
                 "experts.training.default_domains=[]"]
    synthetic_dataset(workdir, name, syn, base_sets)
    del syn, real
    bodies = [{"query": q, "top_k": 10} for q in _texts(cfg.resolve_data_dir(None), query_datasets.split(","), queries)]
    knob_name, knob_value = knob.split("=")
    systems = {}
    for factory, extra in (("Flat", []), (ann, [f"search.{knob_name}={knob_value}"])):
        sets = [*base_sets, f"index.factory={factory}", *extra]
        t0 = time.perf_counter()
        build = subprocess.run([str(Path(sys.executable).parent / "routerserve"), "index", "build",
                                *[x for s_ in sets for x in ("--set", s_)]], capture_output=True, text=True)
        if build.returncode != 0:
            raise RuntimeError(build.stdout[-2000:] + build.stderr[-2000:])
        build_s = time.perf_counter() - t0  # includes starting Ray; 0-ish when a previous run built it
        print(f"[{factory}] index build {build_s:.0f} s", flush=True)
        log = workdir / f"up-{factory.replace(',', '_')}.log"
        with started(sets, log, port, bodies[0]["query"]) as (svc, cold):
            health = httpx.get(f"{svc.url}/healthz", timeout=30).json()
            closed = {}
            for c in _ints(concurrency):
                closed[str(c)] = _median([closed_run(svc.url, bodies, c, duration, warmup) for _ in range(repeats)])
                print(f"  [{factory}] c={c}: {closed[str(c)]['qps']:.1f} q/s p50 {closed[str(c)]['p50_ms']:.0f} ms "
                      f"p99 {closed[str(c)]['p99_ms']:.0f} ms errors {closed[str(c)]['errors']}", flush=True)
        systems[factory] = {"index": factory, "knob": None if factory == "Flat" else knob, "build_s": build_s, **cold,
                            "shards": health.get("shards"), "closed": closed}
    doc = {**_load(out), "serve": {"command": command_line(), "commit": git_commit(), "machine": machine(),
                                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "vectors": vectors,
                                   "num_shards": shards, "queries": len(bodies), "query_datasets": query_datasets.split(","),
                                   "duration_s": duration,
                                   "warmup_s": warmup, "repeats": repeats, "systems": systems}}
    print(write_json("ann", doc, out))
    render(doc, out)



@app.command("docstore")
def docstore_command(rows: int = typer.Option(1_000_000), text_chars: int = typer.Option(1000),
                     workdir: Path = typer.Option(Path(tempfile.gettempdir()) / "routerserve-ann"),
                     out: Path = typer.Option(RESULTS)):
    """The ingress's doc store at N documents of ``text_chars`` characters: write, first open (the
    Arrow copy made), a replica's open, random hits, and the private memory an open store costs."""
    from actors.beir import Doc
    from actors.index_store import DocStore

    path = workdir / f"docstore-{rows}" / "docs.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    filler = ("lorem ipsum dolor sit amet " * (text_chars // 27 + 1))[:text_chars]
    t0 = time.perf_counter()
    DocStore.write(path, (Doc(f"d{i}", f"title {i}", filler, "synthetic") for i in range(rows)))
    write_s = time.perf_counter() - t0
    probe = (r"import json,random,sys,time; sys.path.insert(0, sys.argv[2]); from actors.index_store import DocStore;"
             r"mib=lambda: int([l for l in open('/proc/self/status') if l.startswith('RssAnon')][0].split()[1])/1024;"
             r"m0=mib(); t=time.perf_counter(); d=DocStore(sys.argv[1]); o=time.perf_counter()-t; m1=mib();"
             r"t=time.perf_counter(); [d.hit(random.randrange(len(d)), 0.0, True) for _ in range(10000)];"
             r"h=(time.perf_counter()-t)/10000; print(json.dumps({'open_s': o, 'hit_us': h*1e6, 'private_mib': m1-m0,"
             r"'private_mib_after_hits': mib()-m0}))")
    done = subprocess.run([sys.executable, "-c", probe, str(path), str(Path(__file__).resolve().parents[1])],
                          capture_output=True, text=True, check=True)
    result = {"rows": rows, "text_chars": text_chars, "write_s": write_s,
              "parquet_mib": path.stat().st_size / 2**20, "arrow_mib": DocStore.arrow_path(path).stat().st_size / 2**20,
              **json.loads(done.stdout.strip().splitlines()[-1]), "command": command_line(), "commit": git_commit()}
    print(json.dumps(result), flush=True)
    doc = {**_load(out), "docstore": result}
    print(write_json("ann", doc, out))
    render(doc, out)


# -- report ---------------------------------------------------------------------------------------------


def render(doc: dict, out: Path) -> None:
    write_markdown("ann", render_markdown(doc), out)
    if doc.get("rows"):
        _plot(doc, out / "ann.png")


def chosen_rows(doc: dict) -> list[dict]:
    """Rows at the largest set meeting the goal's recall and speedup, fastest first."""
    rows = doc.get("rows") or []
    if not rows:
        return []
    biggest = max(r["n"] for r in rows)
    return sorted((r for r in rows if r["n"] == biggest and r["recall_at_10"] >= GOAL["recall_at_10"]
                   and r["speedup_vs_flat"] >= GOAL["speedup_vs_flat"]), key=lambda r: -r["qps_batch1"])


def render_markdown(doc: dict) -> str:
    lines = ["# Approximate search (issue 18)", ""]
    if doc.get("rows"):
        m = doc["machine"]
        lines += [f"`{doc['command']}` · commit {doc['commit']} · {doc['date']}", "",
                  f"Machine: {m.get('cpu', '?')}, {m.get('logical_cpus', '?')} CPUs, no GPU. FAISS on one thread (a shard "
                  f"replica's default); search through `actors.search.ShardSearcher` with per-call knobs. Vectors: the "
                  f"base model's document embeddings of {', '.join(doc['datasets'])}; {doc['queries']} real test queries "
                  "spread over the datasets, half base-model passes, half routed-expert passes. Recall@10 against exact "
                  "search on the same vectors; × flat: batch-1 QPS over the flat index's; MiB: the shard file; build: "
                  f"train (on {doc['train_size']:,} sampled vectors at most) + add. Synthetic sets: a Gaussian mixture "
                  "fitted to the real vectors (256 components, full covariance; `benchmarks/ann.py`), queried with the "
                  "same real queries.", "",
                  "| vectors | index | knob | recall@10 | QPS batch 1 | QPS batch 64 | × flat | MiB | build s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in doc["rows"]:
            lines.append(f"| {r['vectors']} ({r['n']:,}) | `{r['index']}` | {r['knob'] or '–'} | {r['recall_at_10']:.3f} | "
                         f"{r['qps_batch1']:.0f} | {r['qps_batch64']:.0f} | {r['speedup_vs_flat']:.1f} | "
                         f"{fmt(r.get('memory_mib'), '.0f')} | {r['build_s']:.1f} |")
        goal = chosen_rows(doc)
        lines += ["", f"**Goal** (largest set: recall@10 ≥ {GOAL['recall_at_10']} at ≥ {GOAL['speedup_vs_flat']:g}× flat's "
                  "batch-1 QPS): " + ("; ".join(f"`{r['index']}` {r['knob']}: recall {r['recall_at_10']:.3f} at "
                                             f"{r['speedup_vs_flat']:.1f}×" for r in goal[:3]) or "**not met**") + "."]
        starts = [r for r in doc["rows"] if r.get("start")]
        if starts:
            lines += ["", "## A replica's start (a fresh process loading one shard file; page cache warm)", "",
                      "| vectors | index | read: s | read: private MiB | mmap: s | mmap: private MiB | mmap: mapped MiB | "
                      "mmap: first search ms |", "|---|---|---|---|---|---|---|---|"]
            seen = set()
            for r in starts:
                if r["index"] in seen:
                    continue
                seen.add(r["index"])
                rd, mm = r["start"]["read"], r["start"]["mmap"]
                lines.append(f"| {r['vectors']} | `{r['index']}` | {rd['load_s']:.2f} | {rd['rss_anon_mib']:.0f} | "
                             f"{mm['load_s']:.3f} | {mm['rss_anon_mib']:.0f} | {mm['rss_file_mib']:.0f} | "
                             f"{mm['first_search_ms']:.1f} |")
    if doc.get("calibration"):
        keys = [k for k in doc["calibration"][0] if k not in ("vectors", "n")]
        lines += ["", "## How far the synthetic vectors resemble the real ones (same size, same queries)", "",
                  "| set | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for r in doc["calibration"]:
            lines.append(f"| {r['vectors']} ({r['n']:,}) | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    if doc.get("ndcg"):
        domains = list(doc["ndcg"][0]["ndcg_at_10"])
        lines += ["", "## The quality users see: nDCG@10 over the union of the real corpora, routed queries", "",
                  "| index | knob | " + " | ".join(domains) + " | avg | vs flat |", "|---" * (len(domains) + 4) + "|"]
        for r in doc["ndcg"]:
            lines.append(f"| `{r['index']}` | {r['knob'] or '–'} | " + " | ".join(f"{r['ndcg_at_10'][d]:.1f}" for d in domains)
                         + f" | {r['avg']:.2f} | {r['vs_flat']:+.2f} |")
    ds = doc.get("docstore")
    if ds:
        lines += ["", f"## The ingress's doc store at {ds['rows']:,} documents ({ds['text_chars']} characters of text each)", "",
                  f"`{ds['command']}` · commit {ds['commit']}. docs.arrow (the memory-mapped copy; every text is the same "
                  f"filler, so docs.parquet's size says nothing) {ds['arrow_mib']:.0f} MiB, written with docs.parquet in "
                  f"{ds['write_s']:.0f} s. A replica opens it in "
                  f"{ds['open_s'] * 1e3:.1f} ms with {ds['private_mib']:.1f} MiB of private memory "
                  f"({ds['private_mib_after_hits']:.1f} MiB after 10,000 random hits); a hit with its text: "
                  f"{ds['hit_us']:.1f} µs."]
    sv = doc.get("serve")
    if sv:
        cs = list(next(iter(sv["systems"].values()))["closed"])
        lines += ["", f"## Through Serve: {sv['vectors']:,} synthetic vectors in {sv['num_shards']} shards", "",
                  f"`{sv['command']}` · commit {sv['commit']} · {sv['date']}. `routerserve up` (retrieval only, the "
                  f"served experts routing real test queries), closed loop: median of {sv['repeats']} × {sv['duration_s']:g} s "
                  f"after {sv['warmup_s']:g} s warm-up, {sv['queries']} test query texts of {', '.join(sv.get('query_datasets', ['?']))}, "
                  "top_k 10.", "",
                  "| index | knob | first answer s | " + " | ".join(f"c={c} q/s (p99 ms)" for c in cs) + " |",
                  "|---" * (len(cs) + 3) + "|"]
        for s_ in sv["systems"].values():
            lines.append(f"| `{s_['index']}` | {s_['knob'] or '–'} | {fmt(s_.get('cold_start_s'), '.0f')} | "
                         + " | ".join(f"{s_['closed'][c]['qps']:.1f} ({s_['closed'][c]['p99_ms']:.0f})" for c in cs) + " |")
    return "\n".join(lines) + "\n"


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["vectors"] for r in doc["rows"]}, key=lambda v: min(r["n"] for r in doc["rows"] if r["vectors"] == v))
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    for ax, name in zip(axes[0], sets):
        rows = [r for r in doc["rows"] if r["vectors"] == name]
        for factory in dict.fromkeys(r["index"] for r in rows):
            pts = [r for r in rows if r["index"] == factory]
            ax.plot([r["recall_at_10"] for r in pts], [r["speedup_vs_flat"] for r in pts], "o-", label=factory)
            for r in pts:
                if r["knob"]:
                    ax.annotate(r["knob"].split("=")[1], (r["recall_at_10"], r["speedup_vs_flat"]), fontsize=7)
        ax.axvline(GOAL["recall_at_10"], color="grey", ls=":")
        ax.axhline(GOAL["speedup_vs_flat"], color="grey", ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("batch-1 QPS / flat's")
        ax.set_title(f"{name} ({rows[0]['n']:,} vectors)")
        ax.legend(fontsize=7)
    fig.suptitle(f"FAISS index types, one thread · {doc['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app()

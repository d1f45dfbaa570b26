"""Closed-loop load on POST /v1/retrieve, with the in-process compute ceiling in the same run.

    .venv/bin/python benchmarks/retrieval_load.py [--concurrency 1,16] [--duration 20] [--repeats 3]

Needs the index and experts of the config (run `./scripts/run.sh --once` first, or pass
--prepare). For each concurrency N, N clients each send one request, wait for the answer, send the
next (closed loop) for --duration seconds after a warm-up; QPS, p50 and p99 are the median over
--repeats runs. The ceiling runs the same service code in this process without Ray (local encoder
and shard objects) at batch 1 and at batch N: what the CPU can do with zero serving overhead.
The load generator shares the machine with the service (noted in the result).

Writes benchmarks/results/retrieval_load.{json,md,png}.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, git_commit, machine, write_json, write_markdown  # noqa: E402

app = typer.Typer(add_completion=False)


def _queries(data_dir: Path, datasets: list[str], n: int) -> list[str]:
    from actors.beir import available_splits, load_qrels, load_queries

    out: list[str] = []
    for name in datasets:
        qs = load_queries(data_dir, name)
        split = "test" if "test" in available_splits(data_dir, name) else None
        ids = sorted(load_qrels(data_dir, name, split)) if split else sorted(qs)
        out += [qs[i] for i in ids if i in qs]
    if not out:
        raise SystemExit("no queries found")
    return (out * (n // len(out) + 1))[:n]


_SERVED = object()  # local_service's default: the config's corpus guard


def local_service(cfg, data_dir: Path, unknown_corpus_share=_SERVED):
    """The RetrievalService the ingress runs, over local encoder and shard objects (no Ray): the
    config's index, served experts, policy, search knobs and corpus guard (``unknown_corpus_share``
    overrides the guard's share; None: off)."""
    from actors.encoder import EncoderEngine
    from actors.index_store import DocStore, IndexManifest
    from actors.routed_encoder import RoutedEncoder
    from actors.search import ShardSearcher
    from serve.artifacts.experts import served_experts
    from serve.artifacts.index import require_index
    from serve.artifacts.models import encoder_settings
    from serve.artifacts.models import resolve_model
    from serve.app.retrieval.service import LocalEncoderClient, LocalShardClient, RetrievalService

    folder = require_index(cfg, data_dir)
    manifest = IndexManifest.load(folder)
    _, adapters, pilots = served_experts(cfg)  # the generation the service serves
    engine = EncoderEngine(resolve_model(cfg.model.ref), adapters, encoder_settings(cfg))
    routed = RoutedEncoder(engine, pilots, cfg.experts.policy)
    defaults = cfg.search.knob_defaults(manifest.knobs)
    shards = [LocalShardClient(ShardSearcher(folder / s.file, s.offset, use_gpu="never", num_threads=1, factory=manifest.factory,
                                             defaults=defaults, mmap=cfg.search.mmap)) for s in manifest.shards]
    share = cfg.experts.unknown_corpus_share if unknown_corpus_share is _SERVED else unknown_corpus_share
    return RetrievalService(LocalEncoderClient(routed), shards, DocStore(folder.parent / "docs.parquet"), cfg.limits, "m",
                            manifest.dim, manifest.factory, defaults, share, list(manifest.datasets))


def _ceiling(cfg, data_dir: Path, queries: list[str], batch: int, repeats: int, top_k: int) -> dict:
    """Same RetrievalService code, local encoder + shards, no Ray: queries/s at this batch size."""
    from serve.app.retrieval.service import RetrieveItem

    service = local_service(cfg, data_dir)

    async def run_once() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(queries), batch):
            items = [RetrieveItem(q, top_k, None, False) for q in queries[i : i + batch]]
            await service.retrieve_many(items)
        return len(queries) / (time.perf_counter() - t0)

    asyncio.run(run_once())  # warm-up
    runs = [asyncio.run(run_once()) for _ in range(repeats)]
    return {"batch": batch, "qps_runs": runs, "qps": statistics.median(runs), "queries": len(queries)}


async def _closed_loop(url: str, queries: list[str], concurrency: int, duration: float, warmup: float, top_k: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        measure_from = start + warmup
        stop = measure_from + duration

        async def worker(wid: int) -> None:
            nonlocal errors
            i = wid
            while True:
                t0 = time.perf_counter()
                if t0 >= stop:
                    return
                r = await client.post(f"{url}/v1/retrieve", json={"query": queries[i % len(queries)], "top_k": top_k})
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop:
                    if r.status_code == 200:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    lat = np.array(latencies) * 1e3
    return {
        "requests": len(latencies),
        "errors": errors,
        "qps": len(latencies) / duration,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_ms": float(lat.mean()) if len(lat) else None,
    }


def _median_runs(runs: list[dict]) -> dict:
    keys = ("qps", "p50_ms", "p99_ms", "mean_ms")
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "runs": runs,
    }


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = sorted(result["load"], key=int)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar([f"c={c}" for c in conc], [result["load"][c]["qps"] for c in conc], color="#4c72b0", label="Serve HTTP (closed loop)")
    for b, ceil in result["ceiling"].items():
        ax1.axhline(ceil["qps"], ls="--", color="#dd8452" if b == "1" else "#55a868", label=f"in-process ceiling, batch {b}")
    ax1.set_ylabel("queries / s (median of runs)")
    ax1.set_title("Throughput")
    ax1.legend(fontsize=8)
    x = np.arange(len(conc))
    ax2.bar(x - 0.2, [result["load"][c]["p50_ms"] for c in conc], 0.4, label="p50")
    ax2.bar(x + 0.2, [result["load"][c]["p99_ms"] for c in conc], 0.4, label="p99")
    ax2.set_xticks(x, [f"c={c}" for c in conc])
    ax2.set_ylabel("latency ms")
    ax2.set_title("Latency")
    ax2.legend(fontsize=8)
    fig.suptitle(f"routerserve /v1/retrieve — {result['machine']['cpu']}, {result['machine']['logical_cpus']} CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@app.command()
def main(
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: Optional[list[str]] = typer.Option(None, "--set"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    concurrency: str = typer.Option("1,16", help="comma-separated client counts"),
    duration: float = typer.Option(20.0, help="measured seconds per run"),
    warmup: float = typer.Option(3.0, help="unmeasured seconds before each run"),
    repeats: int = typer.Option(3, help="runs per setting (median reported)"),
    top_k: int = typer.Option(10),
    prepare: bool = typer.Option(False, help="build the index / default experts if missing"),
    name: str = typer.Option("retrieval_load", help="results file stem under benchmarks/results"),
):
    from rich.console import Console
    from rich.table import Table

    from ray import serve

    from serve.app.builders import build_app
    from serve.cli.common import wait_healthy
    from serve.deploy.cluster import ensure_ray
    from serve.config import load_config

    console = Console()
    cfg = load_config(config, set_).absolutized()
    ddir = cfg.resolve_data_dir(data_dir)
    levels = [int(c) for c in concurrency.split(",")]
    queries = _queries(ddir, cfg.corpus.datasets, 256)
    ensure_ray(cfg.ray)
    if prepare:
        from serve.offline.training import train_default_experts
        from serve.offline.indexing import build_index

        build_index(cfg, ddir)
        train_default_experts(cfg, ddir)
    console.rule("in-process ceiling (no Ray)")
    ceiling = {}
    for b in sorted({1, *levels}):
        ceiling[str(b)] = _ceiling(cfg, ddir, queries[:96], b, repeats, top_k)
        console.print(f"batch {b}: {ceiling[str(b)]['qps']:.1f} q/s")
    console.rule("Serve over HTTP")
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app({"config": cfg, "data_dir": str(ddir)}), name=cfg.app_name, route_prefix=cfg.http.route_prefix)
    url = f"http://127.0.0.1:{cfg.http.port}"
    health = wait_healthy(url)
    load = {}
    for c in levels:
        runs = []
        for r in range(repeats):
            res = asyncio.run(_closed_loop(url, queries, c, duration, warmup, top_k))
            runs.append(res)
            console.print(f"c={c} run {r + 1}/{repeats}: {res['qps']:.1f} q/s p50 {res['p50_ms']:.1f} ms p99 {res['p99_ms']:.1f} ms errors {res['errors']}")
        load[str(c)] = _median_runs(runs)
    serve.shutdown()
    result = {
        "benchmark": "retrieval_load",
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "note": "load generator (httpx, this process) shares the CPUs with the Ray Serve replicas",
        "setup": {
            "datasets": cfg.corpus.datasets,
            "num_docs": health["num_docs"],
            "experts": health.get("experts"),
            "num_shards": cfg.index.num_shards,
            "policy": cfg.experts.policy,
            "top_k": top_k,
            "max_seq_length": cfg.model.max_seq_length,
            "duration_s": duration,
            "warmup_s": warmup,
            "repeats": repeats,
            "deployments": cfg.deployments.model_dump(),
        },
        "ceiling": ceiling,
        "load": load,
    }
    write_json(name, result)
    table = Table("setting", "QPS (median)", "p50 ms", "p99 ms", "requests", "errors")
    lines = [
        f"# Retrieval load — {time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `{result['command']}` (commit {result['commit']})",
        f"Machine: {result['machine']['cpu']}, {result['machine']['logical_cpus']} logical CPUs, "
        f"{result['machine']['memory_gib']} GiB, GPU: {result['machine']['gpu']}",
        f"Corpus: {cfg.corpus.datasets} ({health['num_docs']} docs), {cfg.index.num_shards} shards, experts {health.get('experts')}, "
        f"policy {cfg.experts.policy}, top_k {top_k}. Median of {repeats} runs of {duration:.0f} s.",
        "",
        "| setting | QPS | p50 ms | p99 ms | requests | errors |",
        "|---|---|---|---|---|---|",
    ]
    for b, c in ceiling.items():
        lines.append(f"| in-process ceiling, batch {b} | {c['qps']:.1f} | – | – | {c['queries'] * repeats} | 0 |")
        table.add_row(f"ceiling batch {b}", f"{c['qps']:.1f}", "–", "–", str(c["queries"] * repeats), "0")
    for c, r in load.items():
        lines.append(f"| Serve HTTP, concurrency {c} | {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['requests']} | {r['errors']} |")
        table.add_row(f"HTTP c={c}", f"{r['qps']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", str(r["requests"]), str(r["errors"]))
    lines += ["", f"Note: {result['note']}.", ""]
    write_markdown(name, "\n".join(lines))
    from common import RESULTS

    _plot(result, RESULTS / f"{name}.png")
    console.print(table)
    console.print(f"wrote {RESULTS / name}.json/.md/.png")


if __name__ == "__main__":
    app()

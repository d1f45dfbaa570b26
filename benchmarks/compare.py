"""Side by side in one run (issue 17): the Serve path against its own in-process ceiling and a
naive server doing the same work, the same load generator, the same machine, model, index and
queries; routerserve's cold start.

    .venv/bin/python benchmarks/compare.py [--concurrency 1,16,32,64] [--rates 5,10,20,40,60,80]
        [--duration 15] [--repeats 3] [--systems ceiling,routerserve,naive,...] [--smoke] [--set k=v]

Systems, each alone on the machine in turn (the load generator — this process — shares the
cores with it, noted in the result):
  ceiling      RetrievalService in this process without Ray or HTTP (local encoder and shard
               objects), the best of several batch sizes, torch with 1 thread and with one per
               CPU: base pass + routing + expert pass + search.
  routerserve  `routerserve up` (retrieval only: llm.enabled=false) over HTTP: closed loop at each
               concurrency (median of --repeats runs) and open loop at fixed arrival rates
               (p50/p99 vs offered load, goodput = answers within --slo-ms per second). Its cold
               start: seconds from `routerserve up` to the first 200 with every artifact cached.
  naive        benchmarks/naive_server.py: FastAPI + uvicorn, the same work per request, nothing
               batched across requests; the same closed and open loops.
  embeddings   routerserve's /v1/embeddings, one text per request, closed loop.
  mixed        /v1/retrieve with the expert forced, round-robin over every served expert vs all
               to one: the mixed-adapter batch (one forward over rows of different LoRA experts).
  infinity     Infinity (PyPI infinity-emb, torch engine, CPU; its own virtualenv under
               .venvs/infinity, created on first use) serving the same model folder: the same load.
--label NAME stores a run's systems as <system>@NAME (e.g. the code before a change) and --merge
adds them to an existing compare.json: before/after in one table (an unlabeled --merge run
replaces the header and the systems it measures, and keeps the others).
  serve-batch  the retrieval-only app with Ray Serve's @serve.batch in place of the GreedyBatcher
               (deployments.*_batching.batcher=serve_batch, the same batch settings): the
               deviation re-measured on every Ray upgrade.
  default-app  the default config (both halves: the vLLM engines resident, idle): /v1/retrieve as a
               user meets it, and its cold start.
routerserve, embeddings and mixed run on one `routerserve up` when adjacent (the default order).

--smoke (CI): seconds per system, no figure asserted; results go to --out (not benchmarks/results).
Writes <out>/compare.{json,md,png}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import httpx
import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, fmt, git_commit, machine, write_json, write_markdown  # noqa: E402
from reliability_common import REPO, RETRIEVAL_ONLY, LiveService, Record, closed_loop, open_loop  # noqa: E402
from retrieval_load import _ceiling, _queries  # noqa: E402

app = typer.Typer(add_completion=False)
NAIVE_PORT = 8010
SYSTEMS = ("ceiling", "routerserve", "embeddings", "mixed", "serve-batch", "default-app", "naive", "infinity")
ON_SHARED_SERVICE = ("routerserve", "embeddings", "mixed")  # adjacent ones share one `routerserve up`
# serve-batch: only the batch formation differs (Ray Serve's @serve.batch, the same batch settings)
SERVE_BATCH = ["deployments.ingress_batching.batcher=serve_batch", "deployments.encoder_batching.batcher=serve_batch"]


def summarize(records: list[Record], warmup_s: float, duration_s: float, slo_s: float | None = None) -> dict:
    """Answers that started inside the measured window [warmup_s, duration_s): QPS of 200s,
    latency percentiles, errors; goodput (200s within ``slo_s`` per second) when given."""
    window = duration_s - warmup_s
    inside = [r for r in records if warmup_s <= r.start_s < duration_s]
    ok = [r.latency_s for r in inside if r.status == 200]
    lat = np.asarray(ok) * 1e3
    out = {
        "requests": len(inside), "ok": len(ok), "errors": len(inside) - len(ok),
        "qps": len(ok) / window,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }
    if slo_s is not None:  # the open loop: what the service got done while the load lasted
        out["goodput"] = sum(x <= slo_s for x in ok) / window
        out["completed_per_s"] = sum(1 for r in inside if r.status == 200 and r.start_s + r.latency_s <= duration_s) / window
    return out


def _median(runs: list[dict]) -> dict:
    keys = [k for k in ("qps", "p50_ms", "p99_ms", "goodput") if all(r.get(k) is not None for r in runs) and k in runs[0]]
    return {**{k: statistics.median(r[k] for r in runs) for k in keys},
            "errors": sum(r["errors"] for r in runs), "runs": runs}


def closed_run(url: str, bodies: list, c: int, duration: float, warmup: float, path: str = "/v1/retrieve") -> dict:
    """One closed-loop run at concurrency ``c``, summarized over its measured window."""
    return summarize(asyncio.run(closed_loop(url, bodies, c, warmup + duration, path=path)), warmup, warmup + duration)


def measure(url: str, qs: list[str], concurrency: list[int], rates: list[float], duration: float, warmup: float,
            repeats: int, slo_s: float) -> dict:
    """Closed loop at each concurrency (median of ``repeats``), then open loop at each rate."""
    closed, opened = {}, {}
    for c in concurrency:
        closed[str(c)] = _median([closed_run(url, qs, c, duration, warmup) for _ in range(repeats)])
        print(f"  closed c={c}: {closed[str(c)]['qps']:.1f} q/s p50 {closed[str(c)].get('p50_ms') or 0:.0f} ms "
              f"p99 {closed[str(c)].get('p99_ms') or 0:.0f} ms", flush=True)
    for rate in rates:
        recs = asyncio.run(open_loop(url, qs, rate, duration))
        opened[f"{rate:g}"] = {"offered": rate, **summarize(recs, 0.0, duration, slo_s)}
        o = opened[f"{rate:g}"]
        print(f"  open {rate:g}/s: {o['completed_per_s']:.1f} completed/s, goodput {o['goodput']:.1f}, p99 {o.get('p99_ms') or 0:.0f} ms, "
              f"errors {o['errors']}", flush=True)
    return {"closed": closed, "open": opened}


def measure_embeddings(url: str, bodies: list[dict], concurrency: list[int], duration: float, warmup: float,
                       repeats: int) -> dict:
    closed = {}
    for c in concurrency:
        closed[str(c)] = _median([closed_run(url, bodies, c, duration, warmup, "/v1/embeddings") for _ in range(repeats)])
        print(f"  embeddings c={c}: {closed[str(c)]['qps']:.1f} req/s p99 {closed[str(c)].get('p99_ms') or 0:.0f} ms "
              f"errors {closed[str(c)]['errors']}", flush=True)
    return {"closed": closed}


def measure_mixed(url: str, qs: list[str], experts: list[str], concurrency: list[int], duration: float, warmup: float,
                  repeats: int) -> dict:
    """/v1/retrieve with every request's expert forced: spread round-robin over every expert of
    the served generation (batches mix LoRA adapters in one forward pass) vs all to the first one;
    the same queries, the same closed loop. The single and mixed runs alternate per repeat."""
    if len(experts) < 2:
        raise RuntimeError(f"mixed experts needs at least 2 experts; the served generation has {experts}")
    bodies = {"single": [{"query": q, "top_k": 10, "expert": experts[0]} for q in qs],
              "mixed": [{"query": q, "top_k": 10, "expert": experts[i % len(experts)]} for i, q in enumerate(qs)]}
    out: dict = {"experts": experts, "single": {"closed": {}}, "mixed": {"closed": {}}}
    for c in concurrency:
        runs: dict[str, list] = {"single": [], "mixed": []}
        for _ in range(repeats):
            for kind in ("single", "mixed"):
                runs[kind].append(closed_run(url, bodies[kind], c, duration, warmup))
        for kind in ("single", "mixed"):
            out[kind]["closed"][str(c)] = _median(runs[kind])
        print(f"  c={c}: single {out['single']['closed'][str(c)]['qps']:.1f}, mixed over {len(experts)} experts "
              f"{out['mixed']['closed'][str(c)]['qps']:.1f} q/s", flush=True)
    return out


INFINITY_PINS = ["torch==2.13.0", "infinity-emb[server,torch]==0.0.78"]  # a baseline only, never a project dependency


def _stop(proc: subprocess.Popen) -> None:
    """The server's whole process group (its own session): TERM, then KILL; also when the
    server itself already exited and left children."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


class BaselineServer:
    """A baseline server in its own process group: started with ``command()``/``env()``, waited
    for on ``health`` (never left running when that fails), stopped with its whole group."""

    name, health = "server", "/healthz"

    def __init__(self, log: Path, port: int):
        self.log, self.port = log, port
        self.url = f"http://127.0.0.1:{port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def __enter__(self):
        args = self.command()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env=self.env(), start_new_session=True)
        try:
            return self._wait_healthy()
        except BaseException:  # a timeout, a crash, Ctrl-C: never leave the server running
            _stop(self.proc)
            raise

    def _wait_healthy(self):
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(f"{self.url}{self.health}", timeout=5).status_code == 200:
                    print(f"[{self.name}] healthy after {time.monotonic() - t0:.0f} s", flush=True)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not healthy within 300 s; see {self.log}")

    def __exit__(self, *exc) -> None:
        _stop(self.proc)


class InfinityServer(BaselineServer):
    """Infinity (PyPI infinity-emb, torch engine, CPU) in its own virtualenv under
    .venvs/infinity (repository root), created on first use, serving the same model folder."""

    name, health = "infinity", "/health"

    def __init__(self, model_dir: Path, served_name: str, log: Path, port: int):
        super().__init__(log, port)
        self.model_dir, self.served_name = model_dir, served_name
        self.venv = REPO / ".venvs" / "infinity"  # outside the source folders (linters, test discovery)

    def command(self) -> list[str]:
        exe = self.venv / "bin" / "infinity_emb"
        if not exe.is_file():
            print(f"[infinity] creating {self.venv} ({' '.join(INFINITY_PINS)}; a few minutes)", flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
            pip = [str(self.venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
            subprocess.run([*pip, INFINITY_PINS[0]], check=True, timeout=1800)  # torch first: PyPI's is the CPU build here
            subprocess.run([*pip, *INFINITY_PINS], check=True, timeout=1800)
        return [str(exe), "v2", "--model-id", str(self.model_dir), "--engine", "torch", "--device", "cpu",
                "--url-prefix", "/v1", "--served-model-name", self.served_name, "--port", str(self.port),
                "--host", "127.0.0.1"]

    def env(self) -> dict[str, str]:
        return {**os.environ, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}


class NaiveServer(BaselineServer):
    """benchmarks/naive_server.py, with the same config overrides."""

    name = "naive"

    def __init__(self, sets: list[str], log: Path, port: int = NAIVE_PORT):
        super().__init__(log, port)
        self.sets = sets

    def command(self) -> list[str]:
        args = [sys.executable, str(REPO / "benchmarks" / "naive_server.py"), "--port", str(self.port)]
        for s in self.sets:
            args += ["--set", s]
        return args

    def env(self) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def first_answer_s(url: str, query: str, t0: float, timeout_s: float = 900,
                   stop: threading.Event | None = None) -> float | None:
    """Seconds from ``t0`` until POST /v1/retrieve answers 200 (None when ``stop`` is set first)."""
    while time.monotonic() - t0 < timeout_s and not (stop and stop.is_set()):
        try:
            if httpx.post(f"{url}/v1/retrieve", json={"query": query, "top_k": 10}, timeout=30).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    if stop and stop.is_set():
        return None
    raise TimeoutError("no 200 from /v1/retrieve")


@contextlib.contextmanager
def started(sets: list[str], log: Path, port: int, query: str):
    """`routerserve up` (LiveService) and its cold start with every artifact cached: seconds from
    the launch to the first 200 from /v1/retrieve (polled while it starts: retrieval answers before
    the LLM engines are up) and to every deployment up (/healthz 200, `up` printed "serving")."""
    t0, stop = time.monotonic(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(first_answer_s, f"http://127.0.0.1:{port}", query, t0, stop=stop)
        try:
            with LiveService(sets, log, port=port) as svc:
                ready = time.monotonic() - t0
                cold = {"cold_start_s": first.result(), "all_ready_s": ready}
                print(f"  cold start: first answer {cold['cold_start_s']:.0f} s, every deployment up {ready:.0f} s", flush=True)
                yield svc, cold
        finally:
            stop.set()


def _share(sys_: dict, a: str, b: str, c: str) -> float | None:
    qa = sys_.get(a, {}).get("closed", {}).get(c, {}).get("qps")
    qb = sys_.get(b, {}).get("closed", {}).get(c, {}).get("qps")
    return qa / qb if qa and qb else None


def _mixed_share(mixed: dict | None, c: str) -> float | None:
    if not mixed:
        return None
    m, o = (mixed[k]["closed"].get(c, {}).get("qps") for k in ("mixed", "single"))
    return m / o if m and o else None


def ratios(doc: dict, c: str) -> dict:
    sys_ = doc["systems"]
    rs = sys_.get("routerserve", {}).get("closed", {}).get(c, {})
    ceiling = sys_.get("ceiling", {}).get("qps")
    share = rs.get("qps") / ceiling if rs.get("qps") and ceiling else None
    return {
        f"ceiling_share_c{c}": share,
        f"vs_naive_c{c}": _share(sys_, "routerserve", "naive", c),
        f"p99_over_p50_c{c}": rs["p99_ms"] / rs["p50_ms"] if rs.get("p99_ms") and rs.get("p50_ms") else None,
        f"vs_infinity_c{c}": _share(sys_, "embeddings", "infinity", c),
        f"vs_serve_batch_c{c}": _share(sys_, "routerserve", "serve-batch", c),
        "mixed_vs_single": _mixed_share(sys_.get("mixed"), c),
        "cold_start_s": sys_.get("routerserve", {}).get("cold_start_s"),
        "default_app_cold_start_s": sys_.get("default-app", {}).get("cold_start_s"),
        "default_app_all_ready_s": sys_.get("default-app", {}).get("all_ready_s"),
    }


def render(doc: dict, out: Path) -> None:
    s = doc["systems"]
    lines = ["# Side by side: /v1/retrieve and /v1/embeddings", "",
             f"`{doc['command']}` · commit {doc['commit']} · {doc['date']}", "",
             f"Machine: {doc['machine'].get('cpu', '?')}, {doc['machine'].get('logical_cpus', '?')} CPUs, GPU: {doc['machine'].get('gpu', '?')}. "
             "The load generator (this process) shares the cores with the system under test; each system ran alone.",
             f"Queries: {doc['queries']} test queries of {', '.join(doc['datasets'])}; top_k 10; closed loop "
             f"{doc['duration_s']:g} s after {doc['warmup_s']:g} s warm-up, median of {doc['repeats']}; open loop "
             f"{doc['duration_s']:g} s per rate, SLO {doc['slo_ms']:g} ms (rows measured by another command, "
             "see the table at the end, ran with that command's settings).", ""]
    if "ceiling" in s:
        c = s["ceiling"]
        per_batch = ", ".join(f"batch {b['batch']}" + (f" × {b['threads']} threads" if "threads" in b else "") + f": {b['qps']:.1f}"
                              for b in c["batches"])
        lines += [f"**Ceiling** (in-process, no Ray, no HTTP; the same RetrievalService code on local encoder and shard "
                  f"objects): {c['qps']:.1f} q/s at batch {c['batch']}"
                  + (f", {c['threads']} torch threads" if "threads" in c else "") + f" ({per_batch}).", ""]
    colds = [f"{k} {v['cold_start_s']:.0f} s" + (f" (every deployment up: {v['all_ready_s']:.0f} s)" if v.get("all_ready_s") else "")
             for k, v in s.items() if v.get("cold_start_s") is not None]
    if colds:
        lines += [f"**Cold start** (`routerserve up`, artifacts cached, to the first 200 from /v1/retrieve): "
                  f"{', '.join(colds)}.", ""]
    lines += ["routerserve: the retrieval-only app (llm.enabled=false); default-app: the default config, both halves "
              "(the vLLM engines resident, idle); serve-batch: the retrieval-only app with Ray Serve's @serve.batch "
              "in place of the GreedyBatcher (`" + " ".join(f"--set {x}" for x in SERVE_BATCH) + "`), the same batch "
              "settings; naive: benchmarks/naive_server.py (FastAPI + uvicorn, nothing batched across requests).", ""]
    systems = [k for k in s if k.split("@")[0] in ("routerserve", "default-app", "serve-batch", "naive")]
    lines += ["## Closed loop", "", "| concurrency | " + " | ".join(f"{k} q/s | p50 ms | p99 ms" for k in systems) + " |",
              "|---|" + "---|---|---|" * len(systems)]
    for c in doc["concurrency"]:
        row = [str(c)]
        for k in systems:
            r = s[k]["closed"].get(str(c), {})
            row += [fmt(r.get("qps")), fmt(r.get("p50_ms"), ".0f"), fmt(r.get("p99_ms"), ".0f")]
        lines.append("| " + " | ".join(row) + " |")
    if doc["rates"]:
        lines += ["", "## Open loop (offered load)", "",
                  "| offered /s | " + " | ".join(f"{k} goodput /s | completed /s | p99 ms | errors" for k in systems) + " |",
                  "|---|" + "---|---|---|---|" * len(systems)]
        for rate in doc["rates"]:
            row = [f"{rate:g}"]
            for k in systems:
                r = s[k]["open"].get(f"{rate:g}", {})
                row += [fmt(r.get("goodput")), fmt(r.get("completed_per_s")), fmt(r.get("p99_ms"), ".0f"),
                        str(r.get("errors", "–"))]
            lines.append("| " + " | ".join(row) + " |")
    emb = [k for k in s if k.split("@")[0] in ("embeddings", "infinity")]
    if emb:
        lines += ["", "## /v1/embeddings, one text per request (closed loop)", "",
                  "| concurrency | " + " | ".join(f"{k} req/s | p99 ms" for k in emb) + " |", "|---|" + "---|---|" * len(emb)]
        for c in doc["concurrency"]:
            row = [str(c)]
            for k in emb:
                r = s[k]["closed"].get(str(c), {})
                row += [fmt(r.get("qps")), fmt(r.get("p99_ms"), ".0f")]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "embeddings: routerserve's /v1/embeddings (`@label`: the same at another code state, see "
                  "the JSON's `labels`); infinity: Infinity " + INFINITY_PINS[1].split("==")[1] + " (torch engine, "
                  "CPU) serving the same model folder."]
    if "mixed" in s:
        m = s["mixed"]
        lines += ["", f"## Mixed experts: /v1/retrieve, expert forced, over {len(m['experts'])} experts "
                  f"({', '.join(m['experts'])}) vs all to {m['experts'][0]}", "",
                  "| concurrency | single q/s | p99 ms | mixed q/s | p99 ms |", "|---|---|---|---|---|"]
        for c in doc["concurrency"]:
            one, mix = m["single"]["closed"].get(str(c), {}), m["mixed"]["closed"].get(str(c), {})
            lines.append(f"| {c} | {fmt(one.get('qps'))} | {fmt(one.get('p99_ms'), '.0f')} | {fmt(mix.get('qps'))} | "
                         f"{fmt(mix.get('p99_ms'), '.0f')} |")
    lines += ["", "## Where each row was measured", "", "| system | commit | command |", "|---|---|---|"]
    for k, v in s.items():
        m = v.get("measured") or {"commit": doc.get("commit"), "command": doc.get("command")}
        lines.append(f"| {k} | {m.get('commit')} | `{m.get('command')}` |")
    lines += ["", "## Ratios (goals: issue 17)", "", "| ratio | value | goal |", "|---|---|---|"]
    goals = {"ceiling_share": "≥ 0.8", "vs_naive": "≥ 1.5", "p99_over_p50": "≤ 3", "vs_infinity": "≥ 1.0",
             "mixed_vs_single": "≥ 0.9", "cold_start_s": "≤ 60 s", "default_app_cold_start_s": "≤ 60 s",
             "default_app_all_ready_s": "(the LLM engines up too)",
             "vs_serve_batch": "(the GreedyBatcher's gain)"}
    for k, v in doc["ratios"].items():
        goal = next((g for prefix, g in goals.items() if k.startswith(prefix)), "")
        lines.append(f"| {k} | {fmt(v, '.2f')} | {goal} |")
    write_markdown("compare", "\n".join(lines) + "\n", out)
    _plot(doc, out / "compare.png")


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["systems"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for k in s:
        if k == "ceiling" or "closed" not in s[k]:  # mixed: its own table
            continue
        cs = [c for c in doc["concurrency"] if s[k]["closed"].get(str(c), {}).get("qps") is not None]
        style = "--" if k.split("@")[0] in ("embeddings", "infinity") else "-"
        a.plot(cs, [s[k]["closed"][str(c)]["qps"] for c in cs], marker="o", linestyle=style,
               label=k + (" (/v1/embeddings)" if style == "--" else " (/v1/retrieve)"))
        rates = [r for r in doc["rates"] if s[k].get("open", {}).get(f"{r:g}", {}).get("p99_ms") is not None]
        if rates:
            b.plot(rates, [s[k]["open"][f"{r:g}"]["p99_ms"] for r in rates], marker="o", label=k)
    if "ceiling" in s:
        a.axhline(s["ceiling"]["qps"], color="gray", linestyle="--", label="in-process ceiling")
    a.set(xlabel="concurrency (closed loop)", ylabel="answers / s", title="throughput (closed loop)")
    b.set(xlabel="offered load (requests / s)", ylabel="p99 latency (ms)", title="latency vs offered load", yscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"compare.py · commit {doc['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@app.command()
def main(
    systems: str = typer.Option(",".join(SYSTEMS), help="which systems, in this order (routerserve, embeddings and "
                                "mixed share one `routerserve up` when adjacent)"),
    concurrency: str = typer.Option("1,16,32,64"),
    rates: str = typer.Option("5,10,20,40,60,80", help="open-loop arrival rates (requests/s); empty: none"),
    duration: float = typer.Option(15.0, help="seconds measured per run"),
    warmup: float = typer.Option(3.0, help="closed loop: seconds before measuring"),
    repeats: int = typer.Option(3),
    slo_ms: float = typer.Option(1000.0, help="goodput counts answers within this"),
    queries: int = typer.Option(512),
    ceiling_batches: str = typer.Option("1,8,32,64"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="config override for every system (key=value)"),
    smoke: bool = typer.Option(False, help="CI: seconds per system, nothing asserted"),
    out: Path = typer.Option(RESULTS, help="where compare.{json,md,png} go"),
    port: int = typer.Option(8000, help="routerserve's HTTP port"),
    naive_port: int = typer.Option(NAIVE_PORT, help="the naive server's port"),
    infinity_port: int = typer.Option(7997, help="Infinity's port"),
    label: Optional[str] = typer.Option(None, help="store this run's systems as '<system>@<label>' (e.g. a code "
                                        "state before a change); recorded under 'labels' with the commit"),
    merge: bool = typer.Option(False, help="update <out>/compare.json with this run's systems instead of replacing it"),
):
    from serve.config import load_config

    sets = list(set_ or [])
    stamp = {"command": command_line(), "commit": git_commit()}  # the code state measured: taken before the run
    if smoke:
        concurrency, rates, duration, warmup, repeats, queries, ceiling_batches = "1,4", "4", 2.0, 0.5, 1, 16, "1,4"
    cfg = load_config(None, RETRIEVAL_ONLY + sets).absolutized()
    data_dir = cfg.resolve_data_dir(None)
    qs = _queries(data_dir, cfg.corpus.datasets, queries)
    conc = [int(c) for c in concurrency.split(",") if c]
    rate_list = [float(r) for r in rates.split(",") if r]
    doc = {"deployment": "routerserve, embeddings, mixed, serve-batch: the retrieval-only app (llm.enabled=false); default-app: the default config", "concurrency": conc, "rates": rate_list,
           "duration_s": duration, "warmup_s": warmup, "repeats": repeats, "slo_ms": slo_ms, "queries": len(qs),
           "datasets": cfg.corpus.datasets, "smoke": smoke, "sets": sets, "systems": {}}
    logs = out / "logs"
    if merge and (out / "compare.json").is_file():
        # the old file's systems stay (each carries its own stamp: commit, command); a labeled run
        # keeps the old header and parameters, an unlabeled one replaces them with its own
        old = json.loads((out / "compare.json").read_text())
        doc = {**(old if label else doc), "systems": old["systems"], "labels": old.get("labels", {})}
    key = (lambda name: f"{name}@{label}") if label else (lambda name: name)
    if label:
        doc.setdefault("labels", {})[label] = dict(stamp)
    emb_bodies = [{"model": cfg.model.served_name, "input": q} for q in qs]
    order = [x for x in systems.split(",") if x]
    unknown = sorted(set(order) - set(SYSTEMS))
    if unknown:
        raise typer.BadParameter(f"unknown system {unknown[0]!r}: {', '.join(SYSTEMS)}", param_hint="--systems")
    run: dict = {}
    with contextlib.ExitStack() as shared:
        svc = None  # one `routerserve up` for adjacent systems of the retrieval-only app
        for system in order:
            print(f"[{system}]", flush=True)
            if svc is not None and system not in ON_SHARED_SERVICE:
                shared.close()
                svc = None
            if system in ON_SHARED_SERVICE and svc is None:
                svc, cold = shared.enter_context(started(RETRIEVAL_ONLY + sets, logs / "compare_routerserve.log", port, qs[0]))
            if system == "ceiling":  # every core may work: torch with 1 thread and with one per CPU
                batches = []
                for threads in sorted({1, len(os.sched_getaffinity(0))}):
                    cfg_t = load_config(None, RETRIEVAL_ONLY + sets + [f"model.num_threads={threads}"]).absolutized()
                    batches += [{**_ceiling(cfg_t, data_dir, qs, b, repeats, 10), "threads": threads}
                                for b in (int(x) for x in ceiling_batches.split(","))]
                    print("  " + ", ".join(f"batch {b['batch']}: {b['qps']:.1f}" for b in batches if b["threads"] == threads)
                          + f" q/s ({threads} torch thread{'s' if threads > 1 else ''})", flush=True)
                best = max(batches, key=lambda b: b["qps"])
                run["ceiling"] = {"qps": best["qps"], "batch": best["batch"], "threads": best["threads"], "batches": batches}
                print(f"  best {best['qps']:.1f} q/s at batch {best['batch']}, {best['threads']} threads", flush=True)
            elif system == "routerserve":
                run["routerserve"] = {**cold, **measure(svc.url, qs, conc, rate_list, duration, warmup,
                                                                      repeats, slo_ms / 1e3)}
            elif system == "embeddings":
                run["embeddings"] = measure_embeddings(svc.url, emb_bodies, conc, duration, warmup, repeats)
            elif system == "mixed":
                experts = [e["name"] for e in httpx.get(f"{svc.url}/v1/experts", timeout=30).json()["experts"]]
                run["mixed"] = measure_mixed(svc.url, qs, experts, conc, duration, warmup, repeats)
            elif system in ("serve-batch", "default-app"):
                extra = SERVE_BATCH if system == "serve-batch" else []
                app_sets = (RETRIEVAL_ONLY if system == "serve-batch" else []) + sets + extra
                with started(app_sets, logs / f"compare_{system}.log", port, qs[0]) as (own, own_cold):
                    run[system] = {**own_cold, "sets": extra or None,
                                   **measure(own.url, qs, conc, rate_list, duration, warmup, repeats, slo_ms / 1e3)}
            elif system == "naive":
                with NaiveServer(RETRIEVAL_ONLY + sets, logs / "compare_naive.log", naive_port) as srv:
                    run["naive"] = measure(srv.url, qs, conc, rate_list, duration, warmup, repeats, slo_ms / 1e3)
            elif system == "infinity":
                from serve.artifacts.models import resolve_model

                with InfinityServer(resolve_model(cfg.model.ref), cfg.model.served_name, logs / "compare_infinity.log",
                                    infinity_port) as inf:
                    bodies = [{**b, "input": [b["input"]]} for b in emb_bodies]
                    run["infinity"] = measure_embeddings(inf.url, bodies, conc, duration, warmup, repeats)
    stamp["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    doc["systems"].update({key(name): {**figures, "measured": stamp} for name, figures in run.items()})
    conc = doc["concurrency"]
    doc["ratios"] = ratios(doc, str(max(conc)) if 32 not in conc else "32")
    if not (label and merge and "commit" in doc):  # a labeled merge keeps the header it joins
        doc.update(stamp, machine=machine())
    print(write_json("compare", doc, out))
    render(doc, out)
    print({k: v for k, v in doc["ratios"].items() if v is not None})


if __name__ == "__main__":
    app()

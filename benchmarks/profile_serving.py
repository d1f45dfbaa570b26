"""Where a request's CPU goes (issue 17): `routerserve up` (retrieval only) under a closed-loop
load, CPU seconds per answer of every process (HTTP proxy, ingress, encoder, shards, Ray's own,
the load generator) and, for the busiest ones, py-spy samples folded to the functions that cost.

    .venv/bin/python benchmarks/profile_serving.py [--path /v1/retrieve|/v1/embeddings]
        [--concurrency 32] [--duration 20] [--top 3] [--set k=v]

Writes benchmarks/results/profile_<endpoint>.{json,md}: per process, CPU ms per answer and its
share of the machine; per profiled process, the functions with the most samples (self) and the
frames of ours / of the libraries they sit under (inclusive).
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, git_commit, machine, write_json, write_markdown  # noqa: E402
from reliability_common import REPO, RETRIEVAL_ONLY, LiveService, closed_loop, queries  # noqa: E402

app = typer.Typer(add_completion=False)


def role(title: str) -> str:
    """A Ray process's role from its title: the Serve deployment, proxy, controller, or Ray's own."""
    m = re.match(r"ray::ServeReplica:[^:]+:(\w+)", title)
    if m:
        return m.group(1)
    for key, name in (("ProxyActor", "HTTP proxy"), ("ServeController", "Serve controller"), ("raylet", "raylet"),
                      ("gcs_server", "GCS"), ("dashboard", "dashboard"), ("log_monitor", "Ray log monitor"),
                      ("routerserve up", "`routerserve up` driver")):
        if key in title:
            return name
    return "other Ray process"


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
        except psutil.Error:
            continue
    return out


OURS = ("serve", "actors", "benchmarks")


def fold(raw: str) -> dict:
    """py-spy's collapsed stacks ("frame;frame;... count") folded to the functions with the most
    samples: self (on top of the stack), ours inclusive (anywhere on it), and the share of samples
    whose stack passes through each top-level package."""
    self_n: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    libs: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        total += int(n)
        self_n[frames[-1][0]] += int(n)
        for f in {f for f, _ in frames}:
            incl[f] += int(n)
        for lib in {lib for _, lib in frames}:
            libs[lib] += int(n)
    return {"samples": total, "self": self_n.most_common(15),
            "inclusive_ours": [(f, c) for f, c in incl.most_common() if _package(f) in OURS][:15],
            "packages": [(lib, round(c / total, 3)) for lib, c in libs.most_common(12)] if total else []}


def _short(frame: str) -> tuple[str, str]:
    """'fn (pkg/mod.py:12)' → ('fn (pkg/mod.py)', 'pkg'): samples of one function add up."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame, "?"
    fn, path = m.groups()
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{fn} ({path})", _package(path)


def _package(path_or_frame: str) -> str:
    path = path_or_frame.rsplit("(", 1)[-1].rstrip(")")
    top = path.split("/", 1)[0]
    return top[:-3] if top.endswith(".py") else top


def py_spy(pid: int, seconds: float, out: Path) -> dict | None:
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [str(exe), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
           "--format", "raw", "--nonblocking", "--output", str(out)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except (OSError, subprocess.TimeoutExpired) as exc:  # no py-spy (the dev extra), or it hung
        print(f"  py-spy on {pid} failed: {exc}", flush=True)
        return None
    if run.returncode != 0 or not out.is_file():
        print(f"  py-spy on {pid} failed: {run.stderr.strip()[-300:]}", flush=True)
        return None
    return fold(out.read_text())


@app.command()
def main(
    path: str = typer.Option("/v1/retrieve", help="/v1/retrieve or /v1/embeddings"),
    concurrency: int = typer.Option(32),
    duration: float = typer.Option(20.0, help="seconds measured (after a 5 s warm-up)"),
    top: int = typer.Option(3, help="py-spy the busiest N processes"),
    set_: Optional[list[str]] = typer.Option(None, "--set"),
    port: int = typer.Option(8000),
    label: Optional[str] = typer.Option(None, help="file suffix, e.g. the change being measured"),
    out: Path = typer.Option(RESULTS),
):
    from serve.config import load_config

    sets = list(set_ or [])
    stamp = {"command": command_line(), "commit": git_commit()}
    cfg = load_config(None, RETRIEVAL_ONLY + sets)
    bodies = request_bodies(path, cfg.model.served_name)
    name = "profile_" + path.rsplit("/", 1)[-1] + (f"_{label}" if label else "")
    logs = out / "logs"
    with LiveService(RETRIEVAL_ONLY + sets, logs / f"{name}.log", port=port) as svc:
        asyncio.run(closed_loop(svc.url, bodies, concurrency, 5.0, path=path))  # warm-up
        procs = svc.ray_processes() + [psutil.Process(svc.proc.pid), psutil.Process(os.getpid())]
        titles = {p.pid: getattr(p, "title", "load generator (this process)") for p in procs}
        titles[os.getpid()] = "load generator (this process)"
        titles[svc.proc.pid] = "routerserve up"
        before, t0 = cpu_seconds(procs), time.monotonic()
        recs = asyncio.run(closed_loop(svc.url, bodies, concurrency, duration, path=path))
        wall = time.monotonic() - t0
        after = cpu_seconds(procs)
        ok = sum(1 for r in recs if r.status == 200)
        rows = []
        for pid, t in after.items():
            used = t - before.get(pid, t)
            if used <= 0.05:
                continue
            title = titles[pid]
            rows.append({"pid": pid, "role": "load generator" if pid == os.getpid() else role(title),
                         "title": title[:120], "cpu_s": used, "cpu_ms_per_answer": 1e3 * used / max(ok, 1),
                         "cores": used / wall})
        rows.sort(key=lambda r: -r["cpu_s"])
        print(f"  {ok / wall:.1f} answers/s; CPU ms per answer: " + ", ".join(f"{r['role']} {r['cpu_ms_per_answer']:.1f}" for r in rows[:8]), flush=True)
        # py-spy the busiest processes of the service (not the load generator) under the same load
        targets = [r for r in rows if r["pid"] != os.getpid()][:top]
        profiles = {}
        load = subprocess.Popen([sys.executable, "-c", _LOAD_AGAIN, svc.url, path, str(concurrency), str(duration + 10),
                                 cfg.model.served_name], cwd=REPO)
        try:
            time.sleep(3)
            for r in targets:  # one after another: py-spy itself takes a core
                print(f"  py-spy {r['role']} (pid {r['pid']}) {duration / top:.0f} s", flush=True)
                prof = py_spy(r["pid"], max(duration / top, 3), logs / f"{name}_{r['pid']}.txt")
                if prof:  # two replicas of one deployment: each its own profile
                    profiles[f"{r['role']} (pid {r['pid']})"] = prof
        finally:
            load.terminate()
            load.wait(30)
    doc = {**stamp, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "deployment": "retrieval-only app (llm.enabled=false)", "sets": sets, "path": path,
           "concurrency": concurrency, "duration_s": duration, "answers_per_s": ok / wall, "errors": len(recs) - ok,
           "processes": rows, "profiles": profiles}
    print(write_json(name, doc, out))
    render(name, doc, out)


def request_bodies(path: str, model: str) -> list:
    """512 real queries as /v1/retrieve queries or /v1/embeddings bodies (one text each)."""
    qs = queries(512)
    return qs if path == "/v1/retrieve" else [{"model": model, "input": q} for q in qs]


_LOAD_AGAIN = """
import asyncio, sys
sys.path.insert(0, "benchmarks")
from profile_serving import request_bodies
from reliability_common import closed_loop
url, path, c, d, model = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
asyncio.run(closed_loop(url, request_bodies(path, model), c, d, path=path))
"""


def render(name: str, doc: dict, out: Path) -> None:
    lines = [f"# Where the CPU goes: {doc['path']}, closed loop at concurrency {doc['concurrency']}", "",
             f"`{doc['command']}` · commit {doc['commit']} · {doc['date']} · {doc['deployment']}", "",
             f"Machine: {doc['machine'].get('cpu', '?')}, {doc['machine'].get('logical_cpus', '?')} CPUs. "
             f"{doc['answers_per_s']:.1f} answers/s over {doc['duration_s']:g} s, {doc['errors']} errors. "
             "CPU seconds from each process's counters over the measured window (the load generator included: "
             "it shares the cores).", "",
             "| process | CPU ms per answer | cores busy |", "|---|---|---|"]
    total = sum(r["cpu_ms_per_answer"] for r in doc["processes"])
    for r in doc["processes"]:
        lines.append(f"| {r['role']} | {r['cpu_ms_per_answer']:.1f} | {r['cores']:.2f} |")
    lines.append(f"| **all** | **{total:.1f}** | {sum(r['cores'] for r in doc['processes']):.2f} |")
    for role_, prof in doc["profiles"].items():
        n = prof["samples"] or 1
        lines += ["", f"## {role_}: py-spy, {prof['samples']} samples", "",
                  "Packages on the stack (share of samples): " + ", ".join(f"{lib} {share:.0%}" for lib, share in prof["packages"]),
                  "", "| self: function | share |", "|---|---|"]
        lines += [f"| `{f}` | {c / n:.0%} |" for f, c in prof["self"][:10]]
        lines += ["", "| inclusive: our functions | share |", "|---|---|"]
        lines += [f"| `{f}` | {c / n:.0%} |" for f, c in prof["inclusive_ours"][:10]]
    write_markdown(name, "\n".join(lines) + "\n", out)


if __name__ == "__main__":
    app()

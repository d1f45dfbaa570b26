"""Faults: closed-loop /v1/retrieve load while replica processes crash, against `routerserve up`.

    .venv/bin/python benchmarks/faults.py [--replicas 2,1] [--duration 60] [--concurrency 8]

For each replica count R the service starts with R replicas of the ingress, the encoder and every
shard (the LLM half off: not under test). ``--concurrency`` clients send real test queries for
``--duration`` seconds; at 20 s one SearchShard0 replica process is SIGKILLed, at 35 s one
ExpertEncoder replica (as an OOM kill would; Serve replaces both). Per request: start, latency,
status, Retry-After. Reported per run: success rate, max latency, requests past the deadline
(limits.request_timeout_s), how many failures were 503 + Retry-After, recovery (kill → 10
successes in a row) and when the replacement replica process was up.

Writes the "faults" section of benchmarks/results/reliability.{json,md} and reliability.png.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_common import (  # noqa: E402
    OUT, RETRIEVAL_ONLY, LiveService, closed_loop, per_second, queries, save_section,
)

app = typer.Typer(add_completion=False)
KILLS = {"shard": ("SearchShard0", 20.0), "encoder": ("ExpertEncoder", 35.0)}


def _recovery(records, kill_at: float, streak: int = 10) -> float | None:
    """Seconds from the kill until the end of the first run of ``streak`` successes started after it."""
    run = 0
    for r in sorted((r for r in records if r.start_s >= kill_at), key=lambda r: r.start_s):
        run = run + 1 if r.status == 200 else 0
        if run == streak:
            return r.start_s + r.latency_s - kill_at
    return None


class _ReplacementWatch:
    """Polls the replica processes of a deployment after a kill: seconds until a new pid runs."""

    def __init__(self, service: LiveService, deployment: str, replicas: int):
        self.service, self.deployment, self.replicas = service, deployment, replicas
        self.killed_pid: int | None = None
        self.killed_at = 0.0
        self.replaced_s: float | None = None

    def kill(self) -> None:
        self.killed_pid = self.service.crash_replica(self.deployment)
        self.killed_at = time.monotonic()
        print(f"[faults] killed {self.deployment} replica pid {self.killed_pid}", flush=True)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while time.monotonic() - self.killed_at < 120:
            pids = {p.pid for p in self.service.replicas(self.deployment)}
            if len(pids) >= self.replicas and self.killed_pid not in pids:
                self.replaced_s = time.monotonic() - self.killed_at
                return
            time.sleep(0.25)


def run_once(replicas: int, concurrency: int, duration: float, deadline_s: float) -> dict:
    sets = RETRIEVAL_ONLY + [f"deployments.{d}.num_replicas={replicas}" for d in ("ingress", "encoder", "shard")]
    qs = queries()
    with LiveService(sets, OUT.parent / "logs" / f"faults_service_r{replicas}.log") as service:
        asyncio.run(closed_loop(service.url, qs, concurrency, 5.0))  # warm-up, not recorded
        watches = {name: _ReplacementWatch(service, dep, replicas) for name, (dep, _) in KILLS.items()}
        events = [(at, watches[name].kill) for name, (_, at) in KILLS.items()]
        records = asyncio.run(closed_loop(service.url, qs, concurrency, duration, events))
        time.sleep(1)
        replaced = {name: w.replaced_s for name, w in watches.items()}
    ok = [r for r in records if r.status == 200]
    failures = [r for r in records if r.status != 200]
    result = {
        "replicas": replicas,
        "requests": len(records),
        "success_rate": len(ok) / len(records),
        "max_latency_s": max(r.latency_s for r in records),
        "over_deadline": sum(r.latency_s > deadline_s for r in records),
        "failures": len(failures),
        "failure_statuses": {str(s): sum(r.status == s for r in failures) for s in sorted({r.status for r in failures})},
        "refused_with_retry_after": sum(r.status == 503 and r.retry_after for r in failures),
        "recovery_s": {name: _recovery(records, at) for name, (_, at) in KILLS.items()},
        "replaced_s": replaced,
        "kills_at_s": {name: at for name, (_, at) in KILLS.items()},
        "per_second": per_second(records, duration),
    }
    print(f"[faults] {replicas} replica(s): {result['success_rate']:.2%} of {len(records)} succeeded, failures "
          f"{result['failure_statuses']}, max latency {result['max_latency_s']:.1f} s, recovery {result['recovery_s']}, "
          f"replaced {replaced}", flush=True)
    return result


@app.command()
def main(
    replicas: str = typer.Option("2,1", help="comma-separated replica counts per deployment, one run each"),
    duration: float = typer.Option(60.0, help="seconds of load per run (kills at 20 s and 35 s)"),
    concurrency: int = typer.Option(8),
):
    from serve.config import load_config

    deadline_s = load_config(None, None).limits.request_timeout_s
    runs = [run_once(int(r), concurrency, duration, deadline_s) for r in replicas.split(",")]
    main_run = next((r for r in runs if r["replicas"] == 2), runs[0])
    save_section("faults", {
        "setup": f"closed loop, concurrency {concurrency}, {duration:g} s of /v1/retrieve (top_k 10, real test queries); "
                 f"SIGKILL one SearchShard0 replica at {KILLS['shard'][1]:g} s and one ExpertEncoder replica at "
                 f"{KILLS['encoder'][1]:g} s; LLM half off",
        "deadline_s": deadline_s,
        # the keys: the 2-replica run
        "requests": main_run["requests"], "success_rate": main_run["success_rate"],
        "max_latency_s": main_run["max_latency_s"], "over_deadline": main_run["over_deadline"],
        "recovery_s": main_run["recovery_s"],
        "runs": runs,
    })
    print(f"wrote {OUT}.json/.md/.png")


if __name__ == "__main__":
    app()

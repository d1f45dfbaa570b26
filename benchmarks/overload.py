"""Overload and soak: open-loop /v1/retrieve load beyond and at capacity, against `routerserve up`.

    .venv/bin/python benchmarks/overload.py [--factor 3] [--duration 60] [--soak-minutes 10] [--bursts 600]
    .venv/bin/python benchmarks/overload.py --alternative "LABEL" --set limits.max_queue_wait_s=0.25


One service (the default config, LLM half off). First measured on it: the unloaded p99 (one
client, closed loop) and the capacity (16 clients, closed loop: answers per second). Then
requests ARRIVE at factor × capacity per second for --duration seconds whatever happens (open
loop): how many are refused, whether refusals are 503 + Retry-After and fast, and what the
admitted requests' latency is. Then, twice, --bursts requests at once on the idle service: every
status and whether the refusals were our JSON or Serve's proxy's own answers. Then the soak: arrivals at the capacity for --soak-minutes, with
the resident memory of every process of the service sampled (start: after the first minute).

Writes the "overload" and "soak" sections of benchmarks/results/reliability.{json,md}; with
--alternative, a row of "overload_alternatives" under that label instead (no soak), so other
admission settings are compared in the same table.
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
    OUT, RETRIEVAL_ONLY, LiveService, burst, burst_summary, closed_loop, open_loop, percentile_ms, queries, save_alternative,
    save_section,
)

app = typer.Typer(add_completion=False)


def _short_admission(cfg) -> str:
    d, wait = cfg.deployments, cfg.limits.max_queue_wait_s
    return (f"ingress {d.ingress.get('max_ongoing_requests')} ongoing + {d.ingress.get('max_queued_requests')} queued, "
            f"max_queue_wait_s {'off' if wait is None else f'{wait:g}'}")


def _admission(cfg) -> str:
    d = cfg.deployments
    wait = cfg.limits.max_queue_wait_s
    return (f"ingress max_ongoing {d.ingress.get('max_ongoing_requests')} + max_queued {d.ingress.get('max_queued_requests')}, "
            f"limits.max_queue_wait_s {'off' if wait is None else f'{wait:g} s'}, limits.max_waiting {cfg.limits.max_waiting}, "
            f"encoder max_ongoing {d.encoder.get('max_ongoing_requests')} + max_queued {d.encoder.get('max_queued_requests')}, "
            f"request_timeout_s {cfg.limits.request_timeout_s:g} (proxy {cfg.proxy_timeout_s():g})")


@app.command()
def main(
    factor: float = typer.Option(3.0, help="offered load as a multiple of the measured capacity"),
    duration: float = typer.Option(60.0, help="seconds of overload"),
    soak_minutes: float = typer.Option(10.0, help="minutes at capacity (0: no soak)"),
    set_: list[str] = typer.Option([], "--set", help="config overrides for the service (repeatable)"),
    alternative: str = typer.Option("", help="save as a labelled row of overload_alternatives (no soak)"),
    bursts: int = typer.Option(600, help="then, twice on the idle service: this many requests at once (0: none)"),
):
    from serve.config import load_config

    cfg = load_config(None, RETRIEVAL_ONLY + list(set_))
    qs = queries()
    with LiveService(RETRIEVAL_ONLY + list(set_), OUT.parent / "logs" / "overload_service.log") as service:
        asyncio.run(closed_loop(service.url, qs, 8, 5.0))  # warm-up
        unloaded = asyncio.run(closed_loop(service.url, qs, 1, 20.0))
        unloaded_p99 = percentile_ms([r.latency_s for r in unloaded if r.status == 200], 99)
        cap_runs = asyncio.run(closed_loop(service.url, qs, 16, 20.0))
        capacity = sum(r.status == 200 for r in cap_runs) / 20.0
        print(f"[overload] unloaded p99 {unloaded_p99:.0f} ms; capacity {capacity:.1f} answers/s", flush=True)
        offered = factor * capacity
        records = asyncio.run(open_loop(service.url, qs, offered, duration))
        admitted = [r for r in records if r.status == 200]
        rejected = [r for r in records if r.status != 200]
        refusals = [r for r in rejected if r.status == 503 and r.retry_after]
        fast = [r for r in refusals if r.latency_s <= 0.1]
        overload = {
            "capacity_rps": capacity,
            "offered_rps": offered,
            "requests": len(records),
            "rejected_share": len(rejected) / len(records),
            "rejected_with_retry_after_share": len(refusals) / len(rejected) if rejected else None,
            "rejected_fast_with_retry_after_share": len(fast) / len(rejected) if rejected else None,
            "rejection_p50_ms": percentile_ms([r.latency_s for r in refusals], 50),
            "rejection_p99_ms": percentile_ms([r.latency_s for r in refusals], 99),
            "admitted_p50_ms": percentile_ms([r.latency_s for r in admitted], 50),
            "admitted_p99_ms": percentile_ms([r.latency_s for r in admitted], 99),
            # the admitted requests' time inside the ingress (queue + batch): the rest is before it
            "admitted_in_ingress_p50_ms": percentile_ms([r.server_s for r in admitted if r.server_s is not None], 50),
            "admitted_in_ingress_p99_ms": percentile_ms([r.server_s for r in admitted if r.server_s is not None], 99),
            "unloaded_p99_ms": unloaded_p99,
            "goodput_rps": len(admitted) / duration,
            "no_answer": sum(r.status == 0 for r in records),
            # answered (or given up on) after the request deadline, as the client saw it
            "over_deadline": sum(r.latency_s > cfg.limits.request_timeout_s for r in records),
            "deadline_s": cfg.limits.request_timeout_s,
            "statuses": {str(s): sum(r.status == s for r in records) for s in sorted({r.status for r in records})},
            "admission": _short_admission(cfg),
            "setup": f"open loop at {factor:g}× the capacity for {duration:g} s; config: default{''.join(' --set ' + x for x in set_)}, LLM half off; admission: {_admission(cfg)}",
        }
        if bursts:
            overload["bursts"] = []
            for _ in range(2):
                time.sleep(10)  # the overload's queues drained
                overload["bursts"].append(burst_summary(asyncio.run(burst(service.url, qs, bursts)), cfg.limits.request_timeout_s))
        print(f"[overload] {overload}", flush=True)
        if alternative:
            save_alternative("overload_alternatives", alternative, overload)
            return
        save_section("overload", overload)
        if soak_minutes <= 0:
            return
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - t0, service.rss_mib()))
                stop.wait(10)

        threading.Thread(target=sample, daemon=True).start()
        soak = asyncio.run(open_loop(service.url, qs, capacity, soak_minutes * 60))
        stop.set()
        warm = [rss for t, rss in samples if t >= 60] or [rss for _, rss in samples]
        result = {
            "minutes": soak_minutes,
            "rate_rps": capacity,
            "requests": len(soak),
            "success_rate": sum(r.status == 200 for r in soak) / len(soak),
            "statuses": {str(s): sum(r.status == s for r in soak) for s in sorted({r.status for r in soak})},
            "p99_ms": percentile_ms([r.latency_s for r in soak if r.status == 200], 99),
            "rss_start_mib": warm[0],
            "rss_end_mib": samples[-1][1],
            "rss_samples_mib": [(round(t), round(v)) for t, v in samples],
            "setup": "open loop at the measured capacity; RSS of every process of the service (Ray's GCS, raylet, "
                     "workers, replicas, proxy, and `routerserve up`), start = first sample after 60 s",
        }
        print(f"[soak] {result['requests']} requests, success {result['success_rate']:.2%}, RSS "
              f"{result['rss_start_mib']:.0f} → {result['rss_end_mib']:.0f} MiB", flush=True)
        save_section("soak", result)
    print(f"wrote {OUT}.json/.md")


if __name__ == "__main__":
    app()

"""Live expert switches under load: activate another expert generation while a closed-loop client
sends /v1/retrieve, against a real `routerserve up` with two encoder replicas.

    .venv/bin/python benchmarks/live_experts.py [--switches 4] [--every 20] [--concurrency 8]

The service serves the current generation A of the local expert store. The benchmark publishes
B = A without its last expert (nothing is trained or re-encoded; the draft is untouched), then
alternates A → B → A … through the admin API (POST /admin/v1/experts/activate, which answers once
the encoder replicas it samples serve the new generation) every --every seconds, and activates
A again at the end. Per switch: the time from the activate call until every sampled replica
serves the generation (server side, `waited_s`, and as the client saw the call). Over the whole
run: every request's status and latency; p99 before the first switch, during the switches (from
each activate call to 2 s after its answer) and after the last. Writes
benchmarks/results/live_experts.{json,md,png}; top-level keys `switch_s` (the worst switch) and
`errors` (requests not answered 200).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, git_commit, machine, write_json, write_markdown  # noqa: E402
from reliability_common import RETRIEVAL_ONLY, LiveService, closed_loop, per_second, percentile_ms, queries  # noqa: E402

OUT = RESULTS / "live_experts"
app = typer.Typer(add_completion=False)


def _publish_b(cfg) -> tuple[str, str, list[str], list[str]]:
    """A = the current generation; B = A without its last expert (published, not activated)."""
    from serve.artifacts.experts import generation_store

    store = generation_store(cfg)
    a = store.current()
    if a is None or len(a.experts) < 2:
        raise SystemExit("needs a current expert generation with at least two experts (run `routerserve up` once)")
    keep = a.experts[:-1]
    b = store.publish({e: a.adapters()[e] for e in keep}, a.load_pilots(), reason=f"live_experts benchmark: {a.id} without {a.experts[-1]}")
    return a.id, b.id, a.experts, keep


def _window_p99(records, spans, inside: bool) -> float | None:
    def hit(t):
        return any(lo <= t <= hi for lo, hi in spans)
    return percentile_ms([r.latency_s for r in records if r.status == 200 and hit(r.start_s) == inside], 99)


@app.command()
def main(
    switches: int = typer.Option(4, help="activations (alternating B, A, B, …)"),
    every: float = typer.Option(20.0, help="seconds between activations (and before the first)"),
    concurrency: int = typer.Option(8, help="closed-loop clients"),
    replicas: int = typer.Option(2, help="encoder replicas"),
):
    from serve.config import load_config

    sets = RETRIEVAL_ONLY + [f"deployments.encoder.num_replicas={replicas}", "http.admin_open=true"]
    cfg = load_config(None, sets).absolutized()
    gen_a, gen_b, experts_a, experts_b = _publish_b(cfg)
    print(f"[live] A = {gen_a} {experts_a}; B = {gen_b} {experts_b}", flush=True)
    qs = queries()
    duration = every * (switches + 1)
    events: list[dict] = []

    with LiveService(sets, OUT.parent / "logs" / "live_experts_service.log") as service:
        asyncio.run(closed_loop(service.url, qs, concurrency, 5.0))  # warm-up
        t_begin = time.perf_counter()

        def activate(target: str) -> None:
            t0 = time.perf_counter()
            r = httpx.post(f"{service.url}/admin/v1/experts/activate", json={"generation": target, "wait_s": 15}, timeout=60)
            t1 = time.perf_counter()
            body = r.json()
            events.append({"at_s": t0 - t_begin, "answered_at_s": t1 - t_begin, "generation": target, "status": r.status_code,
                           "call_s": t1 - t0, "waited_s": body.get("waited_s"), "switched": body.get("switched"),
                           "replicas": body.get("replicas")})
            print(f"[live] activate {target}: {r.status_code} in {t1 - t0:.2f} s, switched={body.get('switched')} "
                  f"{body.get('replicas')}", flush=True)

        plan = [(every * (i + 1), (lambda g: (lambda: activate(g)))(gen_b if i % 2 == 0 else gen_a)) for i in range(switches)]
        records = asyncio.run(closed_loop(service.url, qs, concurrency, duration, events=plan))
        if events and events[-1]["generation"] != gen_a:
            activate(gen_a)
    # the load generator's clock starts a little after t_begin: align on its own start
    offset = min(r.start_s for r in records) if records else 0.0
    spans = [(e["at_s"] - offset, e["answered_at_s"] - offset + 2.0) for e in events[:switches]]
    first = spans[0][0] if spans else duration
    last = spans[-1][1] if spans else 0.0
    errors = [r for r in records if r.status != 200]
    result = {
        "switch_s": max((e["waited_s"] or 0) for e in events) if events else None,
        "errors": len(errors),
        "requests": len(records),
        "switches": events,
        "p99_ms": {
            "before": percentile_ms([r.latency_s for r in records if r.status == 200 and r.start_s < first], 99),
            "during": _window_p99(records, spans, True),
            "after": percentile_ms([r.latency_s for r in records if r.status == 200 and r.start_s > last], 99),
        },
        "statuses": {str(s): sum(r.status == s for r in records) for s in sorted({r.status for r in records})},
        "generations": {"A": {"id": gen_a, "experts": experts_a}, "B": {"id": gen_b, "experts": experts_b}},
        "setup": f"closed loop, {concurrency} clients, {duration:g} s of /v1/retrieve (top_k 10, real test queries); "
                 f"{replicas} encoder replicas, LLM half off; {switches} activations through the admin API every {every:g} s",
        "command": command_line(), "commit": git_commit(), "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "per_second": per_second(records, duration),
    }
    write_json(OUT.name, result)
    _render(result, spans)
    print(f"[live] switch_s {result['switch_s']}, errors {result['errors']} of {result['requests']}, p99 {result['p99_ms']}")


def _render(result: dict, spans) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = result["per_second"]
    xs = list(range(len(ps["p50_s"])))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(xs, [v * 1e3 if v is not None else np.nan for v in ps["p50_s"]], label="p50 latency (ms)")
    ax.plot(xs, [v * 1e3 if v is not None else np.nan for v in ps["max_s"]], label="max latency (ms)", alpha=0.6)
    for (lo, hi), e in zip(spans, result["switches"]):
        ax.axvspan(lo, hi, color="orange", alpha=0.2)
        ax.text(lo, ax.get_ylim()[1] * 0.9, e["generation"], fontsize=7)
    ax.set_xlabel("seconds"), ax.set_ylabel("ms"), ax.legend(loc="upper right")
    ax.set_title(f"/v1/retrieve during live expert switches (shaded: activate call → answered + 2 s); errors {result['errors']}")
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=110)
    p, m = result["p99_ms"], result["machine"]
    lines = [
        "# Live expert switches under load",
        "",
        f"Command: `{result['command']}` (commit {result['commit']}, {result['date']}). Machine: {m['cpu']}, "
        f"{m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, GPU: {m['gpu']}; the load generator runs on it too.",
        f"Setup: {result['setup']}. A = {result['generations']['A']['id']} {result['generations']['A']['experts']}, "
        f"B = {result['generations']['B']['id']} {result['generations']['B']['experts']}.",
        "",
        "| worst switch s | errors | requests | p99 before ms | p99 during switches ms | p99 after ms | goal |",
        "|---|---|---|---|---|---|---|",
        f"| {result['switch_s']:.2f} | {result['errors']} | {result['requests']} | {p['before']:.0f} | {p['during']:.0f} | "
        f"{p['after']:.0f} | 0 errors, switch ≤ 10 s, p99 during ≤ 2× before |",
        "",
        "| activation | to | answer | waited s (server) | call s (client) | every sampled replica on it |",
        "|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(result["switches"]):
        lines.append(f"| {i + 1} | {e['generation']} | {e['status']} | {e['waited_s']} | {e['call_s']:.2f} | "
                     f"{e['switched']} {e['replicas']} |")
    ratio = (p["during"] or 0) / (p["before"] or 1)
    lines += ["", "Per-second latency with the switches shaded: live_experts.png."]
    if ratio > 2:
        lines += ["", f"Missed: p99 during the switches is {ratio:.1f}× the p99 before. Each replica loads the new "
                  "generation (base model + adapters + pilots) in a thread of its own process while it serves: on this "
                  "2-core host that load competes with the two replicas' forward passes and the load generator."]
    write_markdown(OUT.name, "\n".join(lines) + "\n")


if __name__ == "__main__":
    app()

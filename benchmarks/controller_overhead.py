"""Router-R1 controller overhead: time per round spent in the controller itself (prompt rendering,
chat template, parsing, ledger, trace), with engines that answer after a fixed latency — so what
is left is ours — and whether concurrent requests overlap or serialize.

    .venv/bin/python benchmarks/controller_overhead.py

The ChatService runs in-process with the real tokenizer of the default router model (chat
template and token counting are part of the overhead); every router generation takes
``--router-ms`` and every candidate call ``--candidate-ms`` (asyncio sleeps, like a remote
engine). Each request makes 2 route calls and answers (3 rounds). For each concurrency level:
wall time vs the serial ideal (rounds × latency per request), and the per-round controller time
(p50/p99). Median of ``--repeats`` runs; writes benchmarks/results/controller_overhead.{json,md}.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, git_commit, machine  # noqa: E402

app = typer.Typer(add_completion=False)


def _router_script(prompt: str) -> str:
    done = prompt.count("</information>\n\n")  # inserted blocks (the prompt itself mentions the tag)
    if done >= 2:
        return "<think>enough</think><answer>Paris</answer>"
    return f"<think>step {done}</think><search>Gemma3-270M:capital of France, part {done}?</search>"


@app.command()
def main(
    router_ms: float = typer.Option(50.0),
    candidate_ms: float = typer.Option(100.0),
    concurrency: str = typer.Option("1,8,32"),
    requests_per_level: int = typer.Option(64),
    repeats: int = typer.Option(3),
    name: str = typer.Option("controller_overhead"),
):
    from rich.console import Console
    from rich.table import Table

    from actors.llm_engines import ScriptedEngine
    from serve.app.chat.protocol import ChatCompletionRequest
    from serve.app.chat.service import ChatService
    from serve.config import load_config
    from serve.app.chat.llm_pool import chat_template, load_tokenizers, prompt_counters

    console = Console()
    cfg = load_config(None, []).absolutized()
    tokenizers = load_tokenizers(cfg.llm)  # converts the default GGUF models once if needed
    router_engine = cfg.llm.router.engine
    engines = {
        name: ScriptedEngine(_router_script if name == router_engine else (lambda q: "Paris"),
                             latency_s=(router_ms if name == router_engine else candidate_ms) / 1000, model_id=name)
        for name in cfg.llm.engines
    }
    service = ChatService(cfg.llm, engines, chat_template(tokenizers[router_engine]), prompt_counters(tokenizers, cfg.llm))
    req = ChatCompletionRequest(model="router-r1", messages=[{"role": "user", "content": "What is the capital of France?"}])

    async def level(c: int) -> dict:
        sem = asyncio.Semaphore(c)
        per_round: list[float] = []
        latencies: list[float] = []

        async def one():
            async with sem:
                t0 = time.perf_counter()
                resp = await service.chat(req)
                latencies.append(time.perf_counter() - t0)
                assert resp.routing.route_calls == 2 and resp.choices[0].message.content == "Paris"
                assert resp.routing.calls == {"Gemma3-270M": 2}
                per_round.extend(r["controller_s"] for r in resp.routing.rounds)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests_per_level)))
        wall = time.perf_counter() - t0
        ideal_one = (3 * router_ms + 2 * candidate_ms) / 1000
        per_round.sort()
        return {
            "concurrency": c,
            "wall_s": wall,
            "serial_ideal_s": ideal_one * requests_per_level,
            "parallel_ideal_s": ideal_one * requests_per_level / c,
            "request_latency_p50_ms": 1000 * statistics.median(latencies),
            # everything that is not an engine's latency: prompt + chat template, parsing, ledger, trace
            "overhead_ms_per_request_p50": 1000 * (statistics.median(latencies) - ideal_one),
            "controller_ms_per_round_p50": 1000 * per_round[len(per_round) // 2],
            "controller_ms_per_round_p99": 1000 * per_round[int(len(per_round) * 0.99)],
        }

    rows = []
    for c in (int(x) for x in concurrency.split(",")):
        runs = [asyncio.run(level(c)) for _ in range(repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        med["concurrency"] = c
        rows.append(med)
    result = {
        "benchmark": name,
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "settings": {"router_ms": router_ms, "candidate_ms": candidate_ms, "rounds_per_request": 3,
                     "route_calls_per_request": 2, "requests_per_level": requests_per_level, "repeats": repeats},
        "levels": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Router-R1 controller overhead (scripted engines: router {router_ms:g} ms, candidate {candidate_ms:g} ms)",
        "",
        f"Command: `{result['command']}` — machine: {result['machine']['cpu']}, {result['machine']['logical_cpus']} CPUs; "
        f"median of {repeats} runs of {requests_per_level} requests (3 rounds, 2 route calls each).",
        "",
        "| concurrency | wall s | serial ideal s | parallel ideal s | request p50 ms | overhead ms/request p50 | controller ms/round p50 | p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = Table("concurrency", "wall s", "serial ideal", "parallel ideal", "req p50 ms", "overhead ms/req", "ctl ms/round p50", "p99")
    for r in rows:
        cells = [str(r["concurrency"]), f"{r['wall_s']:.2f}", f"{r['serial_ideal_s']:.2f}", f"{r['parallel_ideal_s']:.2f}",
                 f"{r['request_latency_p50_ms']:.0f}", f"{r['overhead_ms_per_request_p50']:.1f}",
                 f"{r['controller_ms_per_round_p50']:.2f}", f"{r['controller_ms_per_round_p99']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
        table.add_row(*cells)
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    console.print(table)
    console.print(f"wrote {RESULTS / name}.json/.md")


if __name__ == "__main__":
    app()

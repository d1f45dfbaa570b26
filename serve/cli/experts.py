"""`routerserve experts train|train-multitask|list|add|remove` and `routerserve pilots build`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import ConfigOpt, DataOpt, SetOpt, _data_dir, _load, console

experts_app = typer.Typer(no_args_is_help=True, help="Manage expert adapters and pilots.")
pilots_app = typer.Typer(no_args_is_help=True, help="Pilot embeddings (the router's only state).")


@experts_app.command("train")
def experts_train(
    domain: str = typer.Option(..., "--domain", help="BEIR dataset name under the data dir"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: experts.training.steps)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
):
    """Train one query-side LoRA expert for DOMAIN and add its pilots (other experts untouched)."""
    from serve.deploy.cluster import ensure_ray
    from serve.offline.training import check_domain, train_domain_expert

    cfg = _load(config, set_)
    if steps is not None:
        cfg.experts.training.steps = steps
    ddir = _data_dir(cfg, data_dir)
    try:  # before Ray starts
        check_domain(domain)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    ensure_ray(cfg.ray)  # the domain's base index is a Ray Data job when missing
    report = train_domain_expert(cfg, ddir, domain)
    console.print(
        f"[green]expert {domain}[/green]: {report['num_queries']} queries, {len(report['losses'])} steps, "
        f"loss {report['losses'][0]:.3f} → {report['losses'][-1]:.3f}"
    )


@experts_app.command("train-multitask")
def experts_train_multitask(
    domains: str = typer.Option(..., help="comma-separated datasets"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
):
    """The multi-task baseline: one adapter on every domain's training data (never routed to;
    evaluated by `eval beir --policies multitask`). Steps = experts.training.steps × #domains."""
    from serve.deploy.cluster import ensure_ray
    from serve.offline.training import train_multitask_expert

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    ensure_ray(cfg.ray)
    report = train_multitask_expert(cfg, ddir, domains.split(","))
    console.print(f"[green]multitask[/green]: {report['num_queries']} queries, {len(report['losses'])} steps")


@experts_app.command("list")
def experts_list(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt):
    """Expert adapters on disk and their pilot counts."""
    from serve.artifacts.experts import adapters_root, enabled_experts, load_pilots, pilot_rule, pilots_follow_config

    cfg = _load(config, set_)
    pilots = load_pilots(cfg)
    table = Table("expert", "adapter", "pilots")
    for name, path in enabled_experts(cfg).items():
        n = sum(1 for e in (pilots.experts if pilots else []) if e == name)
        table.add_row(name, str(path), str(n))
    console.print(table if table.row_count else f"no experts under {adapters_root(cfg)}")
    if pilots is not None:
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
    from serve.deploy.cluster import ensure_ray
    from serve.artifacts.experts import check_expert_name
    from serve.offline.training import add_expert

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
    from serve.offline.training import remove_expert

    try:
        remove_expert(_load(config, set_), name)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    console.print(f"removed expert {name}")


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
    from serve.deploy.cluster import ensure_ray
    from serve.offline.pilots import build_pilots

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    ensure_ray(cfg.ray)
    wins = build_pilots(cfg, ddir, domains.split(",") if domains else None)
    table = Table("domain", "pilots → expert (queries won)")
    for domain, per in wins.items():
        table.add_row(domain, ", ".join(f"{e} ({n})" for e, n in per.items()))
    console.print(table)

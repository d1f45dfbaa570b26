"""`routerserve experts train|train-multitask|list|add|remove|publish|generations|activate|rollback|gc|jobs`
and `routerserve pilots build`.

train, add, remove and `pilots build` change the draft (adapters/, pilots.npz) and publish it as
a new generation made current (a running service following CURRENT.json switches to it live);
activate and rollback move the pointer; list shows what the service serves. With --url they go
through a running service's admin API instead (add and train as admin jobs, followed until they
end; `experts jobs` shows them)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from serve.artifacts.generations import GenerationError

from .common import ConfigOpt, DataOpt, SetOpt, _data_dir, _load, console, exit_on

experts_app = typer.Typer(no_args_is_help=True, help="Manage expert adapters and pilots.")
pilots_app = typer.Typer(no_args_is_help=True, help="Pilot embeddings (the router's only state).")

UrlOpt = typer.Option(None, "--url", help="a running service: go through its admin API instead of the files")
AdminKeyOpt = typer.Option("ROUTERSERVE_ADMIN_KEY", "--admin-key-env", help="env variable holding an admin key (--url)")
WaitOpt = typer.Option(15.0, help="--url: wait this long for the replicas to switch (≤ 15)")


JobOpt = typer.Option(None, "--job", hidden=True, help="an admin job's id: record progress and outcome in its record")


@contextlib.contextmanager
def _job(cfg, job: Optional[str]):
    """Inside an admin job (--job, started by the admin API): its progress and outcome go to the
    job's record (serve.artifacts.jobs); otherwise nothing is recorded."""
    if not job:
        yield None
        return
    from serve.artifacts.jobs import JobStore

    with JobStore(cfg.experts.dir).reporter(job, cfg.experts.job_timeout_s) as rep:
        yield rep


@experts_app.command("train")
def experts_train(
    domain: str = typer.Option(..., "--domain", help="BEIR dataset name under the data dir (--url: the service's)"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: experts.training.steps)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
    url: Optional[str] = typer.Option(None, "--url", help="a running service: train as an admin job there"),
    admin_key_env: str = AdminKeyOpt,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="--url: follow the job until it ends"),
    job: Optional[str] = JobOpt,
):
    """Train one query-side LoRA expert for DOMAIN and add its pilots (other experts untouched),
    then publish the draft as the current generation. --url: as a job of the running service."""
    if url:
        body = {"domain": domain, **({"steps": steps} if steps is not None else {})}
        return _follow(url, _admin(url, "train", body, admin_key_env), admin_key_env, wait)
    from serve.offline.training import check_domain, train_domain_expert

    cfg = _load(config, set_)
    if steps is not None:
        cfg.experts.training.steps = steps
    ddir = _data_dir(cfg, data_dir)
    with exit_on(ValueError), _job(cfg, job) as rep:
        check_domain(domain)
        report = train_domain_expert(cfg, ddir, domain, on_progress=rep.progress if rep else None)
        if rep:
            rep.result(generation=report.get("generation"), expert=domain, steps=len(report["losses"]),
                       loss_first=report["losses"][0], loss_last=report["losses"][-1])
    console.print(
        f"[green]expert {domain}[/green]: {report['num_queries']} queries, {len(report['losses'])} steps, "
        f"loss {report['losses'][0]:.3f} → {report['losses'][-1]:.3f}; generation {report.get('generation')} is current"
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
    """The experts of the served generation (experts.generation: the current one, or the pinned
    one), their pilot counts and whether the base guard lets the router send queries to them."""
    from actors.routing import describe_guard
    from serve.artifacts.experts import adapters_root, enabled_experts, pilot_rule, served_experts, stale_guards

    cfg = _load(config, set_)
    with exit_on(GenerationError, FileNotFoundError):
        gen, adapters, pilots = served_experts(cfg)
    table = Table("expert", "adapter", "pilots", "routed")
    for name, path in adapters.items():
        n = sum(1 for e in (pilots.experts if pilots else []) if e == name)
        table.add_row(name, str(path), str(n), "no" if pilots is not None and name in pilots.unrouted else "yes")
    if gen is None:
        draft = sorted(enabled_experts(cfg))
        console.print(f"no generation published under {cfg.experts.dir}"
                      + (f"; the draft has {draft}: `routerserve experts publish`" if draft else f" (no experts under {adapters_root(cfg)})"))
        return
    console.print(f"generation {gen.id} ({gen.manifest.get('reason', '')}, {gen.manifest.get('created_at', '')})")
    console.print(table if table.row_count else "no experts in it: the base model serves every query")
    for name, g in sorted((pilots.guards if pilots is not None else {}).items()):
        if name in adapters:
            console.print(describe_guard(name, g))
    if pilots is not None:
        stale = "" if pilots.rule == pilot_rule(cfg) else f" [yellow](config asks {pilot_rule(cfg)!r}: run `routerserve pilots build`)[/yellow]"
        if stale_guards(pilots, cfg):
            stale += (f" [yellow](the base guards of {stale_guards(pilots, cfg)} were judged in another index than corpus.datasets "
                      f"{cfg.corpus.datasets}: run `routerserve pilots build`)[/yellow]")
        if pilots.embeddings.shape[0] and not pilots.members.shape[0]:
            stale += " [yellow](no members kept, from before them: the pilot_knn policy needs `routerserve pilots build`)[/yellow]"
        console.print(f"pilot rule: {pilots.rule or 'not recorded'}{stale}")


def _store(cfg):
    from serve.artifacts.experts import generation_store

    store = generation_store(cfg)
    if store is None:
        console.print("[red]experts.dir is null: there is no expert store[/red]")
        raise typer.Exit(2)
    return store


@experts_app.command("publish")
def experts_publish(
    activate: bool = typer.Option(True, "--activate/--no-activate", help="make it the current generation"),
    reason: str = typer.Option("published by hand", help="recorded in the generation's manifest"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Publish the draft (adapters/ + pilots.npz) as a new immutable generation."""
    from serve.artifacts.experts import publish_draft

    with exit_on(GenerationError, FileNotFoundError):
        gen = publish_draft(_load(config, set_), reason, activate=activate, force=True)  # asked by hand: the draft as it is
    console.print(f"published generation [green]{gen.id}[/green] ({', '.join(gen.experts) or 'no experts'})"
                  + (" — now current" if activate else ""))




def _admin(url: str, path: str, body: dict | None, key_env: str, method: str | None = None, params: dict | None = None,
           prefix: str = "/admin/v1/experts/") -> dict:
    import os

    from .common import _request

    key = os.environ.get(key_env)
    return _request(url, f"{prefix}{path}".rstrip("/"), body, 150, {"Authorization": f"Bearer {key}"} if key else None,
                    method=method, params=params)


def _switched(answer: dict) -> None:
    state = "every sampled replica serves it" if answer["switched"] else "[yellow]not every sampled replica serves it yet[/yellow]"
    console.print(f"generation [green]{answer['generation']}[/green] is current (was {answer['previous']}; "
                  f"{', '.join(answer['experts']) or 'no experts'}); {state}: {answer['replicas']}")


@experts_app.command("generations")
def experts_generations(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
                        url: Optional[str] = UrlOpt, admin_key_env: str = AdminKeyOpt):
    """Every published generation, oldest first; * marks the current one (--url: and the
    generation each sampled encoder replica serves)."""
    if url:
        answer = _admin(url, "generations", None, admin_key_env)
        rows = [(g["generation"], g["experts"], g.get("created_at") or "", g.get("parent"), g.get("reason", ""))
                for g in answer["generations"]]
        current = answer["current"]
    else:
        store = _store(_load(config, set_))
        current = store.current_id()
        rows = [(g.id, g.experts, g.manifest.get("created_at", ""), g.manifest.get("parent"), g.manifest.get("reason", ""))
                for g in store.list()]
    table = Table("", "generation", "experts", "created", "parent", "reason")
    for gid, experts, created, parent, reason in rows:
        table.add_row("*" if gid == current else "", gid, ", ".join(experts) or "–", created, parent or "–", reason)
    console.print(table if table.row_count else "no generation published")
    if url:
        console.print(f"encoder replicas sampled: {answer['replicas']}")


@experts_app.command("activate")
def experts_activate(generation: str, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
                     url: Optional[str] = UrlOpt, admin_key_env: str = AdminKeyOpt,
                     wait_s: float = WaitOpt):
    """Make GENERATION current (every encoder replica that follows CURRENT.json switches to it)."""
    if url:
        return _switched(_admin(url, "activate", {"generation": generation, "wait_s": wait_s}, admin_key_env))
    with exit_on(GenerationError):
        gen = _store(_load(config, set_)).activate(generation, reason="activated by hand")
    console.print(f"generation [green]{gen.id}[/green] is current ({', '.join(gen.experts) or 'no experts'})")


@experts_app.command("rollback")
def experts_rollback(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
                     url: Optional[str] = UrlOpt, admin_key_env: str = AdminKeyOpt,
                     wait_s: float = WaitOpt):
    """Back to the generation that was current before the current one."""
    if url:
        return _switched(_admin(url, "rollback", {"wait_s": wait_s}, admin_key_env))
    with exit_on(GenerationError):
        gen = _store(_load(config, set_)).rollback()
    console.print(f"rolled back: generation [green]{gen.id}[/green] is current ({', '.join(gen.experts) or 'no experts'})")


@experts_app.command("gc")
def experts_gc(
    keep: Optional[int] = typer.Option(None, help="generations to keep (default: experts.keep_generations)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Delete old generations: keeps the newest KEEP, the current one, the recent rollback targets
    and a generation pinned by experts.generation."""
    cfg = _load(config, set_)
    pinned = [] if cfg.experts.generation == "current" else [cfg.experts.generation]
    with exit_on(GenerationError):
        gone = _store(cfg).gc(keep or cfg.experts.keep_generations, protect=pinned)
    console.print(f"deleted {', '.join(gone)}" if gone else "nothing to delete")


@experts_app.command("add")
def experts_add(
    name: str = typer.Argument(..., help="expert name (letters, digits, . _ -)"),
    adapter: Path = typer.Option(..., "--adapter", help="peft LoRA adapter folder trained for the base model "
                                 "(--url: a folder on the service's volume, relative to experts.register_root)"),
    domain: Optional[str] = typer.Option(None, help="dataset whose training queries give its pilots (default: NAME)"),
    replace: bool = typer.Option(False, "--replace", help="overwrite an expert of the same name"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
    url: Optional[str] = typer.Option(None, "--url", help="a running service: register the adapter as an admin job there"),
    admin_key_env: str = AdminKeyOpt,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="--url: follow the job until it ends"),
    job: Optional[str] = JobOpt,
):
    """Add an adapter trained elsewhere as an expert and build its domain's pilots (nothing else
    is retrained; other experts and the index are untouched). --url: as a job of the running service."""
    if url:
        body = {"name": name, "adapter": str(adapter), "replace": replace, **({"domain": domain} if domain else {})}
        return _follow(url, _admin(url, "", body, admin_key_env), admin_key_env, wait)
    from serve.artifacts.generations import check_expert_name
    from serve.offline.training import add_expert

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    with exit_on(ValueError, FileNotFoundError, FileExistsError), _job(cfg, job) as rep:  # GenerationError is a ValueError
        check_expert_name(name)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
        if rep:  # the admin API checked the folder before; it may have changed since: again, here
            _check_registered(cfg, adapter)
        wins = add_expert(cfg, ddir, name, adapter, domain, replace, on_progress=rep.progress if rep else None)
        current = _store(cfg).current_id()
        if rep:
            rep.result(generation=current, expert=name, pilots=wins)
    won = ", ".join(f"{e} ({n})" for e, n in wins.items())
    console.print(f"[green]expert {name}[/green] added; pilots of {domain or name} → {won}; generation {current} is current")


def _check_registered(cfg, adapter: Path) -> None:
    """An admin job's adapter: still under experts.register_root, still a LoRA folder for the base
    model with no symlink inside (serve.artifacts.experts.check_adapter_folder)."""
    from serve.artifacts.experts import adapter_under_root, check_adapter_folder
    from serve.artifacts.models import resolve_model

    problems = check_adapter_folder(adapter_under_root(cfg.experts.register_root_path(), adapter),
                                    resolve_model(cfg.model.ref))
    if problems:
        raise ValueError("; ".join(problems))


def _show_job(j: dict) -> str:
    steps = f" {j['done']}/{j['total']}" if j.get("total") else ""
    return f"job {j['id']} ({j['kind']}): {j['status']}" + (f" — {j['stage']}{steps}" if j.get("stage") else "")


def _follow(url: str, answer: dict, key_env: str, wait: bool) -> None:
    """Print the job the admin API started; with ``wait``, poll it until it ends (exit 1 when it
    failed or was lost)."""
    import time

    j = answer["job"]
    console.print(_show_job(j))
    last = ""
    while wait and j["status"] in ("queued", "running"):
        time.sleep(1.0)
        j = _admin(url, f"jobs/{j['id']}", None, key_env, prefix="/admin/v1/")["job"]
        line = _show_job(j)
        if line != last:
            console.print(line)
            last = line
    if j["status"] in ("failed", "lost"):
        console.print(f"[red]{j.get('error')}[/red]")
        raise typer.Exit(1)
    if j["status"] == "succeeded":
        console.print(f"generation [green]{(j.get('result') or {}).get('generation')}[/green] is current")


@experts_app.command("jobs")
def experts_jobs(job_id: Optional[str] = typer.Argument(None, help="one job (with the end of its log)"),
                 url: str = typer.Option(..., "--url", help="the running service"), admin_key_env: str = AdminKeyOpt):
    """Admin jobs of a running service (register, train), newest first; or one with its log."""
    if job_id:
        answer = _admin(url, f"jobs/{job_id}", None, admin_key_env, prefix="/admin/v1/")
        console.print(_show_job(answer["job"]))
        if answer["job"].get("error"):
            console.print(f"[red]{answer['job']['error']}[/red]")
        for line in answer["log_tail"]:
            console.print(f"  {line}", markup=False, highlight=False)
        return
    listed = _admin(url, "jobs", None, admin_key_env, prefix="/admin/v1/")["jobs"]
    for j in listed:  # one line each: the whole id, which `experts jobs <id>` takes
        asked = " ".join(f"{k}={Path(v).name if k == 'adapter' else v}" for k, v in j["params"].items() if v not in (None, False))
        console.print(f"{_show_job(j)} [{asked}; {j['created_at']}]", markup=False, highlight=False)
    if not listed:
        console.print("no jobs")


@experts_app.command("remove")
def experts_remove(name: str, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
                   url: Optional[str] = UrlOpt, admin_key_env: str = AdminKeyOpt,
                   wait_s: float = WaitOpt):
    """Remove an expert from the draft and publish the rest as the current generation (the index
    and other experts are untouched; older generations keep their copy until `experts gc`).
    --url: through a running service's admin API (a new generation without it, made current)."""
    from serve.artifacts.experts import remove_expert

    if url:
        return _switched(_admin(url, name, None, admin_key_env, method="DELETE", params={"wait_s": wait_s}))
    cfg = _load(config, set_)
    with exit_on(FileNotFoundError, ValueError):
        remove_expert(cfg, name)
    console.print(f"removed expert {name}; generation {_store(cfg).current_id()} is current")


@pilots_app.command("build")
def pilots_build(
    domains: Optional[str] = typer.Option(None, help="comma-separated; default: every expert's domain"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataOpt,
):
    """Group each domain's training queries by their best expert (nDCG@10); mean base embedding
    per (domain, expert) = one pilot, with the domain's confidence floor and its expert's base guard
    (dev nDCG@10 vs base in the served index). Other domains' pilots are kept, unless they were
    grouped by another rule (experts.pilot_margin / pilot_min_queries / confidence_quantile / confidence_floor /
    base_guard): then every domain is rebuilt. The draft is then published as the current generation."""
    from serve.deploy.cluster import ensure_ray
    from serve.offline.pilots import build_pilots

    from serve.artifacts.experts import draft_follows_current

    cfg = _load(config, set_)
    ddir = _data_dir(cfg, data_dir)
    draft_follows_current(cfg)  # after a rollback: rebuild the pilots of what is served
    ensure_ray(cfg.ray)
    wins = build_pilots(cfg, ddir, domains.split(",") if domains else None)
    table = Table("domain", "pilots → expert (queries won)")
    for domain, per in wins.items():
        table.add_row(domain, ", ".join(f"{e} ({n})" for e, n in per.items()))
    console.print(table)
    from actors.routing import describe_guard
    from serve.artifacts.experts import load_pilots, publish_draft

    for name, g in sorted(load_pilots(cfg).guards.items()):
        if g["domain"] in wins:
            console.print(describe_guard(name, g))

    console.print(f"generation {publish_draft(cfg, f'pilots of {sorted(wins)} rebuilt').id} is current")

"""`routerserve config show|serve-yaml` and `routerserve k8s render|validate`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from serve.config import ConfigError

from .common import ConfigOpt, DataOpt, SetOpt, _data_dir, _load, console

config_app = typer.Typer(no_args_is_help=True, help="Show or export the configuration.")
k8s_app = typer.Typer(no_args_is_help=True, help="KubeRay manifests from this config: render, validate.")


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
    """A Ray Serve config for `serve run` / `serve deploy` (import_path: serve.app.builders:build_app)."""
    import yaml

    from serve.deploy.serve_config import serve_config

    cfg = _load(config, set_)
    text = yaml.safe_dump(serve_config(cfg, _data_dir(cfg, data_dir), host), sort_keys=False)
    if output:
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


@k8s_app.command("render")
def k8s_render(
    out: Optional[Path] = typer.Option(None, "--out", help="folder (default: k8s.out_dir)"),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 1 if the folder differs from a fresh render"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Render the RayService, Serve config, PVC, PodMonitor and Grafana dashboard into k8s/."""
    from serve.deploy.k8s import check_rendered, write_rendered

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

    from serve.deploy.k8s import load_objects
    from serve.deploy.k8s_validate import validate_objects

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

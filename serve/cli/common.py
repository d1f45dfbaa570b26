"""What every command shares: the config and data-dir options, loading with errors as exit code
2, POSTing to a running service, waiting for it to be healthy."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from serve.config import ConfigError, RouterServeConfig, load_config


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


@contextlib.contextmanager
def exit_on(*errors: type[BaseException]):
    """An expected error of the block is printed in red and exits 2 (bad input, not a crash)."""
    try:
        yield
    except errors as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)


def _request(url: str, path: str, body: dict | None, timeout: float, headers: dict | None = None,
             method: str | None = None, params: dict | None = None) -> dict:
    """POST (GET when ``body`` is None, or ``method``) to a running service; an unreachable service
    or an error status exits 1 with the reason."""
    import httpx

    try:
        method = method or ("GET" if body is None else "POST")
        resp = httpx.request(method, f"{url.rstrip('/')}{path}", json=body, params=params, timeout=timeout, headers=headers)
    except httpx.HTTPError as exc:
        console.print(f"[red]cannot reach {url}:[/red] {exc}")
        raise typer.Exit(1)
    if not 200 <= resp.status_code < 300:
        console.print(f"[red]{resp.status_code}[/red] {resp.text}")
        raise typer.Exit(1)
    return resp.json()


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

"""`routerserve index build`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import ConfigOpt, DataOpt, SetOpt, _data_dir, _load, console

index_app = typer.Typer(no_args_is_help=True, help="Build the corpus index.")


@index_app.command("build")
def index_build(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, data_dir: Optional[Path] = DataOpt):
    """Encode the configured corpus with the base model (Ray Data) and write FAISS shards."""
    from serve.offline.indexing import build_index

    cfg = _load(config, set_)
    folder = build_index(cfg, _data_dir(cfg, data_dir))
    console.print(f"[green]index ready:[/green] {folder}")

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
    from actors.index_store import IndexManifest

    from serve.offline.indexing import build_index

    cfg = _load(config, set_)
    folder = build_index(cfg, _data_dir(cfg, data_dir))
    m = IndexManifest.load(folder)
    console.print(f"[green]index ready:[/green] {folder}")
    console.print(f"  {m.num_docs:,} documents of {', '.join(m.datasets)} in {len(m.shards)} shard(s) of {m.factory}"
                  + (f" (knobs: {', '.join(m.knobs)}; trained on {m.train_size:,} vectors"
                     f"{f' in {m.train_seconds:.1f} s' if m.train_seconds else ', cached'})" if m.trained_file else ""))

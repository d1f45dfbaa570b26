"""`routerserve` command line (typer): one module per command group.

    index.py     index build                       experts.py   experts …, pilots build
    eval.py      eval beir | qa                    deploy.py    config show | serve-yaml, k8s render | validate
    run.py       up, query, chat, doctor           common.py    options, config loading, HTTP helpers

The only package that may import every other one (online app, offline pipelines, deploy tools).
"""

from __future__ import annotations

import typer

from .deploy import config_app, k8s_app
from .eval import eval_app
from .experts import experts_app, pilots_app
from .index import index_app
from .run import chat, doctor, query, up

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Routed retrieval on Ray Serve.")
app.add_typer(index_app, name="index")
app.add_typer(experts_app, name="experts")
app.add_typer(config_app, name="config")
app.add_typer(pilots_app, name="pilots")
app.add_typer(eval_app, name="eval")
app.add_typer(k8s_app, name="k8s")
for command in (query, chat, up, doctor):
    app.command()(command)

if __name__ == "__main__":
    app()

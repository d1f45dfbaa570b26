"""Producing the Ray Serve config file (`serve run` / `serve deploy`) from the routerserve config."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .builders import CONTROLLER, ENCODER, INGRESS, engine_options, llm_engine_name, shard_name
from .config import RouterServeConfig


def serve_config(cfg: RouterServeConfig, data_dir: Path | None = None, host: str | None = None) -> dict[str, Any]:
    """A ServeDeploySchema-valid dict; validated with Ray Serve's own schema before it is returned."""
    from ray.serve.schema import ServeDeploySchema

    cfg = cfg.absolutized()
    # the k8s section renders the cluster; it means nothing to the running app
    args: dict[str, Any] = {"config": cfg.model_dump(mode="json", exclude={"k8s"})}
    if data_dir is not None:
        args["data_dir"] = str(data_dir)
    d = cfg.deployments
    deployments = [{"name": INGRESS, **d.ingress}, {"name": ENCODER, **d.encoder}] + [
        {"name": shard_name(i), **copy.deepcopy(d.shard)} for i in range(cfg.index.num_shards)
    ]
    if cfg.llm.enabled:
        deployments += [{"name": llm_engine_name(n), **engine_options(e)} for n, e in cfg.llm.engines.items()]
        deployments.append({"name": CONTROLLER, **cfg.llm.controller})
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host or cfg.http.host, "port": cfg.http.port},
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": cfg.http.route_prefix,
                "import_path": "serve.builders:build_app",
                "args": args,
                "deployments": deployments,
            }
        ],
    }
    ServeDeploySchema.model_validate(doc)
    return doc

"""Producing the Ray Serve config file (`serve run` / `serve deploy`) from the routerserve config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve.app.settings import deployment_options
from serve.config import ConfigError, RouterServeConfig

IMPORT_PATH = "serve.app.builders:build_app"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def http_options(cfg: RouterServeConfig, host: str | None = None) -> dict[str, Any]:
    """Serve's HTTP proxy options: where it listens and its backstop deadline (cfg.proxy_timeout_s).
    An admin API opened without keys (http.admin_open) listens only on a loopback host, whoever
    sets the host."""
    host = host or cfg.http.host
    if cfg.http.admin_open and host not in LOOPBACK:
        raise ConfigError(f"http.admin_open: an admin API without keys only on a loopback host, not {host!r} "
                          "(set http.admin_keys_env instead)")
    return {"host": host, "port": cfg.http.port, "request_timeout_s": cfg.proxy_timeout_s()}


def serve_config(cfg: RouterServeConfig, data_dir: Path | None = None, host: str | None = None) -> dict[str, Any]:
    """A ServeDeploySchema-valid dict; validated with Ray Serve's own schema before it is returned."""
    from ray.serve.schema import ServeDeploySchema

    cfg = cfg.absolutized()
    # the k8s section renders the cluster; it means nothing to the running app
    args: dict[str, Any] = {"config": cfg.model_dump(mode="json", exclude={"k8s"})}
    if data_dir is not None:
        args["data_dir"] = str(data_dir)
    doc = {
        "proxy_location": "EveryNode",
        "http_options": http_options(cfg, host),
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": cfg.http.route_prefix,
                "import_path": IMPORT_PATH,
                "args": args,
                "deployments": [{"name": name, **opts} for name, opts in deployment_options(cfg).items()],
            }
        ],
    }
    ServeDeploySchema.model_validate(doc)
    return doc

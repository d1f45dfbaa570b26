"""Starting or joining a Ray cluster with the settings that work on small hosts."""

from __future__ import annotations

import logging
import os

from serve.config import RayConfig

logger = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig) -> None:
    """Init Ray once. 'local' starts a private cluster bound to 127.0.0.1 (never attaches to a
    stray cluster recorded in /tmp/ray); anything else is passed to ray.init as the address."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = {"include_dashboard": cfg.include_dashboard, "log_to_driver": True}
    if cfg.address == "local":
        kwargs.update(address="local", _node_ip_address="127.0.0.1")
        if cfg.num_cpus:
            kwargs["num_cpus"] = cfg.num_cpus
        # The package is installed in this venv; workers import it from there.
    else:
        kwargs["address"] = cfg.address
    ray.init(**kwargs)

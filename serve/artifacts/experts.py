"""The expert store on disk: where adapters and pilots live, which experts are enabled, expert names.

    <experts.dir>/adapters/<name>/     peft LoRA adapter folder (+ train_report.json, loss.png)
    <experts.dir>/pilots.npz           pilot embeddings with the expert and domain of each, and the rule
    <experts.dir>/multitask/           the multi-task baseline adapter (evaluation only)

Read by the online builder and by the offline pipelines; writes nothing but the crash recovery
of serve.artifacts.atomic (an interrupted swap put back) before listing adapters.
"""

from __future__ import annotations

import re
from pathlib import Path

from actors.encoder import adapter_dirs
from actors.routing import PILOTS_FILE, PilotSet

from serve.config import RouterServeConfig

from .atomic import recover


def adapters_root(cfg: RouterServeConfig) -> Path | None:
    return None if cfg.experts.dir is None else Path(cfg.experts.dir) / "adapters"


def pilots_path(cfg: RouterServeConfig) -> Path | None:
    return None if cfg.experts.dir is None else Path(cfg.experts.dir) / PILOTS_FILE


def enabled_experts(cfg: RouterServeConfig) -> dict[str, Path]:
    """Adapter folders the service loads: every one found, or those in experts.enabled."""
    root = adapters_root(cfg)
    if root is not None:
        recover(root)  # a write a crash cut short: the old adapter back in place
    found = adapter_dirs(root) if root is not None else {}
    if cfg.experts.enabled is None:
        return found
    missing = [e for e in cfg.experts.enabled if e not in found]
    if missing:
        raise FileNotFoundError(f"experts.enabled names {missing}, which have no adapter folder under {root}")
    return {e: found[e] for e in cfg.experts.enabled}


def load_pilots(cfg: RouterServeConfig) -> PilotSet | None:
    path = pilots_path(cfg)
    return PilotSet.load(path) if path is not None and path.is_file() else None


def pilot_rule(cfg: RouterServeConfig) -> str:
    """The grouping rule the config asks for, as recorded in pilots.npz (``PilotSet.rule``)."""
    return f"best_expert margin={cfg.experts.pilot_margin:g} min_queries={cfg.experts.pilot_min_queries}"


def pilots_follow_config(pilots: PilotSet | None, cfg: RouterServeConfig) -> bool:
    return pilots is not None and pilots.rule == pilot_rule(cfg)


MULTITASK = "multitask"


def multitask_dir(cfg: RouterServeConfig) -> Path | None:
    """The multi-task baseline adapter lives outside adapters/: it is never routed to."""
    return None if cfg.experts.dir is None else Path(cfg.experts.dir) / MULTITASK


EXPERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_expert_name(name: str) -> str:
    if not EXPERT_NAME.match(name or "") or name.lower() == "base":
        raise ValueError(
            f"invalid expert name {name!r}: 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and not 'base'"
        )
    return name

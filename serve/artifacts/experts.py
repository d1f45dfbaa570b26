"""The expert store on disk: the draft the offline pipelines write, the published generations the
service reads, expert names.

    <experts.dir>/adapters/<name>/     the draft: peft LoRA adapter folders (+ train_report.json, loss.png)
    <experts.dir>/pilots.npz           the draft's pilot embeddings (expert and domain of each, and the rule)
    <experts.dir>/generations/gNNNNNN/ published, immutable expert sets (serve.artifacts.generations)
    <experts.dir>/CURRENT.json         the generation in service
    <experts.dir>/multitask/           the multi-task baseline adapter (evaluation only)

Training, pilot building and `experts add/remove` change the draft and then publish it
(``publish_draft``); serving, evaluation and `experts list` read the current generation
(``served_experts``), never the draft. Writes nothing else but the crash recovery of
serve.artifacts.atomic (an interrupted swap put back) before listing adapters.
"""

from __future__ import annotations

from pathlib import Path

from actors.encoder import adapter_dirs
from actors.routing import PILOTS_FILE, PilotSet

from serve.config import RouterServeConfig

from .atomic import recover
from .generations import Generation, GenerationError, GenerationStore


def adapters_root(cfg: RouterServeConfig) -> Path | None:
    return None if cfg.experts.dir is None else Path(cfg.experts.dir) / "adapters"


def pilots_path(cfg: RouterServeConfig) -> Path | None:
    return None if cfg.experts.dir is None else Path(cfg.experts.dir) / PILOTS_FILE


def enabled_experts(cfg: RouterServeConfig) -> dict[str, Path]:
    """The draft's adapter folders (what the offline pipelines train against and publish): every
    one found, or those in experts.enabled."""
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
    """The draft's pilots."""
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




# -- generations: what the service reads ----------------------------------------------------------


def generation_store(cfg: RouterServeConfig) -> GenerationStore | None:
    return None if cfg.experts.dir is None else GenerationStore(cfg.experts.dir)


def publish_draft(cfg: RouterServeConfig, reason: str, activate: bool = True) -> Generation:
    """The draft (its adapters, restricted to experts.enabled, and their pilots) as a new
    generation; made current unless ``activate`` is false."""
    store = generation_store(cfg)
    if store is None:
        raise GenerationError("experts.dir is null: there is no expert store to publish to")
    gen = store.publish(enabled_experts(cfg), load_pilots(cfg), reason=reason, base_model=cfg.model.ref)
    if activate:
        store.activate(gen.id, reason=reason)
    return gen


def ensure_generation(cfg: RouterServeConfig) -> Generation | None:
    """The current generation; when there is none yet but the draft has experts (an expert store
    from before generations, or experts just trained), the draft is published first."""
    store = generation_store(cfg)
    if store is None:
        return None
    gen = store.current()
    if gen is None and enabled_experts(cfg):
        gen = publish_draft(cfg, "first generation from the draft")
    return gen


def served_generation(cfg: RouterServeConfig) -> Generation | None:
    """The generation the service serves: experts.generation when pinned, else the current one."""
    store = generation_store(cfg)
    if store is None:
        return None
    pinned = cfg.experts.generation
    return store.get(pinned) if pinned != "current" else store.current()


def served_experts(cfg: RouterServeConfig) -> tuple[Generation | None, dict[str, Path], PilotSet | None]:
    """What serving and evaluation read: the served generation, its (enabled) adapters, its pilots."""
    gen = served_generation(cfg)
    if gen is None:
        return None, {}, None
    return gen, gen.adapters(cfg.experts.enabled), gen.load_pilots()

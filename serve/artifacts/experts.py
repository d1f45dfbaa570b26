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

import os
import shutil
from pathlib import Path

from actors.encoder import adapter_dirs
from actors.routing import PILOTS_FILE, PilotSet

from serve.config import RouterServeConfig

from .atomic import recover
from .generations import Generation, GenerationError, GenerationStore, check_expert_name


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
    with store.lock():
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


def remove_from_draft(experts_dir: str | os.PathLike, name: str) -> bool:
    """Delete expert ``name``'s adapter folder and its pilots from the draft under ``experts_dir``;
    False when the draft has no such expert. ``name`` is checked like a new expert's name (no
    '..', no separators, no absolute path); a symlink is unlinked, never followed, so nothing
    outside the expert store is ever deleted."""
    check_expert_name(name)
    root = Path(experts_dir) / "adapters"
    path = root / name
    if not (path.is_dir() or path.is_symlink()):
        return False
    if path.is_symlink():
        path.unlink()
    else:
        # renamed out of sight first, so a crash mid-delete leaves no half adapter to load
        doomed = root / f".{name}.removing-{os.getpid()}"
        os.rename(path, doomed)
        shutil.rmtree(doomed)
    pilots_file = Path(experts_dir) / PILOTS_FILE
    if pilots_file.is_file():
        pilots = PilotSet.load(pilots_file)
        pilots.restrict([e for e in pilots.expert_names if e != name]).save(pilots_file)
    return True


def remove_expert(cfg: RouterServeConfig, name: str, publish: bool = True) -> None:
    """Remove expert ``name`` from the draft (``remove_from_draft``), then publish the draft as a
    new current generation (unless ``publish`` is false). Published generations keep their own
    copy, so a service still serving one with ``name`` is unaffected until it switches."""
    check_expert_name(name)
    if cfg.experts.dir is None or not remove_from_draft(cfg.experts.dir, name):
        raise FileNotFoundError(f"no expert {name!r} under {adapters_root(cfg)}")
    if publish:
        publish_draft(cfg, f"removed expert {name}")


def remove_from_service(store: GenerationStore, name: str, reason: str) -> Generation:
    """A new current generation: the current one without expert ``name`` (from the generation's
    own copies; nothing is re-encoded), with ``name`` removed from the draft too, so the next
    publish of the draft does not bring it back."""
    check_expert_name(name)
    with store.lock():
        return _remove_from_service(store, name, reason)


def _remove_from_service(store: GenerationStore, name: str, reason: str) -> Generation:
    current = store.current()
    if current is None or name not in current.experts:
        have = current.experts if current is not None else []
        raise GenerationError(f"no expert {name!r} in the current generation (it has {have})")
    remove_from_draft(store.root, name)
    keep = [e for e in current.experts if e != name]
    pilots = current.load_pilots()
    gen = store.publish({e: current.adapters()[e] for e in keep}, pilots, reason=reason,
                        base_model=current.manifest.get("base_model", ""))
    return store.activate(gen.id, reason=reason)

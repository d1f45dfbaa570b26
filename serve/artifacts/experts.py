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

import json
import logging
import os
import shutil
from pathlib import Path

from actors.encoder import adapter_dirs
from actors.routing import PILOTS_FILE, PilotSet

from serve.config import RouterServeConfig

from .atomic import recover, staged_dir
from .generations import Generation, GenerationError, GenerationStore, check_expert_name, write_json_atomic

logger = logging.getLogger(__name__)


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
    e = cfg.experts
    return (f"best_expert margin={e.pilot_margin:g} min_queries={e.pilot_min_queries}"
            # the member floor is named; the pilot floor is the one files before the choice hold
            + ("" if e.confidence_quantile is None else f" confidence_quantile={e.confidence_quantile:g}"
               + (" confidence_floor=member" if e.confidence_floor == "member" else ""))
            + (" base_guard" if e.base_guard else ""))


def serving_datasets(cfg: RouterServeConfig, domain: str) -> list[str]:
    """The corpora a query of ``domain`` meets when served: the served index's datasets
    (``corpus.datasets``), plus the domain's own where they lack it (its judged documents must be
    there to score it). Training with ``negatives: union`` and the base guard both use this."""
    return list(dict.fromkeys([*cfg.corpus.datasets, domain]))


def stale_guards(pilots: PilotSet, cfg: RouterServeConfig) -> list[str]:
    """Experts whose base guard was judged in another index than the config serves now."""
    return sorted(e for e, g in pilots.guards.items() if sorted(g["index"]) != sorted(serving_datasets(cfg, g["domain"])))


def pilots_follow_config(pilots: PilotSet | None, cfg: RouterServeConfig) -> bool:
    """Grouped by the config's rule, every base guard judged in the index it serves, and the
    pilots' members kept (files from before them lack what ``pilot_knn`` routes by)."""
    return (pilots is not None and pilots.rule == pilot_rule(cfg) and not stale_guards(pilots, cfg)
            and (pilots.members.shape[0] > 0 or pilots.embeddings.shape[0] == 0))


def adapter_under_root(root: str | os.PathLike, adapter: str | os.PathLike) -> Path:
    """``adapter`` (relative to ``root``, or absolute) resolved, symlinks too, and required to be a
    folder under ``root`` (experts.register_root); ValueError naming the problem otherwise."""
    root = Path(root).resolve()
    if "\x00" in str(adapter):
        raise ValueError("adapter: a path with a NUL byte")
    try:
        path = (root / adapter).resolve()  # an absolute ``adapter`` replaces root: checked like any other
        if not path.is_relative_to(root):
            raise ValueError(f"adapter {str(adapter)!r} resolves to {path}, outside experts.register_root {root}: "
                             "put the folder under it")
        if not path.is_dir():
            raise ValueError(f"adapter folder {path} does not exist (under experts.register_root {root})")
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long, no permission
        raise ValueError(f"adapter {str(adapter)!r}: {exc}") from None
    return path


def check_adapter_folder(adapter_dir: str | os.PathLike, model_dir: str | os.PathLike) -> list[str]:
    """Cheap checks that a folder is a peft LoRA adapter for the base model in ``model_dir``,
    without loading either (the admin API answers 422 before a job starts): adapter_config.json
    names LORA; adapter_model.safetensors exists (pickled weights are refused); every LoRA matrix's
    outer size is one the base model has (hidden or intermediate size) and every layer index is
    below its layer count. Returns the problems, empty when none (the job's command still loads
    the adapter and encodes a probe before anything is written)."""
    import re

    from safetensors import safe_open

    folder = Path(adapter_dir)
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    try:
        missing = [f.name for f in (config_file, weights) if not f.is_file()]
        if missing:
            return [f"{folder} is not a peft adapter folder: {' and '.join(missing)} missing"]
        links = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_symlink()]
        if links:  # a copy follows links: one could carry any file the job can read into the store
            return [f"{folder} holds symbolic links ({', '.join(sorted(links)[:3])}): copy real files"]
        peft_type = json.loads(config_file.read_text()).get("peft_type")
    except (ValueError, AttributeError) as exc:
        return [f"{config_file}: not a JSON object ({exc})"]
    except OSError as exc:
        return [f"{folder}: cannot read it ({exc.strerror or exc})"]
    base = json.loads((Path(model_dir) / "config.json").read_text())  # the service's own model: its error is ours
    if peft_type != "LORA":
        return [f"{config_file}: peft_type {peft_type!r}, not LORA"]
    sizes = {base.get("hidden_size"), base.get("intermediate_size")} - {None}
    layers = base.get("num_hidden_layers")
    problems: list[str] = []
    try:
        with safe_open(str(weights), framework="np") as fh:
            for key in fh.keys():
                if ".lora_A." not in key and ".lora_B." not in key:
                    continue
                shape = fh.get_slice(key).get_shape()
                outer = shape[1] if ".lora_A." in key else shape[0]
                layer = re.search(r"\.layer\.(\d+)\.", key)
                if len(shape) != 2 or outer not in sizes:
                    problems.append(f"{key} has shape {list(shape)}: the base model's sizes are {sorted(sizes)} "
                                    "(an adapter trained for another base model)")
                elif layers is not None and layer is not None and int(layer.group(1)) >= layers:
                    problems.append(f"{key}: layer {layer.group(1)}, the base model has {layers}")
                if len(problems) >= 3:
                    break
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        return [f"{weights}: not a readable safetensors file ({exc})"]
    return problems


MULTITASK = "multitask"


def multitask_dir(cfg: RouterServeConfig) -> Path | None:
    """The multi-task baseline adapter lives outside adapters/: it is never routed to."""
    return None if cfg.experts.dir is None else Path(cfg.experts.dir) / MULTITASK




# -- generations: what the service reads ----------------------------------------------------------


def generation_store(cfg: RouterServeConfig) -> GenerationStore | None:
    return None if cfg.experts.dir is None else GenerationStore(cfg.experts.dir)


DRAFT_MARKER = "DRAFT.json"  # {"generation": the generation the draft was last published as}


def _draft_based_on(store: GenerationStore) -> str | None:
    """The generation the draft was last published as (DRAFT.json), or None (no marker)."""
    marker = store.root / DRAFT_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text()).get("generation")
    except (ValueError, AttributeError):
        return ""  # a damaged marker: follows nothing


def publish_draft(cfg: RouterServeConfig, reason: str, activate: bool = True, force: bool = False) -> Generation:
    """The draft (its adapters, restricted to experts.enabled, and their pilots) as a new
    generation; made current unless ``activate`` is false.

    Refused (nothing published) when another generation was made current while the draft was
    being changed — an activate, rollback or admin removal during a training run would otherwise
    be undone silently; run the change again (it then starts from the new current one). ``force``
    (`experts publish`, asked by hand) publishes the draft as it is."""
    store = generation_store(cfg)
    if store is None:
        raise GenerationError("experts.dir is null: there is no expert store to publish to")
    with store.lock():
        based_on, current = _draft_based_on(store), store.current_id()
        if activate and not force and based_on is not None and current is not None and based_on != current:
            raise GenerationError(f"generation {current} was made current while this change was being made (the draft "
                                  f"was based on {based_on or 'an unreadable marker'}): nothing published; run the "
                                  "change again, it then starts from the served generation")
        gen = store.publish(enabled_experts(cfg), load_pilots(cfg), reason=reason, base_model=cfg.model.ref)
        if activate:
            store.activate(gen.id, reason=reason)
        write_json_atomic(store.root / DRAFT_MARKER, {"generation": gen.id})
    return gen


def draft_follows_current(cfg: RouterServeConfig) -> str | None:
    """Before an offline change to the draft (train, add, remove, pilots build): when the current
    generation is not the one the draft was last published as — an activate or a rollback since,
    or a removal through the admin API — the draft becomes the current generation, so the change
    applies to what is served and publishing it neither brings back a rolled-back expert nor drops
    a served one: the served adapters and pilots are copied in, and draft adapters that some
    generation published but the current one does not serve are removed (their generations keep
    them). Adapters never published (left out by experts.enabled) stay; their pilots are not in
    the served set (a warning names them: `routerserve pilots build`). Returns the generation
    copied, or None (the draft already follows it, no generation is current, or a store from
    before the marker: left as it is)."""
    store = generation_store(cfg)
    if store is None or not (store.root / DRAFT_MARKER).is_file():
        return None
    with store.lock():
        current = store.current()
        if current is None or _draft_based_on(store) == current.id:
            return None
        root = adapters_root(cfg)
        root.mkdir(parents=True, exist_ok=True)
        served = current.adapters()
        published = {e for g in store.list() for e in g.experts}
        unpublished = [name for name in adapter_dirs(root) if name not in published]
        for name in adapter_dirs(root):
            if name in published and name not in served:
                remove_from_draft(store.root, name)
        for name, src in served.items():
            with staged_dir(root / name) as staging:
                shutil.copytree(src, staging, dirs_exist_ok=True, symlinks=False)
        pilots, draft_pilots = current.load_pilots(), pilots_path(cfg)
        if pilots is None:
            draft_pilots.unlink(missing_ok=True)
        else:
            pilots.save(draft_pilots)  # written whole (PilotSet.save)
        if unpublished:
            logger.warning("the draft now follows generation %s; adapters never published %s keep their folders but "
                           "not their pilots: run `routerserve pilots build` before publishing them", current.id, unpublished)
        write_json_atomic(store.root / DRAFT_MARKER, {"generation": current.id})
        return current.id


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
    draft_follows_current(cfg)
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

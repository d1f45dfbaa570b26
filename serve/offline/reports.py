"""What every evaluation report starts with: the JSON written, the markdown and PNG paths, and
matplotlib on its file backend."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from ..artifacts.atomic import replacing, write_text_atomic


def start_report(result: dict, stem: Path):
    """Write ``<stem>.json``; return ([json, md, png] paths, pyplot with the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    write_text_atomic(paths[0], json.dumps(result, indent=2) + "\n")
    return paths, plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """A matplotlib figure written to ``path`` (PNG), whole or not at all (``replacing``)."""
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def machine(dists: tuple[str, ...] = ("ray", "torch", "transformers")) -> dict:
    """Where the figures were measured: CPU model, cores, memory, GPU, Python, package versions."""
    import psutil

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no torch or a broken driver: report none
        pass
    versions = {}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }

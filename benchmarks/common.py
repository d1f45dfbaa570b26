"""Shared helpers for benchmarks: machine description, result writing."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    from serve.offline.reports import machine as describe

    return describe(("ray", "torch", "transformers", "peft", "faiss-cpu", "faiss-gpu", "fastapi"))


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", *[os.path.relpath(sys.argv[0])], *sys.argv[1:]])


def git_commit() -> str:
    """HEAD's short hash, marked when tracked files differ from it (a result of uncommitted code)."""
    try:
        repo = Path(__file__).resolve().parent  # the repository this benchmark belongs to, wherever it is run from
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=repo).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True, cwd=repo).returncode != 0
        return f"{head} + uncommitted changes" if dirty else head
    except Exception:
        return "unknown"


def write_json(name: str, payload: dict, out: Path = RESULTS) -> Path:
    """<out>/<name>.json (default benchmarks/results), replaced whole (serve.artifacts.atomic)."""
    from serve.artifacts.atomic import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out / f"{name}.json", json.dumps(payload, indent=2) + "\n")


def write_markdown(name: str, text: str, out: Path = RESULTS) -> Path:
    from serve.artifacts.atomic import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out / f"{name}.md", text)


def fmt(x, spec: str = ".1f") -> str:
    """A figure for a markdown table; "–" when it was not measured."""
    return "–" if x is None else format(x, spec)

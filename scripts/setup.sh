#!/usr/bin/env bash
# Idempotent set-up: .venv with the CPU build of torch first, then the pinned project (+dev).
# Re-runs only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.routerserve-install-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing pinned dependencies into .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # torch first: 2.13.0 is the CPU build on this disk; an unpinned torch pulls GBs of CUDA wheels.
  .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, ray, faiss, peft, transformers, serve.cli" \
    || { echo "[setup] install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

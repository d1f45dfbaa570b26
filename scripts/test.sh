#!/usr/bin/env bash
# README command 2: set up, then run every test (unit + end-to-end over real Ray Serve HTTP).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# README command 2: set up, check the architecture contracts (import-linter, pyproject.toml), then
# run every test (unit + end-to-end over real Ray Serve HTTP). Fast tier only: ./scripts/test.sh -m "not integration"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lint-imports --no-logo
exec .venv/bin/python -m pytest -q "$@"

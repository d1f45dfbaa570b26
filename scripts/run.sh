#!/usr/bin/env bash
# README command 1: set up, build what is missing (index, default experts), start the service on a
# local Ray cluster, send a sample query, keep serving (pass --once to stop after the query).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/routerserve up "$@"

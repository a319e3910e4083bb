#!/usr/bin/env bash
# README command 2 (and what CI runs): set up, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/ruff format --check --quiet . || { echo "[test] ruff format: run .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest tests "$@"

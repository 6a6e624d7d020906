#!/usr/bin/env bash
# Install everything, then lint (ruff), type-check (mypy) and run the test suite (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
bash scripts/typecheck.sh
echo "== pytest"
.venv/bin/python -m pytest "$@"

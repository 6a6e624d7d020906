#!/usr/bin/env bash
# mypy over the sllm package. The components live in top-level folders mapped under
# `sllm` by pyproject.toml; mypy cannot follow that mapping, so it reads a tree of links.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree"
mkdir -p "$tree/sllm"
for f in sllm/*; do ln -s "$PWD/$f" "$tree/sllm/"; done
for pkg in native_loader controller invoker runtime db traces; do ln -s "$PWD/$pkg" "$tree/sllm/$pkg"; done
cd "$tree"
../../.venv/bin/mypy --config-file ../../pyproject.toml -p sllm

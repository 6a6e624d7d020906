#!/usr/bin/env bash
# Install sllm, then run the main job on the embedded default (offline, CPU is enough).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/sllm demo "$@"

#!/usr/bin/env bash
# Install sllm, then run the main job on the embedded default, offline (CPU is enough):
# start the embedded server, publish a demo model, create a function, invoke it streaming.
# The server keeps running afterwards; the script ends by printing how to go on and stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export SLLM_HOME="${SLLM_HOME:-$PWD/.sllm-demo}"  # database, store, caches, CLI config
PORT="${SLLM_DEMO_PORT:-8700}"
sllm() { .venv/bin/sllm "$@"; }
# A server left running by an earlier demo holds this folder: stop it before wiping it.
sllm server stop >/dev/null 2>&1 || true
rm -rf "$SLLM_HOME"
sllm server start --detach --port "$PORT"
trap 'echo "the demo failed; stopping the server" >&2; sllm server stop' EXIT
echo "== publish a demo model"
sllm model demo "$SLLM_HOME/demo-model"
sllm model push "$SLLM_HOME/demo-model" demo
echo "== create a function and invoke it (tokens stream as they are generated)"
sllm fn create demo --model demo --keep-alive 600
sllm fn invoke demo -p prompt "Once upon a time" -p max_tokens 24 -p temperature 0 --stream
sllm fn invoke demo -p prompt "Once upon a time" -p max_tokens 24 -p temperature 0 --stream
echo "== activations"
sllm activation list
trap - EXIT
cat <<EOF

The server is still running at http://127.0.0.1:$PORT. To go on in your shell:

  export SLLM_HOME="$SLLM_HOME"
  source "$PWD/.venv/bin/activate"    # or call $PWD/.venv/bin/sllm

  sllm fn invoke demo -p prompt "The meaning of life is" -p max_tokens 32 --stream

Stop it with:  sllm server stop
EOF

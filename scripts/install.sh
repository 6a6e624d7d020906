#!/usr/bin/env bash
# Install sllm and its tools into .venv, starting from nothing but Python, gcc and the Python headers.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: an unpinned torch would pull several GB of CUDA packages;
# pyproject's range admits 2.13.0, so nothing replaces it afterwards.
pip install "torch==2.13.0"
pip install -e ".[dev]"
# fio measures raw disk bandwidth for `sllm bench load`; best effort (needs root and apt).
if ! command -v fio >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq fio) >/dev/null 2>&1 \
            || echo "note: could not install fio; the load benchmark will skip the fio baseline" >&2
    else
        echo "note: fio is not installed; the load benchmark will skip the fio baseline" >&2
    fi
fi

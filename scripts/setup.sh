#!/usr/bin/env bash
# Create .venv and install pagedserve with its test tools. CPU build of torch first: a bare
# `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
# The CPU engine's C++ kernels, compiled now rather than at the server's first start.
.venv/bin/pagedserve build-kernels \
  || echo "setup: going on without the C++ CPU kernels (the CPU engine will be slower)" >&2
echo "pagedserve installed in $(pwd)/.venv"

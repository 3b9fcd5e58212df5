#!/usr/bin/env bash
# Regenerate the Python code of protos/**/*.proto (committed; never edit the output by hand).
# tests/test_protos.py fails when the committed code is stale. Needs grpcio-tools (dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-.}
mapfile -t PROTOS < <(find protos -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -I . --python_out="$OUT" --pyi_out="$OUT" "${PROTOS[@]}"
# Service stubs only for the files that define a service.
"$PY" -m grpc_tools.protoc -I . --grpc_python_out="$OUT" $(grep -l '^service ' "${PROTOS[@]}")
# Every directory on the way is a package, so setuptools ships the generated modules.
for d in $(find "$OUT/protos" -type d -not -name __pycache__); do
  [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
done

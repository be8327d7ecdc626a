#!/usr/bin/env bash
# Regenerates the committed Python stubs of protos/*.proto (run after editing one;
# tests/unit/test_protos.py fails while the stubs are stale). Usage: bash scripts/gen_protos.sh [OUT_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python="${PYTHON:-.venv/bin/python}"
"$python" -m grpc_tools.protoc -I . --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    protos/inference.proto protos/worker.proto

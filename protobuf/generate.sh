#!/usr/bin/env bash
# Regenerate phaul/pb/ from protobuf/*.proto. The generated modules are committed (so that a host
# running phaul needs no protoc); tests/unit/test_pb_fresh.py fails when they are stale.
# Uses grpcio-tools and mypy-protobuf from the dev extras (pinned in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-phaul/pb}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -Iprotobuf --python_out="$OUT" --mypy_out="$OUT" \
  --plugin=protoc-gen-mypy="$(dirname "$PY")/protoc-gen-mypy" protobuf/*.proto
# protoc emits absolute imports between generated modules ("import x_pb2"); make them package-relative.
sed -i -E 's/^import ([a-z_0-9]+_pb2) as /from . import \1 as /' "$OUT"/*_pb2.py
[ -f "$OUT/__init__.py" ] || echo '"""Generated from protobuf/*.proto by protobuf/generate.sh. Do not edit."""' > "$OUT/__init__.py"

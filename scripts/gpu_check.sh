#!/usr/bin/env bash
# The GPU check: card, driver, TensorFlow's view, backbone and extraction throughput, decode per core, one
# fine-tune epoch; printed and written to $OUT/gpu-check.json (default reports/). Under 8 minutes.
#   scripts/gpu_check.sh [--n N] [--per-class K]       (PIPELINE_SHARED: the shared assets, default ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PIPELINE_SHARED="${PIPELINE_SHARED:-$(cd .. && pwd)/shared}"
exec timeout 470 "$PY" -m pipeline.bench.gpu "$@"

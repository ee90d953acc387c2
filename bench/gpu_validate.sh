#!/usr/bin/env bash
# lm-loss of SmolLM2-135M-Instruct on fortunes, CUDA (bf16 autocast) vs CPU (fp32).
# Prints "SKIPPED: no CUDA" and exits 0 on a machine without a GPU; pass --cpu to
# run the CPU half alone. Everything it downloads or writes lies in bench/_work/.
# Usage: bash bench/gpu_validate.sh [--cpu] [--rows N] [--model DIR] ...
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 290 "$PY" bench/gpu_validate.py "$@"

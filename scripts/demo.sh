#!/usr/bin/env bash
# README command 1: install, then run the demo on the default registry
# ($PATCHCTL_HOME, else ~/.patchctl). Trained models are cached in .demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python -m patchctl.demo "$@"

#!/usr/bin/env bash
# README command 2: install what the tests need, lint, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
.venv/bin/python -m ruff check patchctl tests bench
.venv/bin/lint-imports --no-cache   # the layers of docs/design.md's module map (contracts in pyproject.toml)
.venv/bin/python -m pytest -q "$@"

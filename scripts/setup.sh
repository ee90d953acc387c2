#!/usr/bin/env bash
# Creates .venv (once) and installs patchctl with the extras named in $1.
# torch: the CPU build 2.13.0 is installed first when no torch is present, so
# that the package's torch range never makes pip pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
stamp=".venv/.patchctl-installed-$extras"
# reinstall when the package metadata or the C kernels (built in place by setup.py) change
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ patchctl/_kernels.c -nt "$stamp" ]; then
  "$PY" -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi

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
# The tests' real parts from Debian (only for the test extra: the demo needs neither).
# Headless Chromium for tests/test_browser.py (no browser download at test time).
# Only as root and only when missing; a failure here leaves those tests skipped, not the setup broken.
if [ "$extras" = test ] && { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
      || echo "setup: could not install chromium chromium-driver; the browser tests will skip" >&2
  else
    echo "setup: chromium/chromedriver missing (apt-get install chromium chromium-driver as root); the browser tests will skip" >&2
  fi
fi
PY=.venv/bin/python
# the CNCF registry (distribution 2.8) that tests/test_oci.py runs; they skip, naming the package, without it
if [ "$extras" = test ] && ! command -v docker-registry >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null 2>&1; then
  # the package lists are often fresh already (the block above updated them): update only when that fails
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry; }; } >/dev/null 2>&1 \
    || echo "setup.sh: could not install docker-registry; the OCI registry tests will skip" >&2
fi
# mergekit 0.1.5 in a venv of its own (its pins clash with ours) for tests/test_mergekit_yaml.py and
# bench/merge.py; CPU torch first, as below. A failure leaves those tests skipped (they say why).
MK=bench/_work/venv-mergekit
if [ "$extras" = test ] && [ ! -x "$MK/bin/mergekit-yaml" ]; then
  { python3 -m venv "$MK" && timeout 900 "$MK/bin/pip" install -q "torch==2.13.0" \
    && timeout 900 "$MK/bin/pip" install -q "mergekit==0.1.5"; } >/dev/null 2>&1 \
    || { rm -rf "$MK"; echo "setup.sh: could not install mergekit 0.1.5 in $MK; the mergekit comparison tests will skip" >&2; }
fi
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

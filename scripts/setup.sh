#!/usr/bin/env bash
# Set up .venv in the checkout: CPU torch first when none is importable, then the project with the dev and fla extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # the CPU build; an unpinned torch would pull a multi-GB CUDA build
  .venv/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -W ignore -c "import torch" 2>/dev/null || { echo "torch install failed" >&2; exit 1; }  # numpy comes next
fi
# with the fla extra (flash-linear-attention + triton, ~1 GB, for the fla DeltaNet tests); torch is pinned to the build
# already installed, so resolving the extras can never swap it (e.g. for a CUDA build)
constraints=$(mktemp)
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
.venv/bin/pip install -q -e ".[dev,fla]" -c "$constraints" 2>&1 | grep -vE "is ignored|^\s*$" || true
rm -f "$constraints"
.venv/bin/python -c "import writesae_plugin.adapters, sae_lens, nnsight" || { echo "project install failed" >&2; exit 1; }
.venv/bin/python -W ignore -c "import fla, triton" 2>/dev/null || { echo "fla extra install failed" >&2; exit 1; }
# headless Chromium for the dashboard's browser test (tests/test_dashboard_browser.py): Debian's chromium and
# chromium-driver, installed only when missing and apt-get can run (root); otherwise that test says why it skips
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver; } >/dev/null 2>&1 || echo "chromium install failed: the browser test will skip" >&2
  else
    echo "no chromium/chromedriver (and no root apt-get): the dashboard browser test will skip" >&2
  fi
fi

#!/usr/bin/env bash
# Set up .venv in the checkout: CPU torch first when none is importable, then the project with the dev and fla extras.
# Quiet when it succeeds: pip runs with -q, and the one line of noise this machine's pip config makes (an extra index
# that 'is ignored') is dropped; anything else pip says is shown.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() {  # pip install -q ARGS; its messages on stderr except the 'is ignored' notes; pip's exit status
  local status=0
  .venv/bin/pip install -q "$@" 2>&1 | { grep -vE "is ignored|^[[:space:]]*$" >&2 || true; } || status=$?
  return "$status"
}
# torch's CPU build: the +cpu local version matches no CUDA build, so pip can never pull one (a plain torch==X from PyPI
# is a multi-GB CUDA build). numpy goes in with it: torch imported without numpy warns "Failed to initialize NumPy".
TORCH_CPU="torch==2.13.0+cpu"
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  pip_install "$TORCH_CPU" numpy || {
    echo "torch install failed: no $TORCH_CPU in the configured package sources? Add PyTorch's CPU index, e.g." \
         "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh" >&2
    exit 1
  }
fi
# the project with the dev and fla extras (flash-linear-attention + triton, ~1 GB, for the fla adapters' tests); torch
# is pinned to the build installed (read from its metadata, without importing it), so resolving the extras can never
# swap it (e.g. for a CUDA build)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > "$constraints"
pip_install -e ".[dev,fla]" -c "$constraints" || { echo "project install failed" >&2; exit 1; }
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

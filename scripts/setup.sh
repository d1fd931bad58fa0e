#!/usr/bin/env bash
# Set up .venv in the checkout: CPU torch first when none is importable, then the project with dev extras.
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
.venv/bin/pip install -q -e ".[dev]" 2>&1 | grep -vE "is ignored|^\s*$" || true
.venv/bin/python -c "import writesae_plugin.adapters, sae_lens, nnsight" || { echo "project install failed" >&2; exit 1; }

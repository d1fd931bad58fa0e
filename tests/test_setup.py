"""The install surface: pyproject's extras agree with each other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirement(extra: list[str], name: str) -> str:
    found = [r for r in extra if re.match(rf"{re.escape(name)}\b", r)]
    assert len(found) == 1, (name, extra)
    return found[0].replace(" ", "")


def test_gpu_extra_pins_fla_as_the_fla_extra():
    """The fla adapters are derived from and tested on one fla release (the [fla] extra's pin): the [gpu] extra
    must install that release, not an older one whose layers and kernels differ."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    fla = _requirement(extras["fla"], "flash-linear-attention")
    assert fla.startswith("flash-linear-attention==")
    assert _requirement(extras["gpu"], "flash-linear-attention") == fla


# ------------------------------------------------------------------------------------ scripts/setup.sh, fresh machine
FAKE_PYTHON = r'''#!/usr/bin/env bash
# a stand-in for .venv/bin/python: torch imports once pip installed it, and warns as torch does without numpy
state="$(dirname "$0")/state"
echo "python $*" >> "$state/log"
code="${@: -1}"
if [[ "$code" == *"import torch"* ]]; then
  [ -e "$state/torch" ] || exit 1
  [ -e "$state/numpy" ] || echo "UserWarning: Failed to initialize NumPy: No module named 'numpy'" >&2
fi
if [[ "$code" == *"version('torch')"* ]]; then
  [ -e "$state/numpy" ] || echo "UserWarning: Failed to initialize NumPy" >&2
  echo "torch==2.13.0+cpu"
fi
exit 0
'''

FAKE_PIP = r'''#!/usr/bin/env bash
# a stand-in for .venv/bin/pip: records its arguments (and the constraints file), "installs" torch and numpy
state="$(dirname "$0")/state"
echo "pip $*" >> "$state/log"
echo "WARNING: Location 'file:///nowhere/simple' is ignored: it is either a non-existing path or lacks a scheme." >&2
prev=""
for a in "$@"; do
  [ "$prev" = "-c" ] && cp "$a" "$state/constraints"
  case "$a" in torch==*) [ -n "${FAIL_TORCH:-}" ] && exit 1; touch "$state/torch";; numpy) touch "$state/numpy";; esac
  prev="$a"
done
[[ " $* " == *" -e "* ]] && touch "$state/numpy"  # the project's dependencies bring numpy
exit 0
'''


def _fresh_checkout(tmp_path):
    import os
    import shutil

    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    bin_dir = tmp_path / ".venv" / "bin"
    (bin_dir / "state").mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("pip", FAKE_PIP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    tools = tmp_path / "tools"  # chromium and its driver present: the set-up leaves the system alone
    tools.mkdir()
    for name in ("chromium", "chromedriver"):
        (tools / name).write_text("#!/bin/sh\n")
        (tools / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
    return bin_dir / "state", env


def test_setup_on_a_fresh_machine_is_quiet_and_installs_the_cpu_torch_with_numpy(tmp_path):
    """No torch in .venv: the set-up asks pip for torch's CPU build (a +cpu pin, which no CUDA build matches)
    together with numpy, pins that build for the project's install through a constraints file, never imports torch
    before numpy is there, and prints nothing (pip's 'is ignored' notes dropped)."""
    import subprocess

    state, env = _fresh_checkout(tmp_path)
    r = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    pips = [ln.split()[1:] for ln in (state / "log").read_text().splitlines() if ln.startswith("pip ")]
    assert len(pips) == 2
    torch_pin = [a for a in pips[0] if a.startswith("torch")]
    assert torch_pin and torch_pin[0].endswith("+cpu") and "numpy" in pips[0]
    assert "-e" in pips[1] and "-c" in pips[1]
    assert (state / "constraints").read_text().strip() == "torch==2.13.0+cpu"


def test_setup_says_what_to_do_when_no_cpu_torch_is_found(tmp_path):
    import subprocess

    state, env = _fresh_checkout(tmp_path)
    r = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                       env={**env, "FAIL_TORCH": "1"}, timeout=60)
    assert r.returncode == 1
    assert "torch install failed" in r.stderr and "download.pytorch.org/whl/cpu" in r.stderr
    assert "is ignored" not in r.stderr

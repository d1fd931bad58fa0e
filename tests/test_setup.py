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

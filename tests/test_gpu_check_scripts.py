"""The GPU check scripts (``scripts/gpu_check_*.py``) stay runnable: a session lent a GPU runs them as they are, so
their CPU dry runs (every step of the script, on the torch path / gloo / the mamba-ssm stand-in) run here and must
pass every check and write their JSON record. No GPU is needed or used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "fla": (["scripts/gpu_check_fla.py", "--device", "cpu"], "gpu_check_fla.json"),
    "mamba_ssm": (["scripts/gpu_check_mamba_ssm.py", "--stand-in"], "gpu_check.json"),
    "distributed": (["scripts/gpu_check_distributed.py", "--device", "cpu", "--quick"],
                    "gpu_check_distributed_cpu_dry_run.json"),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_gpu_check_script_dry_run_passes_every_check(name, tmp_path):
    args, record = SCRIPTS[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / record).read_text())
    checks = {k: v for k, v in results.items() if isinstance(v, dict) and "ok" in v}
    assert len(checks) >= 5, sorted(results)
    assert all(v["ok"] for v in checks.values()), {k: v.get("error") for k, v in checks.items() if not v["ok"]}
    assert "FAIL" not in proc.stdout

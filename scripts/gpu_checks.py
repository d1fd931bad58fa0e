"""What the GPU check scripts (``scripts/gpu_check_*.py``) share: one record per check, printed as a PASS/FAIL line
(with the error's trace on a failure, the other checks still running), a wandb stand-in where it is not installed
(sae_lens imports it; no check logs to it), and the record written as JSON, atomically, after every check.

    from gpu_checks import CheckRecord
    RECORD = CheckRecord()
    RESULTS = RECORD.results              # name -> {"ok": bool, "seconds": float, ...}

    @RECORD.check("capture")              # or RECORD.run("capture", fn, *args)
    def capture(): return {"max_abs_diff": 0.0}
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path


class CheckRecord:
    """The checks of one script run: ``results[name]`` is a check's dict (``ok``, ``seconds``, its numbers) or a
    note (any other value)."""

    def __init__(self):
        self.results: dict = {}

    def run(self, name: str, fn, *args, **kwargs) -> dict:
        """Run one check: ``fn`` returns a dict of what it measured (``ok`` defaults to True) or raises (``ok``
        False, the error and the last 3,000 characters of its trace recorded)."""
        t0 = time.perf_counter()
        try:
            rec = fn(*args, **kwargs) or {}
            rec.setdefault("ok", True)
        except Exception as e:  # a failing check is reported, and the others still run
            rec = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        self.results[name] = rec
        shown = {k: v for k, v in rec.items() if k != "trace"}
        print(f"[{'PASS' if rec['ok'] else 'FAIL'}] {name}: {json.dumps(shown, default=str)}", flush=True)
        if not rec["ok"]:
            print(rec.get("trace", ""), flush=True)
        return rec

    def check(self, name: str):
        """Decorator: calling the function runs it as the check ``name`` (:meth:`run`)."""
        def deco(fn):
            def run(*args, **kwargs):
                return self.run(name, fn, *args, **kwargs)
            return run
        return deco

    def failed(self) -> list[str]:
        return [k for k, v in self.results.items() if isinstance(v, dict) and v.get("ok") is False]

    def write_json(self, path: str | os.PathLike) -> None:
        """The record as JSON, through a temporary file and a rename (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def stub_wandb(self) -> bool:
        """Stand in an empty ``wandb`` module where none is installed (sae_lens imports it at import; no check
        logs to it); noted in the record. Returns whether it was stubbed."""
        if importlib.util.find_spec("wandb") is not None:
            return False
        mod = types.ModuleType("wandb")
        mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = mod
        self.results["note_wandb"] = "not installed: stubbed (sae_lens imports it; nothing logs)"
        return True

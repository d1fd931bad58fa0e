"""Results directories: ``results.json`` (every number with its n and interval, plus the configuration),
``records.jsonl`` (raw per-item records), PNG figures and an ``index.html`` that shows them."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _clean(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        try:
            return _clean(x.item())
        except (ValueError, RuntimeError):
            return str(x)
    return x


def write_report(out_dir: str | Path, title: str, results: dict, records: list[dict] | None = None,
                 figures: dict[str, Callable[[], "plt.Figure"]] | None = None, notes: list[str] | None = None) -> Path:
    """Write a results directory; returns the path of ``index.html``. NaN becomes JSON null."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_clean(results), indent=2, default=str))
    if records is not None:
        with open(out / "records.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(_clean(r), default=str) + "\n")
    images = []
    for name, make in (figures or {}).items():
        fig = make()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        images.append(path.name)
    body = [f"<h1>{html.escape(title)}</h1>"]
    for note in notes or []:
        body.append(f"<p>{html.escape(note)}</p>")
    for img in images:
        body.append(f'<figure><img src="{img}" style="max-width:900px"><figcaption>{img}</figcaption></figure>')
    body.append("<h2>results.json</h2><pre>" + html.escape(json.dumps(_clean(results), indent=2, default=str)[:200000])
                + "</pre>")
    if records is not None:
        body.append(f'<p>{len(records)} raw records in <a href="records.jsonl">records.jsonl</a></p>')
    (out / "index.html").write_text("<!doctype html><html><head><meta charset='utf-8'><title>"
                                    + html.escape(title) + "</title></head><body style='font-family:sans-serif'>"
                                    + "\n".join(body) + "</body></html>")
    return out / "index.html"


def fmt_rate(d: dict) -> str:
    """``92.4% [90.1, 94.2] (n=4851)`` from a ``stats.wilson`` dict."""
    if not d or d.get("n", 0) == 0 or d.get("rate") is None:
        return "n/a"
    return f"{100 * d['rate']:.1f}% [{100 * d['lo']:.1f}, {100 * d['hi']:.1f}] (n={d['n']})"


__all__ = ["write_report", "fmt_rate", "plt"]

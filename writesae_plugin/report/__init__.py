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
    """``x`` as strict JSON values: NaN / inf -> None, dict keys -> str, tuples -> lists, tensors and numpy
    arrays or scalars -> (nested) Python numbers."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "tolist") and callable(x.tolist):  # torch tensors, numpy arrays and scalars
        return _clean(x.tolist())
    if hasattr(x, "item") and callable(x.item):
        try:
            return _clean(x.item())
        except (ValueError, RuntimeError):
            return str(x)
    return x


def _num(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def headline_rows(results: dict, limit: int = 400) -> list[tuple[str, str, str, str]]:
    """``(quantity, value, interval, n)`` rows for every number in ``results`` that carries its interval or n:
    rates (``rate, lo, hi, n``: Wilson / bootstrap), differences (``difference, lo, hi``), R^2 blocks
    (``r2, n``), means with ``ci``/``lo``/``hi``. The configuration is skipped. At most ``limit`` rows, those
    under a ``headline`` key first, then by depth."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(x, path):
        if len(rows) >= limit:
            return
        if isinstance(x, dict):
            n = x.get("n", x.get("n_a", ""))
            if "rate" in x and "lo" in x and "hi" in x:
                ok = x.get("rate") is not None and not (isinstance(x["rate"], float) and math.isnan(x["rate"]))
                rows.append((path, f"{100 * x['rate']:.1f}%" if ok else "n/a",
                             f"[{100 * x['lo']:.1f}, {100 * x['hi']:.1f}]" if ok and x["lo"] is not None else "",
                             _num(n)))
                return
            if "difference" in x and "lo" in x:
                rows.append((path, _num(x["difference"]), f"[{_num(x['lo'])}, {_num(x['hi'])}]",
                             f"{_num(x.get('n_a'))} / {_num(x.get('n_b'))}"))
                return
            if "r2" in x:
                extra = f"sign agreement {_num(x['sign_agreement'])}" if "sign_agreement" in x else ""
                rows.append((path, f"R² = {_num(x['r2'])}", extra, _num(n)))
                return
            if "mean" in x and ("ci" in x or "lo" in x):
                ci = x.get("ci") or [x.get("lo"), x.get("hi")]
                rows.append((path, _num(x["mean"]), f"[{_num(ci[0])}, {_num(ci[1])}]" if ci[0] is not None else "",
                             _num(n if n != "" else x.get("n_clusters", ""))))
                return
            for k, v in x.items():
                if k in ("config", "size", "paper", "timings", "records"):
                    continue
                walk(v, f"{path} / {k}" if path else str(k))

    walk(results, "")
    return sorted(rows, key=lambda r: (0 if "headline" in r[0] else 1, r[0].count(" / ")))


def write_report(out_dir: str | Path, title: str, results: dict, records: list[dict] | None = None,
                 figures: dict[str, Callable[[], "plt.Figure"]] | None = None, notes: list[str] | None = None,
                 links: list[tuple[str, str]] | None = None, headline: list[tuple[str, dict]] | None = None,
                 examples: tuple[str, list[dict]] | None = None) -> Path:
    """Write a results directory; returns the path of ``index.html``. NaN becomes JSON null.

    ``index.html`` is readable on its own: the notes, a headline table of every number that carries its
    interval or n (:func:`headline_rows`; ``headline``: ``(label, stats dict)`` pairs shown first, under their
    own labels), ``examples`` (a caption and rows of text: the items behind the numbers, e.g. firings with
    their tokens, prompts with both continuations; at most 20 shown), the figures, ``links`` (``(label, relative href)``: sub-reports,
    dashboards), the configuration in a collapsed block, and links to the raw files. Every file is written
    atomically (temporary file + rename)."""
    from ..checkpoints import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = _clean(results)
    atomic_write_text(out / "results.json", json.dumps(clean, indent=2, default=str))
    if records is not None:
        atomic_write_text(out / "records.jsonl", "".join(json.dumps(_clean(r), default=str) + "\n" for r in records))
    images = []
    for name, make in (figures or {}).items():
        fig = make()
        path = out / f"{name}.png"
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        images.append(path.name)
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for note in notes or []:
        body.append(f"<p>{esc(note)}</p>")
    if links:
        body.append("<h2>See also</h2><ul>" + "".join(f'<li><a href="{esc(href)}">{esc(label)}</a></li>'
                                                      for label, href in links) + "</ul>")
    rows = headline_rows(clean)
    if headline:
        chosen = [(label, *r[1:]) for label, d in headline for r in headline_rows({"x": _clean(d)})[:1]]
        rows = chosen + rows

    def table(rs, ident):
        return (f"<table id='{ident}'><thead><tr><th>quantity</th><th>value</th><th>95% interval / detail</th>"
                "<th>n</th></tr></thead><tbody>"
                + "".join(f"<tr><td>{esc(q)}</td><td>{esc(v)}</td><td>{esc(i)}</td><td>{esc(n)}</td></tr>"
                          for q, v, i, n in rs) + "</tbody></table>")

    if rows:
        body.append("<h2>Headline numbers</h2>" + table(rows[:12], "headline"))
        if len(rows) > 12:
            body.append(f"<details><summary>All {len(rows)} numbers with intervals</summary>"
                        + table(rows, "all-numbers") + "</details>")
    if examples and examples[1]:
        caption, ex = examples
        cols = list(ex[0])
        body.append(f"<h2>Examples</h2><p>{esc(caption)}</p><table id='examples'><thead><tr>"
                    + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr></thead><tbody>"
                    + "".join("<tr>" + "".join(f"<td><code>{esc(_num(r.get(c)))}</code></td>" for c in cols) + "</tr>"
                              for r in ex[:20]) + "</tbody></table>")
    for img in images:
        body.append(f'<figure><img src="{img}" style="max-width:900px"><figcaption>{img}</figcaption></figure>')
    config = clean.get("config") if isinstance(clean, dict) else None
    if config is not None:
        body.append("<details><summary>Configuration</summary><pre>" + esc(json.dumps(config, indent=2, default=str))
                    + "</pre></details>")
    raw = ['<a href="results.json">results.json</a> (every number, its n and interval, the configuration)']
    if records is not None:
        raw.append(f'<a href="records.jsonl">records.jsonl</a> ({len(records)} raw records)')
    raw += [f'<a href="{img}">{img}</a>' for img in images]
    body.append("<h2>Raw files</h2><ul>" + "".join(f"<li>{r}</li>" for r in raw) + "</ul>")
    body.append("<details><summary>results.json</summary><pre>"
                + esc(json.dumps(clean, indent=2, default=str)[:200000]) + "</pre></details>")
    style = ("body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
             "#examples code{white-space:pre-wrap}")
    atomic_write_text(out / "index.html", "<!doctype html><html><head><meta charset='utf-8'><title>" + esc(title)
                      + f"</title><style>{style}</style></head><body>" + "\n".join(body) + "</body></html>")
    return out / "index.html"


#: what a token's invisible characters are shown as (dashboards, circuit labels and figures)
TOKEN_GLYPHS = {"\n": "\u21b5", "\t": "\u21e5", "\r": "\\r"}  # newline, tab, carriage return (no glyph in DejaVu)
SPACE_GLYPH = "\u2423"  # open box: a space, where a token stands on its own
EMPTY_TOKEN = "\u2205"  # empty set: a token that decodes to nothing


def token_text(token: str, spaces: bool = True) -> str:
    """A token as dashboards and reports show it: newline ``↵``, tab ``⇥``, carriage return ``\\r``, other control
    characters as ``\\xNN``, the empty token ``∅``, and with ``spaces`` (a token shown on its own, in a list or a
    label) each space as ``␣``, so that ``" end"``, ``"end"`` and ``"\\n"`` read apart; running text (a context)
    passes ``spaces=False`` and keeps its spaces."""
    if token == "":
        return EMPTY_TOKEN
    out = []
    for ch in token:
        if ch in TOKEN_GLYPHS:
            out.append(TOKEN_GLYPHS[ch])
        elif ch == " " and spaces:
            out.append(SPACE_GLYPH)
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def fmt_rate(d: dict) -> str:
    """``92.4% [90.1, 94.2] (n=4851)`` from a ``stats.wilson`` dict."""
    if not d or d.get("n", 0) == 0 or d.get("rate") is None:
        return "n/a"
    return f"{100 * d['rate']:.1f}% [{100 * d['lo']:.1f}, {100 * d['hi']:.1f}] (n={d['n']})"


__all__ = ["write_report", "headline_rows", "fmt_rate", "token_text", "plt"]

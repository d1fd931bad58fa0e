"""The dashboard as files: a documented JSON per atom, a static HTML site (opens from disk, no server) and
matplotlib figures.

Layout of ``OUT``::

    index.html                 every atom: sortable table (density, firings, max activation, promoted tokens,
                               substitution win rate, dead marker) with a search box
    atoms/{i}.html             one page per atom with a page (see below)
    figures/atom_{i}.png       its activation histogram and its decay / persistence curves
    data/index.json            {"sae": ..., "config": ..., "n_contexts", "n_positions", "timings",
                                "atoms": [row per atom, as in the table]}
    data/atoms/{i}.json        the atom's page data (schema: ``ATOM_SCHEMA``)

Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from ..report import TOKEN_GLYPHS, _clean, token_text


#: what ``data/atoms/{i}.json`` holds (also the notebook's reference)
ATOM_SCHEMA = {
    "atom": "atom index i",
    "sae": "layer, head, site (write|state), d_sae, decoder_rank, write_mode, family, d_k, d_v",
    "fires": "positions where a_i != 0", "positions": "positions seen", "density": "fires / positions",
    "dead": "true when the atom never fired on these contexts",
    "max_act": "largest activation", "mean_act": "mean activation over its firings",
    "quantiles": "activation quantiles over its firings (from a uniform sample of up to `reservoir` firings; exact "
                 "when it fired at most that often)",
    "histogram": "{edges, counts}: exact histogram of |a_i| over every firing (log-spaced bins)",
    "top_contexts": "largest activations: {act, ctx, pos, center, tokens [str], token_ids, acts [per token]}; "
                    "tokens[center] is the firing; token_id -1 is outside the context",
    "quantile_samples": "firings drawn at activation quantiles of the uniform sample, same fields + quantile",
    "key_side": "{top, bottom}: largest / smallest u_i . k_t over all positions: {value, token, token_id, ctx, pos}",
    "value_side": "{norms: {top, bottom}, static: {top, bottom}, n_firings}: [token, logit per unit activation]; "
                  "norms = W_U J_final W_O J_gated (A_i^T q_t) at its top firings (closed-form direct path), "
                  "static = W_U^T W_O[:, head] A_i^T q_bar (signed by how the head reads it, no norm gains)",
    "effect": "{n, win {rate, lo, hi, k, n}, mean_dlogit_top / mean_dlogit_bottom [token, nats], records}: the "
              "write at each top firing replaced by a_i(t) A_i vs deleted; win = KL_atom < KL_delete at t",
    "curves": "{decay [d], n_decay, (state) persistence [d], alive [d], n_onsets}: mean head decay "
              "exp(G_{t+d} - G_t) over firings; state atoms: mean a(t+d)/a(t) and fraction still active after "
              "an onset",
    "label": "a short label: the atom's top promoted tokens (measured effect, else value side), as the pages show "
             "tokens (writesae_plugin.report.token_text: newline \u21b5, tab \u21e5, space \u2423), space-separated",
}


class _Vocab:
    """Token text for ids (the tokenizer's decode of each id alone; ``<id>`` without a tokenizer)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {-1: ""}

    def __call__(self, i: int) -> str:
        i = int(i)
        if i not in self.cache:
            self.cache[i] = self.tok.decode([i]) if self.tok is not None else f"<{i}>"
        return self.cache[i]


def _fmt_tokens(pairs, vocab) -> list[list]:
    return [[vocab(i), float(s)] for i, s in pairs]


def atom_record(data, atom: int, vocab) -> dict:
    """The JSON page data of one atom (schema ``ATOM_SCHEMA``)."""
    acc = data.stats
    fires = int(acc.fires[atom])
    rec = {"atom": atom, "sae": data.sae_info, "fires": fires, "positions": acc.positions,
           "density": fires / max(acc.positions, 1), "dead": fires == 0,
           "max_act": float(acc.act_max[atom]) if fires else None,
           "mean_act": float(acc.act_sum[atom]) / fires if fires else None}

    def ctx_rows(rows):
        return [{**{k: r[k] for k in ("act", "ctx", "pos", "center")}, "token_ids": r["tokens"],
                 "tokens": [vocab(i) for i in r["tokens"]], "acts": r["acts"]} for r in rows]

    sample = acc.sample(atom) if fires else []
    rec["quantiles"] = acc.quantiles(atom, sample=sample) if fires else {}
    rec["histogram"] = acc.histogram(atom)
    rec["top_contexts"] = ctx_rows(acc.top(atom))
    qs = []
    if sample:
        for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
            j = min(len(sample) - 1, int(round(q * (len(sample) - 1))))
            qs.append({"quantile": q, **ctx_rows([sample[j]])[0]})
    rec["quantile_samples"] = qs
    ks = acc.key_side(atom)
    rec["key_side"] = {side: [{**r, "token_id": r["token"], "token": vocab(r["token"])} for r in rows]
                       for side, rows in ks.items()}
    v = data.value.get(atom, {})
    rec["value_side"] = {"n_firings": v.get("n_firings", 0),
                         "norms": {"top": _fmt_tokens(v.get("top_norms", []), vocab),
                                   "bottom": _fmt_tokens(v.get("bottom_norms", []), vocab)},
                         "static": {"top": _fmt_tokens(v.get("top_static", []), vocab),
                                    "bottom": _fmt_tokens(v.get("bottom_static", []), vocab)}}
    e = data.effect.get(atom, {"n": 0, "records": [], "win": {}})
    rec["effect"] = {"n": e["n"], "win": e["win"] if e["n"] else {},
                     "mean_dlogit_top": _fmt_tokens(e.get("mean_dlogit_top", []), vocab),
                     "mean_dlogit_bottom": _fmt_tokens(e.get("mean_dlogit_bottom", []), vocab),
                     "records": [{**r, "top": _fmt_tokens(r["top"], vocab), "bottom": _fmt_tokens(r["bottom"], vocab),
                                  "token": vocab(int(data.tokens[r["ctx"], r["pos"]]))} for r in e["records"]]}
    rec["curves"] = acc.curves(atom)
    promo = rec["effect"]["mean_dlogit_top"] or rec["value_side"]["norms"]["top"]
    rec["label"] = " ".join(token_text(t) for t, _ in promo[:3])
    for key in ("max_act", "mean_act"):  # never NaN in the JSON
        if rec[key] is not None and not math.isfinite(rec[key]):
            rec[key] = None
    return rec


def _write(path: Path, text: str) -> None:
    """Atomic for readers and for a killed writer (temporary file beside it + rename); not fsynced, since a site
    has hundreds of small files (fsync was most of the writing time) and is rebuilt by rerunning the command."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _dump(path: Path, obj, indent: int | None = None) -> None:
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False)
    except (TypeError, ValueError):  # NaN or tensors somewhere: the slow, cleaning path
        text = json.dumps(_clean(obj), indent=indent, allow_nan=False)
    _write(path, text)


# ------------------------------------------------------------------------------------------ figures
def atom_figure(rec: dict, path: Path, fig_cache: dict) -> None:
    """One PNG: the activation histogram (log-x, exact bins) and the decay / persistence curves."""
    from ..report import plt

    if "fig" not in fig_cache:
        fig_cache["fig"], fig_cache["axes"] = plt.subplots(1, 2, figsize=(9, 3))
    fig, (a1, a2) = fig_cache["fig"], fig_cache["axes"]
    a1.clear()
    a2.clear()
    h = rec["histogram"]
    if h["counts"]:
        edges = [max(e, 1e-7) for e in h["edges"]]
        a1.stairs(h["counts"], edges, fill=True, color="tab:orange")
        a1.set_xscale("log")
    a1.set_xlabel("|activation|")
    a1.set_ylabel("firings")
    a1.set_title(f"atom {rec['atom']}: {rec['fires']} firings, density {rec['density']:.2e}")
    c = rec["curves"]
    xs = list(range(len(c["decay"])))
    a2.plot(xs, [math.nan if v is None else v for v in c["decay"]], label="head decay exp(G_{t+d}-G_t)")
    if "persistence" in c:
        a2.plot(xs, [math.nan if v is None else v for v in c["persistence"]], label="a(t+d)/a(t) after onset")
        a2.plot(xs, [math.nan if v is None else v for v in c["alive"]], label="still active", ls="--")
    a2.set_xlabel("positions after the firing d")
    a2.set_ylim(bottom=0)
    a2.legend(fontsize=7)
    a2.set_title("life in the state")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ HTML
CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{cursor:pointer;background:#f3f3f3}tr.dead{color:#999}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:13px;border-bottom:1px solid #eee;
padding:4px 0}.tok{border-radius:2px}.tok.fire{outline:1px solid #c60}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}.muted{color:#777;font-size:13px}
"""

INDEX_JS = """
function sortBy(col){const t=document.getElementById('atoms');const rows=[...t.tBodies[0].rows];
const dir=t.dataset.col==col&&t.dataset.dir=='desc'?'asc':'desc';t.dataset.col=col;t.dataset.dir=dir;
rows.sort((a,b)=>{const x=a.cells[col].dataset.v??a.cells[col].textContent,y=b.cells[col].dataset.v??b.cells[col].textContent;
const nx=parseFloat(x),ny=parseFloat(y);const c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;return dir=='asc'?c:-c;});
rows.forEach(r=>t.tBodies[0].appendChild(r));}
function filterRows(q){q=q.toLowerCase();for(const r of document.getElementById('atoms').tBodies[0].rows){
r.style.display=r.textContent.toLowerCase().includes(q)?'':'none';}}
"""


def _esc(s) -> str:
    return html.escape(str(s))


def _context_html(row: dict) -> str:
    acts = row["acts"]
    top = max([abs(a) for a in acts] + [1e-12])
    spans = []
    for j, (t, a) in enumerate(zip(row["tokens"], acts)):
        if row["token_ids"][j] == -1:
            continue
        alpha = min(1.0, abs(a) / top)
        cls = "tok fire" if j == row["center"] else "tok"
        # newlines and tabs shown (a bare newline token would be an invisible span), each newline still breaking
        # the line after its glyph
        shown = "\n".join(_esc(token_text(part, spaces=False)) if part else "" for part in t.split("\n"))
        shown = shown.replace("\n", TOKEN_GLYPHS["\n"] + "\n")
        spans.append(f'<span class="{cls}" data-act="{a:.4g}" title="a = {a:.4g}" '
                     f'style="background:rgba(255,120,0,{alpha:.3f})">{shown}</span>')
    return f'<div class="ctx"><span class="muted">{row["act"]:.4g} | ctx {row["ctx"]} pos {row["pos"]}: </span>' \
           + "".join(spans) + "</div>"


def _token_list(pairs, fmt="{:+.3g}") -> str:
    if not pairs:
        return '<p class="muted">none</p>'
    return "<table>" + "".join(f"<tr><td><code>{_esc(token_text(t))}</code></td><td>{fmt.format(v)}</td></tr>"
                               for t, v in pairs) + "</table>"


def _page(title: str, body: str, script: str = "") -> str:
    from jinja2 import Template

    return Template(
        "<!doctype html><html><head><meta charset='utf-8'><title>{{ title }}</title><style>{{ css }}</style>"
        "{% if script %}<script>{{ script }}</script>{% endif %}</head><body>{{ body }}</body></html>",
        autoescape=False).render(title=_esc(title), css=CSS, script=script, body=body)


def atom_page(rec: dict, title: str) -> str:
    s = rec["sae"]
    win = rec["effect"]["win"]
    win_txt = f"{100 * win['rate']:.0f}% [{100 * win['lo']:.0f}, {100 * win['hi']:.0f}] (n = {win['n']})" \
        if win.get("n") else "n/a"
    q = ", ".join(f"q{k}: {v:.3g}" for k, v in rec["quantiles"].items())
    parts = [f'<p><a href="../index.html">&larr; all atoms</a></p>',
             f"<h1>Atom {rec['atom']} <span class='muted'>{_esc(title)} L{s['layer']}.H{s['head']}.{s['site']}</span></h1>",
             f"<p>{rec['fires']} firings in {rec['positions']} positions (density {rec['density']:.3e}); max activation "
             f"{rec['max_act'] if rec['max_act'] is None else format(rec['max_act'], '.4g')}; "
             f"substitution win rate vs deletion at its top firings: {win_txt}. Label: {_esc(rec['label'])}</p>",
             f"<p class='muted'>activation quantiles: {_esc(q)} (<a href='../data/atoms/{rec['atom']}.json'>page data "
             "JSON</a>)</p>",
             f"<figure><img id='fig' src='../figures/atom_{rec['atom']}.png' alt='histogram and curves'></figure>",
             "<h2>Top activations</h2><div id='top'>"
             + "".join(_context_html(r) for r in rec["top_contexts"]) + "</div>",
             "<h2>Samples at activation quantiles</h2><div id='quantiles'>"
             + "".join(f"<p class='muted'>quantile {r['quantile']:g}</p>" + _context_html(r)
                       for r in rec["quantile_samples"]) + "</div>",
             "<div class='grid'><div><h2>Key side: u . k</h2><p class='muted'>tokens whose write key aligns with the "
             "atom's key side (its address)</p><h3>largest</h3>"
             + _token_list([(r["token"], r["value"]) for r in rec["key_side"]["top"]])
             + "<h3>smallest</h3>" + _token_list([(r["token"], r["value"]) for r in rec["key_side"]["bottom"]])
             + "</div><div><h2>Value side</h2><p class='muted'>direct-path logits per unit activation as the head reads "
             f"the atom, through the linearised norms at its top {rec['value_side']['n_firings']} firings</p>"
             "<h3>promotes</h3>" + _token_list(rec["value_side"]["norms"]["top"])
             + "<h3>suppresses</h3>" + _token_list(rec["value_side"]["norms"]["bottom"])
             + "<p class='muted'>static W_U W_O A^T q (signed by the read, no norm gains): "
             + _esc(" ".join(token_text(t) for t, _ in rec["value_side"]["static"]["top"][:5])) + "</p></div></div>",
             f"<h2>Measured effect of substituting the atom</h2><p class='muted'>the write at each top firing "
             f"replaced by a_i(t) A_i; mean next-token logit change over n = {rec['effect']['n']} firings</p>"
             "<div class='grid'><div><h3>raised</h3>" + _token_list(rec["effect"]["mean_dlogit_top"])
             + "</div><div><h3>lowered</h3>" + _token_list(rec["effect"]["mean_dlogit_bottom"]) + "</div></div>"
             "<table><tr><th>ctx</th><th>pos</th><th>token</th><th>act</th><th>KL atom</th><th>KL delete</th>"
             "<th>win</th></tr>"
             + "".join(f"<tr><td>{r['ctx']}</td><td>{r['pos']}</td><td><code>{_esc(token_text(r['token']))}</code></td>"
                       f"<td>{r['act']:.3g}</td><td>{r['kl_atom']:.3g}</td><td>{r['kl_delete']:.3g}</td>"
                       f"<td>{'yes' if r['win'] else 'no'}</td></tr>" for r in rec["effect"]["records"])
             + "</table>"]
    return _page(f"atom {rec['atom']} - {title}", "\n".join(parts))


def index_row(rec: dict, has_page: bool) -> dict:
    win = rec["effect"]["win"]
    return {"atom": rec["atom"], "fires": rec["fires"], "density": rec["density"], "max_act": rec["max_act"],
            "label": rec["label"], "win_rate": win.get("rate") if win.get("n") else None, "win_n": win.get("n", 0),
            "dead": rec["dead"], "page": f"atoms/{rec['atom']}.html" if has_page else None}


def index_page(rows: list[dict], title: str, meta: dict) -> str:
    body = [f"<h1>{_esc(title)}</h1>",
            f"<p>{meta['n_atoms']} atoms ({meta['n_dead']} dead on these contexts), {meta['n_contexts']} contexts of "
            f"{meta['context_length']} tokens ({meta['n_positions']} positions). Click a column to sort; "
            "<a href='data/index.json'>data/index.json</a>.</p>",
            f"<p id='pages'>{_esc(meta['pages'])}</p>",
            "<input id='search' type='search' placeholder='search atoms, tokens...' oninput='filterRows(this.value)'>",
            "<table id='atoms'><thead><tr>" + "".join(
                f"<th onclick='sortBy({j})'>{h}</th>" for j, h in enumerate(
                    ["atom", "density", "firings", "max act", "promotes", "win rate (n)", "dead"])) + "</tr></thead><tbody>"]
    for r in rows:
        name = f"<a href='{r['page']}'>{r['atom']}</a>" if r["page"] else str(r["atom"])
        win = f"{100 * r['win_rate']:.0f}% ({r['win_n']})" if r["win_rate"] is not None else ""
        body.append(f"<tr class='{'dead' if r['dead'] else ''}'><td data-v='{r['atom']}'>{name}</td>"
                    f"<td data-v='{r['density']}'>{r['density']:.2e}</td><td>{r['fires']}</td>"
                    f"<td data-v='{r['max_act'] if r['max_act'] is not None else -1}'>"
                    f"{'' if r['max_act'] is None else format(r['max_act'], '.3g')}</td>"
                    f"<td><code>{_esc(r['label'])}</code></td>"
                    f"<td data-v='{r['win_rate'] if r['win_rate'] is not None else -1}'>{win}</td>"
                    f"<td>{'dead' if r['dead'] else ''}</td></tr>")
    body.append("</tbody></table>")
    return _page(title, "\n".join(body), INDEX_JS)


def pages_note(config: dict, n_pages: int) -> str:
    """Which atoms have pages and how to ask for more (the index page's note)."""
    max_pages, atoms = config.get("max_pages"), config.get("atoms")
    if max_pages is not None:
        chosen = f"the {max_pages} most frequently firing atoms" + (f" and atoms {sorted(atoms)}" if atoms else "")
    elif atoms is not None:
        chosen = f"atoms {sorted(atoms)}"
    else:
        chosen = "every atom that fired"
    return (f"Pages for {n_pages} atoms: {chosen} (their numbers link to them; dead atoms get none). For more pages, "
            "rerun writesae dashboard with a larger --max-pages N, with --atoms I J ..., or with neither (every atom "
            "that fires).")


def write_dashboard(data, out_dir: str | Path, tokenizer=None, title: str = "WriteSAE atoms",
                    progress: bool = True, neuronpedia: dict | None = None) -> Path:
    """Write the site for ``data`` (:class:`~writesae_plugin.dashboard.compute.DashboardData`) under
    ``out_dir``; returns the path of ``index.html``. Every atom gets a JSON record and a row; atoms in
    ``data.atoms`` that fired get a page and a figure. ``neuronpedia``: keyword arguments of
    :func:`~writesae_plugin.dashboard.neuronpedia.write_neuronpedia` (with ``out_dir``) to also write
    Neuronpedia's upload format for the atoms with pages."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    for sub in ("atoms", "figures", "data/atoms"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    vocab = _Vocab(tokenizer)
    pages = set(data.atoms)
    rows, fig_cache, exported = [], {}, []
    for a in tqdm(range(data.stats.n), desc="dashboard pages", disable=not progress):
        rec = atom_record(data, a, vocab)
        has_page = a in pages and not rec["dead"]
        if has_page and neuronpedia is not None:
            exported.append(_clean(rec))
        _dump(out / "data" / "atoms" / f"{a}.json", rec)
        if has_page:
            atom_figure(rec, out / "figures" / f"atom_{a}.png", fig_cache)
            _write(out / "atoms" / f"{a}.html", atom_page(rec, title))
        rows.append(index_row(rec, has_page))
    if "fig" in fig_cache:
        from ..report import plt

        plt.close(fig_cache["fig"])
    N, T = data.tokens.shape
    meta = {"n_atoms": data.stats.n, "n_dead": sum(r["dead"] for r in rows), "n_contexts": N, "context_length": T,
            "n_positions": data.stats.positions,
            "pages": pages_note(data.config, sum(r["page"] is not None for r in rows))}
    _dump(out / "data" / "index.json", {"title": title, "sae": data.sae_info, "config": data.config,
                                        "timings": data.timings, **meta, "schema": ATOM_SCHEMA, "atoms": rows}, indent=1)
    _write(out / "index.html", index_page(rows, title, meta))
    if neuronpedia is not None:
        from .neuronpedia import write_neuronpedia

        kw = dict(neuronpedia)
        write_neuronpedia(exported, kw.pop("out_dir"), n_prompts=N, n_tokens_in_prompt=T, **kw)
    return out / "index.html"


def load_atom(out_dir: str | Path, atom: int) -> dict:
    """The page data of ``atom`` from a written dashboard (``data/atoms/{atom}.json``; schema ``ATOM_SCHEMA``).
    Raises ``FileNotFoundError`` naming the directory when it has no such atom."""
    path = Path(out_dir) / "data" / "atoms" / f"{int(atom)}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} has no dashboard data for atom {atom} ({path})")
    return json.loads(path.read_text())


__all__ = ["ATOM_SCHEMA", "atom_record", "write_dashboard", "load_atom"]

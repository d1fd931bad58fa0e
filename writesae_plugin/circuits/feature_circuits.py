"""Sparse feature circuits over write atoms (nodes, edges, error nodes) and an ACDC-style pruning loop.

Nodes are the atoms of per-head WriteSAEs at several layers (summed over positions and batch) plus one error
node per SAE (``e = X - SAE(X)``). With every SAE spliced with its error term the forward is the model's
own; a zero perturbation on each ``hook_sae_acts_post`` and ``hook_sae_error`` gives, in one backward pass
of the corrupted run, the attribution-patching node effects (Marks et al. 2024):

* atom ``i`` of SAE ``l``: ``IE = sum_{b,t} (a^clean - a^corr) * d metric / d a``;
* error node: ``IE = sum_{b,t} <e^clean - e^corr, d metric / d e>``.

Edges ``u -> d`` (u upstream of d): ``sum_{b,t} (d metric / d d) (d d / d u) Delta u``, one backward pass per
kept downstream node, through every path of the model (not only direct ones). Thresholds select nodes
(``|IE| >= node_threshold * |metric(clean) - metric(corrupted)|``) and edges (the same, relative).

:func:`acdc_prune` then checks the circuit by actual patching (ACDC, Conmy et al. 2023, at node level):
from the whole graph, in reverse topological order, a node is ablated (its clean-run value replaced by
the corrupted one, exactly) and removed for good when the metric moves by less than ``threshold``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .editing import mean_ci
from .patching import Metric, _check_pair, head_slice, sae_options, scalar, site_codes


@dataclass
class Circuit:
    """Nodes ``{"id", "layer", "head", "kind": atom|error, "atom", "effect"[, "by_prompt": mean and 95% CI
    of the per-prompt effects when the metric is a batch mean]}`` and edges
    ``{"src", "dst", "effect"}``; ``metric``: the clean and corrupted metric values."""

    nodes: list[dict]
    edges: list[dict] = field(default_factory=list)
    metric: dict = field(default_factory=dict)
    method: str = "attribution"

    def node_ids(self) -> list[str]:
        return [n["id"] for n in self.nodes]

    def to_json(self, path: str | Path | None = None) -> str:
        """The graph as JSON (NaN, e.g. an interval from one prompt, becomes null)."""
        from ..report import _clean

        text = json.dumps(_clean(asdict(self)), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Circuit":
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        return cls(**json.loads(p.read_text() if p is not None else str(text_or_path)))

    def figure(self, title: str | None = None):
        """The graph drawn by layer (x) with node effects (colour, size) and edge effects (width)."""
        from ..report import plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        layers = sorted({n["layer"] for n in self.nodes})
        pos = {}
        for li, layer in enumerate(layers):
            col = [n for n in self.nodes if n["layer"] == layer]
            for j, n in enumerate(col):
                pos[n["id"]] = (li, j - (len(col) - 1) / 2)
        scale = max([abs(n["effect"]) for n in self.nodes] + [1e-12])
        escale = max([abs(e["effect"]) for e in self.edges] + [1e-12])
        for e in self.edges:
            if e["src"] in pos and e["dst"] in pos:
                (x0, y0), (x1, y1) = pos[e["src"]], pos[e["dst"]]
                ax.plot([x0, x1], [y0, y1], color="tab:red" if e["effect"] > 0 else "tab:blue",
                        lw=0.5 + 4 * abs(e["effect"]) / escale, alpha=0.6, zorder=1)
        for n in self.nodes:
            x, y = pos[n["id"]]
            ax.scatter([x], [y], s=80 + 600 * abs(n["effect"]) / scale, zorder=2,
                       color="tab:red" if n["effect"] > 0 else "tab:blue",
                       marker="s" if n["kind"] == "error" else "o", edgecolor="k")
            text = n["id"] + (f"\n{n['label']}" if n.get("label") else "")
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(8, 4), fontsize=8)
        ax.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        ax.set_yticks([])
        ax.set_title(title or f"feature circuit ({self.method}): {len(self.nodes)} nodes, {len(self.edges)} edges; "
                     "red: raises the metric, squares: error nodes")
        fig.tight_layout()
        return fig


def _node_id(sae, kind: str, atom: int | None) -> str:
    base = f"L{sae.cfg.layer}.H{sae.cfg.head}.{sae.cfg.site}"
    return f"{base}.err" if kind == "error" else f"{base}.{atom}"


def _check_saes(model, saes) -> list:
    """Upstream to downstream: by layer, and at one layer the write site before the state site."""
    saes = sorted(saes, key=lambda s: (s.cfg.layer, s.cfg.site == "state"))
    sae_options(*saes)  # one write mode for all (raises otherwise)
    for s in saes:
        if s.cfg.head is None:
            raise ValueError("feature circuits need per-head WriteSAEs (cfg.head set)")
        model.check_sae_fits(s, model.hook_prefix(s.cfg.layer) + f"hook_{s.cfg.site}")
    hooks = [s.cfg.metadata.hook_name for s in saes]
    if len(set(hooks)) != len(hooks):
        raise ValueError("one SAE per hook: give SAEs at distinct (layer, site)")
    return saes


def _perturbed_run(model, saes, tokens, metric, rows: tuple[int, int] | None = None,
                   reference_logits: Tensor | None = None):
    """Corrupted-run forward with every SAE spliced (error term) and zero perturbations on each SAE's acts
    and error; returns (metric value, {sae index: (acts, err, z_acts, z_err)}).

    ``rows=(s, e)``: run only rows ``s:e`` of ``tokens``; the metric then sees ``reference_logits`` (the
    same run without grad) in the other rows, so its value is the whole batch's and its gradient with
    respect to these rows is exactly the batched one (rows of a forward are independent); ``metric=None``:
    the forward only (value None)."""
    store: dict[int, dict] = {}

    def perturb(i, kind):  # kind: "acts" or "err"; keeps the input and its zero perturbation
        def hook(x, hook):
            z = torch.zeros_like(x, requires_grad=True)
            store.setdefault(i, {}).update({kind: x, f"z_{kind}": z})
            return x + z
        return hook

    fwd = []
    for i, s in enumerate(saes):
        fwd += [(s.cfg.metadata.hook_name + ".hook_sae_acts_post", perturb(i, "acts")),
                (s.cfg.metadata.hook_name + ".hook_sae_error", perturb(i, "err"))]
    if rows is None:
        return scalar(metric(model.run_with_hooks(tokens, fwd_hooks=fwd))), store
    s, e = rows
    logits = model.run_with_hooks(tokens[s:e], fwd_hooks=fwd)
    if metric is None:
        return None, store
    if reference_logits is not None and (s > 0 or e < tokens.shape[0]):
        ref = reference_logits.to(logits.dtype)
        logits = torch.cat([ref[:s], logits, ref[e:]])
    return scalar(metric(logits)), store


def _row_chunks(n: int, batch_size: int | None) -> list[tuple[int, int]]:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of prompts (or None: all at once), got {batch_size}")
    step = n if batch_size is None else batch_size
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def feature_circuit(model, saes: Sequence, clean: Tensor, corrupted: Tensor, metric: Metric,
                    node_threshold: float = 0.05, edge_threshold: float = 0.02, max_nodes_per_sae: int = 10,
                    progress: bool = True, batch_size: int | None = 1) -> Circuit:
    """Attribution-patching feature circuit (clean -> corrupted) over the atoms and error nodes of ``saes``
    (per-head WriteSAEs at distinct layers; write or state site). See the module docstring.

    At most ``max_nodes_per_sae`` atoms per SAE (by |effect|) are kept, plus its error node. The gradient
    passes stream ``batch_size`` prompts at a time (default 1; None: the whole batch in one graph): the
    metric is evaluated on the whole batch (other rows from a no-grad run), so the numbers equal the batched
    ones up to floating-point rounding, while memory and time grow linearly in the number of prompts. Two
    streamed passes: node effects (one backward per chunk), then edges (one backward per kept downstream
    node and chunk, from the same forward)."""
    _check_pair(clean, corrupted)
    saes = _check_saes(model, saes)
    n = clean.shape[0]
    chunks = _row_chunks(n, batch_size)
    with torch.no_grad():
        m_clean, m_corr = float(scalar(metric(model(clean)))), float(scalar(metric(model(corrupted))))
    total = abs(m_clean - m_corr)
    if total < 1e-12:
        raise ValueError("the metric does not distinguish the clean and corrupted inputs: no circuit to find")
    with torch.no_grad():
        deltas = []
        for s in saes:
            (a_c, e_c), (a_x, e_x) = site_codes(model, s, clean), site_codes(model, s, corrupted)
            deltas.append((a_c - a_x, e_c - e_x))
    opts = sae_options(*saes)
    K = len(saes)
    nodes, kept = [], []  # kept: (sae index, kind, atom)
    with model.options(**opts), model.saes(list(saes), use_error_term=True):
        ref = None
        if len(chunks) > 1:
            with torch.no_grad():
                ref = model(corrupted)
        # pass 1: node effects; the gradients (per row) are kept for the edges
        grads: list[list[Tensor]] = [[] for _ in range(2 * K)]
        for rows in tqdm(chunks, desc="circuit nodes", disable=not progress):
            with torch.enable_grad():
                value, store = _perturbed_run(model, saes, corrupted, metric, rows, ref)
                zs = [store[i]["z_acts"] for i in range(K)] + [store[i]["z_err"] for i in range(K)]
                for slot, g in zip(grads, torch.autograd.grad(value, zs)):
                    slot.append(g.detach())
            del value, store, zs
        grads = [torch.cat(g) for g in grads]
        for i, s in enumerate(saes):
            g_acts, g_err = grads[i], head_slice(s, grads[K + i])
            d_acts, d_err = deltas[i]
            B = d_acts.shape[0]
            by_prompt = (d_acts * g_acts).sum(1) * B  # [b, d_sae]: per-prompt effects of a batch-mean metric
            ie = by_prompt.mean(0)
            order = ie.abs().argsort(descending=True)
            picked = [int(j) for j in order[:max_nodes_per_sae] if abs(float(ie[j])) >= node_threshold * total]
            for j in picked:
                nodes.append({"id": _node_id(s, "atom", j), "layer": s.cfg.layer, "head": s.cfg.head, "kind": "atom",
                              "atom": j, "effect": float(ie[j]), "by_prompt": mean_ci(by_prompt[:, j])})
                kept.append((i, "atom", j))
            err_by_prompt = (d_err * g_err).flatten(1).sum(1) * B
            ie_err = float(err_by_prompt.mean())
            if abs(ie_err) >= node_threshold * total:
                nodes.append({"id": _node_id(s, "error", None), "layer": s.cfg.layer, "head": s.cfg.head,
                              "kind": "error", "atom": None, "effect": ie_err, "by_prompt": mean_ci(err_by_prompt)})
                kept.append((i, "error", None))
        # pass 2: edges u -> d, one backward per kept downstream node d (with upstream nodes) and chunk
        downstream = [k for k in kept if k[0] > 0 and any(u[0] < k[0] for u in kept)]
        weights: dict[tuple, float] = {}
        bar = tqdm(total=len(chunks) * len(downstream), desc="circuit edges", disable=not progress or not downstream)
        for s_, e_ in chunks if downstream else []:
            with torch.enable_grad():
                _, store = _perturbed_run(model, saes, corrupted, None, (s_, e_))
                for i, kind, j in downstream:
                    if kind == "atom":
                        y = (grads[i][s_:e_, ..., j] * store[i]["acts"][..., j]).sum()
                    else:
                        y = (grads[K + i][s_:e_] * store[i]["err"]).sum()
                    bar.update(1)
                    if not y.requires_grad:
                        continue
                    ups = [k for k in kept if k[0] < i]
                    up_z = [store[u]["z_acts"] if uk == "atom" else store[u]["z_err"] for u, uk, _ in ups]
                    up_g = torch.autograd.grad(y, up_z, retain_graph=True, allow_unused=True)
                    for (u, uk, uj), gz in zip(ups, up_g):
                        if gz is None:
                            continue
                        d_acts, d_err = deltas[u]
                        w = float((d_acts[s_:e_, ..., uj] * gz[..., uj]).sum()) if uk == "atom" else float(
                            (d_err[s_:e_] * head_slice(saes[u], gz)).sum())
                        key = ((u, uk, uj), (i, kind, j))
                        weights[key] = weights.get(key, 0.0) + w
            del store
        bar.close()
        edges = [{"src": _node_id(saes[u], uk, uj), "dst": _node_id(saes[i], kind, j), "effect": w}
                 for ((u, uk, uj), (i, kind, j)), w in weights.items() if abs(w) >= edge_threshold * total]
    return Circuit(nodes, edges, {"clean": m_clean, "corrupted": m_corr}, "attribution")


@torch.no_grad()
def _corrupted_values(model, saes, corrupted) -> dict[str, Tensor]:
    """Each SAE's codes and error node on the corrupted run (SAEs spliced with their error terms)."""
    names = [s.cfg.metadata.hook_name + n for s in saes for n in (".hook_sae_acts_post", ".hook_sae_error")]
    with model.options(**sae_options(*saes)), model.saes(list(saes), use_error_term=True):
        _, cache = model.run_with_cache(corrupted, names_filter=names)
    return {n: cache[n] for n in names}


@torch.no_grad()
def _circuit_metric(model, saes, clean, corrupted_values, metric, removed: set[str]) -> float:
    """Metric of the clean run with the ``removed`` nodes ablated: a removed atom's code and a removed error
    node take their corrupted-run values (SAEs spliced with error terms, so the rest is the model's own
    computation and downstream nodes respond to upstream ablations)."""
    fwd = []
    for s in saes:
        h = s.cfg.metadata.hook_name
        atoms = [j for j in range(s.cfg.d_sae) if _node_id(s, "atom", j) in removed]
        if atoms:
            def set_acts(x, hook, atoms=atoms, ref=corrupted_values[h + ".hook_sae_acts_post"]):
                x = x.clone()
                x[..., atoms] = ref[..., atoms].to(x.dtype)
                return x
            fwd.append((h + ".hook_sae_acts_post", set_acts))
        if _node_id(s, "error", None) in removed:
            fwd.append((h + ".hook_sae_error", lambda x, hook, ref=corrupted_values[h + ".hook_sae_error"]:
                        ref.to(x.dtype).clone()))
    with model.options(**sae_options(*saes)), model.saes(list(saes), use_error_term=True):
        return float(scalar(metric(model.run_with_hooks(clean, fwd_hooks=fwd))))


@torch.no_grad()
def acdc_prune(model, saes: Sequence, clean: Tensor, corrupted: Tensor, metric: Metric,
               threshold: float = 0.05, circuit: Circuit | None = None, progress: bool = True) -> Circuit:
    """ACDC at node level with exact patching: start from ``circuit``'s nodes (default: every atom active in
    either run, and every error node), visit them from the last layer back, and remove a node when ablating
    it (with the nodes already removed) moves the metric by less than ``threshold * |clean - corrupted|``.
    The kept nodes' effects are the metric change of ablating each alone."""
    _check_pair(clean, corrupted)
    saes = _check_saes(model, saes)
    m_clean = float(scalar(metric(model(clean))))
    m_corr = float(scalar(metric(model(corrupted))))
    total = abs(m_clean - m_corr)
    if total < 1e-12:
        raise ValueError("the metric does not distinguish the clean and corrupted inputs: nothing to prune")
    if circuit is None:
        candidates = []
        for s in saes:
            (a_c, _), (a_x, _) = site_codes(model, s, clean), site_codes(model, s, corrupted)
            active = ((a_c - a_x) != 0).any(0).any(0).nonzero().flatten().tolist()
            candidates += [(s, "atom", j) for j in active] + [(s, "error", None)]
    else:
        by_id = {n["id"]: n for n in circuit.nodes}
        candidates = [(s, n["kind"], n["atom"]) for s in saes for n in by_id.values()
                      if n["layer"] == s.cfg.layer and n["head"] == s.cfg.head
                      and n["id"].split(".")[2] == s.cfg.site]
    candidates.sort(key=lambda c: -c[0].cfg.layer)
    ref = _corrupted_values(model, saes, corrupted)
    removed: set[str] = set()
    current = m_clean
    for s, kind, j in tqdm(candidates, desc="ACDC", disable=not progress):
        nid = _node_id(s, kind, j)
        trial = _circuit_metric(model, saes, clean, ref, metric, removed | {nid})
        if abs(trial - current) < threshold * total:
            removed.add(nid)
            current = trial
    nodes = []
    kept = [c for c in candidates if _node_id(c[0], c[1], c[2]) not in removed]
    for s, kind, j in tqdm(kept, desc="ACDC node effects", disable=not progress or not kept):
        nid = _node_id(s, kind, j)
        alone = _circuit_metric(model, saes, clean, ref, metric, {nid})
        nodes.append({"id": nid, "layer": s.cfg.layer, "head": s.cfg.head, "kind": kind, "atom": j,
                      "effect": m_clean - alone})
    return Circuit(nodes, [], {"clean": m_clean, "corrupted": m_corr, "circuit": current,
                               "faithfulness": (current - m_corr) / (m_clean - m_corr)}, "acdc")

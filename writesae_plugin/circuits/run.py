"""Results directories for the patching / attribution / circuit commands (``writesae patch`` ...).

Each ``run_*`` takes a hooked model, the SAEs and :class:`~.tasks.PromptPairs`, writes ``results.json``
(every number with its n and interval), figures and ``index.html`` to ``out``, and returns the results.
Defaults elsewhere (CLI): the shipped demo model, its release, the quote task on held-out stdlib text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .attribution_patching import attribute_atoms, attribute_writes, compare_with_patching
from .editing import edit_atoms, mean_ci
from .feature_circuits import acdc_prune, feature_circuit
from .path_patching import Reads, path_patch
from .patching import PatchResult, patch_atoms, patch_writes
from .tasks import PromptPairs

DEFAULT_SAES = ("writesae-demo:L4.H0.write", "writesae-demo:L4.H0.state")  # where the quote memory lives


def atom_labels(model, sae, tokens: torch.Tensor, atoms: Sequence[int], k: int = 3) -> dict[int, str]:
    """``{atom: "promotes 'a' 'b' 'c'"}``: the ``k`` tokens each atom's value side promotes through the direct
    path as its head reads it on ``tokens`` (read-signed, ``write_attribution.preferred_token``'s scores); empty
    without a tokenizer or for a head-shared SAE."""
    from ..experiments.substitution import _site_and_writes
    from ..experiments.write_attribution import atom_read, direct_token_scores, head_queries

    from ..report import token_text

    tk = getattr(model, "tokenizer", None)
    atoms = [int(a) for a in atoms if isinstance(a, int) or (hasattr(a, "__index__") and not isinstance(a, str))]
    if tk is None or getattr(sae.cfg, "head", None) is None or not atoms:
        return {}
    with torch.no_grad():
        q = head_queries(model, sae, tokens)
        codes = _site_and_writes(model, sae, tokens, sae.cfg.write_mode)[0]
    out = {}
    for a in atoms:
        scores = direct_token_scores(model, sae, atom_read(sae, a, q, codes)["read"])
        out[a] = "promotes " + " ".join(token_text(tk.decode([i])) for i in scores.topk(k).indices.tolist())
    return out


def _baselines(res: PatchResult) -> dict:
    return {"clean": mean_ci(res.clean_rows), "corrupted": mean_ci(res.corrupted_rows)}


def _top(res: PatchResult, k: int = 10) -> list[dict]:
    effect = (res.scores - res.corrupted).abs().flatten()
    names = list(res.index)
    out = []
    for flat in effect.argsort(descending=True)[:k].tolist():
        idx = torch.unravel_index(torch.tensor(flat), res.scores.shape)
        idx = tuple(int(i) for i in idx)
        entry = {n: res.index[n][i] for n, i in zip(names, idx) if isinstance(res.index.get(n), list)}
        entry["effect"] = res.effect_interval(*idx) if res.rows is not None else {
            "mean": float(res.scores[idx] - res.corrupted)}
        entry["normalized"] = float(res.normalized[idx])
        out.append(entry)
    return out


def run_patch(model, sae, pairs: PromptPairs, out: str | Path, progress: bool = True) -> dict:
    """Activation patching of every write (layer x position x head) and of ``sae``'s atoms + error node."""
    from ..report import plt, token_text, write_report

    metric = pairs.metric(per_prompt=True)
    writes = patch_writes(model, pairs.clean, pairs.corrupted, metric, progress=progress)
    T = pairs.clean.shape[1]
    positions = list(range(pairs.source_pos, T))  # the writes that can differ: from the corruption on
    atoms = patch_atoms(model, sae, pairs.clean, pairs.corrupted, metric, positions=positions, max_atoms=16,
                        progress=progress) if sae is not None else None
    results = {"n_prompts": len(pairs), "source_pos": pairs.source_pos, **_baselines(writes),
               "writes": {"top": _top(writes), "index": writes.index,
                          "normalized": writes.normalized.tolist()}}
    if atoms is not None:
        top = _top(atoms)
        labels = atom_labels(model, sae, pairs.clean, [e["atom"] for e in top if e.get("atom") != "error"])
        for e in top:
            if e.get("atom") in labels:
                e["label"] = labels[e["atom"]]
        results["atoms"] = {"top": top, "index": atoms.index, "sae": sae.cfg.metadata.hook_name}
    tk = getattr(model, "tokenizer", None)
    tick_labels = [tk.decode([int(i)]) for i in pairs.clean[0].tolist()] if tk is not None else None

    def heatmap():
        L = len(writes.index["layer"])
        fig, axes = plt.subplots(1, L, figsize=(2.6 * L + 1.5, 3.2), squeeze=False, sharey=True,
                                 constrained_layout=True)
        lim = float(writes.normalized.abs().max()) or 1.0
        for i, ax in enumerate(axes[0]):
            im = ax.imshow(writes.normalized[i].T, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim,
                           interpolation="nearest")
            ax.set_title(f"layer {writes.index['layer'][i]}")
            if tick_labels is not None:  # the tokens of the first clean prompt (the template's end is shared)
                ax.set_xticks(range(len(tick_labels)), [token_text(t) for t in tick_labels], rotation=90, fontsize=6)
                ax.set_xlabel("position (tokens of clean prompt 0)")
            else:
                ax.set_xlabel("position")
            ax.set_yticks(range(len(writes.index["head"])), writes.index["head"])
        axes[0][0].set_ylabel("value head")
        fig.colorbar(im, ax=axes[0].tolist(), label="normalised patching score")
        return fig

    write_report(out, "activation patching: writes and atoms", results, None, {"write_patching": heatmap},
                 [f"{len(pairs)} clean/corrupted pairs; metric logit(answer) - logit(wrong) at the last position; "
                  "score 1 = the patch restores the clean metric, 0 = no effect. Intervals: 95% t over prompts."])
    return results


def run_attribution_patch(model, sae, pairs: PromptPairs, out: str | Path, progress: bool = True) -> dict:
    """Attribution patching of writes and atoms against actual patching (correlations, scatter)."""
    from ..report import plt, write_report

    metric = pairs.metric()
    est_w = attribute_writes(model, pairs.clean, pairs.corrupted, metric)
    act_w = patch_writes(model, pairs.clean, pairs.corrupted, metric, progress=progress)
    results = {"n_prompts": len(pairs), "writes": compare_with_patching(est_w, act_w)}
    pairs_xy = [("writes", est_w, act_w)]
    if sae is not None:
        pos = list(range(pairs.source_pos, pairs.clean.shape[1]))
        act_a = patch_atoms(model, sae, pairs.clean, pairs.corrupted, metric, positions=pos, max_atoms=16,
                            progress=progress)
        atoms = [a for a in act_a.index["atom"] if a != "error"]
        for backend in ("adjoint", "transformer_lens", "nnsight"):
            est_a = attribute_atoms(model, sae, pairs.clean, pairs.corrupted, metric, positions=pos, atoms=atoms,
                                    backend=backend)
            results[f"atoms_{backend}"] = compare_with_patching(est_a, act_a)
        pairs_xy.append(("atoms + error", est_a, act_a))

    def scatter():
        fig, axes = plt.subplots(1, len(pairs_xy), figsize=(4.5 * len(pairs_xy), 4), squeeze=False)
        for ax, (name, e, a) in zip(axes[0], pairs_xy):
            x, y = (e.scores - e.corrupted).flatten(), (a.scores - a.corrupted).flatten()
            ax.scatter(x, y, s=8)
            lim = float(torch.cat([x.abs(), y.abs()]).max()) or 1.0
            ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
            ax.set_xlabel("attribution patching estimate")
            ax.set_ylabel("actual patching effect")
            ax.set_title(name)
        fig.tight_layout()
        return fig

    write_report(out, "attribution patching vs activation patching", results, None, {"attribution_vs_patching": scatter},
                 ["Estimate: corrupted metric + <d metric / d W, Delta W> (one forward and backward of the corrupted "
                  "run). Pearson / Spearman over every patch, n = number of patches."])
    return results


def run_path_patch(model, pairs: PromptPairs, out: str | Path, layer: int | None = None, head: int | None = None,
                   progress: bool = True) -> dict:
    """The clean write at ``(layer, source_pos, head)`` patched into the corrupted run (default: the write
    with the largest patching effect at the source position), restricted to each later read position and
    mediated by each later recurrent layer's write value."""
    from ..adapters import WriteEdit
    from ..report import plt, write_report

    metric = pairs.metric(per_prompt=True)
    s = pairs.source_pos
    if layer is None or head is None:
        res = patch_writes(model, pairs.clean, pairs.corrupted, metric, positions=[s], progress=progress)
        li, _, hi = torch.unravel_index((res.scores - res.corrupted).abs().argmax(), res.scores.shape)
        layer, head = res.index["layer"][int(li)], res.index["head"][int(hi)]
    p = model.hook_prefix(layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(pairs.clean, names_filter=[p + "hook_write_key", p + "hook_write_value"])
    sender = [WriteEdit(layer=layer, pos=s, head=head, key=cache[p + "hook_write_key"][b, s, head],
                        value=cache[p + "hook_write_value"][b, s, head], batch=b) for b in range(len(pairs))]
    T = pairs.clean.shape[1]
    by_read = {t: path_patch(model, pairs.corrupted, sender, [Reads(layer, positions=(t,), heads=(head,))], metric)
               for t in range(s, T)}
    later = [l_ for l_ in model.cfg.recurrent_layers if l_ > layer]
    mediated = {l_: path_patch(model, pairs.corrupted, sender, [f"blocks.{l_}.hook_write_value"], metric)
                for l_ in later}
    results = {"sender": {"layer": layer, "pos": s, "head": head}, "n_prompts": len(pairs),
               "by_read_position": {str(t): r for t, r in by_read.items()},
               "mediated_by_layer_write_value": {str(k): v for k, v in mediated.items()}}

    def fig():
        f, ax = plt.subplots(figsize=(6, 3))
        ts = list(by_read)
        ax.bar(ts, [by_read[t]["path"] - by_read[t]["base"] for t in ts])
        ax.set_xlabel(f"read position t (layer {layer}, head {head})")
        ax.set_ylabel("metric change via this read only")
        ax.set_title(f"path patching of the write at position {s}")
        f.tight_layout()
        return f

    write_report(out, "path patching through the recurrence", results, None, {"path_by_read": fig},
                 ["Each bar: the sender's effect when only the read at t sees it (exact: the read's change is the "
                  "zero-value-trick propagation of the write change)."])
    return results


def run_circuit(model, saes: Sequence, pairs: PromptPairs, out: str | Path, node_threshold: float = 0.02,
                edge_threshold: float = 0.01, acdc_threshold: float = 0.02, progress: bool = True,
                max_nodes_per_sae: int = 10, batch_size: int | None = 1) -> dict:
    """Attribution feature circuit over ``saes`` + node-level ACDC, exported as JSON and figures. At most
    ``max_nodes_per_sae`` atoms per SAE; the gradient passes stream ``batch_size`` prompts at a time
    (bounded memory; the numbers equal the batched ones up to rounding)."""
    from ..report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = pairs.metric()
    circ = feature_circuit(model, saes, pairs.clean, pairs.corrupted, metric, node_threshold, edge_threshold,
                           max_nodes_per_sae=max_nodes_per_sae, progress=progress, batch_size=batch_size)
    pruned = acdc_prune(model, saes, pairs.clean, pairs.corrupted, metric, acdc_threshold, circuit=circ,
                        progress=progress)
    for sae in saes:  # atom labels: the tokens each node's atom promotes, as its head reads it
        key = (sae.cfg.layer, sae.cfg.head)
        mine = [n for c in (circ, pruned) for n in c.nodes if n["kind"] == "atom" and (n["layer"], n["head"]) == key
                and n["id"].rsplit(".", 2)[-2] == sae.cfg.site]
        labels = atom_labels(model, sae, pairs.clean, sorted({n["atom"] for n in mine}))
        for n in mine:
            if n["atom"] in labels:
                n["label"] = labels[n["atom"]]
    circ.to_json(out / "circuit.json")
    pruned.to_json(out / "circuit_acdc.json")
    results = {"n_prompts": len(pairs), "attribution": {"n_nodes": len(circ.nodes), "n_edges": len(circ.edges),
                                                        "metric": circ.metric},
               "acdc": {"n_nodes": len(pruned.nodes), "metric": pruned.metric}, "nodes": circ.nodes,
               "acdc_nodes": pruned.nodes}
    write_report(out, "feature circuit over write atoms", results, None,
                 {"circuit": circ.figure, "circuit_acdc": pruned.figure},
                 ["circuit.json / circuit_acdc.json hold the graphs. Node effects: attribution patching "
                  "(clean -> corrupted); ACDC: exact ablation to the corrupted values, faithfulness = "
                  "(circuit - corrupted) / (clean - corrupted)."])
    return results


def run_edit(model, sae, pairs: PromptPairs, out: str | Path, atoms: Sequence[int] | None = None,
             n_controls: int = 20, progress: bool = True) -> dict:
    """Ablate the atoms that carry the behaviour (default: the 3 with the largest positive attribution
    effect) on the clean prompts; behaviour before/after with intervals, against random atom sets."""
    from ..report import plt, write_report

    if atoms is None:
        est = attribute_atoms(model, sae, pairs.clean, pairs.corrupted, pairs.metric(),
                              positions=list(range(pairs.source_pos, pairs.clean.shape[1])), include_error=False)
        eff = (est.scores - est.corrupted).sum(0)  # summed over the positions from the corruption on
        atoms = [est.index["atom"][i] for i in eff.argsort(descending=True)[:3].tolist()]
    res = edit_atoms(model, sae, pairs.clean, pairs.metric(per_prompt=True), atoms, mode="ablate",
                     n_controls=n_controls, progress=progress)

    def fig():
        f, ax = plt.subplots(figsize=(5, 3))
        ax.hist(res["controls"]["effects"], bins=15, color="grey", label="random atom sets")
        ax.axvline(res["effect"]["mean"], color="tab:red", label=f"atoms {res['atoms']}")
        ax.set_xlabel("mean change of logit(answer) - logit(wrong)")
        ax.legend()
        f.tight_layout()
        return f

    write_report(out, "SHIFT-style ablation of write atoms", res, None, {"edit_vs_controls": fig},
                 ["Ablation = codes set to 0 with the SAE spliced (error term kept), on the clean prompts."])
    return res

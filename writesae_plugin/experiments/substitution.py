"""The substitution test (docs/method.md 6.1), exact and batched.

At a firing ``(context c, position t)`` of the SAE's site, with dominant atom ``i*``, the write ``W_t`` of
the SAE's (layer, head) is replaced under each condition and the next-token distributions are compared
with the clean forward's:

* ``atom_act``: ``a_{i*}(t) A_{i*}``; ``atom_norm``: ``||W_t|| A_{i*} / ||A_{i*}||``; ``delete``: 0;
* ``random_act`` / ``random_norm``: a random rank-1 unit atom at the same coefficient / norm;
* ``rescaled_native``: ``W_t`` rescaled to ``||a_{i*} A_{i*}||``; ``sae_projection``: ``W_t`` projected on the
  span of the atoms active at t.

Speed: the residual entering the SAE's layer is computed once per context; every (firing, condition) is one
row of a batched forward resumed at that layer, and the edit itself is one extra kernel call for all rows
(``adapters/ops.py``). ``substitution_naive`` re-runs the whole forward per condition (the reference).
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..adapters import StateCapture, WriteEdit
from ..sae import atoms as atom_ops
from . import stats

CONDITIONS = ("atom_act", "atom_norm", "delete", "random_act", "random_norm", "rescaled_native", "sae_projection")
METRICS = ("kl_final", "kl_next", "kl_mean")
PAPER = {"qwen3.5-0.8B L9 H4 (atom_act vs delete, KL at the final position)": {
    "win_rate": 0.924, "n_firings": 4851, "per_atom_mean": 0.898, "n_atoms": 87},
    "Mamba-2": {"win_rate": 0.881, "n_firings": 2500}, "RWKV-7": {"win_rate": 0.453},
    "DeltaNet": {"win_rate": 0.483}}


@dataclass
class SubstitutionConfig:
    """What to test. ``atoms``: the pool (None: every atom). Caps: firings per atom, per context, total."""

    atoms: list[int] | None = None
    max_per_atom: int = 50
    max_per_context: int = 4
    max_firings: int = 500
    conditions: tuple[str, ...] = CONDITIONS
    write_mode: str = "raw"
    seed: int = 0
    min_pos: int = 1  # first position eligible for a firing

    def __post_init__(self):
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"unknown conditions {bad}; choose from {CONDITIONS}")
        if "delete" not in self.conditions:
            raise ValueError("the 'delete' condition is the baseline of every win; keep it in conditions")
        if self.write_mode not in ("raw", "delta"):
            raise ValueError(f"write_mode must be 'raw' or 'delta', got {self.write_mode!r}")
        if min(self.max_per_atom, self.max_per_context, self.max_firings) < 1:
            raise ValueError("max_per_atom, max_per_context and max_firings must be >= 1")


@dataclass
class Firing:
    context: int
    pos: int
    atom: int
    act: float


@dataclass
class SubstitutionResult:
    config: dict
    firings: list[dict]
    records: list[dict]  # one per (firing, condition)
    summary: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ site and codes
def capture_site(model, sae, tokens: Tensor, write_mode: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """The write factors ``key [b, T, d_k]``, ``value [b, T, d_v]`` of the SAE's (layer, head) and, for a
    state-site SAE, the states ``[b, T, d_k, d_v]`` after each position (one forward up to the layer)."""
    cfg = sae.cfg
    L, h = cfg.layer, cfg.head
    p = model.hook_prefix(L)
    names = [p + "hook_write_key", p + "hook_write_value"]
    capture = StateCapture("all", heads=[h]) if cfg.site == "state" else None
    with torch.no_grad(), model.options(write_mode=write_mode, capture_states=capture):
        _, cache = model.run_with_cache(tokens, names_filter=names + ([p + "hook_state"] if capture else []),
                                        stop_at_layer=L + 1)
    states = cache[p + "hook_state"][:, :, 0] if capture else None
    return cache[p + "hook_write_key"][:, :, h], cache[p + "hook_write_value"][:, :, h], states


def _site_and_writes(model, sae, tokens: Tensor, write_mode: str):
    """Per context: the SAE codes ``[b, T, n]`` at its site and head, and the write factors of that head."""
    cfg = sae.cfg
    key, value, states = capture_site(model, sae, tokens, write_mode)
    with torch.no_grad():
        if cfg.site == "state":
            codes = sae.encode(states)
        else:
            if write_mode != cfg.write_mode:
                raise ValueError(f"the SAE was trained on {cfg.write_mode} writes; run with write_mode="
                                 f"{cfg.write_mode!r}")
            codes = sae.encode_factors(key, value)
    return codes, key, value


def select_firings(codes: Tensor, cfg: SubstitutionConfig, context_offset: int = 0) -> list[Firing]:
    """Firings in ``codes`` ``[b, T, n]`` (positions ``min_pos..T-2``), dominant atom over the pool."""
    b, T, n = codes.shape
    pool = torch.arange(n) if cfg.atoms is None else torch.tensor(cfg.atoms)
    if pool.numel() == 0 or pool.max() >= n or pool.min() < 0:
        raise ValueError(f"atoms must be indices in [0, {n})")
    a = codes[:, :, pool]
    val, arg = a.max(-1)
    out = []
    for c, t in (val[:, cfg.min_pos:T - 1] > 0).nonzero().tolist():
        t += cfg.min_pos
        out.append(Firing(c + context_offset, t, int(pool[arg[c, t]]), float(val[c, t])))
    return out


def _cap(cands: list[Firing], cfg: SubstitutionConfig) -> list[Firing]:
    rng = random.Random(cfg.seed)
    rng.shuffle(cands)
    per_atom, per_ctx, out = {}, {}, []
    for f in cands:
        if per_atom.get(f.atom, 0) >= cfg.max_per_atom or per_ctx.get(f.context, 0) >= cfg.max_per_context:
            continue
        per_atom[f.atom] = per_atom.get(f.atom, 0) + 1
        per_ctx[f.context] = per_ctx.get(f.context, 0) + 1
        out.append(f)
        if len(out) >= cfg.max_firings:
            break
    return sorted(out, key=lambda f: (f.context, f.pos))


# ------------------------------------------------------------------------------------------ conditions
def atom_matrix(sae, i: int) -> Tensor:
    if sae.cfg.decoder_rank is None:
        return sae.dec_dense[i].detach().view(sae.cfg.d_k, sae.cfg.d_v)
    return atom_ops.atom_matrices(sae.dec_key[i:i + 1], sae.dec_value[i:i + 1])[0].detach()


def replacement(condition: str, sae, firing: Firing, W: Tensor, codes_t: Tensor, rng: torch.Generator) -> Tensor | None:
    """The matrix that replaces ``W`` (None: delete)."""
    A = atom_matrix(sae, firing.atom)
    A_norm = A.norm()
    W_norm = W.norm()
    if condition == "atom_act":
        return firing.act * A
    if condition == "atom_norm":
        return W_norm * A / A_norm
    if condition == "delete":
        return None
    if condition in ("random_act", "random_norm"):
        u = torch.randn(sae.cfg.d_k, generator=rng)
        w = torch.randn(sae.cfg.d_v, generator=rng)
        R = torch.outer(u / u.norm(), w / w.norm())
        return firing.act * A_norm * R if condition == "random_act" else W_norm * R
    if condition == "rescaled_native":
        return W * (firing.act * A_norm / W_norm) if W_norm > 0 else torch.zeros_like(W)
    if condition == "sae_projection":
        active = (codes_t > 0).nonzero().flatten().tolist()
        if not active:
            return torch.zeros_like(W)
        M = torch.stack([atom_matrix(sae, j).reshape(-1) for j in active])  # [m, d_in]
        coef = torch.linalg.lstsq(M.T.double(), W.reshape(-1, 1).double()).solution.flatten()
        return (coef.float() @ M).view_as(W)
    raise ValueError(condition)


def kl_metrics(clean: Tensor, edited: Tensor, t: int) -> dict[str, float]:
    """KL(clean || edited) (``kl_*``) and KL(edited || clean) (``kl_*_rev``) at the final position, at t+1,
    and averaged over t+1..T-1, from logits ``[T, V]``."""
    lp, lq = clean.double().log_softmax(-1), edited.double().log_softmax(-1)
    fwd = (lp.exp() * (lp - lq)).sum(-1)  # [T]
    rev = (lq.exp() * (lq - lp)).sum(-1)
    T = clean.shape[0]
    return {"kl_final": float(fwd[-1]), "kl_final_rev": float(rev[-1]), "kl_next": float(fwd[t + 1]),
            "kl_next_rev": float(rev[t + 1]), "kl_mean": float(fwd[t + 1:T].mean()),
            "kl_mean_rev": float(rev[t + 1:T].mean())}


# ------------------------------------------------------------------------------------------ the test
def _plan(model, sae, tokens: Tensor, cfg: SubstitutionConfig):
    codes, key, value = _site_and_writes(model, sae, tokens, cfg.write_mode)
    firings = _cap(select_firings(codes, cfg), cfg)
    rng = torch.Generator().manual_seed(cfg.seed)
    jobs = []  # (firing index, condition, WriteEdit matrix or None, write norm, replacement norm)
    for fi, f in enumerate(firings):
        W = torch.outer(key[f.context, f.pos], value[f.context, f.pos])
        for cond in cfg.conditions:
            A = replacement(cond, sae, f, W, codes[f.context, f.pos], rng)
            jobs.append((fi, cond, A, float(W.norm()), 0.0 if A is None else float(A.norm())))
    return firings, jobs


def _edit(sae, f: Firing, A: Tensor | None, row: int, mode: str) -> WriteEdit:
    if A is None:
        return WriteEdit(layer=sae.cfg.layer, pos=f.pos, head=sae.cfg.head, batch=row, op="delete", mode=mode)
    return WriteEdit(layer=sae.cfg.layer, pos=f.pos, head=sae.cfg.head, batch=row, matrix=A, mode=mode)


def _check(model, sae):
    if sae.cfg.head is None:
        raise ValueError("the substitution test needs a per-head WriteSAE (cfg.head set)")
    if sae.cfg.layer not in model.cfg.recurrent_layers:
        raise ValueError(f"the SAE's layer {sae.cfg.layer} is not a recurrent layer of this model")
    model.check_sae_fits(sae, model.hook_prefix(sae.cfg.layer) + f"hook_{sae.cfg.site}")


@torch.no_grad()
def run_substitution(model, sae, tokens: Tensor, cfg: SubstitutionConfig | None = None,
                     progress: bool = True) -> SubstitutionResult:
    """The fast substitution test on contexts ``tokens`` ``[N, T]`` (one SAE layer and head).

    Nothing is computed twice: each context's clean prefix is run once, incrementally, into an HF cache; at
    every firing the cache is copied to one row per condition and only the suffix ``t..T-1`` of the layers
    from the SAE's layer on is run (from the clean residual entering it), with the edit applied at ``t``
    (one extra kernel call for all rows).
    """
    cfg = cfg or SubstitutionConfig()
    _check(model, sae)
    firings, jobs = _plan(model, sae, tokens, cfg)
    L = sae.cfg.layer
    clean = model(tokens)
    state = model.resume_state(tokens, L)  # layers < L are the same for every condition: run them once
    by_firing: dict[int, list] = {}
    for job in jobs:
        by_firing.setdefault(job[0], []).append(job)
    records = []
    bar = tqdm(total=len(jobs), desc="substitution", disable=not progress, unit="row")
    order = sorted(by_firing, key=lambda fi: (firings[fi].context, firings[fi].pos))
    cache, ctx_done, done = None, None, 0
    with model.options(write_mode=cfg.write_mode):
        for fi in order:
            f = firings[fi]
            if f.context != ctx_done:
                cache, ctx_done, done = None, f.context, 0
            if f.pos > done:  # advance the clean prefix to the firing
                out = model(tokens[f.context:f.context + 1, done:f.pos], return_type="hf", past_key_values=cache,
                            use_cache=True)
                cache, done = model.cache_of(out), f.pos
            group = by_firing[fi]
            rows = copy.deepcopy(cache)
            rows.reorder_cache(torch.zeros(len(group), dtype=torch.long, device=tokens.device))
            suffix = state.select([f.context] * len(group), start=f.pos)
            edits = [_edit(sae, f, A, r, cfg.write_mode) for r, (_, _, A, _, _) in enumerate(group)]
            with model.edits(edits):
                logits = model.run_from_layer(suffix, past_key_values=rows)
            for r, (_, cond, _, wn, an) in enumerate(group):
                records.append({"firing": fi, "context": f.context, "pos": f.pos, "atom": f.atom, "act": f.act,
                                "condition": cond, "write_norm": wn, "replacement_norm": an,
                                **kl_metrics(clean[f.context, f.pos:], logits[r], 0)})
            bar.update(len(group))
    bar.close()
    records.sort(key=lambda r: (r["firing"], cfg.conditions.index(r["condition"])))
    result = SubstitutionResult(config=asdict(cfg), firings=_with_text(model, tokens, firings), records=records)
    result.summary = summarize(records, cfg.conditions)
    return result


def _with_text(model, tokens: Tensor, firings: list[Firing]) -> list[dict]:
    """Firings as dicts, with the firing token's text and the 12 tokens before it when the model has a
    tokenizer."""
    out = [asdict(f) for f in firings]
    tk = getattr(model, "tokenizer", None)
    if tk is not None:
        for d in out:
            c, t = d["context"], d["pos"]
            d["token"] = tk.decode([int(tokens[c, t])])
            d["before"] = tk.decode(tokens[c, max(0, t - 12):t].tolist())
    return out


@torch.no_grad()
def run_substitution_naive(model, sae, tokens: Tensor, cfg: SubstitutionConfig | None = None) -> SubstitutionResult:
    """Reference: one full forward per (firing, condition) of its own context, nothing shared."""
    cfg = cfg or SubstitutionConfig()
    _check(model, sae)
    firings, jobs = _plan(model, sae, tokens, cfg)
    records = []
    for fi, cond, A, wn, an in jobs:
        f = firings[fi]
        ctx = tokens[f.context:f.context + 1]
        clean = model(ctx)[0]
        with model.options(write_mode=cfg.write_mode):
            edited = model.run_with_edits(ctx, [_edit(sae, f, A, 0, cfg.write_mode)])[0]
        records.append({"firing": fi, "context": f.context, "pos": f.pos, "atom": f.atom, "act": f.act,
                        "condition": cond, "write_norm": wn, "replacement_norm": an,
                        **kl_metrics(clean, edited, f.pos)})
    return SubstitutionResult(config=asdict(cfg), firings=[asdict(f) for f in firings], records=records,
                              summary=summarize(records, cfg.conditions))


# ------------------------------------------------------------------------------------------ statistics
def _by_firing(records, metric):
    table: dict[int, dict[str, dict]] = {}
    for r in records:
        table.setdefault(r["firing"], {})[r["condition"]] = r
    return table


def summarize(records: list[dict], conditions=CONDITIONS, metrics=METRICS) -> dict:
    """Win statistics (``KL_cond < KL_delete``) for every condition and metric, plus the strict chain
    ``KL_atom < KL_delete < KL_random`` and KL distributions. The headline is ``atom_act`` on ``kl_final``."""
    out: dict = {"n_firings": len({r["firing"] for r in records}), "by_metric": {}}
    for metric in metrics + tuple(m + "_rev" for m in metrics):
        table = _by_firing(records, metric)
        per_metric = {}
        for cond in conditions:
            if cond == "delete":
                continue
            rows = [(v[cond], v["delete"]) for v in table.values() if cond in v and "delete" in v]
            if not rows:
                continue
            wins = [a[metric] < d[metric] for a, d in rows]
            atoms = [a["atom"] for a, _ in rows]
            contexts = [a["context"] for a, _ in rows]
            per_metric[cond] = {
                "win": stats.wilson(sum(wins), len(wins)),
                "per_atom_mean": stats.per_cluster_mean(wins, atoms, min_count=5),
                "bootstrap_by_atom": stats.cluster_bootstrap(wins, atoms),
                "bootstrap_by_context": stats.cluster_bootstrap(wins, contexts),
                "wilcoxon_vs_delete": stats.paired_wilcoxon([a[metric] for a, _ in rows],
                                                            [d[metric] for _, d in rows]),
            }
        for atom_c, rand_c in (("atom_act", "random_act"), ("atom_norm", "random_norm")):
            rows = [v for v in table.values() if {atom_c, "delete", rand_c} <= set(v)]
            if rows:
                chain = [v[atom_c][metric] < v["delete"][metric] < v[rand_c][metric] for v in rows]
                per_metric[f"strict_chain_{atom_c}"] = stats.wilson(sum(chain), len(chain))
        per_metric["median_kl"] = {c: _median([r[metric] for r in records if r["condition"] == c])
                                   for c in conditions}
        out["by_metric"][metric] = per_metric
    head = out["by_metric"].get("kl_final", {}).get("atom_act")
    if head:
        out["headline"] = {"test": "atom_act vs delete, KL(clean || edited) at the final position",
                           **head["win"], "per_atom_mean": head["per_atom_mean"]}
    out["paper"] = PAPER
    return out


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


__all__ = ["SubstitutionConfig", "SubstitutionResult", "run_substitution", "run_substitution_naive",
           "summarize", "kl_metrics", "select_firings", "CONDITIONS"]


# ------------------------------------------------------------------------------------------ report
def figures(result: SubstitutionResult, metric: str = "kl_final") -> dict:
    """KL distributions per condition and win rates (vs delete) with Wilson intervals."""
    import numpy as np

    from ..report import plt

    conds = [c for c in result.config["conditions"]]

    def kl_dist():
        fig, ax = plt.subplots(figsize=(8, 4))
        data = [np.log10(np.clip([r[metric] for r in result.records if r["condition"] == c], 1e-30, None))
                for c in conds]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(conds) + 1), conds, rotation=30)
        ax.set_ylabel(f"log10 {metric} (KL(clean || edited))")
        ax.set_title(f"KL per condition ({result.summary['n_firings']} firings)")
        return fig

    def win_rates():
        fig, ax = plt.subplots(figsize=(8, 4))
        s = result.summary["by_metric"][metric]
        names = [c for c in conds if c != "delete" and c in s]
        rates = [s[c]["win"]["rate"] for c in names]
        err = [[s[c]["win"]["rate"] - s[c]["win"]["lo"] for c in names],
               [s[c]["win"]["hi"] - s[c]["win"]["rate"] for c in names]]
        ax.bar(names, rates, yerr=err, capsize=4, color="tab:blue")
        ax.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
        ax.axhline(PAPER["qwen3.5-0.8B L9 H4 (atom_act vs delete, KL at the final position)"]["win_rate"],
                   color="tab:red", ls=":", lw=1, label="paper atom_act (Qwen3.5-0.8B)")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"P({metric}[cond] < {metric}[delete])")
        ax.set_title("win rate vs delete, Wilson 95% intervals")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(loc="lower right", fontsize=8)
        return fig

    return {"substitution_kl": kl_dist, "substitution_win_rates": win_rates}


def save_substitution(result: SubstitutionResult, out_dir, extra: dict | None = None):
    from ..report import fmt_rate, write_report

    head = result.summary.get("headline", {})
    notes = [f"Headline ({head.get('test', '')}): {fmt_rate(head)}; paper: 92.4% of n = 4,851 firings "
             "(Qwen3.5-0.8B L9 H4). Numbers here are as measured on this model and data."]
    by = result.summary.get("by_metric", {}).get("kl_final", {})
    kl = {(r["firing"], r["condition"]): r["kl_final"] for r in result.records}
    examples = ("Firings: the 12 tokens before the firing token, the dominant atom and its activation, and KL(clean "
                "|| edited) at the final position when the write is replaced by the atom or deleted.",
                [{"before": f["before"], "token": f["token"], "atom": f["atom"], "act": f["act"],
                  "KL atom_act": kl.get((i, "atom_act")), "KL delete": kl.get((i, "delete"))}
                 for i, f in enumerate(result.firings) if "token" in f])
    headline = [(f"{cond} beats delete (KL at the final position)", v["win"]) for cond, v in by.items()
                if isinstance(v, dict) and "win" in v]
    return write_report(out_dir, "WriteSAE substitution test",
                        {"experiment": "substitution", "config": result.config, "summary": result.summary,
                         "firings": result.firings, **(extra or {})}, result.records, figures(result), notes,
                        headline=headline, examples=examples)

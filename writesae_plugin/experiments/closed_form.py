"""Closed-form logit shift of an atom install (docs/method.md 6.2), with three predictors reported side by side.

Perturb the write of (layer, head) at ``t0`` by ``eps A`` (``A = u w^T``, unit atom) and compare, for
``t > t0`` and a few target tokens per atom, the measured ``Delta logit / eps`` with:

(a) ``jvp``: the exact first-order response, ``torch.func.jvp`` through the whole model (eager attention);
(b) ``direct``: the parameter-free direct path ``W_U J_finalnorm(x_t) W_O J_gatednorm(o_t, z_t) Delta o_t``
    with the exact in-layer ``Delta o_t`` of the head (the norms linearised by jvp of the model's own norm
    modules, over all heads: a Mamba-2 gated norm spans a group, so the other heads' outputs move too);
(c) ``fitted_g``: the paper's three-factor form ``G * (prod alpha) * (u . q_t) * (W_U W_O[:, head] w)[token]``
    with one ``G`` per (atom, token) fitted by least squares on a held-out split of the contexts.

Each R^2 is reported separately (never blended), pooled, per atom and against the horizon ``t - t0``, with
sign agreement and linearity in ``eps``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..adapters import WriteEdit
from .substitution import atom_matrix

PREDICTORS = ("jvp", "direct", "fitted_g")
PAPER = {"fitted G per (prompt, feature, token)": 0.98, "parameter-free check": -0.06}


@dataclass
class ClosedFormConfig:
    """``eps``: perturbation sizes relative to the native write norm at ``t0``; the smallest one is the
    "measured" shift the predictors are scored against. ``t0``: position (default ``T // 4``)."""

    atoms: list[int] = field(default_factory=lambda: [0])
    t0: int | None = None
    eps: tuple[float, ...] = (0.05, 0.25, 1.0)
    n_tokens: int = 5
    fit_fraction: float = 0.5
    horizon_bins: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 1 << 30)
    seed: int = 0

    def __post_init__(self):
        if not self.atoms:
            raise ValueError("give at least one atom")
        if not self.eps or min(self.eps) <= 0:
            raise ValueError("eps must be positive")
        if not 0 < self.fit_fraction < 1:
            raise ValueError("fit_fraction must be in (0, 1)")


@dataclass
class ClosedFormResult:
    config: dict
    records: list[dict]
    summary: dict


@contextlib.contextmanager
def eager_attention(model):
    """Temporarily switch the HF model to eager attention (``torch.func.jvp`` fails through CPU SDPA) and eager
    MoE experts (``torch._grouped_mm``, transformers' default experts kernel, has no forward-mode derivative)."""
    hf = model.hf_model
    before = getattr(hf.config, "_attn_implementation", None)
    experts = getattr(hf.config, "_experts_implementation", None)
    switch_experts = experts not in (None, "eager") and hasattr(hf, "set_experts_implementation")
    if switch_experts:
        hf.set_experts_implementation("eager")
    try:
        if before in (None, "eager"):
            yield
            return
        hf.set_attn_implementation("eager")
        try:
            yield
        finally:
            hf.set_attn_implementation(before)
    finally:
        if switch_experts:
            hf.set_experts_implementation(experts)


class GatedNormMap:
    """How a layer's read reaches its output projection, for the direct path: the per-head gated norm
    ``norm(o, z)`` of Gated DeltaNet, KDA and Mamba-2 (a family may give its own map: ``family.output_map``).
    ``register(captured)`` records what the map needs during a forward (returns the hook handles),
    ``read(captured)`` is the read as the map takes it, ``apply(captured, x)`` maps a read ``x`` (same shape)."""

    def __init__(self, mixer):
        self.norm = _norm_module(mixer)

    def register(self, captured: dict) -> list:
        return [self.norm.register_forward_pre_hook(
            lambda m, a: captured.setdefault("norm_in", (a[0].clone(), a[1].clone())))]

    def read(self, captured: dict) -> Tensor:
        return captured["norm_in"][0]

    def apply(self, captured: dict, x: Tensor) -> Tensor:
        return self.norm(x, captured["norm_in"][1])


def _norm_module(mixer):
    for m in mixer.children():
        if "Norm" in type(m).__name__ and "Gated" in type(m).__name__:
            return m
    raise RuntimeError(f"{type(mixer).__name__} has no gated norm module")


def _out_proj(mixer, d_model: int, width: int):
    for name in ("out_proj", "o_proj"):  # by name first: a q/k/v projection can have the same shape
        m = getattr(mixer, name, None)
        if isinstance(m, torch.nn.Linear) and m.in_features == width and m.out_features == d_model:
            return m
    for m in mixer.children():
        if isinstance(m, torch.nn.Linear) and m.in_features == width and m.out_features == d_model:
            return m
    raise RuntimeError(f"{type(mixer).__name__} has no output projection [{width} -> {d_model}]")


def r2(y: np.ndarray, yhat: np.ndarray) -> float:
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    ss = ((y - y.mean()) ** 2).sum()
    return float(1 - ((y - yhat) ** 2).sum() / ss) if ss > 0 else float("nan")


@torch.no_grad()
def _context_pass(model, sae, ctx: Tensor, atom: int, cfg: ClosedFormConfig, t0: int, norm, out_proj, final_norm):
    L, h = sae.cfg.layer, sae.cfg.head
    H, dv = model.cfg.n_heads, model.cfg.d_v
    p = model.hook_prefix(L)
    captured = {}
    handles = norm.register(captured)
    handles.append(final_norm.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].clone())))
    try:
        clean, cache = model.run_with_cache(ctx, names_filter=[p + "hook_read", p + "hook_write_key",
                                                               p + "hook_write_value", p + "hook_query",
                                                               p + "hook_log_decay"])
    finally:
        for handle in handles:
            handle.remove()
    T = ctx.shape[1]
    A = atom_matrix(sae, atom)
    A = A / A.norm()
    W0 = torch.outer(cache[p + "hook_write_key"][0, t0, h], cache[p + "hook_write_value"][0, t0, h])
    scale = float(W0.norm()) or 1.0  # eps is relative to the native write norm

    def edited(eps_abs: Tensor):
        return model.run_with_edits(ctx, [WriteEdit(layer=L, pos=t0, head=h, op="add", matrix=eps_abs * A)])

    # (a) exact first-order response per unit of eps_abs
    _, jvp = torch.func.jvp(edited, (torch.tensor(0.0),), (torch.tensor(1.0),))
    jvp = jvp[0]
    # measured shifts per unit eps_abs, for every eps of the sweep
    measured = {e: (edited(torch.tensor(e * scale))[0] - clean[0]) / (e * scale) for e in cfg.eps}
    # (b) direct path: exact in-layer Delta o (linear in eps) through the linearised norms
    with model.edits([WriteEdit(layer=L, pos=t0, head=h, op="add", matrix=A)]):
        _, ed = model.run_with_cache(ctx, names_filter=[p + "hook_read"])
    d_o = (ed[p + "hook_read"] - cache[p + "hook_read"])[0]  # [T, H, d_v]
    # linearise the output norm on the whole read (a Mamba-2 gated norm spans a group of heads, so the
    # other heads' normalised outputs move too); the tangent is the exact change of head h
    o_all = norm.read(captured)
    tangent = torch.zeros(T, H, dv, dtype=torch.float32)
    tangent[:, h] = d_o[:, h]
    _, d_n = torch.func.jvp(lambda x: norm.apply(captured, x), (o_all,),
                            (tangent.reshape(o_all.shape).to(o_all.dtype),))
    d_x = d_n.float().reshape(T, H * dv) @ out_proj.weight.float().T  # [T, d_model]
    W_O = out_proj.weight[:, h * dv:(h + 1) * dv]  # [d_model, d_v] (three-factor embedding below)
    x = captured["x"][0]
    _, d_xn = torch.func.jvp(final_norm, (x,), (d_x.to(x.dtype),))
    direct = d_xn.float() @ model.W_U.float()  # [T, V]
    # (c) three-factor features
    u = sae.dec_key[atom, 0].float() if sae.cfg.decoder_rank else A.reshape(model.cfg.d_k, dv).svd()[0][:, 0]
    w = A.T @ u / (u @ u)
    g = cache[p + "hook_log_decay"][0, :, h]
    gate = torch.exp(torch.cumsum(g, 0) - torch.cumsum(g, 0)[t0])  # prod_{s=t0+1..t} alpha_s
    if g.dim() == 2:  # per-channel decay [T, d_k] (Kimi Delta Attention): forget gate and query match do not
        # factor; the query match takes the per-channel decay, q_t^T Diag(prod alpha) u, and the gate is 1
        qmatch = (cache[p + "hook_query"][0, :, h] * gate) @ u
        gate = torch.ones(T)
    else:
        qmatch = cache[p + "hook_query"][0, :, h] @ u
    emb = model.W_U.float().T @ (W_O.float() @ w)  # [V]
    return {"jvp": jvp, "measured": measured, "direct": direct, "gate": gate, "qmatch": qmatch, "emb": emb,
            "scale": scale}


def run_closed_form(model, sae, tokens: Tensor, cfg: ClosedFormConfig | None = None,
                    progress: bool = True) -> ClosedFormResult:
    """The closed-form analysis on contexts ``tokens`` ``[N, T]`` for the SAE's layer and head."""
    cfg = cfg or ClosedFormConfig()
    if sae.cfg.head is None:
        raise ValueError("the closed-form analysis needs a per-head WriteSAE (cfg.head set)")
    bad = [a for a in cfg.atoms if not 0 <= a < sae.cfg.d_sae]
    if bad:
        raise ValueError(f"atoms {bad} out of range for d_sae={sae.cfg.d_sae}")
    N, T = tokens.shape
    t0 = cfg.t0 if cfg.t0 is not None else T // 4
    if not 0 <= t0 < T - 1:
        raise ValueError(f"t0={t0} must leave later positions in contexts of length {T}")
    mixer = model.family.mixers[sae.cfg.layer]
    output_map = getattr(model.family, "output_map", None)
    norm = output_map(mixer) if output_map is not None else GatedNormMap(mixer)
    out_proj = _out_proj(mixer, model.cfg.d_model, model.cfg.n_heads * model.cfg.d_v)
    final_norm = model.family.final_norm(model.hf_model)
    rng = np.random.default_rng(cfg.seed)
    fit_ctx = set(rng.permutation(N)[: max(1, int(round(cfg.fit_fraction * N)))].tolist())
    if len(fit_ctx) == N:
        raise ValueError("need at least 2 contexts: one to fit G, one to evaluate")
    records = []
    bar = tqdm(total=N * len(cfg.atoms), desc="closed form", disable=not progress)
    with eager_attention(model):
        for atom in cfg.atoms:
            tokens_of_atom = None
            for c in range(N):
                res = _context_pass(model, sae, tokens[c:c + 1], atom, cfg, t0, norm, out_proj, final_norm)
                if tokens_of_atom is None:  # the atom's target tokens: largest |direct output embedding|
                    tokens_of_atom = res["emb"].abs().topk(cfg.n_tokens).indices.tolist()
                for t in range(t0 + 1, T):
                    for tok in tokens_of_atom:
                        rec = {"atom": atom, "context": c, "t": t, "horizon": t - t0, "token": tok,
                               "split": "fit" if c in fit_ctx else "eval", "write_norm": res["scale"],
                               "jvp": float(res["jvp"][t, tok]), "direct": float(res["direct"][t, tok]),
                               "three_factor": float(res["gate"][t] * res["qmatch"][t] * res["emb"][tok])}
                        for e, m in res["measured"].items():
                            rec[f"measured@{e}"] = float(m[t, tok])
                        records.append(rec)
                bar.update(1)
    bar.close()
    summary = summarize(records, cfg)
    return ClosedFormResult(config=asdict(cfg), records=records, summary=summary)


def _fit_g(records: list[dict], target: str) -> dict:
    """Least-squares G per (atom, token) on the fit split: ``measured ~ G * three_factor``."""
    num, den = {}, {}
    for r in records:
        if r["split"] == "fit":
            key = (r["atom"], r["token"])
            num[key] = num.get(key, 0.0) + r["three_factor"] * r[target]
            den[key] = den.get(key, 0.0) + r["three_factor"] ** 2
    return {k: num[k] / den[k] for k in num if den[k] > 0}


def _scores(y, preds: dict[str, np.ndarray]) -> dict:
    """R^2 and sign agreement of each predictor. Sign agreement counts the records where both the measured shift
    and the prediction are nonzero: a prediction of exactly 0 (the direct path where the head's state has
    forgotten the edit: the decay product underflows) has no sign; ``zero_predictions`` is their share."""
    out = {}
    for name, yhat in preds.items():
        yhat = np.asarray(yhat, float)
        signed = (np.abs(y) > 1e-12) & (yhat != 0)
        out[name] = {"r2": r2(y, yhat), "sign_agreement": float((np.sign(yhat[signed]) == np.sign(y[signed])).mean())
                     if signed.any() else float("nan"), "n": int(len(y)),
                     "zero_predictions": float((yhat == 0).mean()) if len(yhat) else float("nan")}
    return out


def summarize(records: list[dict], cfg: ClosedFormConfig) -> dict:
    target = f"measured@{min(cfg.eps)}"
    G = _fit_g(records, target)
    ev = [r for r in records if r["split"] == "eval" and (r["atom"], r["token"]) in G]
    if not ev:
        return {"error": "no evaluation records"}

    def preds(rows):
        return {"jvp": np.array([r["jvp"] for r in rows]), "direct": np.array([r["direct"] for r in rows]),
                "fitted_g": np.array([G[(r["atom"], r["token"])] * r["three_factor"] for r in rows])}

    y = np.array([r[target] for r in ev])
    out = {"target": f"measured Delta logit / eps at eps = {min(cfg.eps)} x native write norm (eval split)",
           "pooled": _scores(y, preds(ev)), "per_atom": {}, "by_horizon": [], "linearity_in_eps": {},
           "n_eval": len(ev), "n_fit": sum(r["split"] == "fit" for r in records), "paper": PAPER}
    for atom in sorted({r["atom"] for r in ev}):
        rows = [r for r in ev if r["atom"] == atom]
        out["per_atom"][str(atom)] = _scores(np.array([r[target] for r in rows]), preds(rows))
    edges = list(cfg.horizon_bins)
    for lo, hi in zip(edges[:-1], edges[1:]):
        rows = [r for r in ev if lo <= r["horizon"] < hi]
        if rows:
            out["by_horizon"].append({"horizon": [lo, hi - 1], **{k: v["r2"] for k, v in
                                      _scores(np.array([r[target] for r in rows]), preds(rows)).items()},
                                      "n": len(rows)})
    jvp_all = np.array([r["jvp"] for r in records])
    for e in cfg.eps:
        out["linearity_in_eps"][str(e)] = {"r2_vs_jvp": r2(np.array([r[f"measured@{e}"] for r in records]), jvp_all)}
    return out


def figures(result: ClosedFormResult) -> dict:
    from ..report import plt

    cfg = result.config
    target = f"measured@{min(cfg['eps'])}"
    ev = [r for r in result.records if r["split"] == "eval"]
    G = _fit_g(result.records, target)

    def scatter():
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        y = np.array([r[target] for r in ev])
        for ax, name in zip(axes, PREDICTORS):
            if name == "fitted_g":
                x = np.array([G.get((r["atom"], r["token"]), np.nan) * r["three_factor"] for r in ev])
            else:
                x = np.array([r[name] for r in ev])
            ax.scatter(x, y, s=4, alpha=0.5)
            lim = np.nanmax(np.abs(np.concatenate([x, y]))) if len(y) else 1
            ax.plot([-lim, lim], [-lim, lim], color="gray", lw=1)
            ax.set_title(f"{name}: R2 = {result.summary['pooled'][name]['r2']:.3f}")
            ax.set_xlabel("predicted d logit / d eps")
        axes[0].set_ylabel("measured")
        return fig

    def horizon():
        fig, ax = plt.subplots(figsize=(6, 4))
        hb = result.summary["by_horizon"]
        xs = [f"{b['horizon'][0]}-{b['horizon'][1]}" for b in hb]
        for name in PREDICTORS:
            ax.plot(xs, [b[name] for b in hb], marker="o", label=name)
        ax.set_ylim(-1, 1.05)
        ax.set_xlabel("horizon t - t0")
        ax.set_ylabel("R^2")
        ax.legend()
        ax.tick_params(axis="x", rotation=30)
        return fig

    return {"closed_form_scatter": scatter, "closed_form_horizon": horizon}


def save_closed_form(result: ClosedFormResult, out_dir, extra: dict | None = None):
    from ..report import write_report

    pooled = result.summary.get("pooled", {})
    notes = ["Three predictors, each scored separately: " + "; ".join(
        f"{k}: R2 = {v['r2']:.3f}, sign agreement {v['sign_agreement']:.3f} (n={v['n']}"
        + (f"; {v['zero_predictions']:.0%} exactly 0, no sign" if v.get("zero_predictions") else "") + ")"
        for k, v in pooled.items()),
        "Paper: fitted G per (prompt, feature, token) R2 = 0.98; its parameter-free check R2 = -0.06."]
    return write_report(out_dir, "WriteSAE closed-form logit shift",
                        {"experiment": "closed_form", "config": result.config, "summary": result.summary,
                         **(extra or {})}, result.records, figures(result), notes)

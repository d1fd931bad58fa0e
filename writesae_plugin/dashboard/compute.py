"""The dashboard's numbers: one streaming pass over the data for every atom, then per-atom effects at the
atoms' top firings (docs/method.md 6.1-6.2).

``compute_dashboard(model, sae, tokens, cfg)`` returns a :class:`DashboardData`:

1. **The pass** (``batch`` contexts per forward, a tqdm bar): one forward up to the SAE's layer per batch
   captures the head's write factors (and states for a state SAE), its ``hook_log_decay``; the SAE encodes
   them and :class:`~writesae_plugin.dashboard.stats.AtomStats` updates every atom's counts, top-k, reservoir,
   histogram, key-side extremes (``u_i . k_t``) and decay / persistence curves. No forward per atom.
2. **Value side** (``value_firings`` top firings per atom, all atoms' firings batched per context): the
   direct-path logit direction of the atom as its head reads it there, through the model's norms
   linearised as in the closed-form module: ``W_U J_final(x_t) W_O J_gated(o_t, z_t) [A_i^T q_t]`` per unit
   activation (``jvp`` of the model's own norm modules); averaged over the firings. The static
   ``W_U^T W_O[:, head] A_i^T q_bar`` of :func:`~writesae_plugin.experiments.write_attribution.preferred_token`
   (no norm gains) is kept beside it.
3. **Measured effect** (``effect_firings`` top firings per atom): the write at the firing is replaced by the
   atom at its activation (``a_i(t) A_i``, the substitution test's ``atom_act``) and, separately, deleted;
   the context up to the firing is run (causal: the logits at t are those of the full context) and the
   next-token change ``Delta logit_t`` (atom - clean), ``KL(clean || atom)`` and ``KL(clean || delete)`` at t
   are recorded; a win is ``KL_atom < KL_delete`` (Wilson 95% interval over the atom's firings).

Units: activations are SAE codes; logits in nats; KL in nats. A head-shared SAE (``cfg.head`` None) is viewed
at one value head (``DashboardConfig.head``). Raises ``ValueError`` for a head-shared SAE without a head, an SAE
whose layer is not recurrent, atoms out of range or empty tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..adapters import StateCapture, WriteEdit
from ..experiments import stats as xstats
from ..experiments.closed_form import _norm_module, _out_proj
from ..experiments.substitution import atom_matrix
from ..experiments.write_attribution import direct_token_scores
from .stats import AtomStats, StatsConfig


@dataclass
class DashboardConfig:
    """``batch``: contexts per forward of the pass; ``atoms``: atoms that get pages, value sides and effects
    (None: every atom that fired; with ``max_pages``: those that fired most often, plus ``atoms``); ``value_firings`` /
    ``effect_firings``: top firings per atom used for the value side and the measured effect; ``n_tokens``:
    tokens listed per top/bottom list."""

    stats: StatsConfig = field(default_factory=StatsConfig)
    batch: int = 8
    atoms: list[int] | None = None
    value_firings: int = 4
    effect_firings: int = 3
    n_tokens: int = 10
    max_pages: int | None = None
    #: the value head to view a head-shared SAE (``cfg.head`` None) at; must be None or equal for a per-head SAE
    head: int | None = None

    def __post_init__(self):
        if isinstance(self.stats, dict):
            self.stats = StatsConfig(**self.stats)
        for name in ("batch", "n_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("value_firings", "effect_firings"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")


@dataclass
class DashboardData:
    """Everything a dashboard shows. ``stats``: the accumulator; ``tokens``: the contexts ``[N, T]``;
    ``atoms``: atoms with pages; ``value`` / ``effect``: per atom (dicts keyed by atom); ``timings`` seconds."""

    config: dict
    sae_info: dict
    stats: AtomStats
    tokens: Tensor
    atoms: list[int]
    value: dict = field(default_factory=dict)
    effect: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def atom_factors(sae) -> tuple[Tensor, Tensor]:
    """Key and value sides ``U [n, d_k]``, ``W [n, d_v]`` with ``A_i ~= u_i w_i^T``: the decoder's factors for a
    rank-1 WriteSAE (exact), else the leading singular pair of each atom matrix (``u`` scaled by the singular
    value). fp32, detached."""
    if sae.cfg.decoder_rank == 1:
        return sae.dec_key[:, 0].detach().float(), sae.dec_value[:, 0].detach().float()
    M = torch.stack([atom_matrix(sae, i).float() for i in range(sae.cfg.d_sae)])
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :, 0] * S[:, :1], Vh[:, 0, :]


class _AtHead:
    """A head-shared SAE seen at one value head: its own parameters and methods, a config with ``head`` set (a
    shared SAE encodes one head's ``[..., d_k]`` / ``[..., d_k, d_v]`` inputs like a per-head one)."""

    def __init__(self, sae, head: int):
        import dataclasses

        self._sae = sae
        self.cfg = dataclasses.replace(sae.cfg, head=head)

    def __getattr__(self, name):
        return getattr(self._sae, name)


def at_head(sae, head: int | None, n_heads: int):
    """``sae`` itself (per-head SAE; ``head`` None or its own head) or a head-shared SAE viewed at ``head``.
    Raises ``ValueError`` for a shared SAE without a head, a head out of range, or a different head."""
    own = getattr(sae.cfg, "head", None)
    if own is not None:
        if head is not None and head != own:
            raise ValueError(f"the SAE is for value head {own}; head={head} does not match")
        return sae
    if head is None:
        raise ValueError("the SAE is shared by all value heads: choose the head to view (head=..., --head)")
    if not 0 <= head < n_heads:
        raise ValueError(f"head {head} out of range (value heads 0..{n_heads - 1})")
    return _AtHead(sae, head)


def _check(model, sae, tokens: Tensor, atoms):
    if sae.cfg.layer not in model.cfg.recurrent_layers:
        raise ValueError(f"the SAE's layer {sae.cfg.layer} is not a recurrent layer of this model "
                         f"({list(model.cfg.recurrent_layers)})")
    model.check_sae_fits(sae, model.hook_prefix(sae.cfg.layer) + f"hook_{sae.cfg.site}")
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [N, T] with N, T > 0, got {tuple(tokens.shape)}")
    if atoms is not None:
        bad = [a for a in atoms if not 0 <= a < sae.cfg.d_sae]
        if bad:
            raise ValueError(f"atoms {bad} out of range for d_sae={sae.cfg.d_sae}")


@torch.no_grad()
def encode_batch(model, sae, tokens: Tensor, U: Tensor) -> dict[str, Tensor]:
    """One forward up to the SAE's layer: ``codes`` ``[B, T, n]``, ``key_dot`` ``[B, T, n]`` (``u_i . k_t``),
    ``log_decay`` ``[B, T]`` and ``query`` ``[B, T, d_k]`` of the SAE's head."""
    cfg = sae.cfg
    L, h = cfg.layer, cfg.head
    p = model.hook_prefix(L)
    names = [p + "hook_write_key", p + "hook_write_value", p + "hook_log_decay", p + "hook_query"]
    capture = StateCapture("all", heads=[h]) if cfg.site == "state" else None
    if capture is not None:
        names.append(p + "hook_state")
    with model.options(write_mode=cfg.write_mode, capture_states=capture):
        _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=L + 1)
    key, value = cache[p + "hook_write_key"][:, :, h], cache[p + "hook_write_value"][:, :, h]
    codes = sae.encode(cache[p + "hook_state"][:, :, 0]) if capture is not None else sae.encode_factors(key, value)
    log_decay = cache[p + "hook_log_decay"][:, :, h]  # [B, T] (scalar decay per head)
    if log_decay.dim() != 2:  # a per-channel decay (Kimi Delta Attention) has no single decay curve
        log_decay = None
    return {"codes": codes.float(), "key_dot": key.float() @ U.T, "log_decay": log_decay,
            "query": cache[p + "hook_query"][:, :, h].float()}


@torch.no_grad()
def streaming_pass(model, sae, tokens: Tensor, cfg: DashboardConfig, progress: bool = True) -> AtomStats:
    """Step 1 of the module docstring: every atom's statistics from one forward per batch."""
    U, _ = atom_factors(sae)
    acc = AtomStats(sae.cfg.d_sae, cfg.stats, state_site=sae.cfg.site == "state")
    bar = tqdm(total=int(tokens.numel()), desc="dashboard pass", unit="tok", disable=not progress)
    for s in range(0, tokens.shape[0], cfg.batch):
        chunk = tokens[s:s + cfg.batch]
        out = encode_batch(model, sae, chunk, U)
        acc.update(out["codes"], chunk, out["key_dot"], out["log_decay"], context_offset=s)
        bar.update(int(chunk.numel()))
    bar.close()
    return acc


def _firings(acc: AtomStats, atoms: list[int], per_atom: int) -> dict[int, list[dict]]:
    return {a: acc.top(a)[:per_atom] for a in atoms} if per_atom else {a: [] for a in atoms}


@torch.no_grad()
def value_sides(model, sae, tokens: Tensor, acc: AtomStats, atoms: list[int], cfg: DashboardConfig) -> dict:
    """Step 2: per atom ``{"tokens_norms": [[id, score], ...] top, "bottom_norms": ..., "tokens_static": ...,
    "bottom_static": ..., "n_firings": F}`` (scores in logits per unit activation)."""
    L, h = sae.cfg.layer, sae.cfg.head
    H, dv = model.cfg.n_heads, model.cfg.d_v
    p = model.hook_prefix(L)
    mixer = model.family.mixers[L]
    norm = _norm_module(mixer)
    out_proj = _out_proj(mixer, model.cfg.d_model, H * dv)
    final_norm = model.family.final_norm(model.hf_model)
    W_U = model.W_U.float()
    fir = _firings(acc, atoms, cfg.value_firings)
    by_ctx: dict[int, list[tuple[int, int]]] = {}
    for a, fs in fir.items():
        for f in fs:
            by_ctx.setdefault(f["ctx"], []).append((a, f["pos"]))
    sums = {a: torch.zeros(model.cfg.d_model) for a in atoms}
    mats = {a: atom_matrix(sae, a).float() for a in atoms}
    for c, pairs in by_ctx.items():
        ctx = tokens[c:c + 1]
        captured = {}
        h1 = norm.register_forward_pre_hook(lambda m, a: captured.setdefault("norm_in", (a[0].clone(), a[1].clone())))
        h2 = final_norm.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].clone()))
        try:
            with model.options(write_mode=sae.cfg.write_mode):
                _, cache = model.run_with_cache(ctx, names_filter=[p + "hook_query"])
        finally:
            h1.remove()
            h2.remove()
        T = ctx.shape[1]
        o_all, z_all = captured["norm_in"]
        x = captured["x"][0]  # [T, d_model]
        q = cache[p + "hook_query"][0, :, h].float()  # [T, d_k]
        for a, t in pairs:
            tangent = torch.zeros(T, H, dv)
            tangent[t, h] = mats[a].T @ q[t]  # the exact change of the head's read per unit activation
            _, d_n = torch.func.jvp(lambda o: norm(o, z_all), (o_all,), (tangent.reshape(o_all.shape).to(o_all.dtype),))
            d_x = d_n.float().reshape(T, H * dv)[t] @ out_proj.weight.float().T  # [d_model]
            _, d_xn = torch.func.jvp(final_norm, (x[t:t + 1],), (d_x[None].to(x.dtype),))
            sums[a] += d_xn[0].float()
    out = {}
    k = cfg.n_tokens
    for a in atoms:
        n = len(fir[a])
        entry = {"n_firings": n}
        if n:
            scores = W_U.T @ (sums[a] / n)
            entry["top_norms"] = _ranked(scores, k, True)
            entry["bottom_norms"] = _ranked(scores, k, False)
        out[a] = entry
    return out


def _ranked(scores: Tensor, k: int, largest: bool) -> list[list]:
    v, i = scores.topk(min(k, scores.numel()), largest=largest)
    return [[int(j), float(s)] for j, s in zip(i.tolist(), v.tolist())]


def static_value_sides(model, sae, acc_query_bar: dict[int, Tensor], atoms: list[int], k: int) -> dict:
    """``W_U^T W_O[:, head] A_i^T q_bar`` (the read-signed static direction; no norm gains) per atom."""
    out = {}
    for a in atoms:
        qb = acc_query_bar.get(a)
        if qb is None:
            continue
        s = direct_token_scores(model, sae, atom_matrix(sae, a).float().T @ qb)
        out[a] = {"top_static": _ranked(s, k, True), "bottom_static": _ranked(s, k, False)}
    return out


@torch.no_grad()
def measured_effects(model, sae, tokens: Tensor, acc: AtomStats, atoms: list[int], cfg: DashboardConfig,
                     progress: bool = True, rows_per_forward: int = 32) -> dict:
    """Step 3: per atom ``{"records": [{"ctx", "pos", "act", "kl_atom", "kl_delete", "win", "top": [[id, dlogit]]
    ...}], "mean_dlogit_top" / "mean_dlogit_bottom": [[id, mean Delta logit]], "win": Wilson dict, "n"}``.

    The layers before the SAE's run once for every context involved (``model.resume_state``, checked against
    the full forward); the firings of one context then run together from the SAE's layer on: two rows per
    firing (atom, delete), each row with its one edit (edits are exact per row, so rows do not interact), at
    most ``rows_per_forward`` rows per call."""
    L, h, mode = sae.cfg.layer, sae.cfg.head, sae.cfg.write_mode
    fir = _firings(acc, atoms, cfg.effect_firings)
    by_ctx: dict[int, list[tuple[int, dict]]] = {}
    for a in atoms:
        for f in fir[a]:
            by_ctx.setdefault(f["ctx"], []).append((a, f))
    n_jobs = sum(len(v) for v in by_ctx.values())
    bar = tqdm(total=n_jobs, desc="atom effects", unit="firing", disable=not progress or not n_jobs)
    res: dict[int, dict] = {a: {"records": [], "dsum": None} for a in atoms}
    per = max(1, rows_per_forward // 2)
    ctxs = sorted(by_ctx)
    state = model.resume_state(tokens[ctxs], L) if ctxs else None  # layers < L: once per context
    for ci, c in enumerate(ctxs):
        with model.options(write_mode=mode):
            clean_all = model.run_from_layer(state.select([ci]))[0].float()
        jobs = by_ctx[c]
        for s0 in range(0, len(jobs), per):
            group = jobs[s0:s0 + per]
            edits = []
            for r, (a, f) in enumerate(group):
                A = f["act"] * atom_matrix(sae, a).float()
                edits += [WriteEdit(layer=L, pos=f["pos"], head=h, batch=2 * r, matrix=A, mode=mode),
                          WriteEdit(layer=L, pos=f["pos"], head=h, batch=2 * r + 1, op="delete", mode=mode)]
            with model.options(write_mode=mode), model.edits(edits):
                logits = model.run_from_layer(state.select([ci] * (2 * len(group)))).float()
            for r, (a, f) in enumerate(group):
                t = f["pos"]
                clean = clean_all[t]
                lp = clean.double().log_softmax(-1)
                kls = [float((lp.exp() * (lp - logits[2 * r + k, t].double().log_softmax(-1))).sum())
                       for k in range(2)]
                d = logits[2 * r, t] - clean
                rr = res[a]
                rr["dsum"] = d.clone() if rr["dsum"] is None else rr["dsum"] + d
                rr["records"].append({"ctx": c, "pos": t, "act": f["act"], "kl_atom": kls[0], "kl_delete": kls[1],
                                      "win": kls[0] < kls[1], "top": _ranked(d, cfg.n_tokens, True),
                                      "bottom": _ranked(d, cfg.n_tokens, False)})
            bar.update(len(group))
    bar.close()
    out = {}
    for a in atoms:
        r = res[a]
        r["records"].sort(key=lambda x: -x["act"])
        n = len(r["records"])
        entry = {"records": r["records"], "n": n, "win": xstats.wilson(sum(x["win"] for x in r["records"]), n)}
        if n:
            mean = r["dsum"] / n
            entry["mean_dlogit_top"] = _ranked(mean, cfg.n_tokens, True)
            entry["mean_dlogit_bottom"] = _ranked(mean, cfg.n_tokens, False)
        out[a] = entry
    return out


def _query_bars(model, sae, tokens: Tensor, acc: AtomStats, atoms: list[int], cfg: DashboardConfig) -> dict:
    """``q_bar`` per atom over its kept top firings (``sum a_t q_t``), the read that signs its static value side."""
    out = {}
    U, _ = atom_factors(sae)
    need: dict[int, list[tuple[int, int, float]]] = {}
    for a in atoms:
        for f in acc.top(a):
            need.setdefault(f["ctx"], []).append((a, f["pos"], f["act"]))
    for c, items in need.items():
        q = encode_batch(model, sae, tokens[c:c + 1], U)["query"][0]
        for a, t, act in items:
            out[a] = out.get(a, torch.zeros(q.shape[-1])) + act * q[t]
    return out


def compute_dashboard(model, sae, tokens: Tensor, cfg: DashboardConfig | None = None,
                      progress: bool = True) -> DashboardData:
    """All dashboard numbers for ``sae`` on contexts ``tokens`` ``[N, T]`` (module docstring)."""
    cfg = cfg or DashboardConfig()
    sae = at_head(sae, cfg.head, model.cfg.n_heads)
    _check(model, sae, tokens, cfg.atoms)
    timings = {}
    t0 = time.time()
    acc = streaming_pass(model, sae, tokens, cfg, progress)
    timings["pass_s"] = time.time() - t0
    fired = (acc.fires > 0).nonzero().flatten().tolist()
    if cfg.max_pages is not None:  # the most frequent atoms (ties: lower index), and any atoms asked for
        order = sorted(fired, key=lambda a: (-int(acc.fires[a]), a))
        atoms = sorted(set(order[: cfg.max_pages]) | set(cfg.atoms or []))
    elif cfg.atoms is not None:
        atoms = sorted(set(cfg.atoms))
    else:
        atoms = fired
    live = [a for a in atoms if acc.fires[a] > 0]
    t1 = time.time()
    with torch.no_grad():
        qbars = _query_bars(model, sae, tokens, acc, live, cfg)
        static = static_value_sides(model, sae, qbars, live, cfg.n_tokens)
    value = value_sides(model, sae, tokens, acc, live, cfg)
    for a in live:
        value[a].update(static.get(a, {}))
    timings["value_side_s"] = time.time() - t1
    t2 = time.time()
    effect = measured_effects(model, sae, tokens, acc, live, cfg, progress)
    timings["effect_s"] = time.time() - t2
    info = {"layer": sae.cfg.layer, "head": sae.cfg.head, "shared_heads": isinstance(sae, _AtHead),
            "site": sae.cfg.site, "d_sae": sae.cfg.d_sae,
            "decoder_rank": sae.cfg.decoder_rank, "write_mode": sae.cfg.write_mode,
            "family": getattr(sae.cfg, "family", None), "d_k": sae.cfg.d_k, "d_v": sae.cfg.d_v}
    conf = asdict(cfg)
    return DashboardData(config=conf, sae_info=info, stats=acc, tokens=tokens, atoms=atoms, value=value,
                         effect=effect, timings=timings)


__all__ = ["DashboardConfig", "DashboardData", "atom_factors", "compute_dashboard", "encode_batch",
           "streaming_pass", "value_sides", "measured_effects"]

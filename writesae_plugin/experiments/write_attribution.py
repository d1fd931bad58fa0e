"""Write attribution (docs/method.md 6.4) and atom erasure.

* ``effective_attention``: the exact weight of write ``s`` in read ``t`` of a Gated DeltaNet head,
  ``A_eff[t, s] = beta_s c q^_t^T Phi(t, s) k^_s``, in parallel:
  ``A_eff = tril(Q K^T . Gamma) L^{-1} diag(beta)``, ``L = I + strict_tril(diag(beta) K K^T . Gamma)``,
  ``Gamma[t, s] = exp(G_t - G_s)``, ``G = cumsum(g)``; then ``o_t = sum_s A_eff[t, s] v_s`` exactly.
* ``layer_effective_attention``: the same per family, from a model and tokens: Gated DeltaNet and Kimi Delta
  Attention (the delta-rule form above; per-channel decays inside the inner products), or Mamba-2, its hybrids
  and xLSTM (scalar decay: ``A_eff = Gamma . (C B^T)``, value ``dt' x``; xLSTM: query and value as hooked).
* ``dictionary_scores``: the adjoint score of a whole dictionary, ``<A_i - W_s, G_s>_F`` with
  ``G_s = dm/dS_s`` from the reverse recurrence: the first-order change of a metric when the write at s is
  replaced by atom i, for every atom at once (``((U G_s) . W).sum(-1)`` for rank-1 atoms).
* ``run_erasure``: remove an atom's contribution ``a_i(t) A_i`` at its natural firings vs at matched
  non-firing positions of the same contexts; change in log-prob of the atom's preferred token (the token its
  value side promotes as the layer reads it: signed by ``q . u_i`` at its firings, ``preferred_token``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from ..adapters import WriteEdit, ops
from . import stats
from .closed_form import _out_proj
from .substitution import _site_and_writes, atom_matrix


def effective_attention(query_scaled: Tensor, key: Tensor, log_decay: Tensor, beta: Tensor) -> Tensor:
    """``A_eff`` ``[b, H, T, T]`` from the canonical hooks of one layer (``hook_query``, ``hook_write_key``,
    ``hook_log_decay``, ``hook_beta`` repeated per value head).

    With a per-channel ``log_decay`` ``[b, T, H, d_k]`` (Kimi Delta Attention) the same formula is exact with the
    decayed inner products ``(Q K^T . Gamma)[t, s] = q_t^T Diag(exp(G_t - G_s)) k_s`` (and likewise ``K K^T``):
    there ``S_t = Diag(alpha_t) S_{t-1} + k_t d_t^T`` with ``d = L^{-1} diag(beta) V``. This forms a
    ``[b, H, T, T, d_k]`` tensor (short contexts)."""
    q, k = query_scaled.float().transpose(1, 2), key.float().transpose(1, 2)  # [b, H, T, d_k]
    bt = beta.float().transpose(1, 2)
    T = q.shape[2]
    lower = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if log_decay.dim() == key.dim():  # per key channel
        G = log_decay.float().transpose(1, 2).cumsum(2)  # [b, H, T, d_k]
        diff = G[:, :, :, None, :] - G[:, :, None, :, :]  # [b, H, t, s, d_k]
        Gamma = torch.where(lower[..., None], diff, torch.full_like(diff, -torch.inf)).exp()
        KK = torch.einsum("bhtc,bhtsc,bhsc->bhts", k, Gamma, k)
        QKG = torch.einsum("bhtc,bhtsc,bhsc->bhts", q, Gamma, k)
    else:
        G = log_decay.float().transpose(1, 2).cumsum(-1)  # [b, H, T]
        diff = G[..., :, None] - G[..., None, :]
        Gamma = torch.where(lower, diff, torch.full_like(diff, -torch.inf)).exp()
        KK, QKG = (k @ k.transpose(-1, -2)) * Gamma, q @ k.transpose(-1, -2) * Gamma
    eye = torch.eye(T, device=q.device)
    Lmat = eye + (bt[..., :, None] * KK).tril(-1)
    QK = QKG.tril()
    # A_eff = QK L^{-1} diag(beta): solve X L = QK for X (L lower unitriangular)
    X = torch.linalg.solve_triangular(Lmat, QK, upper=False, left=False, unitriangular=True)
    return X * bt[..., None, :]


def mamba2_effective_attention(C: Tensor, B: Tensor, log_decay: Tensor) -> Tensor:
    """Mamba-2 (scalar decay per head): ``A_eff[t, s] = Gamma[t, s] (C_t . B_s)`` ``[b, H, T, T]``, so that
    ``y_t = sum_s A_eff[t, s] (dt'_s x_s)`` (the ``D x`` skip excluded). ``C``, ``B`` ``[b, T, H, d_state]``
    (groups already expanded to heads), ``log_decay`` ``[b, T, H]`` = ``dt'_t A_h``. The same holds for any
    transition without an erase; with a per-key-channel ``log_decay`` ``[b, T, H, d_k]`` (GLA) the inner products
    are decayed per channel, ``A_eff[t, s] = C_t^T Diag(exp(G_t - G_s)) B_s`` (a ``[b, H, T, T, d_k]`` tensor)."""
    c, k = C.float().transpose(1, 2), B.float().transpose(1, 2)
    T = c.shape[2]
    if log_decay.dim() == B.dim():  # per key channel
        G = log_decay.float().transpose(1, 2).cumsum(2)  # [b, H, T, d_k]
        diff = G[:, :, :, None, :] - G[:, :, None, :, :]
        lower = torch.ones(T, T, dtype=torch.bool, device=c.device).tril()
        Gamma = torch.where(lower[..., None], diff, torch.full_like(diff, -torch.inf)).exp()
        return torch.einsum("bhtc,bhtsc,bhsc->bhts", c, Gamma, k)
    G = log_decay.float().transpose(1, 2).cumsum(-1)
    diff = G[..., :, None] - G[..., None, :]
    lower = torch.ones(T, T, dtype=torch.bool, device=c.device).tril()
    Gamma = torch.where(lower, diff, torch.full_like(diff, -torch.inf)).exp()
    return (c @ k.transpose(-1, -2)) * Gamma


def _write_rule(model) -> str:
    """``"delta"`` (Gated DeltaNet, KDA, DeltaNet), ``"scalar_decay"`` (no erase: Mamba-2 and its hybrids,
    transformers or mamba-ssm, xLSTM, and GLA with its per-channel decay) or ``"dplr"`` (RWKV-7: diagonal plus
    rank-one transitions, ``adapters/rwkv7.py``)."""
    from ..adapters.gated_deltanet import GatedDeltaNetFamily
    from ..adapters.mamba2 import Mamba2FamilyBase

    if getattr(model.family, "write_rule", None) == "dplr":
        return "dplr"
    if isinstance(model.family, Mamba2FamilyBase) or getattr(model.family, "write_rule", None) == "scalar_decay":
        return "scalar_decay"  # (xLSTM too: C~ under a scalar decay, the normaliser folded into the query)
    if isinstance(model.family, GatedDeltaNetFamily):
        return "delta"
    raise ValueError(f"write attribution supports Gated DeltaNet, KDA, Mamba-2 and xLSTM layers; this model's "
                     f"family is {getattr(model.family, 'name', type(model.family).__name__)!r}")


def _attribution_hooks(model) -> tuple[str, ...]:
    base = ("hook_query", "hook_write_key", "hook_write_value", "hook_log_decay")
    extra = {"delta": ("hook_beta", "hook_v"), "dplr": ("hook_kk", "hook_a")}
    return base + extra.get(_write_rule(model), ())


def layer_effective_attention(model, tokens: Tensor | None, layer: int, cache=None) -> tuple[Tensor, Tensor]:
    """``(A_eff [b, H, T, T], value [b, T, H, d_v])`` of ``layer`` for the model's write family, so that the
    layer's read is exactly ``sum_s A_eff[:, h, t, s] value[:, s, h]`` (``write_contributions(A_eff, value)``).

    Gated DeltaNet: the delta-rule effective attention (``beta`` inside ``A_eff``) and the native ``v``.
    Mamba-2 (and hybrids): ``A_eff = Gamma . (C B^T)`` on the scalar-decay transitions and the write's
    value side ``dt' x`` (the ``D x`` skip is not a write and is not part of the read). ``cache``: an
    ``ActivationCache`` already holding the layer's hooks (else ``tokens`` are run, without gradients).
    """
    rule = _write_rule(model)
    p = model.hook_prefix(layer)
    if cache is None:
        if tokens is None:
            raise ValueError("layer_effective_attention needs tokens or a cache")
        names = [p + n for n in _attribution_hooks(model)]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=names)
    if rule == "delta":
        A = effective_attention(cache[p + "hook_query"], cache[p + "hook_write_key"], cache[p + "hook_log_decay"],
                                cache[p + "hook_beta"])
        return A, cache[p + "hook_v"]
    if rule == "dplr":  # RWKV-7: q_t^T Phi(t, s) k~_s through the DPLR transitions (exact), value v
        from ..adapters.rwkv7 import dplr_effective_attention

        A = dplr_effective_attention(cache[p + "hook_query"], cache[p + "hook_write_key"],
                                     cache[p + "hook_log_decay"], cache[p + "hook_kk"], cache[p + "hook_a"])
        return A, cache[p + "hook_write_value"]
    A = mamba2_effective_attention(cache[p + "hook_query"], cache[p + "hook_write_key"], cache[p + "hook_log_decay"])
    return A, cache[p + "hook_write_value"]


def write_contributions(A_eff: Tensor, value: Tensor) -> Tensor:
    """Per-write contributions to each read ``[b, H, T_read, T_write, d_v]`` (``value``: native v
    ``[b, T, H, d_v]``). Materialises ``T^2 d_v`` per head: for short contexts or a slice."""
    return A_eff[..., None] * value.float().transpose(1, 2)[:, :, None, :, :]


def read_gradient(model, tokens: Tensor, layer: int, metric) -> tuple[Tensor, dict]:
    """``dm/do`` ``[b, T, H, d_v]`` at the layer's read and the layer's canonical hooks (for the adjoint).

    The read is made a leaf by a torch forward hook placed before any TransformerLens hook, so hooks the
    caller attached to ``hook_read`` (and the metric) see the tensor whose gradient is taken.
    """
    p = model.hook_prefix(layer)
    names = [p + n for n in _attribution_hooks(model)]
    saved: dict = {}

    def make_leaf(module, inputs, output):
        saved["leaf"] = output.detach().requires_grad_(True)
        return saved["leaf"]

    handle = model.hook_dict[p + "hook_read"].register_forward_hook(make_leaf, prepend=True)
    try:
        with model.hooks(fwd_hooks=[(n, lambda x, hook: saved.setdefault(hook.name, x.detach())) for n in names]):
            with torch.enable_grad():
                m = metric(model(tokens))
                if m.dim() != 0:
                    raise ValueError("metric must return a scalar")
                (grad,) = torch.autograd.grad(m, saved["leaf"], allow_unused=True)
    finally:
        handle.remove()
    if grad is None:
        grad = torch.zeros_like(saved["leaf"])
    return grad, {n.rsplit(".", 1)[-1]: saved[n] for n in names}


def dictionary_scores(model, tokens: Tensor, sae, metric) -> Tensor:
    """First-order change of ``metric(logits)`` when the write of the SAE's (layer, head) at position s is
    replaced by atom i (raw mode): ``<A_i - W_s, G_s>``, returned ``[b, T, d_sae]``. Gated DeltaNet and
    Mamba-2 (whose reverse recurrence is ``G_s = exp(g_{s+1}) G_{s+1} + C_s (dm/dy_s)^T``)."""
    if sae.cfg.head is None:
        raise ValueError("dictionary_scores needs an SAE for one head (cfg.head is None)")
    h = sae.cfg.head
    grad, c = read_gradient(model, tokens, sae.cfg.layer, metric)
    if "hook_kk" in c:  # RWKV-7: the reverse recurrence through the DPLR transitions
        from ..adapters.rwkv7 import dplr_write_adjoint

        G = dplr_write_adjoint(c["hook_query"], c["hook_log_decay"], c["hook_kk"], c["hook_a"], grad)[:, :, h]
    else:  # Mamba-2's transition exp(g) I is the delta rule's with beta = 0: the same reverse recurrence, no erase
        beta = c["hook_beta"] if "hook_beta" in c else torch.zeros(c["hook_log_decay"].shape[:3])
        G = ops.write_adjoint(c["hook_query"], c["hook_write_key"], c["hook_log_decay"], beta, grad)[:, :, h]
    W_dot = torch.einsum("btk,btkv,btv->bt", c["hook_write_key"][:, :, h], G, c["hook_write_value"][:, :, h])
    if sae.cfg.decoder_rank is None:
        M = sae.dec_dense.detach().view(-1, sae.cfg.d_k, sae.cfg.d_v)
        A_dot = torch.einsum("btkv,nkv->btn", G, M)
    else:
        A_dot = torch.einsum("njk,btkv,njv->btn", sae.dec_key.detach(), G, sae.dec_value.detach())
    return A_dot - W_dot[..., None]


# ------------------------------------------------------------------------------------------ erasure
@dataclass
class ErasureConfig:
    atoms: list[int]
    max_per_atom: int = 50
    seed: int = 0


def head_queries(model, sae, tokens: Tensor) -> Tensor:
    """The queries that read the SAE's head, ``[N, T, d_k]`` fp32 (``hook_query`` of its layer and head: normalised
    and scaled exactly as the read uses them, so the head's read is ``o_t = S_t^T q_t``). One forward up to the
    layer, without gradients."""
    p = model.hook_prefix(sae.cfg.layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[p + "hook_query"], stop_at_layer=sae.cfg.layer + 1)
    return cache[p + "hook_query"][:, :, sae.cfg.head].float()


def atom_read(sae, atom: int, query: Tensor, codes: Tensor) -> dict:
    """How the layer reads atom ``atom`` on some data: ``q_bar = sum_t a_i(t) q_t`` over the positions where the
    atom is active (its firings, read at the same position by ``o_t = S_t^T q_t``, where ``S_t`` holds the atom
    with ``Phi(t, t) = I``), or ``sum_t q_t`` over every position when it never fires there.

    ``query`` ``[N, T, d_k]`` (``head_queries``), ``codes`` ``[N, T, d_sae]`` (the SAE's codes on the same
    tokens). Returns ``{"q_bar": [d_k], "read": [d_v] = A_i^T q_bar`` (the direction the atom adds to the read,
    up to the positive factor of how often it fires), ``"positions": "firings" | "all"``, ``"n": positions
    used``, and for rank-1 atoms ``"sign"`` (``sign(u_i . q_bar)``, +1 / -1 / 0) and ``"frac_negative"`` (the
    fraction of those positions with ``q_t . u_i < 0``)}."""
    a = codes[..., atom].float()
    fire = a != 0
    if bool(fire.any()):
        q, weights, where = query[fire], a[fire], "firings"
    else:
        q, weights, where = query.reshape(-1, query.shape[-1]), None, "all"
    q_bar = (weights[:, None] * q).sum(0) if weights is not None else q.sum(0)
    A = atom_matrix(sae, atom).float()
    out = {"q_bar": q_bar, "read": A.T @ q_bar, "positions": where, "n": int(q.shape[0])}
    if sae.cfg.decoder_rank == 1:
        u = sae.dec_key[atom, 0].detach().float()
        out["sign"] = int(torch.sign(u @ q_bar))
        out["frac_negative"] = float(((q @ u) < 0).float().mean()) if q.shape[0] else float("nan")
    return out


def direct_token_scores(model, sae, read: Tensor) -> Tensor:
    """``W_U^T W_O[:, head] read`` ``[vocab]``: the direct-path logit direction of a change ``read`` ``[d_v]`` of
    the head's read (the output norms' per-position gains are not included)."""
    dv, h = model.cfg.d_v, sae.cfg.head
    W_O = _out_proj(model.family.mixers[sae.cfg.layer], model.cfg.d_model, model.cfg.n_heads * dv).weight
    return model.W_U.float().T @ (W_O[:, h * dv:(h + 1) * dv].float() @ read.float())


def preferred_token(model, sae, atom: int, tokens: Tensor | None = None, *, query: Tensor | None = None,
                    codes: Tensor | None = None) -> int:
    """The token atom ``atom`` promotes through the direct path as the layer actually reads it:
    ``argmax W_U^T W_O[:, head] A_i^T q_bar`` with ``q_bar`` from ``atom_read`` (for a rank-1 atom
    ``A_i = u_i w_i^T`` this is ``argmax sign(u_i . q_bar) W_U^T W_O w_i``: a value side read with ``q . u < 0``
    promotes the tokens ``W_U W_O w_i`` ranks last).

    Give ``tokens`` ``[N, T]`` (the queries and codes are then computed) or both ``query`` ``[N, T, d_k]`` and
    ``codes`` ``[N, T, d_sae]``. Raises ``ValueError`` without either, or for an atom out of range."""
    if not 0 <= atom < sae.cfg.d_sae:
        raise ValueError(f"atom {atom} out of range for d_sae={sae.cfg.d_sae}")
    if query is None or codes is None:
        if tokens is None:
            raise ValueError("preferred_token needs tokens (or query and codes): the sign of an atom's read is "
                             "measured on data")
        query = head_queries(model, sae, tokens) if query is None else query
        codes = _site_and_writes(model, sae, tokens, sae.cfg.write_mode)[0] if codes is None else codes
    return int(direct_token_scores(model, sae, atom_read(sae, atom, query, codes)["read"]).argmax())


@torch.no_grad()
def run_erasure(model, sae, tokens: Tensor, cfg: ErasureConfig) -> dict:
    """Remove ``a_i(t) A_i`` at firings of atom i and, as a control, the same matrix at a matched position of
    the same context where atom i is inactive; record the change of the log-prob of the atom's preferred
    token at that position's prediction. Paired Wilcoxon on (firing, control)."""
    codes, _, _ = _site_and_writes(model, sae, tokens, sae.cfg.write_mode)
    query = head_queries(model, sae, tokens)
    clean = model(tokens).float().log_softmax(-1)
    rng = np.random.default_rng(cfg.seed)
    records = []
    for atom in cfg.atoms:
        tok = preferred_token(model, sae, atom, query=query, codes=codes)
        A = atom_matrix(sae, atom)
        fires = (codes[:, :, atom] > 0).nonzero().tolist()
        rng.shuffle(fires)
        for c, t in fires[: cfg.max_per_atom]:
            quiet = (codes[c, :, atom] == 0).nonzero().flatten().tolist()
            if not quiet:
                continue
            ctrl = min(quiet, key=lambda s: (abs(s - t), s))
            a = float(codes[c, t, atom])
            deltas = []
            for pos in (t, ctrl):
                e = WriteEdit(layer=sae.cfg.layer, pos=pos, head=sae.cfg.head, op="add", matrix=-a * A)
                lp = model.run_with_edits(tokens[c:c + 1], [e])[0].float().log_softmax(-1)
                deltas.append(float(lp[pos, tok] - clean[c, pos, tok]))
            records.append({"atom": atom, "token": tok, "context": c, "pos": t, "control_pos": ctrl, "act": a,
                            "delta_logprob_firing": deltas[0], "delta_logprob_control": deltas[1]})
    summary = {"n": len(records), "config": asdict(cfg)}
    if records:
        f = [r["delta_logprob_firing"] for r in records]
        q = [r["delta_logprob_control"] for r in records]
        summary.update(mean_delta_firing=float(np.mean(f)), mean_delta_control=float(np.mean(q)),
                       wilcoxon_firing_vs_control=stats.paired_wilcoxon(f, q),
                       firing_drop_larger=stats.wilson(sum(a < b for a, b in zip(f, q)), len(f)))
    return {"records": records, "summary": summary}

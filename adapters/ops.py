"""Exact in-layer edit propagation with the model's own gated-delta-rule kernel.

Every function here works in the canonical key-first frame, fp32, per value head, and calls a kernel with
the HF / fla signature ``kernel(q, k, v, g=, beta=, initial_state=, output_final_state=,
use_qk_l2norm_in_kernel=False) -> (o [b,T,H,d_v], S_T [b,H,d_k,d_v])`` where the kernel multiplies ``q`` by
``d_k**-0.5`` itself. ``q`` below is always the *unscaled* normalised query the kernel expects.

The zero-value (suffix) trick (docs/method.md section 4): a change ``D`` of the state right after position s
propagates as ``Phi(t, s) D`` because transitions never depend on the state. Running the kernel on the
suffix ``s+1..T-1`` with ``initial_state = D``, every value zeroed and the original keys, gates and betas
gives exactly ``Delta o_t`` and ``Delta S_T``. Many (row, position) perturbations are batched as rows of one
kernel call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Perturbations:
    """State perturbations to propagate, one per row: ``D[r]`` is added to the state of batch row
    ``batch[r]`` right after position ``pos[r]`` (all value heads at once)."""

    batch: Tensor  # [R] long
    pos: Tensor  # [R] long (local position in this call)
    delta_state: Tensor  # [R, H, d_k, d_v] fp32


@dataclass
class Propagated:
    """Effect of :class:`Perturbations` on the layer's read and final state, summed per batch row."""

    delta_read: Tensor  # [b, T, H, d_v] fp32
    delta_final: Tensor  # [b, H, d_k, d_v] fp32
    suffix_read: Tensor | None  # [R, L, H, d_v]: per-row Delta o at positions pos+1.. (row-aligned)


def kernel_canonical(kernel, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                     initial_state: Tensor | None, output_final_state: bool = True):
    """Call the gated-delta-rule kernel on canonical fp32 inputs (q, k already normalised)."""
    return kernel(q, k, v, g=g, beta=beta, initial_state=initial_state,
                  output_final_state=output_final_state, use_qk_l2norm_in_kernel=False)


def _suffix_index(pos: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """Indices ``pos[r] + 1 + j`` (clamped) and their validity, ``j < T - 1 - min(pos)``."""
    L = int(T - 1 - pos.min().item()) if pos.numel() else 0
    j = torch.arange(max(L, 0), device=pos.device)
    idx = pos[:, None] + 1 + j[None, :]
    valid = idx < T
    return idx.clamp(max=T - 1), valid


def propagate(kernel, pert: Perturbations, q: Tensor, query_scaled: Tensor, k: Tensor, g: Tensor,
              beta: Tensor) -> Propagated:
    """Exact ``Delta o`` and ``Delta S_T`` caused by state perturbations, with one kernel call.

    Args:
        q: ``[b, T, H, d_k]`` normalised unscaled query (what the kernel reads).
        query_scaled: ``[b, T, H, d_k]`` the read's query ``c * q`` (used at the perturbed position itself).
        k, g, beta: ``[b, T, H, d_k]``, ``[b, T, H]``, ``[b, T, H]`` transition inputs. Positions whose
            transition is replaced by ``alpha I`` (delta-mode edits) must already have ``beta = 0``.
    """
    b, T, H, d_k = k.shape
    d_v = pert.delta_state.shape[-1]
    R = pert.batch.numel()
    delta_read = torch.zeros(b * T, H, d_v, dtype=torch.float32, device=k.device)
    delta_final = torch.zeros(b, H, d_k, d_v, dtype=torch.float32, device=k.device)
    if R == 0:
        return Propagated(delta_read.view(b, T, H, d_v), delta_final, None)
    D = pert.delta_state.float()
    # the perturbed position reads the perturbation directly: Delta o_s = D^T (c q_s)
    here = torch.einsum("rhkv,rhk->rhv", D, query_scaled[pert.batch, pert.pos].float())
    delta_read = delta_read.index_add(0, pert.batch * T + pert.pos, here)
    idx, valid = _suffix_index(pert.pos, T)
    suffix_read = None
    if idx.shape[1] == 0:
        final = D
    else:
        rows = pert.batch[:, None]
        m = valid.float()
        q_s = q[rows, idx].float() * m[..., None, None]
        k_s = k[rows, idx].float() * m[..., None, None]
        g_s = g[rows, idx].float() * m[..., None]
        b_s = beta[rows, idx].float() * m[..., None]
        v_s = torch.zeros(R, idx.shape[1], H, d_v, dtype=torch.float32, device=k.device)
        suffix_read, final = kernel_canonical(kernel, q_s, k_s, v_s, g_s, b_s, D, True)
        suffix_read = suffix_read.float()
        flat = (rows * T + idx)[valid]
        delta_read = delta_read.index_add(0, flat, suffix_read[valid])
    delta_final = delta_final.index_add(0, pert.batch, final.float())
    return Propagated(delta_read.view(b, T, H, d_v), delta_final, suffix_read)


def previous_reads(kernel, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                   initial_state: Tensor | None) -> Tensor:
    """``alpha_t S_{t-1}^T k_t`` for every t, with one kernel call (shifted-query trick).

    The kernel's read at t with query ``alpha_{t+1} k_{t+1}`` is ``alpha_{t+1} S_t^T k_{t+1}``; position 0
    reads the initial state directly. Returns ``[b, T, H, d_v]`` fp32.
    """
    b, T, H, d_k = k.shape
    alpha = g.float().exp()
    out = torch.zeros(b, T, H, v.shape[-1], dtype=torch.float32, device=k.device)
    if initial_state is not None:
        out[:, 0] = alpha[:, 0, :, None] * torch.einsum("bhkv,bhk->bhv", initial_state.float(), k[:, 0].float())
    if T > 1:
        q_shift = torch.zeros_like(k, dtype=torch.float32)
        q_shift[:, :-1] = (alpha[:, 1:, :, None] * k[:, 1:].float()) * (d_k ** 0.5)
        o, _ = kernel_canonical(kernel, q_shift, k.float(), v.float(), g.float(), beta.float(),
                                None if initial_state is None else initial_state.float(), False)
        out[:, 1:] = o[:, :-1].float()
    return out


def states_at(kernel, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
              upto: int) -> Tensor:
    """All states ``S_t`` for ``t < upto`` with one kernel call (basis-query trick).

    Each value head is replicated ``d_k`` times with query ``sqrt(d_k) e_j``; the kernel's read is then row
    j of ``S_t``. Returns ``[b, upto, H, d_k, d_v]`` fp32. Costs ``d_k`` kernel rows: opt-in only.
    """
    b, T, H, d_k = k.shape
    d_v = v.shape[-1]
    k, v, g, beta = (x[:, :upto].float() for x in (k, v, g, beta))
    rep = lambda x: x.repeat_interleave(d_k, dim=2)  # noqa: E731  [b,t,H*d_k,...]
    eye = torch.eye(d_k, dtype=torch.float32, device=k.device) * (d_k ** 0.5)
    q = eye.repeat(H, 1)[None, None].expand(b, upto, H * d_k, d_k).contiguous()
    init = None
    if initial_state is not None:
        init = initial_state.float().repeat_interleave(d_k, dim=1)
    o, _ = kernel_canonical(kernel, q, rep(k), rep(v), rep(g), rep(beta), init, False)
    return o.float().view(b, upto, H, d_k, d_v)


def propagated_states(kernel, pert: Perturbations, k: Tensor, g: Tensor, beta: Tensor,
                      positions: Tensor, b: int) -> Tensor:
    """``Delta S_t`` at the chosen local ``positions`` ``[P]`` caused by ``pert``, summed per batch row.

    Returns ``[b, P, H, d_k, d_v]`` fp32 (zero where ``t < pos``). Uses :func:`states_at` on the
    suffix-aligned rows, so it costs ``d_k`` kernel rows per perturbation.
    """
    _, T, H, d_k = k.shape
    d_v = pert.delta_state.shape[-1]
    out = torch.zeros(b, positions.numel(), H, d_k, d_v, dtype=torch.float32, device=k.device)
    R = pert.batch.numel()
    if R == 0:
        return out
    D = pert.delta_state.float()
    idx, valid = _suffix_index(pert.pos, T)
    suffix_states = None
    if idx.shape[1] > 0:
        rows = pert.batch[:, None]
        m = valid.float()
        k_s = k[rows, idx].float() * m[..., None, None]
        g_s = g[rows, idx].float() * m[..., None]
        b_s = beta[rows, idx].float() * m[..., None]
        v_s = torch.zeros(R, idx.shape[1], H, d_v, dtype=torch.float32, device=k.device)
        suffix_states = states_at(kernel, k_s, v_s, g_s, b_s, D, idx.shape[1])
    for r in range(R):
        s = int(pert.pos[r])
        for i, p in enumerate(positions.tolist()):
            if p == s:
                out[pert.batch[r], i] += D[r]
            elif p > s:
                out[pert.batch[r], i] += suffix_states[r, p - s - 1]
    return out


def write_adjoint(query_scaled: Tensor, k: Tensor, g: Tensor, beta: Tensor, grad_read: Tensor) -> Tensor:
    """``G_s = dL/dS_s`` for every s from ``grad_read = dL/do`` (docs/method.md 6.4), by the reverse recurrence
    ``G_s = T_{s+1}^T G_{s+1} + (c q_s) (dL/do_s)^T`` (``T`` is symmetric for the delta rule).

    Returns ``[b, T, H, d_k, d_v]`` fp32: the gradient of a state change (or extra write) at each position.
    A per-token loop (only in backward passes through differentiable dense edits).
    """
    b, T, H, d_k = k.shape
    alpha = g.float().exp()
    G = torch.zeros(b, H, d_k, grad_read.shape[-1], dtype=torch.float32, device=k.device)
    out = torch.empty(b, T, H, d_k, grad_read.shape[-1], dtype=torch.float32, device=k.device)
    for s in range(T - 1, -1, -1):
        if s < T - 1:
            kk, bt = k[:, s + 1].float(), beta[:, s + 1].float()
            proj = torch.einsum("bhk,bhkv->bhv", kk, G)
            G = alpha[:, s + 1, :, None, None] * (G - bt[:, :, None, None] * kk[..., None] * proj[:, :, None, :])
        G = G + query_scaled[:, s].float()[..., None] * grad_read[:, s].float()[:, :, None, :]
        out[:, s] = G
    return out


class DensePerturbationPath(torch.autograd.Function):
    """``Delta o`` and ``Delta S_T`` of dense state changes ``D [b, T, H, d_k, d_v]`` (zero where nothing
    changed). Forward: exact, with the kernel on the changed rows only. Backward: ``dL/dD_s = G_s`` by
    :func:`write_adjoint`; the transitions are treated as constants on this path."""

    @staticmethod
    def forward(ctx, D, kernel, q, query_scaled, k, g, beta):
        b, T, H = D.shape[:3]
        changed = (D != 0).any(-1).any(-1).any(-1)  # [b, T]
        rows = changed.nonzero()
        pert = Perturbations(rows[:, 0], rows[:, 1], D[rows[:, 0], rows[:, 1]])
        res = propagate(kernel, pert, q, query_scaled, k, g, beta)
        ctx.save_for_backward(query_scaled, k, g, beta)
        ctx.mark_non_differentiable(res.delta_final)
        return res.delta_read, res.delta_final

    @staticmethod
    def backward(ctx, grad_read, grad_final):
        query_scaled, k, g, beta = ctx.saved_tensors
        return write_adjoint(query_scaled, k, g, beta, grad_read), None, None, None, None, None, None

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

Decays: ``g`` is ``[b, T, H]`` (one log decay per head and token: Gated DeltaNet, ``S_t = alpha_t (I - beta_t
k_t k_t^T) S_{t-1} + ...``) or ``[b, T, H, d_k]`` (one per key channel: Kimi Delta Attention, ``S_t = (I - beta_t
k_t k_t^T) Diag(alpha_t) S_{t-1} + ...``, the decay first, then the erase). Every function takes either; the
per-head code path is unchanged by the per-channel one (:func:`per_channel`).
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


def per_channel(g: Tensor, k: Tensor) -> bool:
    """Whether the log decay ``g`` has one entry per key channel (``[b, T, H, d_k]``, as ``k``) rather than one per
    head (``[b, T, H]``)."""
    return g.dim() == k.dim()


def _mask(m: Tensor, x: Tensor) -> Tensor:
    """``m [R, L]`` shaped to broadcast over ``x [R, L, ...]``."""
    return m.reshape(*m.shape, *([1] * (x.dim() - 2)))


def _decay_step(X: Tensor, alpha_t: Tensor, col_t: Tensor, row_t: Tensor, beta_t: Tensor) -> Tensor:
    """One per-channel transition ``(I - beta k k^T) Diag(alpha) X`` on ``X [b, H, d_k, d_v]`` (``alpha_t``
    ``[b, H, d_k, 1]``, ``col_t`` ``[b, H, d_k, 1]``, ``row_t`` ``[b, H, 1, d_k]``, ``beta_t`` ``[b, H, 1, 1]``)."""
    Y = alpha_t * X
    return torch.addcmul(Y, col_t, -beta_t * (row_t @ Y))


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
              beta: Tensor, method: str = "auto") -> Propagated:
    """Exact ``Delta o`` and ``Delta S_T`` caused by state perturbations.

    Args:
        q: ``[b, T, H, d_k]`` normalised unscaled query (what the kernel reads).
        query_scaled: ``[b, T, H, d_k]`` the read's query ``c * q`` (used at the perturbed position itself).
        k, g, beta: ``[b, T, H, d_k]``, ``[b, T, H]``, ``[b, T, H]`` transition inputs. Positions whose
            transition is replaced by ``alpha I`` (delta-mode edits) must already have ``beta = 0``.
        method: ``"kernel"``: one call of the model's kernel on the suffix of every perturbation row
            (``R`` rows of up to ``T`` tokens; ``suffix_read`` is filled); ``"scan"``
            (:func:`propagate_scan`): the per-token recurrence over all rows at once (``b`` rows whatever ``R``:
            the dense case, e.g. an SAE spliced at every position, is ``O(T)`` instead of ``O(T^2)``);
            ``"auto"``: the scan when there are more perturbations than batch rows, else the kernel. The
            readable oracle of both is :func:`adapters.reference.gated_deltanet_reference` (``extra_writes``).
    """
    if method == "auto":
        method = "scan" if pert.batch.numel() > k.shape[0] else "kernel"
    if method == "scan":
        return propagate_scan(pert, query_scaled, k, g, beta)
    if method != "kernel":
        raise ValueError(f"method must be 'auto', 'scan' or 'kernel', got {method!r}")
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
        g_s = g[rows, idx].float()
        g_s = g_s * _mask(m, g_s)
        b_s = beta[rows, idx].float() * m[..., None]
        v_s = torch.zeros(R, idx.shape[1], H, d_v, dtype=torch.float32, device=k.device)
        suffix_read, final = kernel_canonical(kernel, q_s, k_s, v_s, g_s, b_s, D, True)
        suffix_read = suffix_read.float()
        flat = (rows * T + idx)[valid]
        delta_read = delta_read.index_add(0, flat, suffix_read[valid])
    delta_final = delta_final.index_add(0, pert.batch, final.float())
    return Propagated(delta_read.view(b, T, H, d_v), delta_final, suffix_read)


def propagate_scan(pert: Perturbations, query_scaled: Tensor, k: Tensor, g: Tensor, beta: Tensor) -> Propagated:
    """:func:`propagate` by the per-token recurrence ``X_t = alpha_t (X_{t-1} - beta_t k_t (k_t^T X_{t-1})) +
    sum_{r: pos_r = t} D_r``, ``Delta o_t = X_t^T (c q_t)`` from the first perturbed position on (exact zeros
    before it and in rows with nothing perturbed yet). ``suffix_read`` is None (the rows are summed)."""
    b, T, H, d_k = k.shape
    d_v = pert.delta_state.shape[-1]
    R = pert.batch.numel()
    delta_read = torch.zeros(b, T, H, d_v, dtype=torch.float32, device=k.device)
    zero = torch.zeros(b, H, d_k, d_v, dtype=torch.float32, device=k.device)
    if R == 0:
        return Propagated(delta_read, zero, None)
    D = pert.delta_state.float()
    by_pos: dict[int, list[int]] = {}
    for r, p in enumerate(pert.pos.tolist()):
        by_pos.setdefault(p, []).append(r)
    t0 = min(by_pos)
    col, row = _key_columns(k, T)
    vec = per_channel(g, k)
    alpha = g.float().exp()[..., None] if vec else g.float().exp()[..., None, None]
    bt = beta.float()[..., None, None]
    neg_ab = -bt * alpha
    qs = query_scaled.float()[..., None, :]  # [b, T, H, 1, d_k]
    X, reads = zero, []
    for t in range(t0, T):
        if t > t0 and vec:
            X = _decay_step(X, alpha[:, t], col[:, t], row[:, t], bt[:, t])
        elif t > t0:
            X = torch.addcmul(alpha[:, t] * X, col[:, t], neg_ab[:, t] * (row[:, t] @ X))
        if t in by_pos:
            r = torch.tensor(by_pos[t], dtype=torch.long, device=k.device)
            X = X.index_add(0, pert.batch[r], D[r])
        reads.append((qs[:, t] @ X)[..., 0, :])
    delta_read = torch.cat([delta_read[:, :t0], torch.stack(reads, 1)], 1)
    return Propagated(delta_read, X, None)


def previous_reads(kernel, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                   initial_state: Tensor | None) -> Tensor:
    """``alpha_t S_{t-1}^T k_t`` for every t, with one kernel call (shifted-query trick); for per-channel decays
    ``(Diag(alpha_t) S_{t-1})^T k_t = S_{t-1}^T (alpha_t * k_t)``.

    The kernel's read at t with query ``alpha_{t+1} k_{t+1}`` is ``alpha_{t+1} S_t^T k_{t+1}``; position 0
    reads the initial state directly. Returns ``[b, T, H, d_v]`` fp32.
    """
    b, T, H, d_k = k.shape
    vec = per_channel(g, k)
    alpha = g.float().exp()
    out = torch.zeros(b, T, H, v.shape[-1], dtype=torch.float32, device=k.device)
    if initial_state is not None and vec:
        out[:, 0] = torch.einsum("bhkv,bhk->bhv", initial_state.float(), alpha[:, 0] * k[:, 0].float())
    elif initial_state is not None:
        out[:, 0] = alpha[:, 0, :, None] * torch.einsum("bhkv,bhk->bhv", initial_state.float(), k[:, 0].float())
    if T > 1:
        q_shift = torch.zeros_like(k, dtype=torch.float32)
        a_next = alpha[:, 1:] if vec else alpha[:, 1:, :, None]
        q_shift[:, :-1] = (a_next * k[:, 1:].float()) * (d_k ** 0.5)
        o, _ = kernel_canonical(kernel, q_shift, k.float(), v.float(), g.float(), beta.float(),
                                None if initial_state is None else initial_state.float(), False)
        out[:, 1:] = o[:, :-1].float()
    return out


def states_at(kernel, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
              upto: int, method: str = "auto", positions: Tensor | None = None) -> Tensor:
    """The states ``S_t`` for ``t < upto`` (or only at local ``positions [P]``, each ``< upto``).

    Returns ``[b, upto, H, d_k, d_v]`` (or ``[b, P, H, d_k, d_v]``) fp32, differentiable. Two exact paths (the
    readable oracle is :func:`adapters.reference.gated_deltanet_reference` with ``return_states=True``):
    ``"scan"`` (:func:`states_scan`, what ``"auto"`` takes): the per-token recurrence, vectorised over batch
    rows and heads; ``"kernel"`` (:func:`states_at_kernel`): one call of the model's kernel with ``d_k``
    rows per value head (basis-query trick), 3-45x slower on CPU (benchmarks/RESULTS.md).
    """
    if method in ("auto", "scan"):
        return states_scan(k, v, g, beta, initial_state, upto, positions)
    if method == "kernel":
        out = states_at_kernel(kernel, k, v, g, beta, initial_state, upto)
        return out if positions is None else out[:, positions]
    raise ValueError(f"method must be 'auto', 'scan' or 'kernel', got {method!r}")


def states_scan(k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None, upto: int,
                positions: Tensor | None = None) -> Tensor:
    """:func:`states_at` by ``S_t = alpha_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T``, one step
    per token (``O(upto * b * H * d_k * d_v)``); only the wanted states are kept."""
    b, T, H, d_k = k.shape
    d_v = v.shape[-1]
    wanted = list(range(upto)) if positions is None else [int(p) for p in positions.tolist()]
    if any(not 0 <= p < upto for p in wanted):
        raise ValueError(f"positions {wanted} out of range for {upto} states")
    slots: dict[int, list[int]] = {}
    for i, p in enumerate(wanted):
        slots.setdefault(p, []).append(i)
    S = (torch.zeros(b, H, d_k, d_v, dtype=torch.float32, device=k.device) if initial_state is None
         else initial_state.float())
    found: list[Tensor | None] = [None] * len(wanted)
    steps = max(wanted, default=-1) + 1
    # per step: S <- alpha S + k (beta (v - alpha S^T k))^T (the same update, six small ops)
    col, row = _key_columns(k, steps)
    vec = per_channel(g, k)
    alpha, bt = g[:, :steps].float().exp()[..., None, None], beta[:, :steps].float()[..., None, None]
    if vec:
        alpha = g[:, :steps].float().exp()[..., None]  # [b, t, H, d_k, 1]
    bv, ba = bt * v[:, :steps].float()[:, :, :, None, :], bt * alpha  # [b, t, H, 1, d_v], [b, t, H, 1, 1]
    for t in range(steps):
        if vec:  # A = Diag(alpha) S; S <- A + k (beta (v - A^T k))^T
            A = alpha[:, t] * S
            S = torch.addcmul(A, col[:, t], bv[:, t] - bt[:, t] * (row[:, t] @ A))
        else:
            S = torch.addcmul(alpha[:, t] * S, col[:, t], bv[:, t] - ba[:, t] * (row[:, t] @ S))
        for i in slots.get(t, ()):
            found[i] = S
    if not found:
        return torch.zeros(b, 0, H, d_k, d_v, dtype=torch.float32, device=k.device)
    return torch.stack(found, 1)


def _key_columns(k: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """The transition keys of the first ``steps`` tokens as columns ``[b, t, H, d_k, 1]`` and rows
    ``[b, t, H, 1, d_k]`` (fp32), for the per-token scans."""
    kf = k[:, :steps].float()
    return kf[..., :, None], kf[..., None, :]


def states_at_kernel(kernel, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
                     upto: int) -> Tensor:
    """All states ``S_t`` for ``t < upto`` with one kernel call (basis-query trick).

    Each value head is replicated ``d_k`` times with query ``sqrt(d_k) e_j``; the kernel's read is then row
    j of ``S_t``. Returns ``[b, upto, H, d_k, d_v]`` fp32. Costs ``d_k`` kernel rows per value head.
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
                      positions: Tensor, b: int, method: str = "auto") -> Tensor:
    """``Delta S_t`` at the chosen local ``positions`` ``[P]`` caused by ``pert``, summed per batch row.

    Returns ``[b, P, H, d_k, d_v]`` fp32 (zero where ``t < pos``); differentiable in ``pert.delta_state`` and
    the transitions. Two exact paths (the readable oracle is :func:`adapters.reference.propagated_states_reference`,
    a per-(row, token, head) loop):

    * ``"scan"`` (:func:`propagated_states_scan`): the per-token recurrence
      ``X_t = alpha_t (I - beta_t k_t k_t^T) X_{t-1} + sum_{r: pos_r = t} D_r``, vectorised over batch rows and
      heads; its cost does not depend on the number of perturbations (the dense case: every (row, position)
      perturbed, e.g. a state SAE spliced under autograd);
    * ``"kernel"`` (:func:`propagated_states_kernel`): the model's kernel on the suffix of every perturbation
      row with the basis-query trick (``d_k`` kernel rows per perturbation); cheaper for a few perturbations
      in long sequences.

    ``"auto"`` takes the scan unless there are at most as many perturbations as batch rows and the scan would
    run more than :data:`SCAN_MAX_STEPS_SPARSE` steps.
    """
    if method == "auto":
        R = pert.batch.numel()
        steps = int(positions.max()) - int(pert.pos.min()) + 1 if R and positions.numel() else 0
        method = "kernel" if R <= b and steps > SCAN_MAX_STEPS_SPARSE else "scan"
    if method == "scan":
        return propagated_states_scan(pert, k, g, beta, positions, b)
    if method == "kernel":
        return propagated_states_kernel(kernel, pert, k, g, beta, positions, b)
    raise ValueError(f"method must be 'auto', 'scan' or 'kernel', got {method!r}")


SCAN_MAX_STEPS_SPARSE = 128  # "auto": with at most one perturbation per batch row, longer spans use the kernel


def propagated_states_scan(pert: Perturbations, k: Tensor, g: Tensor, beta: Tensor, positions: Tensor,
                           b: int) -> Tensor:
    """:func:`propagated_states` by the per-token recurrence over ``min(pos) .. max(positions)``, vectorised
    over batch rows and heads (``O(steps * b * H * d_k * d_v)``, whatever the number of perturbations)."""
    _, T, H, d_k = k.shape
    d_v = pert.delta_state.shape[-1]
    P = positions.numel()
    R = pert.batch.numel()
    if R == 0 or P == 0:
        return torch.zeros(b, P, H, d_k, d_v, dtype=torch.float32, device=k.device)
    D = pert.delta_state.float()
    pos_list = pert.pos.tolist()
    wanted = positions.tolist()
    t0, t1 = min(pos_list), max(wanted)
    # perturbations grouped by position, in their row order (the sum per (batch row, position) is index_add's)
    by_pos: dict[int, list[int]] = {}
    for r, s in enumerate(pos_list):
        by_pos.setdefault(s, []).append(r)
    # the outputs are the states at the wanted positions (zero before the first perturbation)
    slots = {}
    for i, p in enumerate(wanted):
        slots.setdefault(p, []).append(i)
    zero = torch.zeros(b, H, d_k, d_v, dtype=torch.float32, device=k.device)
    found: list[Tensor | None] = [None] * P
    X = None
    col, row = _key_columns(k, t1 + 1)
    vec = per_channel(g, k)
    alpha = g[:, :t1 + 1].float().exp()[..., None] if vec else g[:, :t1 + 1].float().exp()[..., None, None]
    bt = beta[:, :t1 + 1].float()[..., None, None]
    neg_ab = -bt * alpha
    for t in range(t0, t1 + 1):
        if X is not None and vec:
            X = _decay_step(X, alpha[:, t], col[:, t], row[:, t], bt[:, t])
        elif X is not None:  # the transition at t (never depends on the state): alpha_t (X - beta_t k_t (k_t^T X))
            X = torch.addcmul(alpha[:, t] * X, col[:, t], neg_ab[:, t] * (row[:, t] @ X))
        if t in by_pos:
            r = torch.tensor(by_pos[t], dtype=torch.long, device=k.device)
            X = (zero if X is None else X).index_add(0, pert.batch[r], D[r])
        for i in slots.get(t, ()):
            found[i] = zero if X is None else X
    return torch.stack([zero if f is None else f for f in found], 1)


def propagated_states_kernel(kernel, pert: Perturbations, k: Tensor, g: Tensor, beta: Tensor,
                             positions: Tensor, b: int) -> Tensor:
    """:func:`propagated_states` with :func:`states_at_kernel` on the suffix-aligned perturbation rows (``d_k``
    kernel rows per perturbation), assembled by one gather and one ``index_add`` (bit-identical to
    accumulating row by row, :func:`_propagated_states_kernel_loop`, in the same order)."""
    _, T, H, d_k = k.shape
    d_v = pert.delta_state.shape[-1]
    P = positions.numel()
    out = torch.zeros(b * P, H, d_k, d_v, dtype=torch.float32, device=k.device)
    R = pert.batch.numel()
    if R == 0 or P == 0:
        return out.view(b, P, H, d_k, d_v)
    D = pert.delta_state.float()
    src = D[:, None]  # src[r, j]: Delta S at pos_r + j (j = 0: the perturbation itself)
    suffix = _suffix_states(kernel, pert, k, g, beta)
    if suffix is not None:
        src = torch.cat([src, suffix], 1)
    lag = positions[None, :] - pert.pos[:, None]  # [R, P]
    r, i = (lag >= 0).nonzero(as_tuple=True)  # row-major: r outer, i inner, as the row-by-row loop
    if r.numel():
        out = out.index_add(0, pert.batch[r] * P + i, src[r, lag[r, i]])
    return out.view(b, P, H, d_k, d_v)


def _suffix_states(kernel, pert: Perturbations, k: Tensor, g: Tensor, beta: Tensor) -> Tensor | None:
    """``[R, L, H, d_k, d_v]``: ``Delta S`` at ``pos_r + 1 + j`` of each perturbation alone (None if L = 0)."""
    _, T, H, d_k = k.shape
    d_v = pert.delta_state.shape[-1]
    idx, valid = _suffix_index(pert.pos, T)
    if idx.shape[1] == 0:
        return None
    R = pert.batch.numel()
    rows = pert.batch[:, None]
    m = valid.float()
    k_s = k[rows, idx].float() * m[..., None, None]
    g_s = g[rows, idx].float()
    g_s = g_s * _mask(m, g_s)
    b_s = beta[rows, idx].float() * m[..., None]
    v_s = torch.zeros(R, idx.shape[1], H, d_v, dtype=torch.float32, device=k.device)
    return states_at_kernel(kernel, k_s, v_s, g_s, b_s, pert.delta_state.float(), idx.shape[1])


def _propagated_states_kernel_loop(kernel, pert: Perturbations, k: Tensor, g: Tensor, beta: Tensor,
                                   positions: Tensor, b: int) -> Tensor:
    """The readable form of :func:`propagated_states_kernel`'s assembly (a Python loop of slice adds; slow
    under autograd, each add's backward allocating the whole block): kept for its parity test."""
    _, T, H, d_k = k.shape
    d_v = pert.delta_state.shape[-1]
    out = torch.zeros(b, positions.numel(), H, d_k, d_v, dtype=torch.float32, device=k.device)
    if pert.batch.numel() == 0:
        return out
    D = pert.delta_state.float()
    suffix = _suffix_states(kernel, pert, k, g, beta)
    for r in range(pert.batch.numel()):
        s = int(pert.pos[r])
        for i, p in enumerate(positions.tolist()):
            if p == s:
                out[pert.batch[r], i] += D[r]
            elif p > s:
                out[pert.batch[r], i] += suffix[r, p - s - 1]
    return out


def write_adjoint(query_scaled: Tensor, k: Tensor, g: Tensor, beta: Tensor, grad_read: Tensor) -> Tensor:
    """``G_s = dL/dS_s`` for every s from ``grad_read = dL/do`` (docs/method.md 6.4), by the reverse recurrence
    ``G_s = T_{s+1}^T G_{s+1} + (c q_s) (dL/do_s)^T`` (``T`` is symmetric for the delta rule with a per-head
    decay; with a per-channel decay ``T^T = Diag(alpha) (I - beta k k^T)``).

    Returns ``[b, T, H, d_k, d_v]`` fp32: the gradient of a state change (or extra write) at each position.
    A per-token loop (only in backward passes through differentiable dense edits).
    """
    b, T, H, d_k = k.shape
    alpha = g.float().exp()[..., None] if per_channel(g, k) else g.float().exp()[..., None, None]
    G = torch.zeros(b, H, d_k, grad_read.shape[-1], dtype=torch.float32, device=k.device)
    out = torch.empty(b, T, H, d_k, grad_read.shape[-1], dtype=torch.float32, device=k.device)
    for s in range(T - 1, -1, -1):
        if s < T - 1:
            kk, bt = k[:, s + 1].float(), beta[:, s + 1].float()
            proj = torch.einsum("bhk,bhkv->bhv", kk, G)
            G = alpha[:, s + 1] * (G - bt[:, :, None, None] * kk[..., None] * proj[:, :, None, :])
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


# ---------------------------------------------------------------------------------------- gradient paths
def delta_rule_scan(query: Tensor, write_key: Tensor, write_value: Tensor, key: Tensor, beta: Tensor,
                    log_decay: Tensor, initial_state: Tensor | None = None, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """The gated delta rule with the write decoupled from the transition, chunked, pure torch, differentiable:

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + sum_r kw_{t,r} wv_{t,r}^T,     o_t = S_t^T q_t

    ``query [b,T,H,d_k]`` (the read's query as used, scale included), ``write_key [b,T,H,(r,)d_k]``,
    ``write_value [b,T,H,(r,)d_v]`` (``r`` rank-1 writes per step), transition ``key [b,T,H,d_k]``,
    ``beta [b,T,H]``, ``log_decay [b,T,H]``. Returns ``(read [b,T,H,d_v], final [b,H,d_k,d_v])`` in fp32;
    nothing of size ``T x d_k x d_v`` is formed. With ``write_key = key``, ``write_value = beta v`` it is the
    model's kernel. Per chunk, with ``d_s = exp(g_s) S_{s-1}^T k_s`` the recurrence is a scalar-decay one with
    the writes ``kw wv^T - beta k d^T``, and ``d`` solves a unit lower-triangular system (docs/method.md 6.4).
    A per-channel ``log_decay [b,T,H,d_k]`` (``S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + ...``) runs
    the per-token form, :func:`delta_rule_scan_tokens`."""
    from .scalar_decay import _decay_matrix

    if write_key.dim() == 4:
        write_key, write_value = write_key[..., None, :], write_value[..., None, :]
    if per_channel(log_decay, key):
        return delta_rule_scan_tokens(query, write_key, write_value, key, beta, log_decay, initial_state)
    b, T, H, d_k = key.shape
    d_v = write_value.shape[-1]
    S = (torch.zeros(b, H, d_k, d_v, device=key.device) if initial_state is None else initial_state.float())
    reads = []
    for t0 in range(0, T, chunk):
        sl = slice(t0, t0 + chunk)
        q, kt = query[:, sl].float().transpose(1, 2), key[:, sl].float().transpose(1, 2)  # [b,H,L,d_k]
        bt = beta[:, sl].float().transpose(1, 2)  # [b,H,L]
        kw = write_key[:, sl].float().permute(0, 2, 1, 3, 4)  # [b,H,L,r,d_k]
        wv = write_value[:, sl].float().permute(0, 2, 1, 3, 4)  # [b,H,L,r,d_v]
        M, G, tail = _decay_matrix(log_decay[:, sl])  # M [b,H,L,L] (diagonal 1), G, tail [b,L,H]
        L = q.shape[2]
        strict = M * torch.ones(L, L, device=key.device).tril(-1)
        eG, tail = G.exp().transpose(1, 2), tail.transpose(1, 2)  # [b,H,L]
        A = torch.eye(L, device=key.device) + (kt @ kt.transpose(-1, -2)) * strict * bt[:, :, None, :]
        rhs = eG[..., None] * (kt @ S) + torch.einsum("bhij,bhid,bhjrd,bhjrv->bhiv", strict, kt, kw, wv)
        d = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # [b,H,L,d_v]
        bd = bt[..., None] * d
        o = (eG[..., None] * (q @ S) + torch.einsum("bhij,bhid,bhjrd,bhjrv->bhiv", M, q, kw, wv)
             - ((q @ kt.transpose(-1, -2)) * M) @ bd)
        S = (G[:, -1].exp()[..., None, None] * S + torch.einsum("bhjrd,bhjrv,bhj->bhdv", kw, wv, tail)
             - torch.einsum("bhjd,bhjv,bhj->bhdv", kt, bd, tail))
        reads.append(o.transpose(1, 2))
    return torch.cat(reads, 1), S


def delta_rule_scan_tokens(query: Tensor, write_key: Tensor, write_value: Tensor, key: Tensor, beta: Tensor,
                           log_decay: Tensor, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`delta_rule_scan` one token at a time (pure torch, differentiable in every input), for per-head
    ``log_decay [b,T,H]`` or per-channel ``[b,T,H,d_k]``: ``A = Diag(exp g_t) S_{t-1}``, ``S_t = A - beta_t k_t
    (k_t^T A) + sum_r kw_{t,r} wv_{t,r}^T``, ``o_t = S_t^T q_t``. ``write_key [b,T,H,r,d_k]``, ``write_value``
    ``[b,T,H,r,d_v]``; returns ``(read [b,T,H,d_v], final [b,H,d_k,d_v])`` fp32."""
    if write_key.dim() == 4:
        write_key, write_value = write_key[..., None, :], write_value[..., None, :]
    b, T, H, d_k = key.shape
    d_v = write_value.shape[-1]
    S = (torch.zeros(b, H, d_k, d_v, device=key.device) if initial_state is None else initial_state.float())
    alpha = log_decay.float().exp()
    alpha = alpha[..., None] if per_channel(log_decay, key) else alpha[..., None, None]
    col, row = _key_columns(key, T)
    bt = beta.float()[..., None, None]
    q = query.float()[..., None, :]
    reads = []
    for t in range(T):
        S = _decay_step(S, alpha[:, t], col[:, t], row[:, t], bt[:, t])
        S = S + torch.einsum("bhrk,bhrv->bhkv", write_key[:, t].float(), write_value[:, t].float())
        reads.append((q[:, t] @ S)[..., 0, :])
    return torch.stack(reads, 1), S


def in_functorch_or_forward_ad(*tensors) -> bool:
    """Inside a ``torch.func`` transform, or some tensor carries a ``torch.autograd.forward_ad`` tangent."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    from torch.autograd import forward_ad

    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def carries_derivative(t: Tensor | None) -> bool:
    """``t`` is on an autograd graph being recorded, or carries a forward-mode tangent."""
    if t is None:
        return False
    return (torch.is_grad_enabled() and t.requires_grad) or in_functorch_or_forward_ad(t)


def through_edited_layer(f_g, f_q, g_eff: Tensor, q_eff: Tensor, states_edited: bool):
    """Where write edits change a layer's states (``states_edited``), the decay and query derivatives are taken
    through the edited layer (the canonical scan on the hook outputs), not at the clean one: a ``hook_log_decay`` /
    ``hook_query`` output that carries a derivative is marked edited. Returns ``(f_g, f_q, g_eff, q_eff,
    derivative_only)``; ``derivative_only``: the canonical scan then runs for the derivatives only, the values stay
    the model kernel's (no decay or query was edited in value)."""
    if not states_edited:
        return f_g, f_q, g_eff, q_eff, False
    edited_before = f_g.edited or f_q.edited
    if not f_g.edited and carries_derivative(f_g.raw):
        f_g = type(f_g)(f_g.raw.float(), True, f_g.value, raw=f_g.raw)
        g_eff = f_g.value
    if not f_q.edited and carries_derivative(f_q.raw):
        f_q = type(f_q)(f_q.raw.float(), True, f_q.value, raw=f_q.raw)
        q_eff = f_q.value
    return f_g, f_q, g_eff, q_eff, not edited_before and (f_g.edited or f_q.edited)


def unedited_deltas(pairs: dict) -> dict[str, Tensor]:
    """``{name: raw - clean}`` (zero in value, see :func:`derivative_delta`) of the hooks in ``pairs``
    (``{name: (fired hook, clean tensor)}``) that were not edited and carry a derivative: what a layer routes
    through its zero-valued first-order path so every hook output is on the logits' autograd path."""
    deltas = {n: derivative_delta(f.raw, c) for n, (f, c) in pairs.items() if not f.edited}
    return {n: d for n, d in deltas.items() if d is not None}


def derivative_delta(raw: Tensor, clean: Tensor) -> Tensor | None:
    """``raw - clean`` (a hook's output minus the clean tensor it was given, zero in value) when either carries
    a derivative, else None (nothing to route; no work on the no-grad path)."""
    if not (carries_derivative(raw) or carries_derivative(clean)):
        return None
    return raw.float() - clean


class _Linearised(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, like, n, *tensors):
        ctx.fn, ctx.n = fn, n
        ctx.save_for_backward(*tensors[:n])
        ctx.has_delta = [t is not None for t in tensors[n:]]
        return torch.zeros_like(like)

    @staticmethod
    def backward(ctx, grad):
        base = ctx.saved_tensors
        with torch.enable_grad():
            zs = [torch.zeros_like(b_, requires_grad=True) if h else None for b_, h in zip(base, ctx.has_delta)]
            y = ctx.fn(*[b_ if z is None else b_ + z for b_, z in zip(base, zs)])
            used = [z for z in zs if z is not None]
            grads = iter(torch.autograd.grad(y, used, grad, allow_unused=True))
        out = [None if z is None else next(grads) for z in zs]
        return (None, None, None, *([None] * ctx.n), *out)


def linearised(fn, base: list[Tensor], delta: list[Tensor | None], like: Tensor) -> Tensor:
    """``J_fn(base) . delta`` for ``delta`` that is zero in value: a tensor of zeros shaped as ``like`` that
    carries the first-order response of ``fn`` to the deltas, in both autodiff modes. Reverse mode costs
    nothing in the forward (``fn`` runs in the backward, at ``base``); forward mode (``torch.func.jvp``,
    ``forward_ad``) evaluates ``fn(base + delta) - fn(base)``. ``base`` entries are constants (detached)."""
    if in_functorch_or_forward_ad(*base, *delta):
        return fn(*[b_ if d is None else b_ + d for b_, d in zip(base, delta)]) - fn(*base)
    return _Linearised.apply(fn, like, len(base), *[b_.detach() for b_ in base], *delta)


class _ValueOf(torch.autograd.Function):
    @staticmethod
    def forward(src, value):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None

    @staticmethod
    def jvp(ctx, src_tangent, value_tangent):
        return src_tangent


def straight_through(src: Tensor, value: Tensor) -> Tensor:
    """A tensor with exactly the bits of ``value`` and the derivatives of ``src`` (equal to ``value`` up to
    rounding): used where the model's own output is kept bit for bit while the derivative path runs through
    the hook points. Returns ``value`` itself when ``src`` carries no derivative."""
    if not carries_derivative(src):
        return value
    if src.dtype != value.dtype:
        src = src.to(value.dtype)
    return _ValueOf.apply(src, value)

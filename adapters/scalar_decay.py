"""Canonical scalar-decay recurrence in pure torch (Mamba-2's transition): exact, chunked, differentiable.

``S_t = exp(g_t) S_{t-1} + W_t``, ``y_t = S_t^T q_t`` per head, with ``S`` ``[d_k, d_v]`` (key-first).
Used where the model's own kernel cannot express an edit (edited decays or queries: HF's scan takes ``dt``
shared by the decay and the write, and ``C`` shared by a group) and for the differentiable dense-write path.
Readable per-token reference: :func:`adapters.mamba2.mamba2_reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _decay_matrix(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For one chunk ``g [b, L, H]``: ``(M [b, H, L, L], G [b, L, H], tail [b, L, H])`` with ``G = cumsum(g)``,
    ``M[t, s] = exp(sum_{s < r <= t} g_r)`` for ``s <= t`` else 0 and ``tail[s] = exp(sum_{s < r < L} g_r)``.
    The exponents are segment sums (masked, then cumulated), not differences of running sums, so very
    negative decays lose no precision; masked entries never reach ``exp`` as large numbers."""
    gT = g.float().permute(0, 2, 1)  # [b, H, L]
    L = gT.shape[-1]
    strict = torch.ones(L, L, dtype=torch.bool, device=g.device).tril(-1)  # r > s
    seg = gT[..., :, None].expand(*gT.shape, L).masked_fill(~strict, 0.0).cumsum(-2)  # [t, s] = sum_{s<r<=t}
    M = seg.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=g.device).tril(), float("-inf")).exp()
    tail = seg[..., -1, :].exp().permute(0, 2, 1)
    return M, g.float().cumsum(1), tail


def scalar_decay_scan(key: Tensor, value: Tensor, log_decay: Tensor, query: Tensor,
                      initial_state: Tensor | None = None, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Factored writes ``W_t = key_t value_t^T``.

    ``key [b,T,H,N]``, ``value [b,T,H,P]``, ``log_decay [b,T,H]``, ``query [b,T,H,N]``, ``initial_state``
    ``[b,H,N,P]`` or None. Returns ``(read [b,T,H,P], final [b,H,N,P])`` in fp32; nothing of size
    ``T x N x P`` is formed."""
    b, T, H, N = key.shape
    P = value.shape[-1]
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    S = (torch.zeros(b, H, N, P, device=key.device) if initial_state is None else initial_state.float())
    reads = []
    for t0 in range(0, T, chunk):
        k, v = key[:, t0:t0 + chunk].float(), value[:, t0:t0 + chunk].float()
        q, g = query[:, t0:t0 + chunk].float(), log_decay[:, t0:t0 + chunk]
        M, G, tail = _decay_matrix(g)
        scores = torch.einsum("bthn,bshn->bhts", q, k) * M
        y = torch.einsum("bhts,bshp->bthp", scores, v)
        y = y + G.exp()[..., None] * torch.einsum("bhnp,bthn->bthp", S, q)
        S = G[:, -1].exp()[..., None, None] * S + torch.einsum("bshn,bshp,bsh->bhnp", k, v, tail)
        reads.append(y)
    return torch.cat(reads, 1), S


def dense_decay_scan(writes: Tensor, log_decay: Tensor, query: Tensor, initial_state: Tensor | None = None,
                     chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Dense writes ``writes [b,T,H,N,P]`` (for a dense hook replaced under autograd, where the writes are
    already materialised): returns ``(read [b,T,H,P], final [b,H,N,P])`` in fp32, differentiable."""
    b, T, H, N, P = writes.shape
    S = (torch.zeros(b, H, N, P, device=writes.device) if initial_state is None else initial_state.float())
    reads = []
    for t0 in range(0, T, chunk):
        W, q, g = writes[:, t0:t0 + chunk].float(), query[:, t0:t0 + chunk].float(), log_decay[:, t0:t0 + chunk]
        M, G, tail = _decay_matrix(g)
        y = torch.einsum("bhts,bshnp,bthn->bthp", M, W, q)
        y = y + G.exp()[..., None] * torch.einsum("bhnp,bthn->bthp", S, q)
        S = G[:, -1].exp()[..., None, None] * S + torch.einsum("bshnp,bsh->bhnp", W, tail)
        reads.append(y)
    return torch.cat(reads, 1), S

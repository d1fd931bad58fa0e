"""Readable per-token recurrences in the canonical key-first frame: the oracle for every fast path.

Canonical Gated DeltaNet step, per (batch row, value head), with ``S`` of shape ``[d_k, d_v]``::

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T q_t

``k_t`` is the L2-normalised key, ``q_t`` the L2-normalised query already multiplied by ``d_k**-0.5``,
``alpha_t = exp(g_t)``. The raw write is ``W_t = beta_t k_t v_t^T``; the delta write is
``W^delta_t = S_t - alpha_t S_{t-1} = k_t delta_t^T`` with ``delta_t = beta_t (v_t - alpha_t S_{t-1}^T k_t)``.

Edits (docs/method.md sections 3-4):

* ``write_edits[(b, t, h)] = (W_new [d_k, d_v], mode)``: in ``"raw"`` mode the raw write at t is replaced,
  ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + W_new``; in ``"delta"`` mode erase and write are
  replaced, ``S_t = alpha_t S_{t-1} + W_new``.
* ``extra_writes[(b, t, h)] = D [d_k, d_v]``: ``S_t += D`` after the (possibly edited) write at t.

Kimi Delta Attention (transformers ``kimi_linear``) is the same rule with a per-key-channel decay applied before
the erase: ``S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T`` with ``alpha_t = exp(g_t)``
``[d_k]``; its delta value is ``delta_t = beta_t (v_t - (Diag(alpha_t) S_{t-1})^T k_t)``, and the edits read as
above with ``alpha_t S_{t-1}`` replaced by ``Diag(alpha_t) S_{t-1}``. :func:`gated_deltanet_reference` takes
either decay (``log_decay`` ``[b, T, H]`` or ``[b, T, H, d_k]``).

This file is deliberately a Python loop over tokens; it is slow and obviously correct.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ReferenceResult:
    """Outputs of :func:`gated_deltanet_reference` (all fp32)."""

    read: Tensor  # [b, T, H, d_v]: o_t = S_t^T q_t
    final_state: Tensor  # [b, H, d_k, d_v]
    delta_value: Tensor  # [b, T, H, d_v]: delta_t of the (edited) run
    states: Tensor | None  # [b, T, H, d_k, d_v] when asked for


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """The in-kernel L2 norm of HF and fla: ``x * rsqrt(sum(x^2) + eps)`` over the last axis, in fp32."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_deltanet_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    log_decay: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    write_edits: dict[tuple[int, int, int], tuple[Tensor, str]] | None = None,
    extra_writes: dict[tuple[int, int, int], Tensor] | None = None,
    return_states: bool = False,
) -> ReferenceResult:
    """Per-token gated delta rule in the canonical frame.

    Args:
        query: ``[b, T, H, d_k]`` normalised and scaled query.
        key: ``[b, T, H, d_k]`` normalised key (one per value head).
        value: ``[b, T, H, d_v]`` the native value ``v`` (beta is applied here).
        log_decay: ``[b, T, H]`` g, with ``alpha = exp(g)``; or ``[b, T, H, d_k]`` (Kimi Delta Attention: one
            decay per key channel, applied as ``Diag(alpha)`` before the erase).
        beta: ``[b, T, H]``.
        initial_state: ``[b, H, d_k, d_v]`` or None for zeros.
    """
    query, key, value, log_decay, beta = (x.float() for x in (query, key, value, log_decay, beta))
    b, T, H, d_k = key.shape
    d_v = value.shape[-1]
    write_edits = write_edits or {}
    extra_writes = extra_writes or {}
    S = torch.zeros(b, H, d_k, d_v) if initial_state is None else initial_state.float().clone()
    read = torch.zeros(b, T, H, d_v)
    delta_value = torch.zeros(b, T, H, d_v)
    states = torch.zeros(b, T, H, d_k, d_v) if return_states else None
    for t in range(T):
        for i in range(b):
            for h in range(H):
                k, v, q = key[i, t, h], value[i, t, h], query[i, t, h]
                alpha, bt = log_decay[i, t, h].exp(), beta[i, t, h]
                prev = S[i, h]
                if alpha.dim() == 1:  # per-channel decay: decay the rows first, then the delta rule without decay
                    prev, alpha = alpha[:, None] * prev, torch.ones(())
                delta = bt * (v - alpha * (prev.T @ k))
                new = alpha * prev + torch.outer(k, delta)
                if (i, t, h) in write_edits:
                    w_new, mode = write_edits[(i, t, h)]
                    if mode == "raw":
                        erased = alpha * (prev - bt * torch.outer(k, k @ prev))
                        new = erased + w_new.float()
                    elif mode == "delta":
                        new = alpha * prev + w_new.float()
                    else:
                        raise ValueError(f"mode must be 'raw' or 'delta', got {mode!r}")
                if (i, t, h) in extra_writes:
                    new = new + extra_writes[(i, t, h)].float()
                S[i, h] = new
                delta_value[i, t, h] = delta
                read[i, t, h] = new.T @ q
                if states is not None:
                    states[i, t, h] = new
    return ReferenceResult(read=read, final_state=S, delta_value=delta_value, states=states)


def propagated_states_reference(batch: Tensor, pos: Tensor, delta_state: Tensor, key: Tensor, log_decay: Tensor,
                                beta: Tensor, positions: Tensor, b: int) -> Tensor:
    """``Delta S_t`` at ``positions [P]`` when ``delta_state[r] [H, d_k, d_v]`` is added to the state of batch row
    ``batch[r]`` right after position ``pos[r]`` (the oracle of ``adapters.ops.propagated_states``).

    Transitions never depend on the state, so the change is the per-token run of the layer from a zero state
    with every value zero and the perturbations as extra writes. Returns ``[b, P, H, d_k, d_v]`` fp32."""
    _, T, H, d_k = key.shape
    d_v = delta_state.shape[-1]
    extra: dict[tuple[int, int, int], Tensor] = {}
    for r in range(batch.numel()):
        for h in range(H):
            k_ = (int(batch[r]), int(pos[r]), h)
            extra[k_] = extra.get(k_, 0) + delta_state[r, h].float()
    zeros = torch.zeros(b, T, H, d_v)
    states = gated_deltanet_reference(torch.zeros(b, T, H, d_k), key, zeros, log_decay, beta,
                                      extra_writes=extra, return_states=True).states
    return states[:, positions.long()]

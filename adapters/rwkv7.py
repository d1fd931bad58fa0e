"""RWKV-7 write hooks for flash-linear-attention's ``RWKV7Attention`` layer (fla ``rwkv7`` models).

Derived from ``fla/layers/rwkv7.py``, ``fla/ops/rwkv7`` and ``fla/ops/generalized_delta_rule/dplr`` (fla 0.6.0;
per-token form: ``dplr/naive.py: dplr_recurrence`` and the triton kernel of ``fused_mul_recurrent_rwkv7``).
``RWKV7Attention.forward`` computes, from the token shift ``delta = x_{t-1} - x_t`` and the ``x_*`` mixes, per head
(``H = num_heads`` heads of ``d_k = head_dim`` and ``d_v = head_v_dim``; one key per head)::

    r    = r_proj(x_r)                               receptance, the read's query (scale 1)
    w    = -0.6065 sigmoid(w_lora(x_w))              the log decay per key channel, in [-0.61, 0]
    k    = k_proj(x_k),   v = v_proj(x_v)            (layers > 0: v = lerp(v, v_first, sigmoid(v_lora(x_v))))
    a    = sigmoid(a_lora(x_a))                      the in-context learning rate, per key channel
    kk^  = l2norm(k . k_k)                            the erase key (per head)
    k~   = k . (1 + (a - 1) . k_a)                   the write key (``fused_k_rwkv7``)

and calls ``chunk_rwkv7`` (the DPLR chunk kernel with ``a = -kk^``, ``b = kk^ . a``; whenever autograd is on or the
call has >= 64 tokens) or ``fused_mul_recurrent_rwkv7`` (``kk^``, ``a``). Both run, with the state key-first
``[d_k, d_v]`` (fla's ``[N, H, K, V]``, as the cache stores it)::

    S_t = Diag(exp w_t) S_{t-1} - (a_t . kk^_t)(kk^_t^T S_{t-1}) + k~_t v_t^T,      o_t = S_t^T r_t

i.e. the transition ``T_t = Diag(exp w_t) - (a_t . kk^_t) kk^_t^T`` (diagonal plus rank one; both parts act on
``S_{t-1}``, and it never depends on the state), the write ``k~_t (x) v_t``, the read ``S^T r`` (scale 1). After
the read: ``g_norm`` (per-head group norm), then ``gate_output_correction``: ``(g_norm(o) + ((r . k~ . r_k) 1^T) v)
. g`` with ``g = g_lora(x_g)``, then ``o_proj``. The bonus term ``(r . k~ . r_k) v`` bypasses the state: it is not a
write and is not part of ``hook_read`` (as Mamba-2's ``D x`` skip); it uses the layer's own ``r``, ``k~``, ``v``,
so no hook edit changes it.

One write mode. The raw write ``k~ v^T`` keeps the token's erase in ``T_t``. The increment over the decayed state,
``k~ v^T - (a . kk^)(S_{t-1}^T kk^)^T``, has two different keys (``k~`` and ``a . kk^`` are not parallel in general),
so it is rank 2, not a rank-1 write; ``write_mode="delta"`` is refused.

``v_first``: layer 0's value (before the kernel) is handed to every later layer, which mixes it into its own
value. The hooks sit at the kernel: an edit of layer 0's ``hook_v`` / ``hook_write_value`` / ``hook_write`` changes
layer 0's state (and so its reads) only; the ``v_first`` the later layers see is the model's own, unedited one.

Hooks (``blocks.{l}.linear_attn.``, as the other fla families): native ``hook_r``, ``hook_w``, ``hook_k`` (``k~``),
``hook_kk`` (``kk^``), ``hook_a`` ``[b,p,H,d_k]``, ``hook_v`` ``[b,p,H,d_v]`` (the kernel's inputs, as fla computes
them; ``hook_kk``, ``hook_a``, ``hook_w`` change the transitions, ``hook_k``, ``hook_v`` the write, ``hook_r`` the
read); canonical ``hook_write_key`` (``k~``), ``hook_write_value`` (``v``), opt-in ``hook_write`` /
``hook_write_flat``, ``hook_log_decay`` ``[b,p,H,d_k]`` (``w``: a vector per head; an edit changes the diagonal of
the transitions), ``hook_query`` (``r``), opt-in ``hook_state``, ``hook_read`` (``o_t`` before ``g_norm``, fp32).

Kernels. The adapter swaps ``chunk_rwkv7`` and ``fused_mul_recurrent_rwkv7`` in ``fla.layers.rwkv7`` for one
dispatcher: a hooked layer's call goes to the hook logic; an unhooked call runs fla's kernel, except for CPU
tensors, which run the pure-torch :func:`dplr_scan` (the same function for the plain and the hooked model, so
capture-only logits are bit-identical). Edits propagate by the zero-value trick (docs/method.md 4) with a DPLR
kernel (``initial_state = D``, zero keys and values, the layer's ``w``, ``kk^``, ``a``): fla's ``chunk_rwkv7``
(``chunk_dplr_delta_rule``) on a GPU, :func:`dplr_scan` on a CPU. :func:`dplr_scan` is a per-token loop over the
sequence with ``[B, H, K, V]`` tensor ops (vectorised over rows and heads; a chunked WY form measured 8x slower on a
CPU, see its docstring); it is a separate
function from the readable per-token reference :func:`rwkv7_reference` (loops over rows and heads too), and tested
against it. Nothing of size ``T x d_k x d_v`` is formed unless states or dense writes are asked for.
"""

from __future__ import annotations

import importlib
import sys
import threading

import torch
from torch import Tensor, nn

from . import fla_cpu
from .base import UnsupportedModelError, cache_from_kwargs, conflicting_edit_error
from .gated_deltanet import (_CURRENT, GatedDeltaNetFamily, _alias, _output, cache_offset, on_device_of,
                             resolve_capture)
from .mamba2 import Mamba2Hooks
from .ops import carries_derivative, linearised, straight_through, through_edited_layer, unedited_deltas
from .reference import ReferenceResult

RWKV7_MODEL_TYPES = {"rwkv7": "fla.layers.rwkv7"}
RWKV7_CHUNK = "chunk_rwkv7"
RWKV7_RECURRENT = "fused_mul_recurrent_rwkv7"
RWKV7_KERNELS = (RWKV7_CHUNK, RWKV7_RECURRENT)
RWKV7_MIXER = "RWKV7Attention"
_RECORD = threading.local()  # .a: the ``a`` the current hooked layer passed to fused_k_rwkv7


# ---------------------------------------------------------------------------------------- reference and kernels
def rwkv7_reference(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor, kk: Tensor, a: Tensor,
                    initial_state: Tensor | None = None, write_edits: dict | None = None,
                    extra_writes: dict | None = None, return_states: bool = False) -> ReferenceResult:
    """Per-token RWKV-7 in the canonical frame, a Python loop over tokens, rows and heads (slow and obviously
    correct): ``T_t = Diag(exp w_t) - (a_t . kk_t) kk_t^T``, ``S_t = T_t S_{t-1} + W_t``, ``W_t = k_t v_t^T``,
    ``o_t = S_t^T q_t``.

    ``query``, ``key``, ``log_decay`` (``w``), ``kk``, ``a`` ``[b,T,H,d_k]``, ``value`` ``[b,T,H,d_v]``,
    ``initial_state`` ``[b,H,d_k,d_v]`` or None. ``write_edits[(b, t, h)] = (W_new, "raw")`` replaces the write (the
    erase stays in ``T_t``; RWKV-7 has one write mode); ``extra_writes[(b, t, h)] = D`` adds ``D`` after it.
    Returns fp32 ``read [b,T,H,d_v]``, ``final_state``, ``delta_value`` (= ``value``) and optionally ``states``."""
    query, key, value, log_decay, kk, a = (x.float() for x in (query, key, value, log_decay, kk, a))
    b, T, H, d_k = key.shape
    d_v = value.shape[-1]
    write_edits, extra_writes = write_edits or {}, extra_writes or {}
    # one [d_k, d_v] matrix per (row, head), replaced (never written in place) so autograd can run through it
    S = [[torch.zeros(d_k, d_v) if initial_state is None else initial_state[i, h].float() for h in range(H)]
         for i in range(b)]
    reads, kept = [], []
    for t in range(T):
        for i in range(b):
            for h in range(H):
                transition = torch.diag(log_decay[i, t, h].exp()) - torch.outer(a[i, t, h] * kk[i, t, h], kk[i, t, h])
                W = torch.outer(key[i, t, h], value[i, t, h])
                if (i, t, h) in write_edits:
                    W_new, mode = write_edits[(i, t, h)]
                    if mode != "raw":
                        raise ValueError(f"RWKV-7 has one write mode ('raw'), got {mode!r}")
                    W = W_new.float()
                new = transition @ S[i][h] + W
                if (i, t, h) in extra_writes:
                    new = new + extra_writes[(i, t, h)].float()
                S[i][h] = new
        reads.append(torch.stack([torch.stack([S[i][h].T @ query[i, t, h] for h in range(H)]) for i in range(b)]))
        if return_states:
            kept.append(torch.stack([torch.stack(row) for row in S]))
    read = torch.stack(reads, 1) if reads else torch.zeros(b, 0, H, d_v)
    states = (torch.stack(kept, 1) if kept else torch.zeros(b, 0, H, d_k, d_v)) if return_states else None
    S = torch.stack([torch.stack(row) for row in S])
    return ReferenceResult(read=read, final_state=S, delta_value=value.clone(), states=states)


def dplr_scan(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor, alpha: Tensor, beta: Tensor,
              initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """fla's DPLR recurrence in pure torch (fp32, differentiable):
    ``S_t = Diag(exp g_t) S_{t-1} + beta_t (alpha_t^T S_{t-1}) + k_t v_t^T``, ``o_t = S_t^T q_t`` (``q`` already
    scaled; RWKV-7: ``alpha = -kk^``, ``beta = kk^ . a``, scale 1).

    ``query``, ``key``, ``log_decay``, ``alpha``, ``beta`` ``[B,T,H,K]``, ``value`` ``[B,T,H,V]``,
    ``initial_state`` ``[B,H,K,V]`` (key-first) or None. A per-token loop over T with ``[B,H,K,V]`` tensor ops
    (vectorised over rows and heads). A chunked WY form (fla's ``dplr_chunkwise``: a unit-triangular solve per chunk
    of 64 over ``[B,H,L,L,K]`` decay tensors) was measured against it on a CPU: 8x slower at ``T = 1024``, ``H = 8``,
    ``K = V = 64`` (0.30 s vs 0.038 s, one thread) and 1.3e-5 off the per-token reference where reads reach 20, so
    the loop is the CPU kernel. Returns ``(o [B,T,H,V], S_T [B,H,K,V])`` fp32."""
    q, k, v, g, al, be = (x.float() for x in (query, key, value, log_decay, alpha, beta))
    B, T, H, K = k.shape
    V = v.shape[-1]
    S = (torch.zeros(B, H, K, V, dtype=torch.float32, device=k.device) if initial_state is None
         else initial_state.float())
    decay = g.exp()[..., None]  # [B,T,H,K,1]
    al_row, be_col = al[..., None, :], be[..., None]  # [B,T,H,1,K], [B,T,H,K,1]
    k_col, v_row, q_row = k[..., None], v[..., None, :], q[..., None, :]
    reads = []
    for t in range(T):
        S = decay[:, t] * S + be_col[:, t] * (al_row[:, t] @ S) + k_col[:, t] * v_row[:, t]
        reads.append((q_row[:, t] @ S)[..., 0, :])
    o = torch.stack(reads, 1) if reads else torch.zeros(B, 0, H, V, dtype=torch.float32, device=k.device)
    return o, S


def rwkv7_kernel(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor, kk: Tensor, a: Tensor,
                 initial_state: Tensor | None = None, output_final_state: bool = True) -> tuple[Tensor, Tensor | None]:
    """The canonical RWKV-7 kernel on a CPU: :func:`dplr_scan` with ``alpha = -kk``, ``beta = kk . a`` (``query``
    already scaled). Returns ``(o [b,T,H,d_v], S_T [b,H,d_k,d_v] or None)`` fp32."""
    kk32 = kk.float()
    o, S = dplr_scan(query, key, value, log_decay, -kk32, kk32 * a.float(), initial_state)
    return o, (S if output_final_state else None)


def _fla_rwkv7_kernel(fla_chunk):
    """The canonical RWKV-7 kernel on a GPU: fla's ``chunk_rwkv7`` (``chunk_dplr_delta_rule``), scale 1, no gate
    bound (an edited decay may leave fla's ``[-0.61, 0)``)."""

    def run(query, key, value, log_decay, kk, a, initial_state=None, output_final_state=True):
        kk32 = kk.float()
        o, S = fla_chunk(r=query.float(), w=log_decay.float(), k=key.float(), v=value.float(), a=-kk32,
                         b=kk32 * a.float(), scale=1.0,
                         initial_state=None if initial_state is None else initial_state.float().contiguous(),
                         output_final_state=output_final_state)
        return o.float(), (None if S is None else S.float())
    return run


_CHUNK_PARAMS = ("r", "w", "k", "v", "a", "b", "scale", "initial_state", "output_final_state", "cu_seqlens",
                 "cu_seqlens_cpu", "safe_gate", "chunk_size", "disable_recompute", "cp_context", "lower_bound")
_RECURRENT_PARAMS = ("r", "w", "k", "v", "kk", "a", "scale", "initial_state", "output_final_state", "reverse",
                     "cu_seqlens")


def _fla_form(name: str, args, kwargs) -> dict:
    """fla's RWKV-7 kernel arguments by name."""
    a = dict(zip(_CHUNK_PARAMS if name == RWKV7_CHUNK else _RECURRENT_PARAMS, args))
    a.update(kwargs)
    return a


def _scaled(r: Tensor, scale) -> Tensor:
    return r.float() * (r.shape[-1] ** -0.5 if scale is None else float(scale))


def torch_rwkv7(name: str):
    """fla's ``name`` (``chunk_rwkv7`` or ``fused_mul_recurrent_rwkv7``) on CPU tensors, by :func:`dplr_scan`: same
    arguments and outputs (``o`` in v's dtype, the final state fp32 or None); packed sequences (``cu_seqlens``) one
    at a time."""

    def run(*args, **kwargs):
        a = _fla_form(name, args, kwargs)
        if a.get("reverse"):
            raise NotImplementedError("fla's RWKV-7 kernel in reverse has no CPU route")
        if a.get("cp_context") is not None:
            raise NotImplementedError("fla's RWKV-7 kernel with context parallelism has no CPU route")
        r, w, k, v = a["r"], a["w"], a["k"], a["v"]
        if name == RWKV7_CHUNK:
            alpha, beta = a["a"], a["b"]
        else:
            kk = a["kk"].float()
            alpha, beta = -kk, kk * a["a"].float()
        q = _scaled(r, a.get("scale", 1.0))
        init, final = a.get("initial_state"), bool(a.get("output_final_state"))
        cu = a.get("cu_seqlens")
        if cu is None:
            o, S = dplr_scan(q, k, v, w, alpha, beta, init)
        else:
            outs, states = [], []
            for i, (s, e) in enumerate(fla_cpu._segments(cu)):
                o_i, S_i = dplr_scan(q[:, s:e], k[:, s:e], v[:, s:e], w[:, s:e], alpha[:, s:e], beta[:, s:e],
                                     None if init is None else init[i:i + 1])
                outs.append(o_i)
                states.append(S_i)
            o, S = torch.cat(outs, 1), torch.cat(states, 0)
        return o.to(v.dtype), (S if final else None)

    run.__name__ = f"torch_{name}"
    return run


def dense_dplr_scan(D: Tensor, query: Tensor, log_decay: Tensor, kk: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """``(Delta o [b,T,H,d_v], Delta S_T [b,H,d_k,d_v])`` of dense state changes ``D [b,T,H,d_k,d_v]`` (added right
    after each position's write) under the RWKV-7 transitions: ``X_t = T_t X_{t-1} + D_t``, ``Delta o_t = X_t^T
    q_t``; per token, differentiable (the dense-hook path under autograd)."""
    kk32 = kk.float()
    b, T, H, d_k, d_v = D.shape
    X = torch.zeros(b, H, d_k, d_v, dtype=torch.float32, device=D.device)
    decay = log_decay.float().exp()[..., None]
    al, be = -kk32[..., None, :], (kk32 * a.float())[..., None]
    q = query.float()[..., None, :]
    reads = []
    for t in range(T):
        X = decay[:, t] * X + be[:, t] * (al[:, t] @ X) + D[:, t].float()
        reads.append((q[:, t] @ X)[..., 0, :])
    return torch.stack(reads, 1), X


def transition_transpose(X: Tensor, log_decay: Tensor, kk: Tensor, a: Tensor) -> Tensor:
    """``T^T X`` for ``X [..., d_k, n]`` and one position's ``log_decay``, ``kk``, ``a`` ``[..., d_k]``:
    ``T^T = Diag(exp w) - kk (a . kk)^T``."""
    kk32 = kk.float()
    proj = ((a.float() * kk32)[..., None, :] @ X)  # [..., 1, n]
    return log_decay.float().exp()[..., None] * X - kk32[..., None] * proj


def dplr_effective_attention(query: Tensor, key: Tensor, log_decay: Tensor, kk: Tensor, a: Tensor) -> Tensor:
    """``A_eff [b,H,T,T]`` of an RWKV-7 layer: ``A_eff[t, s] = q_t^T Phi(t, s) k~_s`` with ``Phi(t, s)`` the product of
    the DPLR transitions ``T_{s+1} ... T_t`` (exact: ``o_t = sum_s A_eff[t, s] v_s`` from a zero state). Computed by
    carrying every read's query back through the transitions, ``Phi(t, s-1)^T q_t = T_s^T Phi(t, s)^T q_t``
    (``O(T^2 d_k)`` per head). Inputs are the canonical hooks ``[b,T,H,d_k]`` (``hook_query``, ``hook_write_key``,
    ``hook_log_decay``, ``hook_kk``, ``hook_a``)."""
    q, k = query.float().transpose(1, 2), key.float().transpose(1, 2)  # [b,H,T,d_k]
    g, kk_, a_ = (x.float().transpose(1, 2) for x in (log_decay, kk, a))
    b, H, T, d_k = q.shape
    A = torch.zeros(b, H, T, T, dtype=torch.float32, device=q.device)
    Y = torch.zeros(b, H, T, d_k, dtype=torch.float32, device=q.device)  # Y[t] = Phi(t, s)^T q_t (t >= s)
    for s in range(T - 1, -1, -1):
        Y[:, :, s] = q[:, :, s]
        A[:, :, :, s] = (Y @ k[:, :, s, :, None])[..., 0]
        if s > 0:  # Phi(t, s-1) = Phi(t, s) T_s
            Yt = transition_transpose(Y.transpose(-1, -2), g[:, :, s], kk_[:, :, s], a_[:, :, s])
            Y = Yt.transpose(-1, -2)
    return A


def dplr_write_adjoint(query: Tensor, log_decay: Tensor, kk: Tensor, a: Tensor, grad_read: Tensor) -> Tensor:
    """``G_s = dL/dS_s`` for every s from ``grad_read = dL/do`` ``[b,T,H,d_v]`` (docs/method.md 6.4) by the reverse
    recurrence ``G_s = T_{s+1}^T G_{s+1} + q_s (dL/do_s)^T`` with the RWKV-7 transitions. Returns
    ``[b,T,H,d_k,d_v]`` fp32."""
    b, T, H, d_k = query.shape
    d_v = grad_read.shape[-1]
    G = torch.zeros(b, H, d_k, d_v, dtype=torch.float32, device=query.device)
    out = torch.empty(b, T, H, d_k, d_v, dtype=torch.float32, device=query.device)
    for s in range(T - 1, -1, -1):
        if s < T - 1:
            G = transition_transpose(G, log_decay[:, s + 1], kk[:, s + 1], a[:, s + 1])
        G = G + query[:, s].float()[..., None] * grad_read[:, s].float()[:, :, None, :]
        out[:, s] = G
    return out


# ---------------------------------------------------------------------------------------- kernel swap
class _RWKV7Kernels:
    """The kernels the hook logic calls: the model's own (``main``: fla's on a GPU, :func:`torch_rwkv7` on a CPU,
    in fla's signature) and the canonical DPLR kernel (``chunk``: ``(q, k, v, w, kk, a, initial_state,
    output_final_state) -> (o, S_T)`` fp32; fla's ``chunk_rwkv7`` on a GPU, :func:`rwkv7_kernel` on a CPU)."""

    def __init__(self, module):
        self.module = module
        self.original = {n: getattr(module, n) for n in RWKV7_KERNELS}
        self.cpu = {n: torch_rwkv7(n) for n in RWKV7_KERNELS}

    def main(self, name: str, device: torch.device):
        return self.cpu[name] if device.type == "cpu" else self.original[name]

    def chunk(self, device: torch.device):
        return rwkv7_kernel if device.type == "cpu" else _fla_rwkv7_kernel(self.original[RWKV7_CHUNK])


_KERNELS: dict[str, _RWKV7Kernels] = {}


def install() -> _RWKV7Kernels:
    """Swap fla's RWKV-7 kernels in ``fla.layers.rwkv7`` for the dispatcher (once): a hooked layer's call goes to
    the hook logic, an unhooked one to fla's kernel, or to :func:`torch_rwkv7` for CPU tensors. ``fused_k_rwkv7``
    also records the ``a`` a hooked layer passes it (the chunk kernel gets only ``kk^ . a``)."""
    module_name = RWKV7_MODEL_TYPES["rwkv7"]
    if module_name in _KERNELS:
        return _KERNELS[module_name]
    module = importlib.import_module(module_name)
    kernels = _RWKV7Kernels(module)

    def make(name):
        original, cpu = kernels.original[name], kernels.cpu[name]

        def dispatch(*args, **kwargs):
            layer = getattr(_CURRENT, "layer", None)
            if not isinstance(layer, RWKV7Hooks):
                return cpu(*args, **kwargs) if fla_cpu.on_cpu(args, kwargs) else original(*args, **kwargs)
            with on_device_of(args, kwargs):
                return layer.intercept(name, kernels, args, kwargs)

        dispatch.__wrapped_by_writesae__ = original
        dispatch.__name__ = name
        return dispatch

    for n in RWKV7_KERNELS:
        setattr(module, n, make(n))
    k_update = module.fused_k_rwkv7

    def fused_k(k, a, ka, *args, **kwargs):
        if isinstance(getattr(_CURRENT, "layer", None), RWKV7Hooks):
            _RECORD.a = a
        return k_update(k, a, ka, *args, **kwargs)

    fused_k.__wrapped_by_writesae__ = k_update
    module.fused_k_rwkv7 = fused_k
    _KERNELS[module_name] = kernels
    return kernels


# ---------------------------------------------------------------------------------------- hooks
class RWKV7Hooks(Mamba2Hooks):
    """Hook points of one RWKV-7 layer (``blocks.{l}.linear_attn``) and its exact edits: the write entries,
    functional edits and hook firing of :class:`Mamba2Hooks`, with the DPLR transitions for the states, the
    propagation (zero-value trick), the dense path and the derivative path."""

    NAMES = ("hook_r", "hook_w", "hook_k", "hook_v", "hook_kk", "hook_a", "hook_write_key", "hook_write_value",
             "hook_write", "hook_write_flat", "hook_log_decay", "hook_query", "hook_state", "hook_read")

    @staticmethod
    def dims(mixer: nn.Module) -> tuple[int, int, int, int]:
        """``(heads, heads, d_k, d_v)``."""
        return mixer.num_heads, mixer.num_heads, mixer.head_dim, mixer.head_v_dim

    def __init__(self, owner, mixer: nn.Module, layer_idx: int):
        H, _, d_k, d_v = self.dims(mixer)
        super().__init__(owner, mixer, layer_idx, None, (H, H, d_k, d_v))

    def intercept(self, name, kernels: _RWKV7Kernels, args, kwargs):
        self._kernel_called = True
        owner = self._owner()
        if owner.write_mode != "raw":
            raise ValueError(f"{RWKV7Family.one_write_mode}; use write_mode='raw'")
        call = _fla_form(name, args, kwargs)
        if call.get("cu_seqlens") is not None:
            raise NotImplementedError(f"layer {self.layer_idx}: packed sequences (cu_seqlens) are not supported by "
                                      "the RWKV-7 write hooks; run one sequence per batch row")
        if call.get("reverse"):
            raise NotImplementedError(f"layer {self.layer_idx}: the RWKV-7 write hooks do not run in reverse")
        r, w, k, v = call["r"], call["w"], call["k"], call["v"]
        if name == RWKV7_CHUNK:
            kk = -call["a"]  # the layer passes a = -kk^, b = kk^ . a (exact negation)
            a_rec = getattr(_RECORD, "a", None)
            _RECORD.a = None
            if a_rec is None or a_rec.numel() != k.numel():
                raise RuntimeError(f"layer {self.layer_idx}: the RWKV-7 layer called chunk_rwkv7 without the "
                                   "fused_k_rwkv7 call the write hooks record a from (its forward was replaced?)")
            a = a_rec.reshape(k.shape)
            if not torch.equal(kk * a, call["b"]):
                raise RuntimeError(f"layer {self.layer_idx}: chunk_rwkv7's b is not kk^ . a as fla 0.6's "
                                   "RWKV7Attention computes it; the write hooks cannot recover a")
        else:
            kk, a = call["kk"], call["a"]
            _RECORD.a = None
        b, T, H, d_k = k.shape
        if (H, d_k, v.shape[-1]) != (self.n_heads, self.d_k, self.d_v):
            raise RuntimeError(f"layer {self.layer_idx}: kernel inputs do not match the layer's heads/dims (heads {H}, "
                               f"d_k {d_k}, d_v {v.shape[-1]}; expected {(self.n_heads, self.d_k, self.d_v)})")
        dev = k.device
        init = call.get("initial_state")
        init_c = None if init is None else init.float().clone()  # key-first already
        scale = call.get("scale", 1.0)

        # native hooks: the kernel's inputs (their edits change the kernel call). r, k~ and v get copies: the layer
        # uses them again after the kernel (the output correction; layer 0's v is v_first), so an edit of these
        # hooks, in place or not, reaches the kernel only
        fired = [self._fire(hp, x) for hp, x in ((self.hook_r, r.clone()), (self.hook_w, w), (self.hook_k, k.clone()),
                                                 (self.hook_v, v.clone()), (self.hook_kk, kk), (self.hook_a, a))]
        r2, w2, k2, v2, kk2, a2 = (f.value for f in fired)

        # canonical frame, fp32 (own tensors: an in-place edit of a canonical hook never reaches the kernel's inputs)
        key, value, g, query = k2.float().clone(), v2.float().clone(), w2.float().clone(), _scaled(r2, scale)
        kk32, a32 = kk2.float(), a2.float()
        f_key = self._fire(self.hook_write_key, _alias(key), lambda: k2.float().clone())
        f_val = self._fire(self.hook_write_value, _alias(value), lambda: v2.float().clone())
        f_g = self._fire(self.hook_log_decay, _alias(g), lambda: w2.float().clone())
        f_q = self._fire(self.hook_query, _alias(query), lambda: _scaled(r2, scale))
        key = f_key.original if f_key.edited else key  # the clean factors (a hook may edit in place)
        value = f_val.original if f_val.edited else value
        g_eff = f_g.value if f_g.edited else g
        q_eff = f_q.value if f_q.edited else query
        entries, dense_D = self._write_entries(owner, f_key, f_val, key, value, b, T)
        write_dense = dense_D
        offset = cache_offset(self, owner, init is not None, T)
        self._functional(owner, entries, 0 if offset is None else offset, b, T, key, value, dense_D)
        states_edited = bool(entries) or (dense_D is not None and bool((dense_D != 0).any()))
        f_g, f_q, g_eff, q_eff, derivative_only = through_edited_layer(f_g, f_q, g_eff, q_eff, states_edited)
        canonical = f_g.edited or f_q.edited  # the model's kernel call cannot express these

        # the model's own call (with edited native inputs, if any)
        main = dict(call)
        main.update(r=r2, w=w2, k=k2, v=v2)
        if name == RWKV7_CHUNK:  # a = -kk^, b = kk^ . a from the hook outputs (the layer's bits when not edited: the
            main.update(a=-kk2, b=kk2 * a2)  # same negation and product; gradients then reach hook_kk, hook_a)
        else:
            main.update(kk=kk2, a=a2)
        if not canonical:
            o, S = kernels.main(name, dev)(**main)
        else:
            o_c, S_c = kernels.chunk(dev)(q_eff, key, value, g_eff, kk32, a32, init_c, True)
            if derivative_only:  # values: the model's own kernel, bit for bit (detached: no tangent either)
                with torch.no_grad():
                    plain = {n_: x.detach() if isinstance(x, Tensor) else x for n_, x in main.items()}
                    o_hf, S_hf = kernels.main(name, dev)(**plain)
                o = o_hf + (o_c - o_c.detach()).to(o_hf.dtype)
                S = None if S_hf is None else S_hf + (S_c - S_c.detach()).to(S_hf.dtype)
            else:
                o = o_c.to(v.dtype)
                S = S_c if call.get("output_final_state") else None

        if owner.capture_for(self) is not None:
            state_D = self._dplr_states(owner, entries, key, value, g_eff, kk32, a32, init_c, b, T, dense_D)
            if state_D is not None:
                dense_D = state_D if dense_D is None else dense_D + state_D
        read = o.float()
        d_read = d_final = None
        if entries:
            d_read, d_final = self._propagate_dplr(kernels.chunk(dev), entries, b, T, q_eff, g_eff, kk32, a32)
        if dense_D is not None:  # a dense hook replaced under autograd: the differentiable torch path
            dr, df = dense_dplr_scan(dense_D, q_eff, g_eff, kk32, a32)
            d_read, d_final = (dr, df) if d_read is None else (d_read + dr, d_final + df)
        if d_read is not None:
            read = read + d_read
        # unedited canonical hooks: a zero-valued first-order path (the torch DPLR scan in the backward)
        pairs = {"q": (f_q, query), "g": (f_g, g)}
        if write_dense is None:  # otherwise the factors reach the logits through the dense write hooks
            pairs.update(k=(f_key, key), v=(f_val, value))
        deltas = unedited_deltas(pairs)
        if deltas:
            read = read + _derivative_path(deltas, q_eff, g_eff, _output(f_key), _output(f_val), kk32, a32, init_c,
                                           read)
        value_changed = (d_read is not None and bool((d_read != 0).any())) or (canonical and not derivative_only)
        f_read = self._fire(self.hook_read, read, None if value_changed else (lambda: o.float()))
        if S is not None and d_final is not None and bool((d_final != 0).any()):
            S = (S.float() + d_final).to(S.dtype)
        if not value_changed and not f_read.edited:  # the kernel's bits; derivatives through the hooks
            return straight_through(f_read.raw, o), S
        return f_read.value.to(o.dtype), S

    def _rows_on(self, entries, device) -> tuple[Tensor, Tensor, Tensor]:
        """State changes grouped by changed (batch, position) pair: ``(D0 [R,H,K,V], batch [R], pos [R])``."""
        rows = sorted({(bi, t) for bi, t, _ in entries})
        index = {r_: i for i, r_ in enumerate(rows)}
        D0 = torch.zeros(len(rows), self.n_heads, self.d_k, self.d_v, dtype=torch.float32, device=device)
        for (bi, t, h), dS in entries.items():
            D0[index[(bi, t)], h] += dS.float().to(device)
        return (D0, torch.tensor([r_[0] for r_ in rows], device=device),
                torch.tensor([r_[1] for r_ in rows], device=device))

    def _propagate_dplr(self, kernel, entries, b, T, query, log_decay, kk, a, method: str = "auto"):
        """Exact ``Delta o`` and ``Delta S_T`` of state changes ``entries[(b, t, h)] = D``. ``"kernel"``: the zero-value
        trick with the DPLR kernel (one row per changed (batch, position) pair, ``initial_state = D``, zero keys and
        values, the layer's transitions on the suffix; padding past the end has ``w = kk = a = 0``, the identity);
        ``"scan"``: one per-token scan over the batch rows adding each change at its position (``O(T)`` whatever the
        number of changes: an SAE spliced at every position); ``"auto"``: the scan when there are more changed
        positions than batch rows."""
        dev = kk.device
        H, K, V = self.n_heads, self.d_k, self.d_v
        D0, batch, pos = self._rows_on(entries, dev)
        if method == "scan" or (method == "auto" and batch.numel() > b):
            return _propagate_scan(D0, batch, pos, b, T, query, log_decay, kk, a)
        d_read = torch.zeros(b, T, H, V, dtype=torch.float32, device=dev)
        d_read.index_put_((batch, pos), torch.einsum("rhkv,rhk->rhv", D0, query[batch, pos].float()), accumulate=True)
        L = int(T - 1 - int(pos.min()))
        final = D0
        if L > 0:
            idx = pos[:, None] + 1 + torch.arange(L, device=dev)[None]
            valid = idx < T
            idc = idx.clamp(max=T - 1)
            m = valid[..., None, None].float()
            rows = batch[:, None]
            q_s, g_s, kk_s, a_s = (x[rows, idc].float() * m for x in (query, log_decay, kk, a))
            R = batch.numel()
            y, final = kernel(q_s, torch.zeros(R, L, H, K, device=dev), torch.zeros(R, L, H, V, device=dev), g_s,
                              kk_s, a_s, D0, True)
            flat = (rows * T + idx)[valid]
            d_read = d_read.view(b * T, H, V).index_add(0, flat, y.float()[valid]).view(b, T, H, V)
        d_final = torch.zeros(b, H, K, V, dtype=torch.float32, device=dev).index_add(0, batch, final.float())
        return d_read, d_final

    def _dplr_states(self, owner, entries, key, value, log_decay, kk, a, init, b, T, dense_D=None):
        """Fire ``hook_state`` with the states of the (write-edited) recurrence at the chosen positions (a per-token
        DPLR scan up to the last one); an edit of a state is added to ``entries`` as an extra write there (or, when
        the hook returns a tensor carrying gradient, returned as a dense change ``[b,T,H,K,V]``)."""
        positions, heads = resolve_capture(owner.capture_for(self), T, self.n_heads)
        dev = key.device
        H, K, V = self.n_heads, self.d_k, self.d_v
        S = torch.zeros(b, H, K, V, dtype=torch.float32, device=dev) if init is None else init.float()
        wanted = {p: i for i, p in enumerate(positions)}
        out = torch.zeros(b, len(positions), H, K, V, dtype=torch.float32, device=dev)
        decay = log_decay.float().exp()[..., None]
        al, be = -kk.float()[..., None, :], (kk.float() * a.float())[..., None]
        by_t: dict[int, list] = {}
        for (bi, tt, h), dS in entries.items():
            by_t.setdefault(tt, []).append((bi, h, dS))
        for t in range(max(positions) + 1):
            S = decay[:, t] * S + be[:, t] * (al[:, t] @ S) + key[:, t, :, :, None] * value[:, t, :, None, :]
            if t in by_t:
                S = S.clone()
                for bi, h, dS in by_t[t]:
                    S[bi, h] = S[bi, h] + dS.float().to(dev)
            if dense_D is not None:
                S = S + dense_D[:, t]
            if t in wanted:
                out[:, wanted[t]] = S
        shown = out[:, :, heads].clone()
        given = out[:, :, heads]
        f = self._fire(self.hook_state, given, lambda: shown)
        if f.replaced_differentiably(given) or (not f.edited and carries_derivative(f.raw)):
            D = torch.zeros(b, T, H, K, V, dtype=torch.float32, device=dev)
            D[:, torch.tensor(positions, device=dev)[:, None], torch.tensor(heads, device=dev)[None, :]] = \
                f.raw.float() - shown
            return D
        if f.edited:
            changed = (f.value != shown).any(-1).any(-1)
            for bi, i, j in changed.nonzero().tolist():
                k_ = (bi, positions[i], heads[j])
                entries[k_] = entries.get(k_, 0) + (f.value[bi, i, j] - shown[bi, i, j])
        return None

    def _functional(self, owner, entries, offset, b, T, key, value, dense_D=None):
        for e in owner._pending_edits or []:
            if e.layer == self.layer_idx and offset <= e.pos < offset + T and dense_D is not None:
                raise conflicting_edit_error(self.layer_idx, e.pos)
        super()._functional(owner, entries, offset, b, T, key, value, dense_D)


def _propagate_scan(D0: Tensor, batch: Tensor, pos: Tensor, b: int, T: int, query, log_decay, kk, a):
    """``X_t = T_t X_{t-1} + sum_{r: pos_r = t} D_r`` over the ``b`` batch rows from the first changed position,
    ``Delta o_t = X_t^T q_t`` (exact zeros before it); returns ``(Delta o [b,T,H,V], Delta S_T [b,H,K,V])``."""
    _, H, K, V = D0.shape
    dev = D0.device
    d_read = torch.zeros(b, T, H, V, dtype=torch.float32, device=dev)
    X = torch.zeros(b, H, K, V, dtype=torch.float32, device=dev)
    if batch.numel() == 0:
        return d_read, X
    by_pos: dict[int, list[int]] = {}
    for r_, p in enumerate(pos.tolist()):
        by_pos.setdefault(p, []).append(r_)
    t0 = min(by_pos)
    decay = log_decay.float().exp()[..., None]
    al, be = -kk.float()[..., None, :], (kk.float() * a.float())[..., None]
    q = query.float()[..., None, :]
    reads = []
    for t in range(t0, T):
        if t > t0:
            X = decay[:, t] * X + be[:, t] * (al[:, t] @ X)
        if t in by_pos:
            rows = torch.tensor(by_pos[t], dtype=torch.long, device=dev)
            X = X.index_add(0, batch[rows], D0[rows])
        reads.append((q[:, t] @ X)[..., 0, :])
    return torch.cat([d_read[:, :t0], torch.stack(reads, 1)], 1), X


def _derivative_path(deltas: dict, query, log_decay, write_key, write_value, kk, a, init, like):
    """Zero-valued ``Delta read`` carrying the first-order response to the unedited canonical hooks (``q``, ``g``,
    write factors ``k``/``v``), linearised at the layer as it ran (the torch DPLR scan, fp32)."""
    init = None if init is None else init.detach().float().clone()
    write_key, write_value, kk, a = (x.detach() for x in (write_key, write_value, kk, a))

    def fn(q, g, ek, ev):
        return rwkv7_kernel(q, write_key + ek, write_value + ev, g, kk, a, init, False)[0]

    base = [query.detach(), log_decay.detach(), torch.zeros_like(write_key), torch.zeros_like(write_value)]
    return linearised(fn, base, [deltas.get(n) for n in "qgkv"], like)


# ---------------------------------------------------------------------------------------- family
class RWKV7OutputMap:
    """``o [b,T,H,d_v] -> g_norm(o) . g`` ``[b,T,H*d_v]`` (the group norm per head, then the output gate
    ``g = g_lora(x_g)`` recorded during a forward): how an RWKV-7 read reaches ``o_proj``. The bonus term of
    ``gate_output_correction`` does not depend on the read and is left out (the closed form's direct path
    linearises this map)."""

    def __init__(self, mixer: nn.Module):
        self.mixer = mixer

    def register(self, captured: dict) -> list:
        m = self.mixer
        return [m.g_lora.register_forward_hook(lambda mod, a_, out: captured.setdefault("g", out.clone())),
                m.g_norm.register_forward_pre_hook(lambda mod, a_: [captured.setdefault("o", a_[0].clone())]
                                                   and None)]

    def read(self, captured: dict) -> Tensor:
        o = captured["o"]  # fuse_norm: [b, T, H*d_v]; nn.GroupNorm: [(b T), H*d_v]
        g = captured["g"]
        return o.reshape(*g.shape[:2], self.mixer.num_heads, self.mixer.head_v_dim)

    def apply(self, captured: dict, x: Tensor) -> Tensor:
        m = self.mixer
        b, T = x.shape[:2]
        flat = x.reshape(b, T, -1)
        normed = m.g_norm(flat) if m.fuse_norm else m.g_norm(flat.reshape(b * T, -1)).view(b, T, -1)
        return normed * captured["g"]


_HOOK_DOCS = {
    "hook_r": "[b,p,H,d_k] native receptance r (the read's query, scale 1); edits change the read",
    "hook_w": "[b,p,H,d_k] native log decay w = -0.6065 sigmoid(w_lora x_w); edits change the transitions",
    "hook_k": "[b,p,H,d_k] native write key k~ = k . (1 + (a - 1) . k_a) as the kernel gets it; edits change the "
              "write only (the output correction keeps the layer's k~)",
    "hook_v": "[b,p,H,d_v] native value (after the v_first mix); edits change the write only (not v_first)",
    "hook_kk": "[b,p,H,d_k] native erase key kk^ = l2norm(k . k_k); edits change the transitions",
    "hook_a": "[b,p,H,d_k] native in-context learning rate a = sigmoid(a_lora x_a); edits change the transitions "
              "(the write key k~ is the layer's)",
    "hook_write_key": "[b,p,H,d_k] canonical key factor k~ (fp32); edits replace the write only",
    "hook_write_value": "[b,p,H,d_v] canonical value factor v (fp32; one write mode); edits replace the write only",
    "hook_write": ("[b,p,H,d_k,d_v] dense write k~ v^T (while materialize_writes, or an SAE / named hook is on it); "
                   "edits propagate exactly"),
    "hook_write_flat": "[b,p,H*d_k*d_v] flat dense write (as hook_write)",
    "hook_log_decay": "[b,p,H,d_k] w = log decay per key channel; edits change the diagonal of the transitions",
    "hook_query": "[b,p,H,d_k] r as read (scale 1); edits change the read",
    "hook_state": ("[b,p_s,H_s,d_k,d_v] opt-in states after the write at the captured positions p_s and heads H_s; "
                   "an edit acts as an extra write"),
    "hook_read": "[b,p,H,d_v] o_t = S_t^T r_t before g_norm (fp32; the output correction's bonus term excluded); "
                 "edits replace the read",
}


class RWKV7Family(GatedDeltaNetFamily):
    """Finds fla ``RWKV7Attention`` mixers by class and ``layer_idx``; hooks under ``blocks.{l}.linear_attn``.
    One write mode (raw): ``write_mode="delta"`` is refused."""

    name = "rwkv7"
    write_rule = "dplr"  # write attribution: A_eff[t, s] = q_t^T Phi(t, s) k~_s with the DPLR transitions, value v
    hooks_class = RWKV7Hooks
    layer_label = "RWKV-7"
    #: why ``delta`` is refused (``HookedRecurrentModel.set_write_mode``, edits)
    one_write_mode = ("RWKV-7 writes have one mode: its increment over the decayed state is rank 2 (write key k~, "
                      "erase key a . kk^)")
    kernel_label = "RWKV-7 (DPLR)"

    def __init__(self, hf_model: nn.Module):  # noqa: D107 (GatedDeltaNetFamily.__init__ not called: other discovery)
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        if model_type not in RWKV7_MODEL_TYPES:
            raise UnsupportedModelError(f"{type(hf_model).__name__} (model_type={model_type!r}) is not an fla RWKV-7 "
                                        "model")
        if not fla_cpu.fla_available():
            raise UnsupportedModelError("RWKV-7 models need flash-linear-attention and triton: "
                                        "pip install 'writesae-plugin[fla]'")
        fla_cpu.route_cpu_to_torch()
        fla_cpu.route_sqrelu(hf_model)  # the FFNs built before routing: CPU calls by torch (jvp passes through)
        self.model_type = model_type
        self.module_name = RWKV7_MODEL_TYPES[model_type]
        __import__(self.module_name)
        self._module = sys.modules[self.module_name]
        self.mixers: dict[int, nn.Module] = {}
        for m in hf_model.modules():
            cls = type(m)
            if cls.__module__ == self.module_name and cls.__name__ == RWKV7_MIXER:
                self.mixers[int(m.layer_idx)] = m
        if not self.mixers:
            raise UnsupportedModelError(f"{type(hf_model).__name__} ({model_type}) has no RWKV7Attention layer")
        self.check_forwards(hf_model)
        self.kernels = install()

    @staticmethod
    def output_map(mixer: nn.Module) -> RWKV7OutputMap:
        """The read's way to ``o_proj`` (for the closed form's direct path)."""
        return RWKV7OutputMap(mixer)

    @staticmethod
    def replay_output(out, kwargs):
        """fla's decoder loop takes the cache back from each block's output ``(hidden, attentions, cache,
        v_first)``: a replayed block (``run_from_layer``) hands on the cache it was called with (``v_first`` is
        replayed as recorded)."""
        if isinstance(out, tuple) and len(out) >= 3:
            return (*out[:2], cache_from_kwargs(kwargs), *out[3:])
        return out

    def describe_hook(self, owner, name: str) -> str:
        return _HOOK_DOCS.get(name.rsplit(".", 1)[-1], "")

"""Mamba-2 write hooks for HF ``mamba2`` (hybrids: not yet; see the issue notes).

Canonical key-first frame (docs/method.md 2.2): per head, ``S_t = exp(dt'_t A_h) S_{t-1} + B_t (dt'_t x_t)^T`` with
``S`` ``[d_state, head_dim]`` (the transpose of HF's value-first ``[head_dim, d_state]`` cache), read
``y_t = S_t^T C_t`` (the ``D x`` skip is left untouched and is not part of ``hook_read``). Hooks under
``blocks.{l}.mixer.``: native ``hook_x`` ``[b,p,H,P]``, ``hook_B`` / ``hook_C`` ``[b,p,G,N]``, ``hook_dt``
``[b,p,H]`` (raw, before bias/softplus/clamp); canonical ``hook_write_key`` (B per head) ``[b,p,H,N]``,
``hook_write_value`` (``dt' x``) ``[b,p,H,P]``, ``hook_write`` / ``hook_write_flat`` (opt-in dense),
``hook_log_decay`` (``dt' A``) ``[b,p,H]``, ``hook_query`` (C per head) ``[b,p,H,N]``, ``hook_state``
(opt-in, ``[b,p_s,H_s,N,P]`` at the captured positions ``p_s`` and heads ``H_s``; in single-token decode the step's
own state), ``hook_read`` ``[b,p,H,P]`` (``N`` = d_state, ``P`` = head_dim, ``G`` groups). For Mamba-2 the raw and
delta writes coincide (the transition never erases).

Mechanism as for Gated DeltaNet: the module-level ``mamba2_chunk_scan`` / ``mamba2_selective_state_update``
are swapped for a dispatcher; edits are propagated exactly with ``mamba2_chunk_scan`` itself (zero ``x`` on
the suffix, ``initial_states`` = the state change). The fused training path is disabled while hooked.
Derivatives as for Gated DeltaNet (every hook output on the autograd path; the unedited canonical hooks through
a zero-valued first-order path over ``scalar_decay_scan``; the scan's output kept bit for bit).
"""

from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .base import (AdapterConfig, HookedRecurrentModel, UnsupportedModelError, WriteEdit, conflicting_edit_error,
                   find_decoder_layers, find_final_norm)
from .gated_deltanet import _CURRENT, GatedDeltaNetHooks, _alias, _enter, _output, cache_offset, on_device_of
from .ops import carries_derivative, linearised, straight_through, through_edited_layer, unedited_deltas
from .scalar_decay import dense_decay_scan, scalar_decay_scan

MAMBA2_MODEL_TYPES = {t: f"transformers.models.{t}.modeling_{t}" for t in
                      ("mamba2", "bamba", "nemotron_h", "falcon_h1", "zamba2", "granitemoehybrid")}


@dataclass(frozen=True)
class ScanKernels:
    """The module-level names one library's Mamba-2 mixer calls its kernels by, and what ``x`` is called.
    ``fused_falls_through``: the fused training kernel may return None and the forward then takes the
    unfused path (transformers); otherwise the family turns the fused path off itself (mamba-ssm)."""

    chunk: str
    step: str
    fused: str
    x_arg: str
    fused_falls_through: bool


HF_KERNELS = ScanKernels("mamba2_chunk_scan", "mamba2_selective_state_update", "mamba2_split_conv1d_scan_combined",
                         "hidden_states", True)
MAMBA_SSM_KERNELS = ScanKernels("mamba_chunk_scan_combined", "selective_state_update",
                                "mamba_split_conv1d_scan_combined", "x", False)
_INSTALLED: dict[str, dict] = {}


def _install(module_name: str, names: ScanKernels = HF_KERNELS) -> dict:
    if module_name in _INSTALLED:
        return _INSTALLED[module_name]
    module = sys.modules[module_name]
    original = {n: getattr(module, n) for n in (names.chunk, names.step, names.fused)
                if getattr(module, n, None) is not None}
    if names.chunk not in original or names.step not in original:
        raise UnsupportedModelError(f"{module_name} has no module-level {names.chunk} / {names.step} to hook "
                                    "(for mamba-ssm: its triton kernels did not import)")
    pure = {n: inspect.unwrap(f) for n, f in original.items()}

    def make(name):
        def dispatch(*args, **kwargs):
            layer = getattr(_CURRENT, "layer", None)
            if layer is None:
                return original[name](*args, **kwargs)
            if name == names.fused:
                if names.fused_falls_through:
                    return None  # the fused training path would hide the write: fall through to the hooked path
                raise RuntimeError(f"{name} ran while hooked; the family turns the fused path off, so the "
                                   "mixer's forward was changed")
            with on_device_of(args, kwargs):
                return layer.intercept(name, pure, args, kwargs)

        dispatch.__name__ = name
        return dispatch

    for n in original:
        setattr(module, n, make(n))
    _INSTALLED[module_name] = {"original": original, "pure": pure, "names": names}
    return _INSTALLED[module_name]


def dt_effective(dt: Tensor, dt_bias: Tensor | None, dt_limit=(0.0, float("inf")), softplus: bool = True) -> Tensor:
    """``dt' = clamp(softplus(dt + dt_bias))`` in fp32, as HF's chunk scan computes it (``softplus=False``:
    no softplus, as the kernel's ``dt_softplus`` flag)."""
    x = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    return torch.clamp(F.softplus(x) if softplus else x, min=dt_limit[0], max=dt_limit[1])


def mamba2_reference(key: Tensor, value: Tensor, log_decay: Tensor, query: Tensor, initial_state: Tensor | None = None,
                     write_edits: dict | None = None):
    """Per-token canonical recurrence: ``S_t = exp(g_t) S_{t-1} + W_t``, ``y_t = S_t^T q_t``.

    ``key [b,T,H,N]``, ``value [b,T,H,P]``, ``log_decay [b,T,H]``, ``query [b,T,H,N]``; ``initial_state``
    ``[b,H,N,P]``; ``write_edits[(b,t,h)] = W_new [N,P]``. Returns ``(read [b,T,H,P], final [b,H,N,P])``.
    """
    b, T, H, N = key.shape
    P = value.shape[-1]
    S = torch.zeros(b, H, N, P) if initial_state is None else initial_state.float().clone()
    read = torch.zeros(b, T, H, P)
    write_edits = write_edits or {}
    for t in range(T):
        W = key[:, t, :, :, None].float() * value[:, t, :, None, :].float()
        for (i, tt, h), W_new in write_edits.items():
            if tt == t:
                W[i, h] = W_new
        S = log_decay[:, t].float().exp()[..., None, None] * S + W
        read[:, t] = torch.einsum("bhnp,bhn->bhp", S, query[:, t].float())
    return read, S


def _suffix(pos: Tensor, T: int) -> tuple[int, Tensor, Tensor, Tensor]:
    """Suffix rows for the zero-value trick: length ``L`` (after the earliest changed position), the
    positions ``idx [R, L]`` after each row's own, their validity (``< T``) and ``idx`` clamped in range."""
    L = int(T - 1 - pos.min())
    idx = pos[:, None] + 1 + torch.arange(L)[None]
    return L, idx, idx < T, idx.clamp(max=T - 1)


def _skip(D: Tensor | None, x: Tensor):
    """The ``D x`` skip in fp32: ``D`` per head ``[H]`` or per channel ``[H, P]`` (mamba-ssm ``D_has_hdim``)."""
    if D is None:
        return 0.0
    return (D.float()[:, None] if D.dim() == 1 else D.float()) * x.float()


def _derivative_path(deltas: dict, query, log_decay, write_key, write_value, init, chunk, like):
    """Zero-valued ``Delta read`` carrying the first-order response to the unedited canonical hooks (``q``,
    ``g``, write factors ``k``/``v``), linearised at the layer as it ran (canonical frame, fp32)."""
    init = None if init is None else init.detach().float().clone()
    write_key, write_value = write_key.detach(), write_value.detach()

    def fn(q, g, ek, ev):
        return scalar_decay_scan(write_key + ek, write_value + ev, g, q, init, chunk)[0]

    base = [query.detach(), log_decay.detach(), torch.zeros_like(write_key), torch.zeros_like(write_value)]
    return linearised(fn, base, [deltas.get(n) for n in "qgkv"], like)


def _refuse_packed(a: dict, layer: int) -> None:
    for k in ("seq_idx", "cu_seqlens"):
        if a.get(k) is not None:
            raise NotImplementedError(f"layer {layer}: packed sequences ({k}) are not supported while hooked; "
                                      "run one sequence per batch row")
    if a.get("return_varlen_states"):
        raise NotImplementedError(f"layer {layer}: varlen states are not supported while hooked")


class Mamba2Hooks(nn.Module):
    """Hook points of one Mamba-2 mixer (``blocks.{l}.mixer``) and its exact write edits."""

    NAMES = ("hook_x", "hook_B", "hook_C", "hook_dt", "hook_write_key", "hook_write_value", "hook_write",
             "hook_write_flat", "hook_log_decay", "hook_query", "hook_state", "hook_read")

    def __init__(self, owner: HookedRecurrentModel, mixer: nn.Module, layer_idx: int, names: ScanKernels,
                 dims: tuple[int, int, int, int]):
        """``names``: the library's kernel names; ``dims = (heads, groups, d_state, head_dim)``."""
        super().__init__()
        self._owner = weakref.ref(owner)
        self._mixer = weakref.ref(mixer)
        self.layer_idx = layer_idx
        self.names = names
        self.n_heads, self.n_groups, self.d_k, self.d_v = dims
        for n in self.NAMES:
            setattr(self, n, HookPoint())
        self._kernel_called = False

    _fire = GatedDeltaNetHooks._fire  # the same edit detection as for Gated DeltaNet

    def intercept(self, name, pure, args, kwargs):
        self._kernel_called = True
        owner, mixer = self._owner(), self._mixer()
        if owner.write_mode != "raw":
            raise ValueError(f"{Mamba2FamilyBase.one_write_mode}; use write_mode='raw'")
        kn = self.names
        if name == kn.step:
            return self._decode(pure, args, kwargs, owner, mixer)
        a = inspect.signature(pure[kn.chunk]).bind(*args, **kwargs)
        a.apply_defaults()
        a = dict(a.arguments)
        extra = a.pop("kwargs", {}) or {}
        _refuse_packed(a, self.layer_idx)
        z = a.get("z")
        if z is not None:  # a gate inside the kernel (mamba-ssm without rmsnorm): applied after the read below
            a["z"] = None
        x, dt, B, C = a[kn.x_arg], a["dt"], a["B"], a["C"]
        b, T, H, P = x.shape
        rep = H // B.shape[2]
        fx, fdt, fB, fC = (self._fire(self.hook_x, x), self._fire(self.hook_dt, dt), self._fire(self.hook_B, B),
                           self._fire(self.hook_C, C))
        x, dt, B, C = fx.value, fdt.value, fB.value, fC.value
        dtp = dt_effective(dt, a["dt_bias"], a["dt_limit"], a["dt_softplus"])
        A = a["A"].float()
        key = B.float().repeat_interleave(rep, dim=2)
        value = dtp[..., None] * x.float()
        g_c, q_c = dtp * A, C.float().repeat_interleave(rep, dim=2)
        # the hooks get aliases (own autograd nodes) of the clean tensors (see gated_deltanet._alias)
        f_key = self._fire(self.hook_write_key, _alias(key), lambda: B.float().repeat_interleave(rep, dim=2))
        f_val = self._fire(self.hook_write_value, _alias(value), lambda: dtp[..., None] * x.float())
        f_g = self._fire(self.hook_log_decay, _alias(g_c), lambda: dtp * A)
        f_q = self._fire(self.hook_query, _alias(q_c), lambda: C.float().repeat_interleave(rep, dim=2))
        key = f_key.original if f_key.edited else key  # the clean factors (a hook may edit in place)
        value = f_val.original if f_val.edited else value
        g_eff = f_g.value if f_g.edited else g_c
        q_eff = f_q.value if f_q.edited else q_c
        init = a["initial_states"]
        init_c = None if init is None else init.float().transpose(-1, -2)  # HF [P, N] -> canonical [N, P]
        skip = _skip(a["D"], x)
        entries, dense_D = self._write_entries(owner, f_key, f_val, key, value, b, T)
        write_dense = dense_D
        offset = cache_offset(self, owner, init is not None, T)
        self._functional(owner, entries, offset, b, T, key, value, dense_D)
        states_edited = bool(entries) or (dense_D is not None and bool((dense_D != 0).any()))
        f_g, f_q, g_eff, q_eff, derivative_only = through_edited_layer(f_g, f_q, g_eff, q_eff, states_edited)
        canonical = f_g.edited or f_q.edited  # HF's scan cannot express these: run the canonical scan
        if canonical:
            read_c, S_c = scalar_decay_scan(key, value, g_eff, q_eff, init_c, a["chunk_size"])
            y = (read_c + skip).to(x.dtype)
            S = S_c.transpose(-1, -2).to(init.dtype if init is not None else x.dtype)
            if derivative_only:  # values: the model's own scan, bit for bit (detached: no tangent either)
                with torch.no_grad():
                    plain = {n: v_.detach() if isinstance(v_, Tensor) else v_ for n, v_ in
                             dict(a, **{kn.x_arg: x}, dt=dt, B=B, C=C, **extra).items()}
                    hf_out = pure[kn.chunk](**plain)
                y_hf, S_hf = hf_out if a["return_final_states"] else (hf_out, None)
                y = y_hf + (y - y.detach()).to(y_hf.dtype)
                if S_hf is not None:
                    S = S_hf + (S - S.detach()).to(S_hf.dtype)
            out = (y, S) if a["return_final_states"] else y
        else:
            out = pure[kn.chunk](**dict(a, **{kn.x_arg: x}, dt=dt, B=B, C=C, **extra))
            y, S = out if a["return_final_states"] else (out, None)
        if owner.capture_for(self) is not None:
            state_D = self._states(owner, entries, key, value, g_eff, init, b, T, dense_D)
            if state_D is not None:
                dense_D = state_D if dense_D is None else dense_D + state_D
        read = y.float() - skip
        d_read = d_final = None
        if entries:
            if canonical:
                d_read, d_final = self._propagate_canonical(entries, b, T, g_eff, q_eff)
            else:
                d_read, d_final = self._propagate(pure[kn.chunk], a, entries, b, T, dt, C, B)
        if dense_D is not None:  # a dense hook replaced under autograd: the differentiable torch path
            dr, df = dense_decay_scan(dense_D, g_eff, q_eff, None, a["chunk_size"])
            d_read, d_final = (dr, df) if d_read is None else (d_read + dr, d_final + df)
        if d_read is not None:
            read = read + d_read
        # unedited hooks: a zero-valued first-order path (scalar_decay_scan in the backward), so every hook output
        # is on the autograd path of the logits while the scan's output stays bit for bit
        pairs = {"q": (f_q, q_c), "g": (f_g, g_c)}
        if write_dense is None:  # otherwise the factors reach the logits through the dense write hooks
            pairs.update(k=(f_key, key), v=(f_val, value))
        deltas = unedited_deltas(pairs)
        if deltas:
            read = read + _derivative_path(deltas, q_eff, g_eff, _output(f_key), _output(f_val), init_c,
                                           a["chunk_size"], read)
        value_changed = (d_read is not None and bool((d_read != 0).any())) or canonical
        f_read = self._fire(self.hook_read, read, None if value_changed else (lambda: y.float() - skip))
        if S is not None and d_final is not None and bool((d_final != 0).any()):
            S = S + d_final.transpose(-1, -2).to(S.dtype)  # canonical [N, P] -> HF [P, N]
        if not value_changed and not f_read.edited:  # the scan's bits; derivatives through the hooks
            if z is None:
                y_new = straight_through(f_read.raw + skip, y)
            else:  # the kernel's gate, in fp32 as the kernel computes it: (y + D x) * silu(z)
                y_new = (straight_through(f_read.raw + skip, y.float()) * F.silu(z.float())).to(y.dtype)
        elif z is not None:
            y_new = ((f_read.value + skip) * F.silu(z.float())).to(y.dtype)
        else:
            y_new = (f_read.value + skip).to(y.dtype)
        return (y_new, S) if a["return_final_states"] else y_new

    def _rows(self, entries) -> tuple[Tensor, Tensor, Tensor]:
        """State changes grouped by changed (batch, position) pair: ``(D0 [R, H, N, P], batch [R], pos [R])``."""
        rows = sorted({(bi, t) for bi, t, _ in entries})
        D0 = torch.zeros(len(rows), self.n_heads, self.d_k, self.d_v)
        for (bi, t, h), dS in entries.items():
            D0[rows.index((bi, t)), h] += dS.float()
        return D0, torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    def _propagate_canonical(self, entries, b, T, log_decay, query):
        """Exact Delta y and Delta S_T of state changes under edited decays/queries: the zero-value trick
        with the canonical scan (rows = changed (batch, position) pairs)."""
        H, N, P = self.n_heads, self.d_k, self.d_v
        D0, batch, pos = self._rows(entries)
        d_read = torch.zeros(b, T, H, P)
        d_read.index_put_((batch, pos), torch.einsum("rhnp,rhn->rhp", D0, query[batch, pos].float()), accumulate=True)
        L, idx, valid, idc = _suffix(pos, T)
        final = D0
        if L > 0:
            g_s = log_decay[batch[:, None], idc].float() * valid[..., None]  # padding: g = 0 keeps the state
            q_s = query[batch[:, None], idc].float() * valid[..., None, None]
            zeros_k = torch.zeros(len(batch), L, H, N)
            y, final = scalar_decay_scan(zeros_k, torch.zeros(len(batch), L, H, P), g_s, q_s, D0)
            flat = (batch[:, None] * T + idx)[valid]
            d_read = d_read.view(b * T, H, P).index_add(0, flat, y[valid]).view(b, T, H, P)
        return d_read, torch.zeros(b, H, N, P).index_add(0, batch, final)

    def _states(self, owner, entries, key, value, log_decay, init, b, T, dense_D=None):
        """Fire ``hook_state`` with the states of the (write-edited) recurrence at the chosen positions; an
        edit of a state is added to ``entries`` as an extra write at that position (or, when the hook returns
        a tensor carrying gradient, returned as a dense change ``[b,T,H,N,P]`` for the differentiable path). The states come from a
        per-token scan (opt-in; exact: the transitions never depend on the writes)."""
        from .gated_deltanet import resolve_capture

        positions, heads = resolve_capture(owner.capture_for(self), T, self.n_heads)
        S = torch.zeros(b, self.n_heads, self.d_k, self.d_v) if init is None else init.float().transpose(-1, -2)
        wanted = {p: i for i, p in enumerate(positions)}
        out = torch.zeros(b, len(positions), self.n_heads, self.d_k, self.d_v)
        for t in range(max(positions) + 1):
            S = log_decay[:, t, :, None, None].float().exp() * S + key[:, t, :, :, None] * value[:, t, :, None, :]
            for (bi, tt, h), dS in entries.items():
                if tt == t:
                    S[bi, h] = S[bi, h] + dS.float()
            if dense_D is not None:
                S = S + dense_D[:, t]  # differentiable: a state SAE downstream of a write SAE sees its effect
            if t in wanted:
                out[:, wanted[t]] = S
        shown = out[:, :, heads].clone()
        given = out[:, :, heads]
        f = self._fire(self.hook_state, given, lambda: shown)
        if f.replaced_differentiably(given) or (not f.edited and carries_derivative(f.raw)):  # under autograd: a dense change at the captured positions
            D = torch.zeros(b, T, self.n_heads, self.d_k, self.d_v)
            D[:, torch.tensor(positions)[:, None], torch.tensor(heads)[None, :]] = f.raw.float() - shown
            return D
        if f.edited:
            changed = (f.value != shown).any(-1).any(-1)
            for bi, i, j in changed.nonzero().tolist():
                k_ = (bi, positions[i], heads[j])
                entries[k_] = entries.get(k_, 0) + (f.value[bi, i, j] - shown[bi, i, j])

    def _write_entries(self, owner, f_key, f_val, key, value, b, T) -> tuple[dict, Tensor | None]:
        """Changes of the write from the factor hooks and, while ``materialize_writes`` is on, the dense
        ``hook_write`` / ``hook_write_flat``. Returns ``(entries, dense_D)``: ``entries[(b, t, h)] = Delta W``
        for value edits (propagated with the kernel), or, when a dense hook returned a tensor that carries
        gradient (a spliced SAE under autograd), ``dense_D [b,T,H,N,P]`` = hook output - clean write at every
        position (propagated by the differentiable torch scan; it already contains any factor edits)."""
        new_key, new_val = _output(f_key), _output(f_val)
        differentiable = torch.is_grad_enabled() and ((f_key.edited and new_key.requires_grad)
                                                      or (f_val.edited and new_val.requires_grad))
        changed = None
        if f_key.edited or f_val.edited:
            changed = (new_key != key).any(-1) | (new_val != value).any(-1)
        dense = None
        if owner.writes_materialized(self):
            H, N, P = self.n_heads, self.d_k, self.d_v
            W = torch.einsum("bthn,bthp->bthnp", new_key, new_val)
            f_W = self._fire(self.hook_write, W, lambda: torch.einsum("bthn,bthp->bthnp", new_key, new_val))
            flat_in = _output(f_W).reshape(b, T, H * N * P)
            f_flat = self._fire(self.hook_write_flat, flat_in,
                                lambda: f_W.value.detach().reshape(b, T, H * N * P).clone())
            differentiable = (differentiable or f_W.replaced_differentiably(W)
                              or f_flat.replaced_differentiably(flat_in)
                              or carries_derivative(_output(f_flat)))  # capture: the dense hooks carry gradient
            dense = _output(f_flat).reshape(b, T, H, N, P)
            if f_W.edited or f_flat.edited:
                ch = (dense != torch.einsum("bthn,bthp->bthnp", new_key, new_val)).any(-1).any(-1)
                changed = ch if changed is None else changed | ch
        elif differentiable:  # factor hooks replaced under autograd
            dense = torch.einsum("bthn,bthp->bthnp", new_key, new_val)
        if differentiable:
            return {}, dense.float() - torch.einsum("bthn,bthp->bthnp", key, value)
        entries = {}
        if changed is not None:
            for bi, t, h in changed.nonzero().tolist():
                W_new = dense[bi, t, h] if dense is not None else torch.outer(new_key[bi, t, h], new_val[bi, t, h])
                entries[(bi, t, h)] = W_new - torch.outer(key[bi, t, h], value[bi, t, h])
        return entries, None

    def _functional(self, owner, entries, offset, b, T, key, value, dense_D=None):
        for i, e in enumerate(owner._pending_edits or []):
            if e.layer != self.layer_idx or not offset <= e.pos < offset + T:
                continue
            if dense_D is not None:
                raise conflicting_edit_error(self.layer_idx, e.pos)
            if e.batch is not None and not 0 <= e.batch < b:
                raise ValueError(f"WriteEdit.batch={e.batch} is out of range for a batch of {b} rows")
            A = e.atom(self.d_k, self.d_v)
            if A is not None:
                A = A.to(key.device)  # edits given on the CPU apply to a GPU model
            t = e.pos - offset
            for bi in (range(b) if e.batch is None else [e.batch]):
                if (bi, t, e.head) in entries:
                    raise ValueError(f"two edits target the same write (layer {self.layer_idx}, row {bi}, "
                                     f"position {e.pos}, head {e.head})")
                W = torch.outer(key[bi, t, e.head], value[bi, t, e.head])
                entries[(bi, t, e.head)] = A if e.op == "add" else (torch.zeros_like(W) if A is None else A) - W
            owner._applied_edits.add(i)

    def _propagate(self, chunk_scan, a, entries, b, T, dt, C, B):
        """Exact Delta y (without skip) and Delta S_T with ``mamba2_chunk_scan`` on zero-x suffix rows."""
        H, N, P = self.n_heads, self.d_k, self.d_v
        D0, batch, pos = self._rows(entries)
        rep = H // C.shape[2]
        d_read = torch.zeros(b, T, H, P)
        Cq = C.float().repeat_interleave(rep, dim=2)
        here = torch.einsum("rhnp,rhn->rhp", D0, Cq[batch, pos])
        d_read.index_put_((batch, pos), here, accumulate=True)
        L, idx, valid, idc = _suffix(pos, T)
        final = D0
        if L > 0:
            m = valid.float()
            x0 = torch.zeros(len(batch), L, H, P)
            dt_s = dt[batch[:, None], idc]
            # padding keeps the state: dt' = 0 there (dt -> -inf before softplus)
            dt_s = torch.where(valid[..., None], dt_s, torch.full_like(dt_s, -1e4))
            B_s = B[batch[:, None], idc] * m[..., None, None]
            C_s = C[batch[:, None], idc] * m[..., None, None]
            y, final = chunk_scan(x0, dt_s, a["A"], B_s, C_s, a["chunk_size"], D=None, dt_bias=a["dt_bias"],
                                  initial_states=D0.transpose(-1, -2).contiguous(), dt_softplus=a["dt_softplus"],
                                  dt_limit=a["dt_limit"], return_final_states=True)
            final = final.transpose(-1, -2)
            flat = (batch[:, None] * T + idx)[valid]
            d_read = d_read.view(b * T, H, P).index_add(0, flat, y.float()[valid]).view(b, T, H, P)
        d_final = torch.zeros(b, H, N, P).index_add(0, batch, final.float())
        return d_read, d_final

    def _decode(self, pure, args, kwargs, owner, mixer):
        """Single-token decode (HF updates the cached state in place). The hooks fire with ``p = 1``; write
        edits at this position add ``C^T Delta W`` to the read and ``Delta W`` to the cached state."""
        kn = self.names
        a = inspect.signature(pure[kn.step]).bind(*args, **kwargs)
        a.apply_defaults()
        a = dict(a.arguments)
        extra = a.pop("kwargs", {}) or {}
        if a.get("state_batch_indices") is not None:
            raise NotImplementedError(f"layer {self.layer_idx}: state_batch_indices (continuous batching) is not "
                                      "supported while hooked")
        state, x, dt, B, C = a["state"], a[kn.x_arg], a["dt"], a["B"], a["C"]
        b, H, P = x.shape
        rep = H // B.shape[1]
        fx = self._fire(self.hook_x, x[:, None])
        fdt = self._fire(self.hook_dt, dt[:, None, :, 0])
        fB, fC = self._fire(self.hook_B, B[:, None]), self._fire(self.hook_C, C[:, None])
        if fdt.edited:
            dt = fdt.value[:, 0, :, None].expand(-1, -1, P)
        x, B, C = fx.value[:, 0], fB.value[:, 0], fC.value[:, 0]
        dt_bias = a["dt_bias"]
        dtp = F.softplus(dt[..., 0].float() + (dt_bias[..., 0].float() if dt_bias is not None else 0.0))
        if not a["dt_softplus"]:
            dtp = dt[..., 0].float() + (dt_bias[..., 0].float() if dt_bias is not None else 0.0)
        A = a["A"][:, 0, 0].float()
        key = B.float().repeat_interleave(rep, dim=1)[:, None]
        value = (dtp[..., None] * x.float())[:, None]
        f_key = self._fire(self.hook_write_key, _alias(key), lambda: B.float().repeat_interleave(rep, dim=1)[:, None])
        f_val = self._fire(self.hook_write_value, _alias(value), lambda: (dtp[..., None] * x.float())[:, None])
        g_c = (dtp * A)[:, None]
        f_g = self._fire(self.hook_log_decay, _alias(g_c), lambda: (dtp * A)[:, None])
        q_c = C.float().repeat_interleave(rep, dim=1)[:, None]
        f_q = self._fire(self.hook_query, _alias(q_c), lambda: C.float().repeat_interleave(rep, dim=1)[:, None])
        g_eff = (f_g.value if f_g.edited else g_c)[:, 0]  # [b, H]
        q_eff = (f_q.value if f_q.edited else q_c)[:, 0]  # [b, H, N]
        canonical = f_g.edited or f_q.edited  # the step kernel cannot express these: update the state here
        key = f_key.original if f_key.edited else key
        value = f_val.original if f_val.edited else value
        z = a["z"]  # Falcon-H1 gates inside the state update: keep the read before the gate
        D = a["D"]
        skip = (D.float() * x.float()) if D is not None else 0.0  # D arrives expanded [H, P]
        # unedited hooks: the zero-valued first-order path of the step (as in prefill); it needs the state before
        pairs = {"q": (f_q, q_c), "g": (f_g, g_c), "k": (f_key, key), "v": (f_val, value)}
        deltas = unedited_deltas(pairs)
        S_prev = state.float().transpose(-1, -2).clone() if canonical or deltas else None
        out = pure[kn.step](**dict(a, **{kn.x_arg: x}, dt=dt, B=B, C=C, z=None, **extra))
        if canonical:
            S_new = g_eff.exp()[..., None, None] * S_prev + key[:, 0, :, :, None] * value[:, 0, :, None, :]
            state.copy_(S_new.detach().transpose(-1, -2).to(state.dtype))
            out = (torch.einsum("bhnp,bhn->bhp", S_new, q_eff) + skip).to(out.dtype)
        gate = F.silu(z) if z is not None else None
        pos = cache_offset(self, owner, True, 1)
        entries, dense_D = self._write_entries(owner, f_key, f_val, key, value, b, 1)
        self._functional(owner, entries, pos, b, 1, key, value, dense_D)
        read = out.float() - skip
        if dense_D is not None:  # the factors reach the read through the dense write hooks
            deltas.pop("k", None), deltas.pop("v", None)
        if deltas:
            read = read + _derivative_path(deltas, q_eff[:, None], g_eff[:, None], _output(f_key), _output(f_val),
                                           S_prev, 1, read[:, None])[:, 0]
        dS = torch.zeros(b, H, self.d_k, self.d_v)
        for (bi, _, h), d in entries.items():
            dS[bi, h] += d.float()
        if dense_D is not None:
            dS = dS + dense_D[:, 0]
        if owner.capture_for(self) is not None:  # the state after this step (with the write edits), [b,1,Hs,N,P]
            from .gated_deltanet import resolve_capture

            _, heads = resolve_capture(owner.capture_for(self), 1, H)
            shown = (state.float().transpose(-1, -2) + dS.detach())[:, heads][:, None].clone()
            f = self._fire(self.hook_state, shown.clone(), lambda: shown)
            if f.replaced_differentiably(shown):
                dS = dS.index_add(1, torch.tensor(heads), (f.raw.float() - shown)[:, 0])
            elif f.edited:
                dS[:, heads] += (f.value - shown)[:, 0]
        d_read = None
        if dS.requires_grad or dS.abs().sum() > 0:
            d_read = torch.einsum("bhnp,bhn->bhp", dS, q_eff)
            read = read + d_read
            # the cache holds the edited state from here on (values only: gradients stop at the cache)
            state.add_(dS.detach().transpose(-1, -2).to(state.dtype))
        value_changed = canonical or (d_read is not None and bool((d_read != 0).any()))
        f_read = self._fire(self.hook_read, read[:, None], None if value_changed else
                            (lambda: (out.float() - skip)[:, None]))
        if not value_changed and not f_read.edited:  # the step kernel's bits; derivatives through the hooks
            y = straight_through(f_read.raw[:, 0] + skip, out)
            return y if gate is None else y * gate
        y = (f_read.value[:, 0] + skip).to(out.dtype)
        return y if gate is None else y * gate


class Mamba2FamilyBase:
    """What the transformers and mamba-ssm Mamba-2 families share: edit validation, module names and the hook
    inventory, over ``self.mixers`` (layer -> mixer) and ``dims(mixer) = (heads, groups, d_state, head_dim)``."""

    block_attr = "mixer"
    #: why ``delta`` is refused (``HookedRecurrentModel.set_write_mode``, edits): the writes have one mode
    one_write_mode = "Mamba-2 writes have one mode: its raw and delta writes coincide (the transition never erases)"
    mixers: dict[int, nn.Module]

    @staticmethod
    def dims(mixer: nn.Module) -> tuple[int, int, int, int]:
        raise NotImplementedError

    def validate_edit(self, owner, e: WriteEdit) -> None:
        if e.layer not in self.mixers:
            raise ValueError(f"WriteEdit.layer={e.layer} is not a Mamba-2 layer; recurrent layers are "
                             f"{sorted(self.mixers)}")
        H, _, N, P = self.dims(self.mixers[e.layer])
        if not 0 <= e.head < H:
            raise ValueError(f"WriteEdit.head={e.head} out of range: layer {e.layer} has {H} heads")
        e.atom(N, P)

    def hf_module_name(self, hf_model, layer: int) -> str:
        return next(n for n, m in hf_model.named_modules() if m is self.mixers[layer])

    def describe_hook(self, owner, name: str) -> str:
        return _HOOK_DOCS.get(name.rsplit(".", 1)[-1], "")


class Mamba2Family(Mamba2FamilyBase):
    """Finds ``Mamba2Mixer`` modules by class and ``layer_idx`` and builds ``blocks.{l}.mixer`` hooks."""

    name = "mamba2"

    @staticmethod
    def dims(mixer: nn.Module) -> tuple[int, int, int, int]:
        return mixer.num_heads, mixer.n_groups, mixer.ssm_state_size, mixer.head_dim

    def __init__(self, hf_model: nn.Module, model_type: str):
        self.model_type = model_type
        self.module_name = MAMBA2_MODEL_TYPES[model_type]
        __import__(self.module_name)
        self.mixers = {int(m.layer_idx): m for m in hf_model.modules()
                       if type(m).__module__ == self.module_name and all(
                           hasattr(m, a) for a in ("A_log", "dt_bias", "ssm_state_size", "n_groups", "layer_idx"))}
        if not self.mixers:
            raise UnsupportedModelError(f"{type(hf_model).__name__} has no Mamba-2 mixer")
        for m in self.mixers.values():
            if "forward" in m.__dict__ or type(m).forward.__module__ != self.module_name:
                raise UnsupportedModelError(f"the forward of {type(m).__name__} was replaced; the write hooks need "
                                            "the transformers forward")
        self.kernels = _install(self.module_name)

    def decoder_layers(self, hf_model) -> nn.ModuleList:
        return find_decoder_layers(hf_model, next(iter(self.mixers.values())))

    def final_norm(self, hf_model) -> nn.Module:
        return find_final_norm(hf_model, self.decoder_layers(hf_model))

    def build_blocks(self, owner: HookedRecurrentModel) -> nn.ModuleList:
        blocks = nn.ModuleList()
        for i in range(len(self.decoder_layers(owner.hf_model))):
            block = nn.Module()
            if i in self.mixers:
                hooks = Mamba2Hooks(owner, self.mixers[i], i, HF_KERNELS, self.dims(self.mixers[i]))
                block.mixer = hooks
                owner.track(self.mixers[i].register_forward_pre_hook(_enter(hooks), with_kwargs=True))
                owner.track(self.mixers[i].register_forward_hook(_leave(hooks)))
                owner.track(self.mixers[i].register_forward_hook(_clear, always_call=True))
            blocks.append(block)
        return blocks

    def make_config(self, owner: HookedRecurrentModel) -> AdapterConfig:
        hf, cfg = owner.hf_model, owner.hf_model.config
        H, G, N, P = self.dims(next(iter(self.mixers.values())))
        param = next(hf.parameters())
        return AdapterConfig(
            model_name=getattr(cfg, "_name_or_path", "") or type(hf).__name__, family=self.model_type,
            n_layers=len(self.decoder_layers(hf)), d_model=cfg.hidden_size,
            d_vocab=hf.get_output_embeddings().weight.shape[0], n_ctx=2048, device=torch.device(param.device),
            dtype=param.dtype, recurrent_layers=tuple(sorted(self.mixers)), d_k=N, d_v=P, n_heads=H, n_key_heads=G,
            normalization_type="RMS", positional_embedding_type="none")



_HOOK_DOCS = {
    "hook_x": "[b,p,H,P] native x after the conv; edits change the write",
    "hook_B": "[b,p,G,N] native B (shared by the heads of a group); edits change the write",
    "hook_C": "[b,p,G,N] native C; edits change the read",
    "hook_dt": "[b,p,H] raw dt (before bias, softplus, clamp); edits change write and decay",
    "hook_write_key": "[b,p,H,N] canonical key factor B (fp32, per head); edits replace the write only",
    "hook_write_value": "[b,p,H,P] canonical value factor dt' x; edits replace the write only",
    "hook_write": ("[b,p,H,N,P] dense write (while materialize_writes, or an SAE / named hook is on it); "
                   "edits propagate exactly"),
    "hook_write_flat": "[b,p,H*N*P] flat dense write (as hook_write)",
    "hook_log_decay": "[b,p,H] dt' A (log of the scalar decay); edits change the transitions only (exact, "
                      "canonical scan)",
    "hook_query": "[b,p,H,N] C per head as read; edits change this head's read only (exact, canonical scan)",
    "hook_state": ("[b,p_s,H_s,N,P] opt-in states after the write (key-first: N = d_state, P = head_dim) at the "
                   "captured positions p_s and heads H_s; an edit acts as an extra write"),
    "hook_read": "[b,p,H,P] y_t = S_t^T C_t without the D x skip (fp32); edits replace the read",
}


def _leave(hooks):
    def post(module, args, output):
        if not hooks._kernel_called:
            raise RuntimeError(f"layer {hooks.layer_idx}: the Mamba-2 forward ran without calling the scan by name; "
                               "its forward was replaced")

    return post


def _clear(module, args, output):
    _CURRENT.layer = None

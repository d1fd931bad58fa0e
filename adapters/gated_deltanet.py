"""Gated DeltaNet write hooks for HF ``qwen3_5`` (+``_text``, ``_moe``), ``qwen3_next``, ``olmo_hybrid``,
``qwen4_exp``.

Mechanism (ECOSYSTEM.md): every GDN mixer calls the module-level ``torch_chunk_gated_delta_rule`` (prefill)
or ``torch_recurrent_gated_delta_rule`` (single-token decode) by name at call time. The adapter swaps those
module globals for a dispatcher and puts a forward-pre-hook on each mixer, so the dispatcher knows which
layer is calling; calls from unhooked models pass straight through. With no edit the layer runs the very
call HF would have made, so logits stay bit-identical. Edits are propagated exactly with the same kernel
(``ops.propagate``, the zero-value suffix trick).

Derivatives: every hook output is on the autograd path of the logits, so TransformerLens backward hooks,
nnsight ``.grad`` and forward-mode AD (``torch.func.jvp``, ``forward_ad``) through a hook edit all see the
same derivative. The model's kernel still runs on the native tensors (capture-only logits bit-identical);
the canonical hooks that were not edited reach the read through a path that is exactly zero in value and
carries their first-order effect (``ops.linearised`` over ``ops.delta_rule_scan``, computed in the backward),
and ``ops.straight_through`` returns the kernel's bits with the read hook's derivatives. A factor's gradient
holds the transitions fixed (its edit semantics); with edits in the same forward, decay and query gradients
are taken through the edited layer. Nothing of size ``T x d_k x d_v`` is formed unless a dense hook is on.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from . import fla_cpu, ops
from .base import (AdapterConfig, HookedRecurrentModel, StateCapture, UnsupportedModelError, WriteEdit,
                   cache_from_kwargs, conflicting_edit_error, find_decoder_layers, find_final_norm)
from .reference import l2_normalize

#: model_type -> the transformers modeling module holding its GDN mixer and kernels
GDN_MODEL_TYPES = {
    "qwen3_5": "transformers.models.qwen3_5.modeling_qwen3_5",
    "qwen3_5_text": "transformers.models.qwen3_5.modeling_qwen3_5",
    "qwen3_5_moe": "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "qwen3_5_moe_text": "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "qwen3_next": "transformers.models.qwen3_next.modeling_qwen3_next",
    "olmo_hybrid": "transformers.models.olmo_hybrid.modeling_olmo_hybrid",
    "qwen4_exp": "transformers.models.qwen4_exp.modeling_qwen4_exp",
    "qwen4_exp_text": "transformers.models.qwen4_exp.modeling_qwen4_exp",
}
CHUNK = "torch_chunk_gated_delta_rule"
RECURRENT = "torch_recurrent_gated_delta_rule"

_CURRENT = threading.local()  # .layer: the GatedDeltaNetHooks whose mixer is running


def available_model_types() -> list[str]:
    """GDN model types whose modeling module exists in the installed transformers."""
    import importlib.util

    return [t for t, m in GDN_MODEL_TYPES.items() if importlib.util.find_spec(m) is not None]


# ---------------------------------------------------------------------------------------- kernel swap
class _Kernels:
    """The kernels of one modeling module: what HF bound (maybe fla) and the pure-torch functions.
    ``names``: the module-level (prefill chunk kernel, single-token recurrent kernel) names."""

    def __init__(self, module, names: tuple[str, str] = (CHUNK, RECURRENT)):
        self.module = module
        self.chunk_name = names[0]
        self.original = {n: getattr(module, n) for n in names}
        self.pure = {n: inspect.unwrap(f) for n, f in self.original.items()}
        self.signature = {n: inspect.signature(f) for n, f in self.pure.items()}

    def main(self, name: str, device: torch.device):
        """The function HF would run: its bound kernel, except pure torch for CPU tensors (CPU hazard)."""
        return self.pure[name] if device.type == "cpu" else self.original[name]

    def chunk(self, device: torch.device):
        return self.main(self.chunk_name, device)


_INSTALLED: dict[str, _Kernels] = {}
_ROUTE_CPU = threading.Event()  # set by fla_cpu.route_cpu_to_torch: unhooked CPU calls run the pure-torch kernel


def route_cpu_calls() -> None:
    """Send calls of the swapped kernels from unhooked models to the pure-torch functions when their tensors are on
    the CPU (transformers binds fla's triton kernels when fla is importable; those cannot run on a CPU). Set by
    :func:`writesae_plugin.adapters.fla_cpu.route_cpu_to_torch`; other devices keep the bound kernel."""
    _ROUTE_CPU.set()


def on_device_of(args, kwargs):
    """Context that makes tensor factories without a device inside an intercepted kernel call allocate on the
    device of the call's first tensor argument (so the edit machinery runs on a GPU model's device); a
    no-op for CPU tensors."""
    dev = next((v.device for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
    return contextlib.nullcontext() if dev is None or dev.type == "cpu" else torch.device(dev)


def _install(module_name: str, names: tuple[str, str] = (CHUNK, RECURRENT)) -> _Kernels:
    """Swap the module-level kernels ``names`` of ``module_name`` for dispatchers (once per module)."""
    if module_name in _INSTALLED:
        return _INSTALLED[module_name]
    module = sys.modules[module_name]
    kernels = _Kernels(module, names)

    def make(name):
        original = kernels.original[name]

        def dispatch(*args, **kwargs):
            layer = getattr(_CURRENT, "layer", None)
            if layer is None:
                if _ROUTE_CPU.is_set() and fla_cpu.on_cpu(args, kwargs):
                    return kernels.pure[name](*args, **kwargs)
                return original(*args, **kwargs)
            with on_device_of(args, kwargs):
                return layer.intercept(name, kernels, args, kwargs)

        dispatch.__wrapped_by_writesae__ = original
        dispatch.__name__ = name
        return dispatch

    for n in names:
        setattr(module, n, make(n))
    _INSTALLED[module_name] = kernels
    return kernels


# ---------------------------------------------------------------------------------------- per-layer hooks
def _version(x: Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # inference tensors track no version
        return None


@dataclass
class _Fired:
    value: Tensor
    edited: bool
    original: Tensor | None = None
    raw: Tensor | None = None  # what the hook returned

    def replaced_differentiably(self, given: Tensor) -> bool:
        """The hook returned another tensor that carries gradient (e.g. a spliced SAE under autograd)."""
        return (self.raw is not None and self.raw is not given and torch.is_grad_enabled()
                and self.raw.requires_grad)


class GatedDeltaNetHooks(nn.Module):
    """Hook points of one GDN layer (``blocks.{l}.linear_attn``) and the exact edit logic.

    Subclasses for other delta-rule families override :meth:`dims` and :meth:`l2norm` (the kernel's own
    in-kernel norm, so the canonical key has the kernel's bits); the log decay may be per head ``[b,T,H]`` or
    per key channel ``[b,T,H,d_k]`` (``ops`` takes either). ``erase = False`` (GLA) drops the erase from the
    transitions (``T_t = Diag(alpha_t)``; beta then only scales the write), with a kernel that takes beta as the
    write's scale; ``states_method`` is how :func:`ops.states_at` computes captured states (``"kernel"``: by the
    family's kernel, for transitions the delta-rule scan does not express)."""

    erase = True
    states_method = "auto"

    @staticmethod
    def dims(mixer: nn.Module) -> tuple[int, int, int, int]:
        """``(value heads, key heads, d_k, d_v)`` of a mixer."""
        return mixer.num_v_heads, mixer.num_k_heads, mixer.head_k_dim, mixer.head_v_dim

    @staticmethod
    def l2norm(x: Tensor) -> Tensor:
        """The in-kernel L2 norm (fp32)."""
        return l2_normalize(x)

    def __init__(self, owner: HookedRecurrentModel, mixer: nn.Module, layer_idx: int):
        super().__init__()
        self._owner = weakref.ref(owner)
        self._mixer = weakref.ref(mixer)
        self.layer_idx = layer_idx
        self.n_heads, self.n_key_heads, self.d_k, self.d_v = self.dims(mixer)
        for name in ("hook_q", "hook_k", "hook_v", "hook_beta", "hook_write_key", "hook_write_value",
                     "hook_write", "hook_write_flat", "hook_log_decay", "hook_query", "hook_state", "hook_read"):
            setattr(self, name, HookPoint())
        self._kernel_called = False

    # ---- hook firing with edit detection (no copies on the capture path)
    def _fire(self, hp: HookPoint, x: Tensor, recompute=None) -> _Fired:
        v0 = _version(x)
        out = hp(x)
        name = getattr(hp, "name", None) or type(hp).__name__
        if out is None:
            raise ValueError(f"{name} returned None; a hook must return the activation or edit it in place")
        if out is x and v0 is not None and _version(x) == v0:
            return _Fired(x, False, raw=out)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"an edit of {name} must keep its shape {list(x.shape)}, got {got}")
        if not torch.isfinite(out).all():
            raise ValueError(f"an edit of {name} contains NaN or inf")
        if recompute is None:
            return _Fired(out, True, raw=out)
        original = recompute()
        if torch.equal(out, original):  # not an edit; a replacement that carries derivatives (TransformerLens
            # backward hooks, x + zeros(requires_grad), a dual tensor) reaches the logits through ``raw``
            return _Fired(original, False, raw=out)
        return _Fired(out.to(original.dtype), True, original, raw=out)  # .to keeps the graph

    # ---- the intercepted kernel call
    def intercept(self, name: str, kernels: _Kernels, args, kwargs):
        self._kernel_called = True
        owner = self._owner()
        bound = kernels.signature[name].bind(*args, **kwargs)
        given = set(bound.arguments) - {"kwargs"}  # what HF passed (an fla kernel takes no torch-only defaults)
        bound.apply_defaults()
        a = dict(bound.arguments)
        extra = a.pop("kwargs", {}) or {}
        if extra.get("cu_seqlens") is not None:
            raise NotImplementedError("packed sequences (cu_seqlens) are not supported by the write hooks; "
                                      "pass padded batches with an attention_mask")
        q, k, v, g, beta = a["query"], a["key"], a["value"], a["g"], a["beta"]
        init, out_final, l2 = a["initial_state"], a["output_final_state"], a["use_qk_l2norm_in_kernel"]
        b, T, Hk, d_k = k.shape
        H, d_v = v.shape[-2:]
        if (Hk, H, d_k, d_v) != (self.n_key_heads, self.n_heads, self.d_k, self.d_v):
            if Hk == H == self.n_heads != self.n_key_heads:
                import transformers

                raise RuntimeError(f"layer {self.layer_idx}: the kernel received the key heads already repeated to "
                                   f"the {H} value heads, as transformers < 5.23 does (installed: "
                                   f"{transformers.__version__}); the write hooks need transformers >= 5.23")
            raise RuntimeError(f"layer {self.layer_idx}: kernel inputs do not match the mixer's heads/dims "
                               f"(key heads {Hk}, value heads {H}, d_k {d_k}, d_v {d_v}; expected "
                               f"{(self.n_key_heads, self.n_heads, self.d_k, self.d_v)})")
        offset = cache_offset(self, owner, init is not None, T)
        dev = k.device
        chunk = kernels.chunk(dev)

        # native hooks
        fq, fk, fv, fb = (self._fire(self.hook_q, q), self._fire(self.hook_k, k), self._fire(self.hook_v, v),
                          self._fire(self.hook_beta, beta))
        q2, k2, v2, beta2 = fq.value, fk.value, fv.value, fb.value

        # canonical frame, fp32, per value head
        rep = H // Hk
        norm = self.l2norm if l2 else (lambda x: x.float())
        qn = norm(q2).repeat_interleave(rep, dim=2)
        kn = norm(k2).repeat_interleave(rep, dim=2)
        v32, beta32 = v2.float(), beta2.float()
        scale = d_k ** -0.5
        mode = owner.write_mode
        raw_value = beta32[..., None] * v32
        if mode == "delta":
            prev = ops.previous_reads(chunk, kn, v32, g.float(), beta32, init)
            write_value = beta32[..., None] * (v32 - prev)
        else:
            write_value = raw_value

        # the canonical hooks get aliases (own autograd nodes) of the clean tensors: a hook's gradient is then
        # only what flows through its output, never what reaches the clean tensor along other paths
        f_key = self._fire(self.hook_write_key, _alias(kn), lambda: norm(k2).repeat_interleave(rep, dim=2))
        f_val = self._fire(self.hook_write_value, _alias(write_value),
                           lambda: beta32[..., None] * (v32 - prev) if mode == "delta" else beta32[..., None] * v32)
        kn = f_key.original if f_key.edited else kn  # transitions always use the model's own key
        write_value = f_val.original if f_val.edited else write_value
        g32, qs = g.float(), qn * scale
        f_g = self._fire(self.hook_log_decay, g32.clone(), lambda: g.float())
        f_query = self._fire(self.hook_query, _alias(qs), lambda: qn * scale)
        g_tr = f_g.value if f_g.edited else g32
        query_scaled = f_query.value if f_query.edited else qs
        q_kernel = query_scaled / scale if f_query.edited else qn

        # write edits: hooks (factors, then dense) and functional edits -> dense Delta S per (b, t, h)
        hook_changed = None
        new_key, new_val = _output(f_key), _output(f_val)
        if f_key.edited or f_val.edited:
            hook_changed = (new_key != kn).any(-1) | (new_val != write_value).any(-1)
        dense_new = None
        dense_grad = torch.is_grad_enabled() and ((f_key.edited and new_key.requires_grad)
                                                  or (f_val.edited and new_val.requires_grad))
        if dense_grad and not owner.writes_materialized(self):  # factor hooks replaced under autograd: dense path
            dense_new = torch.einsum("bthk,bthv->bthkv", new_key, new_val)
        if owner.writes_materialized(self):
            W = torch.einsum("bthk,bthv->bthkv", new_key, new_val)
            f_W = self._fire(self.hook_write, W, lambda: torch.einsum("bthk,bthv->bthkv", new_key, new_val))
            W_in = _output(f_W)
            flat_in = W_in.reshape(b, T, H * d_k * d_v)
            f_flat = self._fire(self.hook_write_flat, flat_in, lambda: W_in.detach().reshape(b, T, -1).clone())
            dense_grad = (dense_grad or f_W.replaced_differentiably(W) or f_flat.replaced_differentiably(flat_in)
                          or ops.carries_derivative(_output(f_flat)))  # capture: the dense hooks carry gradient
            dense_new = _output(f_flat).reshape(b, T, H, d_k, d_v)
            if f_W.edited or f_flat.edited:
                base = torch.einsum("bthk,bthv->bthkv", new_key, new_val)
                ch = (dense_new != base).any(-1).any(-1)
                hook_changed = ch if hook_changed is None else hook_changed | ch
        # a differentiable dense hook (e.g. a spliced SAE under autograd) takes the differentiable path:
        # D = hook output - clean write at every position, with an exact adjoint in backward
        dense_D = None
        if dense_new is not None and dense_grad:
            dense_D = dense_new - torch.einsum("bthk,bthv->bthkv", kn, write_value)
            hook_changed = None  # D already contains any factor edits (dense_new was built from them)
        entries: dict[tuple[int, int, int], tuple[Tensor, bool]] = {}  # (b,t,h) -> (Delta S, delta-mode?)
        if hook_changed is not None and hook_changed.any():
            for bi, t, h in hook_changed.nonzero().tolist():
                W_new = dense_new[bi, t, h] if dense_new is not None else torch.outer(new_key[bi, t, h],
                                                                                    new_val[bi, t, h])
                W_old = torch.outer(kn[bi, t, h], write_value[bi, t, h])
                entries[(bi, t, h)] = (W_new - W_old, mode == "delta")
        self._functional_edits(owner, entries, offset, b, T, kn, raw_value, v32, beta32, g, init, chunk, dense_D)
        # the read / transitions go through the canonical kernel for derivatives only (derivative_only)
        states_edited = bool(entries) or (dense_D is not None and bool((dense_D != 0).any()))
        f_g, promoted_q, g_tr, query_scaled, derivative_only = ops.through_edited_layer(
            f_g, f_query, g_tr, query_scaled, states_edited)
        if promoted_q is not f_query:
            f_query, q_kernel = promoted_q, promoted_q.value / scale

        # main call: exactly what HF would run unless the read or the transitions were edited
        rest = {n: v_ for n, v_ in a.items() if n in given and n not in ("query", "key", "value")}
        rest["beta"] = beta2  # q, k, v by position: HF's torch kernels name them query/key/value, fla's q/k/v
        if not (f_query.edited or f_g.edited):
            o, S = kernels.main(name, dev)(q2, k2, v2, **rest, **extra)
        else:
            o, S = ops.kernel_canonical(chunk, q_kernel, kn, v32, g_tr, beta32, init, out_final)
            if derivative_only:  # values: the model's own kernel, bit for bit; derivatives: the canonical one
                with torch.no_grad():  # detached inputs: no tangent either (forward-mode AD ignores no_grad)
                    plain = {n: v_.detach() if isinstance(v_, Tensor) else v_ for n, v_ in rest.items()}
                    o_hf, S_hf = kernels.main(name, dev)(q2.detach(), k2.detach(), v2.detach(), **plain, **extra)
                o = o_hf + (o - o.detach()).to(o_hf.dtype)
                if S is not None and S_hf is not None:
                    S = S_hf + (S - S.detach()).to(S_hf.dtype)

        beta_tr = beta32 if self.erase else torch.zeros_like(beta32)  # the transitions' erase strength
        delta_read = delta_final = None
        pert = None
        dense_changed = None
        if dense_D is not None:
            dense_changed = (dense_D.detach() != 0).any(-1).any(-1)  # [b, T, H]
        if entries or (dense_changed is not None and mode == "delta" and dense_changed.any()):
            beta_tr = beta_tr.clone()
            for (bi, t, h), (_, is_delta) in entries.items():
                if is_delta:
                    beta_tr[bi, t, h] = 0.0
            if dense_changed is not None and mode == "delta":
                beta_tr = beta_tr.masked_fill(dense_changed, 0.0)
        if entries:
            pert = _group(entries, H, d_k, d_v, dev)
            res = ops.propagate(chunk, pert, q_kernel, query_scaled, kn, g_tr, beta_tr)
            delta_read, delta_final = res.delta_read, res.delta_final
        if dense_D is not None:
            d_read, d_final = _dense_path(dense_D, chunk, q_kernel, query_scaled, kn, g_tr, beta_tr)
            delta_read = d_read if delta_read is None else delta_read + d_read
            delta_final = d_final if delta_final is None else delta_final + d_final
            rows = dense_changed.any(-1).nonzero()
            states_need_grad = owner.capture_for(self) is not None and dense_D.requires_grad and torch.is_grad_enabled()
            if states_need_grad:  # the captured states must carry the dense change's gradient: every row
                rows = torch.ones(b, T, dtype=torch.bool, device=dense_D.device).nonzero()
            if rows.numel():
                values = dense_D[rows[:, 0], rows[:, 1]]
                dense_pert = ops.Perturbations(rows[:, 0], rows[:, 1], values if states_need_grad else values.detach())
                pert = dense_pert if pert is None else ops.Perturbations(
                    torch.cat([pert.batch, dense_pert.batch]), torch.cat([pert.pos, dense_pert.pos]),
                    torch.cat([pert.delta_state, dense_pert.delta_state]))

        # opt-in states
        if owner.capture_for(self) is not None:
            extra_pert = self._states(owner.capture_for(self), chunk, kn, v32, g_tr, beta32, init, pert,
                                      beta_tr, b, T)
            if isinstance(extra_pert, Tensor):  # differentiable state edit: dense D over all positions
                d_read, d_final = _dense_path(extra_pert, chunk, q_kernel, query_scaled, kn, g_tr, beta_tr)
                delta_read = d_read if delta_read is None else delta_read + d_read
                delta_final = d_final if delta_final is None else delta_final + d_final
            elif extra_pert is not None:
                res = ops.propagate(chunk, extra_pert, q_kernel, query_scaled, kn, g_tr, beta_tr)
                delta_read = res.delta_read if delta_read is None else delta_read + res.delta_read
                delta_final = res.delta_final if delta_final is None else delta_final + res.delta_final

        # the hooks not edited get their derivatives by a path that is zero in value (reverse mode: computed in
        # the backward by ops.delta_rule_scan; forward mode: its difference), so the model's own kernel output
        # stays bit for bit and every hook output is on the autograd path of the logits
        pairs = {"q": (f_query, qs), "g": (f_g, g32)}
        if dense_D is None:  # otherwise the factors reach the logits through the dense write hooks
            pairs.update(k=(f_key, kn), v=(f_val, write_value))
        deltas = ops.unedited_deltas(pairs)
        o32 = o.float()
        src = o32 if delta_read is None else o32 + delta_read
        if deltas:
            src = src + self._derivative_path(deltas, query_scaled, g_tr, kn, beta_tr, new_key, new_val, raw_value,
                                              mode, init, o32)
        value_changed = delta_read is not None and bool((delta_read != 0).any())
        f_read = self._fire(self.hook_read, src, None if value_changed else (lambda: o.float()))
        if S is not None and delta_final is not None and bool((delta_final != 0).any()):
            S = (S.float() + delta_final).to(S.dtype)
        if not value_changed and not f_read.edited:
            return ops.straight_through(f_read.raw, o), S  # the model's bits; derivatives through the hooks
        return f_read.value.to(o.dtype), S

    @staticmethod
    def _derivative_path(deltas, query, g, key, beta, write_key, write_value, raw_value, mode, init, like):
        """Zero-valued ``Delta o`` carrying the first-order response to the unedited canonical hooks (read query
        ``q``, log decay ``g``, write factors ``k``/``v``), linearised at the layer as it ran."""
        init = None if init is None else init.detach().float().clone()
        key, beta, write_key, write_value, raw_value = (t.detach() for t in (key, beta, write_key, write_value,
                                                                               raw_value))

        def fn(q, g_, ek, ev):
            if mode == "delta":  # the dynamics write beta v; a factor change adds a write on top of it
                keys, values = torch.stack([key, ek], 3), torch.stack([raw_value + ev, write_value], 3)
            else:
                keys, values = write_key + ek, write_value + ev
            return ops.delta_rule_scan(q, keys, values, key, beta, g_, init)[0]

        zero_k, zero_v = torch.zeros_like(key), torch.zeros_like(raw_value)
        base = [query.detach(), g.detach(), zero_k, zero_v]
        return ops.linearised(fn, base, [deltas.get(n_) for n_ in "qgkv"], like)

    def _functional_edits(self, owner, entries, offset, b, T, kn, raw_value, v32, beta32, g, init, chunk,
                          dense_D=None):
        pending = owner._pending_edits
        if not pending:
            return
        delta_value = None
        for i, e in enumerate(pending):
            if e.layer != self.layer_idx or not offset <= e.pos < offset + T:
                continue
            if dense_D is not None:
                raise conflicting_edit_error(self.layer_idx, e.pos)
            if e.batch is not None and not 0 <= e.batch < b:
                raise ValueError(f"WriteEdit.batch={e.batch} is out of range for a batch of {b} rows")
            t = e.pos - offset
            A = e.atom(self.d_k, self.d_v)
            if A is not None:
                A = A.to(kn.device)
            rows = range(b) if e.batch is None else [e.batch]
            if e.mode == "delta" and e.op != "add" and delta_value is None:
                prev = ops.previous_reads(chunk, kn, v32, g.float(), beta32, init)
                delta_value = beta32[..., None] * (v32 - prev)
            for bi in rows:
                key = (bi, t, e.head)
                if key in entries:
                    raise ValueError(f"two edits target the same write (layer {self.layer_idx}, batch row {bi}, "
                                     f"position {e.pos}, head {e.head})")
                if e.op == "add":
                    entries[key] = (A, False)
                    continue
                value = raw_value if e.mode == "raw" else delta_value
                W_old = torch.outer(kn[bi, t, e.head], value[bi, t, e.head])
                W_new = torch.zeros_like(W_old) if A is None else A
                entries[key] = (W_new - W_old, e.mode == "delta")
            owner._applied_edits.add(i)

    def _states(self, capture: StateCapture, chunk, kn, v32, g, beta32, init, pert, beta_tr, b, T):
        """Fire ``hook_state``; return the perturbations its edits imply (None; or a dense ``D`` over all
        positions when the hook returned a differentiable replacement)."""
        positions, heads = resolve_capture(capture, T, self.n_heads)
        pos_t = torch.tensor(positions, device=kn.device)
        S = ops.states_at(chunk, kn, v32, g, beta32, init, max(positions) + 1, positions=pos_t,
                          method=self.states_method)
        if pert is not None:
            S = S + ops.propagated_states(chunk, pert, kn, g, beta_tr, pos_t, b)
        S = S[:, :, heads]
        shown = S.clone()
        f = self._fire(self.hook_state, _alias(S), lambda: shown)
        if f.replaced_differentiably(S) or (not f.edited and ops.carries_derivative(f.raw)):
            D = torch.zeros(b, T, self.n_heads, self.d_k, self.d_v, dtype=torch.float32, device=kn.device)
            D[:, pos_t[:, None], torch.tensor(heads, device=kn.device)[None, :]] = f.raw.float() - shown
            return D
        if not f.edited:
            return None
        changed = (f.value != shown).any(-1).any(-1)  # [b, P, Hs]
        entries = {}
        for bi, i, j in changed.nonzero().tolist():
            key = (bi, positions[i], heads[j])
            entries[key] = entries.get(key, 0) + (f.value[bi, i, j] - shown[bi, i, j])
        return _group({k_: (d, False) for k_, d in entries.items()}, self.n_heads, self.d_k, self.d_v, kn.device)


def _alias(x: Tensor) -> Tensor:
    """A view of ``x`` with its own autograd node (what a hook point is given)."""
    return x.view_as(x)


def _output(f: _Fired) -> Tensor:
    """What a factor hook returned (its own output when not edited, so dense hooks built on it pass their
    gradient on to it)."""
    return f.value if f.edited else f.raw


def _dense_path(D, chunk, q, query_scaled, k, g, beta):
    """``(Delta o, Delta S_T)`` of dense state changes ``D [b,T,H,d_k,d_v]``: the kernel on the changed rows with
    an adjoint backward, or (forward-mode autodiff) the decoupled delta-rule scan with identity write keys."""
    if ops.in_functorch_or_forward_ad(D, q, k, g, beta):
        d_k = D.shape[-2]
        eye = torch.eye(d_k, device=D.device).expand(*D.shape[:3], d_k, d_k)
        return ops.delta_rule_scan(query_scaled, eye, D, k, beta, g)
    return ops.DensePerturbationPath.apply(D, chunk, q, query_scaled, k, g, beta)


def resolve_capture(capture: StateCapture, T: int, n_heads: int) -> tuple[list[int], list[int]]:
    """Local positions and value heads of a :class:`StateCapture` for a call of ``T`` positions."""
    if capture.positions == "all":
        positions = list(range(T))
    elif capture.positions == "last":
        positions = [T - 1]
    else:
        positions = [p + T if p < 0 else p for p in capture.positions]
        if any(not 0 <= p < T for p in positions):
            raise ValueError(f"StateCapture positions {list(capture.positions)} out of range for {T} positions")
    heads = list(range(n_heads)) if capture.heads is None else list(capture.heads)
    if any(not 0 <= h < n_heads for h in heads):
        raise ValueError(f"StateCapture heads {heads} out of range for {n_heads} value heads")
    return positions, heads


def _group(entries, H, d_k, d_v, device) -> ops.Perturbations:
    """Merge per-(b, t, h) state changes into one perturbation row per (b, t)."""
    rows = sorted({(bi, t) for bi, t, _ in entries})
    index = {r: i for i, r in enumerate(rows)}
    D = torch.zeros(len(rows), H, d_k, d_v, dtype=torch.float32, device=device)
    for (bi, t, h), (dS, _) in entries.items():
        D[index[(bi, t)], h] += dS.float()
    batch = torch.tensor([r[0] for r in rows], dtype=torch.long, device=device)
    pos = torch.tensor([r[1] for r in rows], dtype=torch.long, device=device)
    return ops.Perturbations(batch, pos, D)


# ---------------------------------------------------------------------------------------- the family
_HOOK_DOCS = {
    "hook_q": "[b,p,H_k,d_k] native query before the in-kernel L2 norm; edits change the read",
    "hook_k": "[b,p,H_k,d_k] native key before the L2 norm; edits change erase and write",
    "hook_v": "[b,p,H,d_v] native value; edits change the write",
    "hook_beta": "[b,p,H] native beta; edits change erase and write",
    "hook_write_key": "[b,p,H,d_k] canonical key factor k^ (fp32); edits replace the write only",
    "hook_write_value": "[b,p,H,d_v] canonical value factor (beta v raw / delta); edits replace the write only",
    "hook_write": ("[b,p,H,d_k,d_v] dense write (while materialize_writes, or an SAE / named hook is on it); "
                   "edits propagate exactly"),
    "hook_write_flat": "[b,p,H*d_k*d_v] flat dense write (as hook_write)",
    "hook_log_decay": "[b,p,H] g = log alpha; edits change the transitions",
    "hook_query": "[b,p,H,d_k] d_k^-1/2 l2norm(q) as read; edits change the read",
    "hook_state": ("[b,p_s,H_s,d_k,d_v] opt-in states after the write at the captured positions p_s and heads H_s; "
                   "an edit acts as an extra write"),
    "hook_read": "[b,p,H,d_v] o_t before the output norm (fp32); edits replace the read",
}


class GatedDeltaNetFamily:
    """Finds GDN mixers by class and ``layer_idx`` and builds ``blocks.{l}.linear_attn`` hook modules."""

    name = "gated_deltanet"
    block_attr = "linear_attn"
    hooks_class = GatedDeltaNetHooks
    layer_label = "Gated DeltaNet"  # in error messages
    kernel_label = "gated delta rule"

    def __init__(self, hf_model: nn.Module):
        model_type = _model_type(hf_model)
        self.model_type = model_type
        self.module_name = GDN_MODEL_TYPES[model_type]
        __import__(self.module_name)
        module = sys.modules[self.module_name]
        self.mixers: dict[int, nn.Module] = {}
        for m in hf_model.modules():
            cls = type(m)
            if cls.__module__ == self.module_name and cls.__name__.endswith("GatedDeltaNet"):
                self.mixers[int(m.layer_idx)] = m
        if not self.mixers:
            raise UnsupportedModelError(f"{type(hf_model).__name__} ({model_type}) has no Gated DeltaNet layer")
        self.check_forwards(hf_model)
        self.kernels = _install(self.module_name)
        self._module = module

    def check_forwards(self, hf_model: nn.Module) -> None:
        """Refuse models whose mixer forwards HF may replace or has replaced (hub kernels, other wrappers)."""
        if getattr(hf_model, "use_kernels", False):
            raise UnsupportedModelError(
                f"the model was loaded with use_kernels=True: HF may replace the whole {self.layer_label} layer "
                "forward, and no write hook would fire. Load it without use_kernels.")
        for m in self.mixers.values():
            fwd = type(m).forward
            if "forward" in m.__dict__ or getattr(fwd, "__module__", self.module_name) != self.module_name:
                raise UnsupportedModelError(
                    f"the forward of {type(m).__name__} (layer {m.layer_idx}) was replaced (hub kernels or "
                    "another wrapper); the write hooks need the transformers forward. Load the model without "
                    "use_kernels, and wrap with nnsight after hook_model, not before.")

    # ---- structure
    def decoder_layers(self, hf_model) -> nn.ModuleList:
        return find_decoder_layers(hf_model, next(iter(self.mixers.values())))

    def final_norm(self, hf_model) -> nn.Module:
        return find_final_norm(hf_model, self.decoder_layers(hf_model))

    def build_blocks(self, owner: HookedRecurrentModel) -> nn.ModuleList:
        layers = self.decoder_layers(owner.hf_model)
        blocks = nn.ModuleList()
        for i in range(len(layers)):
            block = nn.Module()
            if i in self.mixers:
                mixer = self.mixers[i]
                hooks = self.hooks_class(owner, mixer, i)
                setattr(block, self.block_attr, hooks)
                owner.track(mixer.register_forward_pre_hook(_enter(hooks), with_kwargs=True))
                owner.track(mixer.register_forward_hook(_leave(hooks, self.layer_label, self.kernel_label)))
                owner.track(mixer.register_forward_hook(_clear, always_call=True))
            blocks.append(block)
        return blocks

    def make_config(self, owner: HookedRecurrentModel) -> AdapterConfig:
        hf = owner.hf_model
        cfg = hf.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        m = next(iter(self.mixers.values()))
        dims = self.hooks_class.dims(m)
        param = next(hf.parameters())
        tok = owner.tokenizer
        bos_prepended = False
        if tok is not None and tok.bos_token_id is not None:
            ids = tok("a")["input_ids"]
            bos_prepended = bool(ids) and ids[0] == tok.bos_token_id
        return AdapterConfig(
            model_name=getattr(cfg, "_name_or_path", "") or type(hf).__name__,
            family=self.model_type,
            n_layers=len(self.decoder_layers(hf)),
            d_model=text.hidden_size,
            d_vocab=hf.get_output_embeddings().weight.shape[0],
            n_ctx=getattr(text, "max_position_embeddings", 2048),
            device=torch.device(param.device),
            dtype=param.dtype,
            recurrent_layers=tuple(sorted(self.mixers)),
            d_k=dims[2], d_v=dims[3], n_heads=dims[0], n_key_heads=dims[1],
            tokenizer_prepends_bos=bos_prepended,
            act_fn=getattr(text, "hidden_act", None),
        )

    def validate_edit(self, owner, e: WriteEdit) -> None:
        if e.layer not in self.mixers:
            raise ValueError(f"WriteEdit.layer={e.layer} is not a {self.layer_label} layer; recurrent layers are "
                             f"{sorted(self.mixers)}")
        H, _, d_k, d_v = self.hooks_class.dims(self.mixers[e.layer])
        if not 0 <= e.head < H:
            raise ValueError(f"WriteEdit.head={e.head} out of range: layer {e.layer} has {H} value heads")
        e.atom(d_k, d_v)  # shape / finiteness check

    def hf_module_name(self, hf_model, layer: int) -> str:
        """The HF module path of layer ``layer``'s mixer (e.g. ``model.layers.1.linear_attn``)."""
        mixer = self.mixers[layer]
        return next(n for n, m in hf_model.named_modules() if m is mixer)

    def describe_hook(self, owner, name: str) -> str:
        return _HOOK_DOCS.get(name.rsplit(".", 1)[-1], "")


def _enter(hooks):
    def pre(module, args, kwargs):
        hooks._kernel_called = False
        hooks._cache = cache_from_kwargs(kwargs)
        _CURRENT.layer = hooks

    return pre


def cache_offset(hooks, owner, has_state: bool, T: int) -> int | None:
    """Absolute position of this call's first token for the layer (tokens already in its cache), and record
    the new count on the HF cache object (``_writesae_seen``, so copies of a cache carry their own).

    Sources, in order: no state -> 0; the cache's own record (made by this hooked model); the offset the
    model-level pre-hook read off the cache (its length) or the attention mask (cached + new tokens). A cache
    made elsewhere that cannot report its length (e.g. a pure Mamba-2 cache from an unhooked twin) gives None;
    an edit of this layer then raises, since its absolute position cannot be placed."""
    cache = getattr(hooks, "_cache", None)
    if not has_state:
        offset = 0
    elif cache is not None and hooks.layer_idx in getattr(cache, "_writesae_seen", {}):
        offset = cache._writesae_seen[hooks.layer_idx]
    else:
        offset = owner._call_offset
    if offset is None:
        mine = [e for e in owner._pending_edits or () if e.layer == hooks.layer_idx]
        if mine:
            raise RuntimeError(
                f"layer {hooks.layer_idx}: the cache passed in does not record how many tokens it holds (it was "
                f"made outside this hooked model and its layers cannot report a length), so the edit at absolute "
                f"position {mine[0].pos} cannot be placed. Build the cache with the hooked model "
                "(model(prefix, use_cache=True, return_type='hf')), or pass an attention_mask that covers the "
                "cached and the new tokens")
        return None
    if cache is not None:
        try:
            cache.__dict__.setdefault("_writesae_seen", {})[hooks.layer_idx] = offset + T
        except AttributeError:
            pass
    return offset


def _leave(hooks: GatedDeltaNetHooks, layer_label: str = "Gated DeltaNet", kernel_label: str = "gated delta rule"):
    def post(module, args, output):
        if not hooks._kernel_called:
            raise RuntimeError(
                f"layer {hooks.layer_idx}: the {layer_label} forward ran without calling the {kernel_label} "
                "kernel by name, so no write hook fired. Its forward was replaced (hub kernels?); load the "
                "model without use_kernels.")

    return post


def _clear(module, args, output):
    _CURRENT.layer = None


def _model_type(hf_model) -> str:
    cfg = getattr(hf_model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type in GDN_MODEL_TYPES:
        return model_type
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else None
    if getattr(text, "model_type", None) in GDN_MODEL_TYPES:
        return text.model_type
    raise UnsupportedModelError(
        f"unsupported model {type(hf_model).__name__} (model_type={model_type!r}); supported families: Gated "
        f"DeltaNet {available_model_types()}, Kimi Delta Attention (kimi_linear), DeltaNet (fla delta_net), GLA (fla "
        "gla), RWKV-7 (fla rwkv7), xLSTM (xlstm) and Mamba-2 "
        "(mamba2, bamba, nemotron_h, falcon_h1, zamba2, granitemoehybrid)")

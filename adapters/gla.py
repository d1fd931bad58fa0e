"""GLA (gated linear attention) write hooks for flash-linear-attention's ``GatedLinearAttention`` layer (fla ``gla``).

Derived from ``fla/layers/gla.py`` and ``fla/ops/gla`` (fla 0.6.0; per-token form: ``naive.py: naive_recurrent_gla``):
``GatedLinearAttention.forward`` computes ``q`` (``num_heads`` heads of ``head_k_dim = key_dim / H``), ``k``, ``v``
and the gate ``gk`` (``num_kv_heads`` heads, repeated to the ``H`` heads, ``repeat`` ``(h g)``, before the kernel),
optionally through short convs (SiLU) and a ``feature_map`` on q and k, the per-key-channel log decay
``gk = logsigmoid(gk_proj x) / gate_logit_normalizer`` (clamped below at ``clamp_min`` if set), and calls the
module-level ``fused_recurrent_gla`` (up to 64 tokens) or ``chunk_gla`` / ``fused_chunk_gla`` with
``state_v_first=True`` and the default scale ``d_k^-1/2``. Per head, with the state key-first ``[d_k, d_v]``::

    S_t = Diag(exp gk_t) S_{t-1} + k_t v_t^T;     o_t = S_t^T (d_k^-1/2 q_t)

so ``T_t = Diag(alpha_t)`` (per key channel, no erase), the write ``k_t (x) v_t`` (raw key and value: no norm, no
beta; one write mode), the read ``S^T (c q)``. fla's cache and the kernels' ``initial_state`` / final state are
**value-first** ``[N, H, d_v, d_k]`` here (``state_v_first=True``): the adapter transposes at the boundary. The
read then goes through ``g_norm_swish_gate(o, g_proj x)`` (fused gated RMSNorm; or ``g_norm`` then ``gate_fn(g)``)
and ``o_proj``.

Hooks (``blocks.{l}.linear_attn.``): native ``hook_q``, ``hook_k`` ``[b,p,H,d_k]``, ``hook_v`` ``[b,p,H,d_v]`` (the
kernel's inputs), ``hook_beta`` ``[b,p,H]`` (identically 1: GLA has no write strength; an edit scales the write, never
the transition); canonical ``hook_write_key`` (k), ``hook_write_value`` (v), opt-in ``hook_write`` /
``hook_write_flat``, ``hook_log_decay`` ``[b,p,H,d_k]`` (``gk``), ``hook_query`` (``d_k^-1/2 q``), opt-in
``hook_state``, ``hook_read`` (``o_t``, fp32). The hook logic is Gated DeltaNet's (:mod:`.gated_deltanet`) with the
erase turned off (``erase = False``: the transitions' beta is 0, the write's is 1) and a kernel with GLA's
semantics (:func:`gla_kernel`). Readable reference: :func:`gla_reference`.
"""

from __future__ import annotations

import importlib
import inspect
import sys

import torch
from torch import Tensor, nn

from . import fla_cpu
from .base import UnsupportedModelError, cache_from_kwargs
from .gated_deltanet import _CURRENT, GatedDeltaNetFamily, GatedDeltaNetHooks, on_device_of
from .reference import ReferenceResult

GLA_MODEL_TYPES = {"gla": "fla.layers.gla"}
GLA_KERNELS = ("chunk_gla", "fused_recurrent_gla", "fused_chunk_gla")
GLA_MIXER = "GatedLinearAttention"
CHUNK = 64


# ---------------------------------------------------------------------------------------- reference and kernel
def gla_reference(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor, initial_state: Tensor | None = None,
                  write_edits: dict | None = None, extra_writes: dict | None = None,
                  return_states: bool = False) -> ReferenceResult:
    """Per-token GLA in the canonical frame, a Python loop: ``S_t = Diag(exp g_t) S_{t-1} + W_t``, ``W_t = k_t v_t^T``,
    ``o_t = S_t^T q_t`` (``query`` already scaled). ``write_edits[(b, t, h)] = (W_new, mode)`` replaces the write
    (one mode: no erase); ``extra_writes[(b, t, h)] = D`` adds ``D`` after it. ``delta_value`` is ``v``."""
    query, key, value, log_decay = (x.float() for x in (query, key, value, log_decay))
    b, T, H, d_k = key.shape
    d_v = value.shape[-1]
    write_edits, extra_writes = write_edits or {}, extra_writes or {}
    S = torch.zeros(b, H, d_k, d_v) if initial_state is None else initial_state.float().clone()
    read = torch.zeros(b, T, H, d_v)
    states = torch.zeros(b, T, H, d_k, d_v) if return_states else None
    for t in range(T):
        for i in range(b):
            for h in range(H):
                W = torch.outer(key[i, t, h], value[i, t, h])
                if (i, t, h) in write_edits:
                    W = write_edits[(i, t, h)][0].float()
                new = log_decay[i, t, h].exp()[:, None] * S[i, h] + W
                if (i, t, h) in extra_writes:
                    new = new + extra_writes[(i, t, h)].float()
                S[i, h] = new
                read[i, t, h] = new.T @ query[i, t, h]
                if states is not None:
                    states[i, t, h] = new
    return ReferenceResult(read=read, final_state=S, delta_value=value.clone(), states=states)


def gla_kernel(query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor,
               initial_state: Tensor | None = None, output_final_state: bool = False,
               use_qk_l2norm_in_kernel: bool = False, **kwargs):
    """GLA in the gated-delta-rule signature the hook logic calls (``beta`` scales the write and never erases):
    ``S_t = Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T (d_k^-1/2 q_t)``; ``g`` ``[b,T,H,d_k]`` (or
    ``[b,T,H]``), state key-first ``[b,H,d_k,d_v]``. Pure torch, chunks of 64: within a chunk the decayed scores
    ``sum_d q_t[d] k_s[d] exp(G_t[d] - G_s[d])`` (``G`` the in-chunk cumulative log decay), across chunks the
    state. Returns ``(o [b,T,H,d_v]`` in v's dtype, ``S_T`` fp32 or None)."""
    if use_qk_l2norm_in_kernel:
        query, key = fla_cpu.fla_l2norm(query), fla_cpu.fla_l2norm(key)
    b, T, H, d_k = key.shape
    d_v = value.shape[-1]
    q = query.float() * d_k ** -0.5
    k = key.float()
    v = value.float() * beta.float()[..., None]
    gf = g.float()
    if gf.dim() == 3:
        gf = gf[..., None].expand(b, T, H, d_k)
    S = (torch.zeros(b, H, d_k, d_v, dtype=torch.float32, device=k.device) if initial_state is None
         else initial_state.float())
    outs = []
    for t0 in range(0, T, CHUNK):
        qc, kc, vc = q[:, t0:t0 + CHUNK], k[:, t0:t0 + CHUNK], v[:, t0:t0 + CHUNK]
        G = gf[:, t0:t0 + CHUNK].cumsum(1)  # [b, L, H, d_k]
        L = G.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=k.device).tril()  # s <= t
        diff = (G[:, :, None] - G[:, None, :]).masked_fill(~causal[None, :, :, None, None], float("-inf"))
        scores = torch.einsum("bthk,bshk,btshk->bhts", qc, kc, diff.exp())
        o = torch.einsum("bhts,bshv->bthv", scores, vc) + torch.einsum("bthk,bhkv->bthv", qc * G.exp(), S)
        S = G[:, -1].exp()[..., None] * S + torch.einsum("bshk,bshv->bhkv", kc * (G[:, -1:] - G).exp(), vc)
        outs.append(o)
    o = torch.cat(outs, 1) if outs else value.new_zeros(b, 0, H, d_v).float()
    return o.to(value.dtype), (S if output_final_state else None)


def _fla_form(name: str, args, kwargs) -> dict:
    """fla's GLA kernel arguments by name (``chunk_gla`` / ``fused_chunk_gla`` call the gate ``g``,
    ``fused_recurrent_gla`` ``gk`` and also takes ``gv``)."""
    if name == "fused_recurrent_gla":
        params = ("q", "k", "v", "gk", "gv", "scale", "initial_state", "output_final_state", "reverse",
                  "state_v_first", "cu_seqlens")
    else:
        params = ("q", "k", "v", "g", "scale", "initial_state", "output_final_state", "state_v_first", "cu_seqlens")
    a = dict(zip(params, args))
    a.update(kwargs)
    a["g"] = a.pop("gk", None) if name == "fused_recurrent_gla" else a.get("g")
    if a.get("gv") is not None or a.get("reverse"):
        raise NotImplementedError("GLA with a value gate (gv) or in reverse has no write hooks / CPU route")
    return a


def torch_gla(name: str):
    """fla's ``name`` (``chunk_gla``, ``fused_recurrent_gla``, ``fused_chunk_gla``) on CPU tensors, by
    :func:`gla_kernel`: same arguments, outputs and state layout (``state_v_first``); packed sequences
    (``cu_seqlens``) one at a time."""

    def run(*args, **kwargs):
        a = _fla_form(name, args, kwargs)
        q, k, v, g, init = a["q"], a["k"], a["v"], a["g"], a.get("initial_state")
        if a.get("scale") is not None and a["scale"] != q.shape[-1] ** -0.5:
            raise NotImplementedError("the CPU GLA kernel takes the default scale d_k^-1/2 only")
        vf = bool(a.get("state_v_first"))
        if g is None:
            g = torch.zeros_like(k, dtype=torch.float32)
        init = init.transpose(-1, -2) if (init is not None and vf) else init
        ones = torch.ones(q.shape[:3], dtype=torch.float32, device=q.device)
        final = bool(a.get("output_final_state"))
        cu = a.get("cu_seqlens")
        if cu is None:
            o, S = gla_kernel(q, k, v, g, ones, init, final)
        else:
            outs, states = [], []
            for i, (s, e) in enumerate(fla_cpu._segments(cu)):
                o_i, S_i = gla_kernel(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], ones[:, s:e],
                                      None if init is None else init[i:i + 1], final)
                outs.append(o_i)
                states.append(S_i)
            o, S = torch.cat(outs, 1), (torch.cat(states, 0) if final else None)
        if S is not None and vf:
            S = S.transpose(-1, -2).contiguous()
        return o, S

    run.__name__ = f"torch_{name}"
    return run


class _GLAKernels:
    """The kernels the hook logic calls (the ``_Kernels`` interface of :mod:`.gated_deltanet`), in the
    gated-delta-rule signature with key-first states: :func:`gla_kernel` on a CPU; on a GPU fla's own kernel with
    beta folded into v (exact: beta is 1 unless ``hook_beta`` was edited), called with fla's default key-first
    state layout."""

    def __init__(self, module):
        self.module = module
        self.original = {n: getattr(module, n) for n in GLA_KERNELS}
        self.pure = {n: gla_kernel for n in GLA_KERNELS}
        self.signature = {n: inspect.signature(gla_kernel) for n in GLA_KERNELS}

    def main(self, name: str, device: torch.device):
        if device.type == "cpu":
            return gla_kernel
        fla_fn = self.original[name]
        gate = "gk" if name == "fused_recurrent_gla" else "g"

        def call(query, key, value, g=None, beta=None, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, **kwargs):  # fla's default layout (state_v_first=False) is key-first
            v = value if beta is None else value * beta[..., None].to(value.dtype)
            return fla_fn(q=query, k=key, v=v, **{gate: g}, initial_state=initial_state,
                          output_final_state=output_final_state)
        return call

    def chunk(self, device: torch.device):
        return self.main("chunk_gla", device)


_KERNELS: dict[str, _GLAKernels] = {}


def install() -> _GLAKernels:
    """Swap fla's GLA kernels in ``fla.layers.gla`` for the dispatcher (once): a hooked layer's call goes to the
    hook logic, an unhooked one to fla's kernel, or to :func:`torch_gla` for CPU tensors."""
    module_name = GLA_MODEL_TYPES["gla"]
    if module_name in _KERNELS:
        return _KERNELS[module_name]
    module = importlib.import_module(module_name)
    kernels = _GLAKernels(module)

    def make(name):
        original, cpu = kernels.original[name], torch_gla(name)

        def dispatch(*args, **kwargs):
            layer = getattr(_CURRENT, "layer", None)
            if not isinstance(layer, GLAHooks):
                return cpu(*args, **kwargs) if fla_cpu.on_cpu(args, kwargs) else original(*args, **kwargs)
            a = _fla_form(name, args, kwargs)
            if a.get("scale") is not None:
                raise NotImplementedError("the GLA write hooks take the kernel's default scale d_k^-1/2 only")
            q, k, v, g, cu = a["q"], a["k"], a["v"], a["g"], a.get("cu_seqlens")
            vf = bool(a.get("state_v_first"))
            packed = cu is not None
            if packed:  # fla unpads whenever an attention_mask is given; equal lengths are a plain batch
                lengths = cu.diff()
                if not bool((lengths == lengths[0]).all()):
                    raise NotImplementedError(
                        f"layer {layer.layer_idx}: padded rows (an attention_mask with zeros) are not supported by "
                        "the GLA write hooks (fla packs them into one sequence); run rows of different lengths "
                        "separately")
                n = len(lengths)
                q, k, v, g = (x.reshape(n, -1, *x.shape[2:]) for x in (q, k, v, g))
            init = a.get("initial_state")
            init = init.transpose(-1, -2) if (init is not None and vf) else init
            beta = torch.ones(q.shape[:3], dtype=q.dtype, device=q.device)
            call = dict(g=g, beta=beta, initial_state=init, output_final_state=bool(a.get("output_final_state")),
                        use_qk_l2norm_in_kernel=False)
            with on_device_of(args, kwargs):
                o, S = layer.intercept(name, kernels, (q, k, v), call)
            if packed:
                o = o.reshape(1, -1, *o.shape[2:])
            if S is not None and vf:
                S = S.transpose(-1, -2).contiguous()
            return o, S

        dispatch.__wrapped_by_writesae__ = original
        dispatch.__name__ = name
        return dispatch

    for n in GLA_KERNELS:
        setattr(module, n, make(n))
    _KERNELS[module_name] = kernels
    return kernels


# ---------------------------------------------------------------------------------------- hooks and family
class GLAHooks(GatedDeltaNetHooks):
    """Hook points of one fla GLA layer: the Gated DeltaNet hook logic without the erase (``T_t = Diag(alpha_t)``),
    per-key-channel log decay, raw key and query (no in-kernel norm), states captured through the GLA kernel."""

    erase = False
    states_method = "kernel"

    @staticmethod
    def dims(mixer: nn.Module) -> tuple[int, int, int, int]:
        return mixer.num_heads, mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim

    def intercept(self, name, kernels, args, kwargs):
        if self._owner().write_mode != "raw":
            raise ValueError(f"{GLAFamily.one_write_mode}; use write_mode='raw'")
        return super().intercept(name, kernels, args, kwargs)


class GLAOutputMap:
    """``o [b,T,H,d_v] -> g_norm_swish_gate(o, g)`` (fused gated RMSNorm) or ``g_norm(o) * gate_fn(g)``, flattened
    to ``[b,T,H*d_v]`` (the gate ``g = g_proj x`` recorded during a forward): how a GLA read reaches ``o_proj``."""

    def __init__(self, mixer: nn.Module):
        if not mixer.use_output_gate:
            raise NotImplementedError("the direct path of a GLA layer without an output gate is not implemented")
        self.mixer = mixer

    def register(self, captured: dict) -> list:
        m = self.mixer
        handles = [m.g_proj.register_forward_hook(lambda mod, a, out: captured.setdefault("g", out.clone()))]
        norm = m.g_norm_swish_gate if m.fuse_norm_and_gate else m.g_norm
        handles.append(norm.register_forward_pre_hook(lambda mod, a: [captured.setdefault("o", a[0].clone())] and None))
        return handles

    def read(self, captured: dict) -> Tensor:
        return captured["o"]

    def apply(self, captured: dict, x: Tensor) -> Tensor:
        m = self.mixer
        b, T = x.shape[:2]
        g = captured["g"]
        if m.fuse_norm_and_gate:
            return m.g_norm_swish_gate(x, g.reshape(*g.shape[:-1], -1, m.head_v_dim)).reshape(b, T, -1)
        return m.g_norm(x).reshape(b, T, -1) * m.gate_fn(g)


class GLAFamily(GatedDeltaNetFamily):
    """Finds fla ``GatedLinearAttention`` mixers by class and ``layer_idx``; hooks under ``blocks.{l}.linear_attn``.
    One write mode (no erase): ``write_mode="delta"`` is refused."""

    name = "gla"
    write_rule = "scalar_decay"  # write attribution: no erase; A_eff[t, s] = q_t^T Diag(exp(G_t - G_s)) k_s, value v
    hooks_class = GLAHooks
    layer_label = "GLA"
    #: why ``delta`` is refused (``HookedRecurrentModel.set_write_mode``, edits)
    one_write_mode = "GLA writes have one mode: with no erase its raw and delta writes coincide"
    kernel_label = "GLA"

    def __init__(self, hf_model: nn.Module):  # noqa: D107 (GatedDeltaNetFamily.__init__ not called: other discovery)
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        if model_type not in GLA_MODEL_TYPES:
            raise UnsupportedModelError(f"{type(hf_model).__name__} (model_type={model_type!r}) is not an fla GLA "
                                        "model")
        if not fla_cpu.fla_available():
            raise UnsupportedModelError("GLA models need flash-linear-attention and triton: "
                                        "pip install 'writesae-plugin[fla]'")
        fla_cpu.route_cpu_to_torch()
        self.model_type = model_type
        self.module_name = GLA_MODEL_TYPES[model_type]
        __import__(self.module_name)
        self._module = sys.modules[self.module_name]
        self.mixers: dict[int, nn.Module] = {}
        for m in hf_model.modules():
            cls = type(m)
            if cls.__module__ == self.module_name and cls.__name__ == GLA_MIXER:
                self.mixers[int(m.layer_idx)] = m
        if not self.mixers:
            raise UnsupportedModelError(f"{type(hf_model).__name__} ({model_type}) has no GLA layer")
        for m in self.mixers.values():
            if getattr(m, "use_gv", False):
                raise UnsupportedModelError("GLA with a value gate (use_gv) has no rank-1 key-first write hooks")
        self.check_forwards(hf_model)
        self.kernels = install()

    @staticmethod
    def output_map(mixer: nn.Module) -> GLAOutputMap:
        """The read's way to ``o_proj`` (for the closed form's direct path)."""
        return GLAOutputMap(mixer)

    @staticmethod
    def replay_output(out, kwargs):
        """fla's decoder loop takes the cache back from each block's output (see :mod:`.delta_net`)."""
        if isinstance(out, tuple) and len(out) >= 3:
            return (*out[:2], cache_from_kwargs(kwargs), *out[3:])
        return out

    def describe_hook(self, owner, name: str) -> str:
        leaf = name.rsplit(".", 1)[-1]
        docs = {
            "hook_q": "[b,p,H,d_k] native query as the kernel gets it (after conv / feature map)",
            "hook_k": "[b,p,H,d_k] native key as the kernel gets it; edits change the write only (no erase)",
            "hook_beta": "[b,p,H] 1 (GLA has no write strength); an edit scales the write, never the transition",
            "hook_write_key": "[b,p,H,d_k] canonical key factor k (fp32); edits replace the write only",
            "hook_write_value": "[b,p,H,d_v] canonical value factor v (one write mode: no erase)",
            "hook_log_decay": "[b,p,H,d_k] gk = log alpha per key channel; edits change the transitions",
            "hook_query": "[b,p,H,d_k] d_k^-1/2 q as read; edits change the read",
        }
        return docs.get(leaf) or super().describe_hook(owner, name)

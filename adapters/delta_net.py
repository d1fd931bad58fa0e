"""DeltaNet write hooks for flash-linear-attention's ``DeltaNet`` layer (fla ``delta_net`` models).

Derived from ``fla/layers/delta_net.py`` and ``fla/ops/delta_rule`` (fla 0.6.0): ``DeltaNet.forward`` computes, per
head (``num_heads`` heads of ``head_k_dim = key_dim / H`` and ``head_v_dim``; one key head per value head), ``q, k, v``
through the projections and short causal convs (``ShortConvolution``; SiLU when ``qk_activation == 'silu'``, SiLU
on v always), then the optional ``qk_activation`` / ``qk_norm == 'sum'``, ``beta = sigmoid(b_proj x)`` (ones
without ``use_beta``; times 2 with ``allow_neg_eigval``), and calls the module-level ``chunk_delta_rule`` (more than
64 tokens) or ``fused_recurrent_delta_rule`` (up to 64) with ``use_qk_l2norm_in_kernel = (qk_norm == 'l2')`` and
the default scale ``d_k^-1/2``. The kernels (fla's ``naive.py``: ``delta_rule_recurrence``) run, with ``S``
``[d_k, d_v]`` (key-first: fla's state ``[N, H, K, V]``, as the cache stores it)::

    delta_t = beta_t (v_t - S_{t-1}^T k^_t);   S_t = S_{t-1} + k^_t delta_t^T;   o_t = S_t^T (d_k^-1/2 q^_t)

i.e. ``S_t = (I - beta_t k^_t k^_t^T) S_{t-1} + beta_t k^_t v_t^T``: the gated delta rule with no decay
(``g = 0``, ``alpha = 1``), so this family reuses the Gated DeltaNet hook logic (:mod:`.gated_deltanet`) with a
zero log decay. The read then goes through the per-head ``o_norm`` (RMSNorm, or gated RMSNorm with ``use_gate``)
and ``o_proj``. ``q^ = l2norm(q)`` with fla's norm ``x * (1 / sqrt(sum x^2 + 1e-6))`` (:func:`.fla_cpu.fla_l2norm`).

Hooks (``blocks.{l}.linear_attn.``, the delta-rule vocabulary of the other families): native ``hook_q``, ``hook_k``
``[b,p,H,d_k]`` (the kernel's inputs: after conv / activation, before the in-kernel L2 norm), ``hook_v``, ``hook_beta``;
canonical ``hook_write_key`` (k^), ``hook_write_value`` (``beta v`` raw / ``delta`` delta mode), opt-in
``hook_write`` / ``hook_write_flat``, ``hook_log_decay`` ``[b,p,H]`` (identically 0: DeltaNet does not decay; an
edit puts a decay into the transitions), ``hook_query`` (``d_k^-1/2 l2norm(q)``), opt-in ``hook_state``, ``hook_read``.

Kernels. The adapter swaps ``chunk_delta_rule`` and ``fused_recurrent_delta_rule`` in ``fla.layers.delta_net`` for one
dispatcher: a hooked layer's call goes to the exact hook logic; an unhooked call runs fla's kernel, except for CPU
tensors, which run :func:`deltanet_kernel` (fla's L2 norm, then transformers' pure-torch gated-delta-rule chunk
kernel with ``g = 0``). Edits propagate with the same torch kernel on a CPU and with fla's
``chunk_gated_delta_rule`` (``g`` given) on a GPU. Readable reference:
:func:`writesae_plugin.adapters.reference.gated_deltanet_reference` with a zero log decay.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys

import torch
from torch import Tensor, nn

from . import fla_cpu
from .base import UnsupportedModelError, cache_from_kwargs
from .gated_deltanet import _CURRENT, GDN_MODEL_TYPES, GatedDeltaNetFamily, GatedDeltaNetHooks, on_device_of

DELTANET_MODEL_TYPES = {"delta_net": "fla.layers.delta_net"}
DN_CHUNK = "chunk_delta_rule"
DN_RECURRENT = "fused_recurrent_delta_rule"
DN_MIXER = "DeltaNet"


def _torch_gdn_chunk():
    """transformers' pure-torch gated-delta-rule chunk kernel (the one HF runs without fla)."""
    from . import gated_deltanet as gdn

    name = GDN_MODEL_TYPES["qwen3_5"]
    if name in gdn._INSTALLED:
        return gdn._INSTALLED[name].pure[gdn.CHUNK]
    return inspect.unwrap(getattr(importlib.import_module(name), gdn.CHUNK))


def deltanet_kernel(query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor,
                    initial_state: Tensor | None = None, output_final_state: bool = False,
                    use_qk_l2norm_in_kernel: bool = False, **kwargs):
    """The pure-torch DeltaNet kernel in the gated-delta-rule signature (``g`` is 0 for the model's own calls):
    fla's L2 norm on q and k when asked, then transformers' torch chunk kernel (chunks of 64, ``d_k^-1/2`` scale).
    Returns ``(o [b,T,H,d_v]`` in v's dtype, ``S_T [b,H,d_k,d_v]`` or None)."""
    if use_qk_l2norm_in_kernel:
        query, key = fla_cpu.fla_l2norm(query), fla_cpu.fla_l2norm(key)
    o, S = _torch_gdn_chunk()(query, key, value, g=g, beta=beta, initial_state=initial_state,
                              output_final_state=output_final_state, use_qk_l2norm_in_kernel=False)
    return o.to(value.dtype), S


def _fla_form(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
    """fla's delta-rule arguments, by name."""
    return dict(q=q, k=k, v=v, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                cu_seqlens=cu_seqlens, extra=kwargs)


def torch_delta_rule(*args, **kwargs):
    """fla's ``chunk_delta_rule`` / ``fused_recurrent_delta_rule`` on CPU tensors (same arguments and outputs),
    by :func:`deltanet_kernel`; packed sequences (``cu_seqlens``) one sequence at a time."""
    a = _fla_form(*args, **kwargs)
    q, k, v, beta, init = a["q"], a["k"], a["v"], a["beta"], a["initial_state"]
    if beta is None:
        beta = torch.ones(q.shape[:3], dtype=q.dtype, device=q.device)
    if a["scale"] is not None and a["scale"] != q.shape[-1] ** -0.5:
        raise NotImplementedError("the CPU delta rule takes the default scale d_k^-1/2 only")
    cu = a["cu_seqlens"]
    if cu is None:
        g = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
        return deltanet_kernel(q, k, v, g, beta, init, a["output_final_state"], a["use_qk_l2norm_in_kernel"])
    outs, states = [], []
    for i, (s, e) in enumerate(fla_cpu._segments(cu)):
        g = torch.zeros(1, e - s, q.shape[2], dtype=torch.float32, device=q.device)
        o, S = deltanet_kernel(q[:, s:e], k[:, s:e], v[:, s:e], g, beta[:, s:e],
                               None if init is None else init[i:i + 1], a["output_final_state"],
                               a["use_qk_l2norm_in_kernel"])
        outs.append(o)
        states.append(S)
    return torch.cat(outs, 1), (torch.cat(states, 0) if a["output_final_state"] else None)


class _DeltaNetKernels:
    """The kernels the hook logic calls (the ``_Kernels`` interface of :mod:`.gated_deltanet`): the model's own
    kernel (``main``: fla's on a GPU, :func:`deltanet_kernel` on a CPU) and a gated-delta-rule chunk kernel that
    honours ``g`` (``chunk``: for edits and the canonical frame)."""

    def __init__(self, module):
        self.module = module
        self.original = {n: getattr(module, n) for n in (DN_CHUNK, DN_RECURRENT)}
        self.pure = {n: deltanet_kernel for n in self.original}
        self.signature = {n: inspect.signature(deltanet_kernel) for n in self.original}

    def main(self, name: str, device: torch.device):
        if device.type == "cpu":
            return deltanet_kernel
        fla_fn = self.original[name]

        def call(query, key, value, g=None, beta=None, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, **kwargs):  # g is 0 on this path (the log decay was not edited)
            return fla_fn(q=query, k=key, v=value, beta=beta, initial_state=initial_state,
                          output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
        return call

    def chunk(self, device: torch.device):
        if device.type == "cpu":
            return deltanet_kernel
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return chunk_gated_delta_rule


_KERNELS: dict[str, _DeltaNetKernels] = {}


def install() -> _DeltaNetKernels:
    """Swap fla's delta-rule kernels in ``fla.layers.delta_net`` for the dispatcher (once)."""
    module_name = DELTANET_MODEL_TYPES["delta_net"]
    if module_name in _KERNELS:
        return _KERNELS[module_name]
    module = importlib.import_module(module_name)
    kernels = _DeltaNetKernels(module)

    def make(name):
        original = kernels.original[name]

        def dispatch(*args, **kwargs):
            layer = getattr(_CURRENT, "layer", None)
            if not isinstance(layer, DeltaNetHooks):
                if fla_cpu.on_cpu(args, kwargs):
                    return torch_delta_rule(*args, **kwargs)
                return original(*args, **kwargs)
            a = _fla_form(*args, **kwargs)
            if a["scale"] is not None:
                raise NotImplementedError("the DeltaNet write hooks take the kernel's default scale d_k^-1/2 only")
            q, k, v, beta, cu = a["q"], a["k"], a["v"], a["beta"], a["cu_seqlens"]
            packed = cu is not None
            if packed:  # fla unpads whenever an attention_mask is given; equal lengths are a plain batch
                lengths = cu.diff()
                if not bool((lengths == lengths[0]).all()):
                    raise NotImplementedError(
                        f"layer {layer.layer_idx}: padded rows (an attention_mask with zeros) are not supported by "
                        "the DeltaNet write hooks (fla packs them into one sequence); run rows of different "
                        "lengths separately")
                n = len(lengths)
                q, k, v, beta = (x.reshape(n, -1, *x.shape[2:]) for x in (q, k, v, beta))
            g = torch.zeros(beta.shape, dtype=torch.float32, device=beta.device)
            call = dict(g=g, beta=beta, initial_state=a["initial_state"],
                        output_final_state=a["output_final_state"],
                        use_qk_l2norm_in_kernel=a["use_qk_l2norm_in_kernel"])
            with on_device_of(args, kwargs):
                o, S = layer.intercept(name, kernels, (q, k, v), call)
            if packed:
                o = o.reshape(1, -1, *o.shape[2:])
            return o, S

        dispatch.__wrapped_by_writesae__ = original
        dispatch.__name__ = name
        return dispatch

    for n in (DN_CHUNK, DN_RECURRENT):
        setattr(module, n, make(n))
    _KERNELS[module_name] = kernels
    return kernels


class DeltaNetHooks(GatedDeltaNetHooks):
    """Hook points of one fla DeltaNet layer: the Gated DeltaNet hook logic with a zero log decay and fla's own
    L2 norm."""

    @staticmethod
    def dims(mixer: nn.Module) -> tuple[int, int, int, int]:
        return mixer.num_heads, mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim

    @staticmethod
    def l2norm(x: Tensor) -> Tensor:
        return fla_cpu.fla_l2norm(x)


class DeltaNetOutputMap:
    """``o [b,T,H,d_v] -> o_norm(o)`` (fla ``RMSNorm`` per head) or ``o_norm(o, g)`` (``FusedRMSNormGated`` with
    ``use_gate``, the gate ``g`` recorded during a forward): how a DeltaNet read reaches ``o_proj`` (the closed
    form's direct path linearises it)."""

    def __init__(self, mixer: nn.Module):
        self.mixer = mixer

    def register(self, captured: dict) -> list:
        return [self.mixer.o_norm.register_forward_pre_hook(
            lambda m, a: [captured.setdefault("o_norm_in", tuple(x.clone() for x in a if isinstance(x, Tensor)))]
            and None)]

    def read(self, captured: dict) -> Tensor:
        return captured["o_norm_in"][0]

    def apply(self, captured: dict, x: Tensor) -> Tensor:
        return self.mixer.o_norm(x, *captured["o_norm_in"][1:2])


class DeltaNetFamily(GatedDeltaNetFamily):
    """Finds fla ``DeltaNet`` mixers by class and ``layer_idx``; hooks under ``blocks.{l}.linear_attn``."""

    name = "delta_net"
    hooks_class = DeltaNetHooks
    layer_label = "DeltaNet"
    kernel_label = "delta rule"

    def __init__(self, hf_model: nn.Module):  # noqa: D107 (GatedDeltaNetFamily.__init__ not called: other discovery)
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        if model_type not in DELTANET_MODEL_TYPES:
            raise UnsupportedModelError(f"{type(hf_model).__name__} (model_type={model_type!r}) is not an fla "
                                        "DeltaNet model")
        if not fla_cpu.fla_available():
            raise UnsupportedModelError("DeltaNet models need flash-linear-attention and triton: "
                                        "pip install 'writesae-plugin[fla]'")
        fla_cpu.route_cpu_to_torch()
        self.model_type = model_type
        self.module_name = DELTANET_MODEL_TYPES[model_type]
        self._module = sys.modules[self.module_name]
        self.mixers: dict[int, nn.Module] = {}
        for m in hf_model.modules():
            cls = type(m)
            if cls.__module__ == self.module_name and cls.__name__ == DN_MIXER:
                self.mixers[int(m.layer_idx)] = m
        if not self.mixers:
            raise UnsupportedModelError(f"{type(hf_model).__name__} ({model_type}) has no DeltaNet layer")
        self.check_forwards(hf_model)
        self.kernels = install()

    @staticmethod
    def output_map(mixer: nn.Module) -> DeltaNetOutputMap:
        """The read's way to ``o_proj`` (for the closed form's direct path)."""
        return DeltaNetOutputMap(mixer)

    @staticmethod
    def replay_output(out, kwargs):
        """fla's decoder loop takes the cache back from each block's output ``(hidden, attentions, cache, attnres)``:
        a replayed block (``run_from_layer``) hands on the cache it was called with."""
        if isinstance(out, tuple) and len(out) >= 3:
            return (*out[:2], cache_from_kwargs(kwargs), *out[3:])
        return out

    def describe_hook(self, owner, name: str) -> str:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "hook_log_decay":
            return "[b,p,H] 0 (DeltaNet does not decay); an edit puts a decay into the transitions"
        if leaf in ("hook_q", "hook_k"):
            return f"[b,p,H,d_k] native {leaf[-1]} as the kernel gets it (after conv, activation), before its L2 norm"
        return super().describe_hook(owner, name)

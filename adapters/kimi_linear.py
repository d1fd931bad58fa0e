"""Kimi Delta Attention (KDA) write hooks for HF ``kimi_linear`` (``KimiLinearForCausalLM``).

Derived from ``transformers/models/kimi_linear/modeling_kimi_linear.py`` (transformers 5.24):
``KimiLinearDeltaAttention.forward`` computes, per head (``linear_num_heads`` heads of ``linear_head_dim``; as
many key heads as value heads), ``q, k, v`` through a short causal conv + SiLU, the per-channel log decay
``g = -exp(A_log_h) * softplus(f_b(f_a(x)) + dt_bias)`` ``[b,T,H,d_k]`` (``KimiLinearForgetGate``) and
``beta = sigmoid(b_proj(x))`` ``[b,T,H]``, and calls the module-level ``chunk_kimi_delta_attention`` (prefill) or
``recurrent_kimi_delta_attention`` (single-token decode) with ``use_qk_l2norm_in_kernel=True``. The kernels
(fp32) normalise ``q, k`` by ``x / sqrt(sum x^2 + 1e-6)``, scale ``q`` by ``d_k^-1/2`` and run, with ``S``
``[d_k, d_v]`` (key-first, as the cache stores it)::

    S' = Diag(exp g_t) S_{t-1};  delta_t = beta_t (v_t - S'^T k^_t);  S_t = S' + k^_t delta_t^T;  o_t = S_t^T q^_t

i.e. ``S_t = (I - beta_t k^_t k^_t^T) Diag(alpha_t) S_{t-1} + beta_t k^_t v_t^T`` (the decay acts on the key
rows before the erase). The read then goes through the per-head gated RMSNorm and ``o_proj``.

Hooks (``blocks.{l}.linear_attn.``), as for Gated DeltaNet (:mod:`.gated_deltanet`, whose hook logic this
family reuses): native ``hook_q``, ``hook_k`` ``[b,p,H,d_k]`` (after the conv, before the in-kernel norm),
``hook_v`` ``[b,p,H,d_v]``, ``hook_beta`` ``[b,p,H]``; canonical ``hook_write_key`` (k^), ``hook_write_value``
(``beta v`` raw / ``delta`` delta mode), opt-in dense ``hook_write`` / ``hook_write_flat``, ``hook_log_decay``
``[b,p,H,d_k]`` (one log decay per key channel; edits change the transitions), ``hook_query``
(``d_k^-1/2 l2norm(q)``), opt-in ``hook_state``, ``hook_read`` (``o_t`` before the gated norm, fp32).
Edits propagate exactly with the model's own chunk kernel (zero-value trick; the kernel takes per-channel
decays, so the suffix run reproduces the transitions bit for bit). Readable reference:
:func:`writesae_plugin.adapters.reference.gated_deltanet_reference` with a ``[b,T,H,d_k]`` log decay.

On a GPU with ``fla`` installed transformers binds ``chunk_kda`` / ``fused_recurrent_kda``; the adapter calls
them the way HF does (q, k, v by position, only the arguments HF passed) and runs the pure-torch functions for
CPU tensors.
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from torch import Tensor, nn

from .base import UnsupportedModelError
from .gated_deltanet import GatedDeltaNetFamily, GatedDeltaNetHooks, _install

KIMI_MODEL_TYPES = {"kimi_linear": "transformers.models.kimi_linear.modeling_kimi_linear"}
KDA_CHUNK = "chunk_kimi_delta_attention"
KDA_RECURRENT = "recurrent_kimi_delta_attention"
KDA_MIXER = "KimiLinearDeltaAttention"


def kda_l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """KDA's in-kernel L2 norm: ``x / sqrt(sum(x^2) + eps)`` over the last axis, in fp32 (transformers'
    ``modeling_kimi_linear.l2norm``, which divides where Gated DeltaNet multiplies by ``rsqrt``)."""
    x = x.float()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


class KimiDeltaHooks(GatedDeltaNetHooks):
    """Hook points of one KDA layer; the exact edit logic of :class:`GatedDeltaNetHooks` with a per-channel
    log decay and KDA's own L2 norm."""

    @staticmethod
    def dims(mixer: nn.Module) -> tuple[int, int, int, int]:
        return mixer.num_heads, mixer.num_heads, mixer.head_dim, mixer.head_dim

    @staticmethod
    def l2norm(x: Tensor) -> Tensor:
        return kda_l2norm(x)


class KimiLinearFamily(GatedDeltaNetFamily):
    """Finds ``KimiLinearDeltaAttention`` mixers by class and ``layer_idx``; hooks under
    ``blocks.{l}.linear_attn``."""

    name = "kimi_linear"
    hooks_class = KimiDeltaHooks
    layer_label = "Kimi Delta Attention"
    kernel_label = "Kimi delta attention"

    def __init__(self, hf_model: nn.Module):  # noqa: D107 (GatedDeltaNetFamily.__init__ not called: other discovery)
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        if model_type not in KIMI_MODEL_TYPES:
            raise UnsupportedModelError(f"{type(hf_model).__name__} (model_type={model_type!r}) is not a Kimi Linear "
                                        "model")
        self.model_type = model_type
        self.module_name = KIMI_MODEL_TYPES[model_type]
        if importlib.util.find_spec(self.module_name) is None:
            raise UnsupportedModelError(f"{model_type} is not in the installed transformers")
        __import__(self.module_name)
        self._module = sys.modules[self.module_name]
        self.mixers: dict[int, nn.Module] = {}
        for m in hf_model.modules():
            cls = type(m)
            if cls.__module__ == self.module_name and cls.__name__ == KDA_MIXER:
                self.mixers[int(m.layer_idx)] = m
        if not self.mixers:
            raise UnsupportedModelError(f"{type(hf_model).__name__} ({model_type}) has no Kimi Delta Attention layer")
        self.check_forwards(hf_model)
        self.kernels = _install(self.module_name, (KDA_CHUNK, KDA_RECURRENT))

    def describe_hook(self, owner, name: str) -> str:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "hook_log_decay":
            return "[b,p,H,d_k] g = log alpha per key channel (the forget gate); edits change the transitions"
        if leaf in ("hook_q", "hook_k"):
            return f"[b,p,H,d_k] native {leaf[-1]} after the short conv, before the in-kernel L2 norm"
        return super().describe_hook(owner, name)

"""Model-facing half of writesae-plugin: named write hook points on real Hugging Face recurrent models.

    from transformers import AutoModelForCausalLM
    from writesae_plugin.adapters import hook_model
    model = hook_model(AutoModelForCausalLM.from_pretrained(path), tokenizer=tok)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_write_key"))

See :mod:`writesae_plugin.adapters.base` for the hook inventory and edit semantics.
"""

from __future__ import annotations

from torch import nn

from .base import (AdapterConfig, HookedRecurrentModel, HookNameError, StateCapture, UnsupportedModelError,
                   WriteEdit, existing_wrapper, lm_cross_entropy, reuse_wrapper)
from .gated_deltanet import GDN_MODEL_TYPES, GatedDeltaNetFamily, available_model_types
from .delta_net import DELTANET_MODEL_TYPES, DeltaNetFamily
from .gla import GLA_MODEL_TYPES, GLAFamily
from .rwkv7 import RWKV7_MODEL_TYPES, RWKV7Family
from .fla_cpu import route_cpu_to_torch
from .kimi_linear import KIMI_MODEL_TYPES, KimiLinearFamily
from .xlstm import XLSTM_MODEL_TYPES, XLSTMFamily
from .mamba2 import MAMBA2_MODEL_TYPES, Mamba2Family
from .mamba_ssm import InferenceCache, MambaSSMCausalLM, hook_mamba_ssm, is_mamba_ssm_model


#: model types that look recurrent but have no rank-1 matrix write in the key-first frame (or no hookable kernel)
NOT_HOOKABLE = {
    "mamba": "Mamba-1 keeps a per-channel state (d_inner x d_state) written by a diagonal, not a rank-1 key-first "
             "write",
    "falcon_mamba": "Falcon-Mamba is Mamba-1: a per-channel state without a rank-1 key-first write",
    "jamba": "Jamba's recurrent layers are Mamba-1: a per-channel state without a rank-1 key-first write",
    "minimax": "MiniMax's lightning attention is written inline in its layer forward (no kernel to intercept)",
    "rwkv": "transformers' rwkv is RWKV-4 (a per-channel WKV state, no matrix write); RWKV-7 lives in fla",
}


def _families_line() -> str:
    return ("supported families: Gated DeltaNet (qwen3_5, qwen3_5_moe, qwen3_next, olmo_hybrid, qwen4_exp), "
            "Kimi Delta Attention (kimi_linear), DeltaNet (fla delta_net), GLA (fla gla), RWKV-7 (fla rwkv7), "
            "xLSTM (xlstm), Mamba-2 (mamba2, bamba, nemotron_h, falcon_h1, zamba2, granitemoehybrid; mamba-ssm "
            "MambaLMHeadModel)")


def supported_families() -> list[str]:
    """Model types this install can hook (``mamba_ssm``: mamba-ssm's ``MambaLMHeadModel``, where importable)."""
    import importlib.util

    others = {**KIMI_MODEL_TYPES, **XLSTM_MODEL_TYPES, **MAMBA2_MODEL_TYPES}
    found = available_model_types() + [t for t, m in others.items() if importlib.util.find_spec(m)]
    if importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None:
        found += list(DELTANET_MODEL_TYPES) + list(GLA_MODEL_TYPES) + list(RWKV7_MODEL_TYPES)
    return found + (["mamba_ssm"] if importlib.util.find_spec("mamba_ssm") else [])


def hook_model(hf_model: nn.Module, tokenizer=None) -> HookedRecurrentModel:
    """Wrap a loaded HF recurrent/hybrid LM, or a mamba-ssm ``MambaLMHeadModel`` with Mamba2 layers, into a
    :class:`HookedRecurrentModel` (same weights, same outputs).

    A model that is already hooked gets its existing wrapper back (``wrapper.unhook()`` removes the hooks).
    Raises :class:`UnsupportedModelError` naming the supported families for any other model.
    """
    if isinstance(hf_model, HookedRecurrentModel):
        return reuse_wrapper(hf_model, tokenizer)
    if not isinstance(hf_model, nn.Module):
        raise TypeError(f"hook_model expects a loaded transformers model, got {type(hf_model).__name__}")
    existing = existing_wrapper(hf_model)
    if existing is not None:
        return reuse_wrapper(existing, tokenizer)
    route_cpu_to_torch()  # with fla installed: CPU calls of fla-bound kernels run torch (a no-op without fla)
    if is_mamba_ssm_model(hf_model):
        return hook_mamba_ssm(hf_model, tokenizer=tokenizer)
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if type(hf_model).__module__.startswith("fla.") and model_type in ("mamba", "mamba2", "bitnet"):
        raise UnsupportedModelError(
            f"{type(hf_model).__name__} is flash-linear-attention's class for model_type={model_type!r}: importing "
            "fla re-registers transformers' mamba / mamba2 types with fla's classes (transformers imports fla with "
            "its Gated DeltaNet models). Call writesae_plugin.adapters.route_cpu_to_torch() (it restores "
            f"transformers' classes) and load the model again; {_families_line()}")
    if model_type in NOT_HOOKABLE:
        raise UnsupportedModelError(f"{type(hf_model).__name__} (model_type={model_type!r}) cannot be hooked: "
                                    f"{NOT_HOOKABLE[model_type]}; {_families_line()}")
    if model_type in MAMBA2_MODEL_TYPES:
        import importlib.util

        if importlib.util.find_spec(MAMBA2_MODEL_TYPES[model_type]) is None:
            raise UnsupportedModelError(f"{model_type} is not in the installed transformers")
        family = Mamba2Family(hf_model, model_type)
    elif model_type in KIMI_MODEL_TYPES:
        family = KimiLinearFamily(hf_model)
    elif model_type in DELTANET_MODEL_TYPES:
        family = DeltaNetFamily(hf_model)
    elif model_type in GLA_MODEL_TYPES:
        family = GLAFamily(hf_model)
    elif model_type in RWKV7_MODEL_TYPES:
        family = RWKV7Family(hf_model)
    elif model_type in XLSTM_MODEL_TYPES:
        family = XLSTMFamily(hf_model)
    else:
        family = GatedDeltaNetFamily(hf_model)
    return HookedRecurrentModel(hf_model, family, tokenizer=tokenizer)


__all__ = ["hook_model", "supported_families", "HookedRecurrentModel", "WriteEdit", "StateCapture",
           "AdapterConfig", "UnsupportedModelError", "HookNameError", "GDN_MODEL_TYPES", "lm_cross_entropy",
           "MambaSSMCausalLM", "InferenceCache", "hook_mamba_ssm", "route_cpu_to_torch"]

"""Tiny, random-init models of the *real* Hugging Face Mamba-2-mixer families.

Used by the test-suite to exercise every Mamba-2 family of the installed ``transformers`` without the
Hub. Every model is built from an explicit tiny config -- vocab 256, hidden 64, Mamba-2 mixers with
4 heads x head_dim 16 (d_inner 64, expand 1), d_state 16, n_groups 2 (B/C shared by 2 heads), conv
kernel 4, chunk_size 16 -- in fp32 on CPU after ``torch.manual_seed(seed)``, saved with
``save_pretrained``, reloaded with ``AutoModelForCausalLM.from_pretrained`` (concrete class as fallback)
and returned in eval mode. Checked for all six families with transformers 5.23 / torch 2.13 CPU:
build OK, params and logits bit-identical after save/reload (no contiguity fix needed), prefill on
``input_ids[2, 37]`` with ``use_cache=True`` OK, one-token decode with the returned cache OK (matches
the full forward to <= 1e-6; bamba only when ``position_ids`` is passed, see below).

Public API: ``MAMBA_FAMILIES``, ``CACHE_KWARG``, ``FAMILY_FACTS``, ``tiny_mamba_config(family)``,
``build_tiny_mamba(family)`` (no save/reload; same weights), ``make_tiny_mamba(family, save_dir)``,
``mamba_mixers(model, family) -> {layer_idx: mixer}``. ``n_layers`` = number of decoder layers.

Default layouts (M = Mamba-2 mixer layer, A = attention):
  mamba2 [M, M] | bamba [M, A, M] (dense MLP in every layer) | granitemoehybrid [M, A, M] (MoE 4 experts
  top-2 + shared MLP in every layer, NoPE) | nemotron_h [M, MoE(4, top-2, 1 shared), A, M, MLP] (one
  mixer per block) | zamba2 [M, hybrid, M] (hybrid = shared attention+MLP block, then its own Mamba
  mixer: 3 mixers, 1 attention) | falcon_h1 [hybrid, hybrid]: EVERY Falcon-H1 layer runs attention and
  Mamba in parallel, so with >= 2 Mamba layers there are necessarily 2 attention modules.

================  ==========================  ====================================  ====================================
family            mixer class                 decoder layers / final norm           mixer attr on the decoder layer
================  ==========================  ====================================  ====================================
mamba2            Mamba2Mixer                 backbone.layers / backbone.norm_f     .mixer
bamba             BambaMixer                  model.layers / model.final_layernorm  .mamba
nemotron_h        NemotronHMamba2Mixer        model.layers / model.norm_f           .mixer (linear_attention blocks)
falcon_h1         FalconH1Mixer               model.layers / model.final_layernorm  .mamba (.self_attn in parallel)
zamba2            Zamba2MambaMixer            model.layers / model.final_layernorm  .mamba / hybrid .mamba_decoder.mamba
granitemoehybrid  GraniteMoeHybridMambaLayer  model.layers / model.norm             .mamba (None on attention layers)
================  ==========================  ====================================  ====================================

Cache (``CACHE_KWARG``): mamba2 takes ``cache=`` / returns ``out.cache`` from transformers 5.24
(``cache_params`` before; the adapter reads the name off the signature: ``model.cache_kwarg``); the five
hybrids take ``past_key_values=`` and return ``out.past_key_values``. The cache is a
``DynamicCache`` in every family (Mamba layers: ``LinearAttentionLayer`` with ``conv_states[0]`` /
``recurrent_states[0]`` [b, H, P, N]; falcon_h1 / zamba2-hybrid layers:
``LinearAttentionAndFullAttentionLayer``; nemotron_h MLP/MoE blocks: ``DummyLayer``).

Scan functions: ALL six modeling modules define module-level ``mamba2_chunk_scan``,
``mamba2_selective_state_update`` and ``mamba2_split_conv1d_scan_combined`` (plus ``causal_conv1d_fn`` /
``causal_conv1d_update``), each wrapped by ``use_kernel_func_from_hub_with_fallback``, and the mixer
``forward`` calls them by bare global name, so patching ``modeling_<family>.<name>`` intercepts them
(verified). ``mamba2_split_conv1d_scan_combined`` is only tried when ``training and cache_params is None``;
its torch fallback returns ``None`` and the forward falls through to the unfused conv + chunk-scan path.
Prefill/multi-token -> ``mamba2_chunk_scan``; ``seq_len == 1`` with a cache ->
``mamba2_selective_state_update``.

Differences from HF ``Mamba2Mixer`` between the conv and the scan (and around it):
  bamba, granitemoehybrid: mixer ``forward`` is line-for-line identical to mamba2 (dt_limit =
    ``config.time_step_limit`` = (0, inf); gated RMSNorm per B/C group, group_size = d_inner/n_groups,
    i.e. spans the 2 heads of a group, eps = rms_norm_eps; D skip inside the scan as in mamba2).
    Outside the mixer, granite scales the mixer output by ``residual_multiplier`` before the residual add,
    embeddings by ``embedding_multiplier`` and logits by 1/``logits_scaling`` (tiny: 0.5, 2.0, 2.0;
    attention_multiplier 0.25).
    Bamba quirk: ``BambaModel`` does not offset default ``position_ids`` by the cache length, so a manual
    decode step must pass ``position_ids`` (RoPE on the attention layer; ``generate`` does this).
  nemotron_h, zamba2: forward identical to mamba2, but ``time_step_limit`` is hard-coded to
    (``config.time_step_min`` = 1e-3, inf), i.e. dt is clamped to >= 1e-3 after softplus in the chunk
    (prefill) path only; the decode path never clamps (as in mamba2). zamba2: gated-norm eps fixed 1e-5,
    conv bias always on, activation always silu; the input of a hybrid layer's mixer is
    ``h + linear(shared_transformer(cat(h, embeddings)))`` (before the mixer's input RMSNorm).
  falcon_h1: (1) input ``* ssm_in_multiplier`` before ``in_proj``; (2) ``in_proj`` output ``* mup_vector``
    (non-persistent buffer built from ``ssm_multipliers`` = per-section scales of z, x, B, C, dt) -> x, B, C
    are scaled BEFORE the conv1d+silu and dt before dt_bias+softplus; (3) ``mamba_rms_norm=False``
    (default and tiny): no gated norm at all, y = scan * silu(z) (decode passes ``z=gate`` into
    ``mamba2_selective_state_update``); with ``mamba_rms_norm=True`` a per-group ``FalconH1RMSNormGated``
    that, if ``mamba_norm_before_gate``, computes norm(y)*w*silu(z) instead of mamba2's norm(y*silu(z))*w;
    (4) mixer output ``* ssm_out_multiplier``, added to the parallel attention branch (which has
    attention_in/out and key multipliers). D skip and dt_limit (config, (0, inf)) as in mamba2. Tiny
    config uses non-unit multipliers: ssm_multipliers [0.5, 1.5, 0.75, 1.25, 2.0], ssm_in 0.8, ssm_out
    1.2, attention_in 1.1, attention_out 0.9, key 0.7, embedding 1.5, lm_head 0.6, mlp [1.3, 0.7].
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

__all__ = [
    "MAMBA_FAMILIES",
    "CACHE_KWARG",
    "FAMILY_FACTS",
    "tiny_mamba_config",
    "build_tiny_mamba",
    "make_tiny_mamba",
    "mamba_mixers",
]

# --------------------------------------------------------------------------------------------------
# Tiny sizes (shared by every family)
# --------------------------------------------------------------------------------------------------
VOCAB_SIZE = 256
HIDDEN_SIZE = 64
MAMBA_NUM_HEADS = 4
MAMBA_HEAD_DIM = 16  # mamba intermediate = 4 * 16 = 64 = expand(1) * hidden
MAMBA_D_STATE = 16
MAMBA_N_GROUPS = 2  # B and C shared by 2 heads
MAMBA_CONV_KERNEL = 4
MAMBA_CHUNK_SIZE = 16
MAMBA_EXPAND = 1
INTERMEDIATE_SIZE = 128  # dense MLP
NUM_ATTENTION_HEADS = 2
NUM_KEY_VALUE_HEADS = 1
NUM_EXPERTS = 4
NUM_EXPERTS_PER_TOK = 2
MOE_INTERMEDIATE_SIZE = 32
SHARED_INTERMEDIATE_SIZE = 32

_CANDIDATES = ("mamba2", "bamba", "nemotron_h", "falcon_h1", "zamba2", "granitemoehybrid")

# family -> (modeling module, config class, causal-LM class, mixer class)
_CLASSES: dict[str, tuple[str, str, str, str]] = {
    "mamba2": ("mamba2", "Mamba2Config", "Mamba2ForCausalLM", "Mamba2Mixer"),
    "bamba": ("bamba", "BambaConfig", "BambaForCausalLM", "BambaMixer"),
    "nemotron_h": ("nemotron_h", "NemotronHConfig", "NemotronHForCausalLM", "NemotronHMamba2Mixer"),
    "falcon_h1": ("falcon_h1", "FalconH1Config", "FalconH1ForCausalLM", "FalconH1Mixer"),
    "zamba2": ("zamba2", "Zamba2Config", "Zamba2ForCausalLM", "Zamba2MambaMixer"),
    "granitemoehybrid": (
        "granitemoehybrid",
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        "GraniteMoeHybridMambaLayer",
    ),
}


def _available(family: str) -> bool:
    mod, cfg_cls, lm_cls, _ = _CLASSES[family]
    try:
        cfg_mod = importlib.import_module(f"transformers.models.{mod}.configuration_{mod}")
        lm_mod = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    except Exception:
        return False
    return hasattr(cfg_mod, cfg_cls) and hasattr(lm_mod, lm_cls)


MAMBA_FAMILIES: list[str] = [f for f in _CANDIDATES if _available(f)]

# family -> (forward kwarg that takes the cache, attribute of the returned output holding it)
CACHE_KWARG: dict[str, tuple[str, str]] = {
    "mamba2": ("cache", "cache"),
    "bamba": ("past_key_values", "past_key_values"),
    "nemotron_h": ("past_key_values", "past_key_values"),
    "falcon_h1": ("past_key_values", "past_key_values"),
    "zamba2": ("past_key_values", "past_key_values"),
    "granitemoehybrid": ("past_key_values", "past_key_values"),
}

# Static facts (see the table in the module docstring).
FAMILY_FACTS: dict[str, dict[str, Any]] = {
    "mamba2": dict(
        module="transformers.models.mamba2.modeling_mamba2",
        mixer_class="Mamba2Mixer",
        layers_path="backbone.layers",
        final_norm_path="backbone.norm_f",
        mixer_attr="mixer",
    ),
    "bamba": dict(
        module="transformers.models.bamba.modeling_bamba",
        mixer_class="BambaMixer",
        layers_path="model.layers",
        final_norm_path="model.final_layernorm",
        mixer_attr="mamba",
    ),
    "nemotron_h": dict(
        module="transformers.models.nemotron_h.modeling_nemotron_h",
        mixer_class="NemotronHMamba2Mixer",
        layers_path="model.layers",
        final_norm_path="model.norm_f",
        mixer_attr="mixer",
    ),
    "falcon_h1": dict(
        module="transformers.models.falcon_h1.modeling_falcon_h1",
        mixer_class="FalconH1Mixer",
        layers_path="model.layers",
        final_norm_path="model.final_layernorm",
        mixer_attr="mamba",
    ),
    "zamba2": dict(
        module="transformers.models.zamba2.modeling_zamba2",
        mixer_class="Zamba2MambaMixer",
        layers_path="model.layers",
        final_norm_path="model.final_layernorm",
        mixer_attr="mamba (Zamba2MambaDecoderLayer) / mamba_decoder.mamba (Zamba2HybridLayer)",
    ),
    "granitemoehybrid": dict(
        module="transformers.models.granitemoehybrid.modeling_granitemoehybrid",
        mixer_class="GraniteMoeHybridMambaLayer",
        layers_path="model.layers",
        final_norm_path="model.norm",
        mixer_attr="mamba",
    ),
}

# Default number of decoder layers per family (see ``_layout``).
_DEFAULT_N_LAYERS = {
    "mamba2": 2,
    "bamba": 3,
    "nemotron_h": 5,
    "falcon_h1": 2,
    "zamba2": 3,
    "granitemoehybrid": 3,
}


def _check_family(family: str) -> None:
    if family not in _CLASSES:
        raise ValueError(f"unknown Mamba-2 family {family!r}; expected one of {list(_CLASSES)}")
    if family not in MAMBA_FAMILIES:
        raise ValueError(f"family {family!r} is not available in this transformers install")


def _layout(family: str, n_layers: int | None) -> list[str]:
    """Per-layer types (``"linear_attention"`` = Mamba-2 mixer).

    * mamba2: ``n`` Mamba layers (n >= 2).
    * bamba / granitemoehybrid: one ``"full_attention"`` layer at index ``n // 2`` (n >= 3), others Mamba.
    * zamba2: one ``"hybrid"`` layer (shared attention block + its own Mamba mixer) at ``n // 2`` (n >= 2).
    * nemotron_h: one ``"full_attention"`` block at ``n // 2``; for n < 5 every other block is Mamba, for
      n >= 5 the non-attention blocks cycle Mamba, MoE, Mamba, MLP (default n=5:
      ``[mamba, moe, attention, mamba, mlp]``).
    * falcon_h1: ``n`` "hybrid" layers (n >= 2); every Falcon-H1 layer runs attention and Mamba in parallel,
      so "exactly one attention layer" is impossible with >= 2 Mamba layers.
    """
    n = _DEFAULT_N_LAYERS[family] if n_layers is None else int(n_layers)
    if family in ("mamba2", "falcon_h1"):
        if n < 2:
            raise ValueError(f"{family}: n_layers must be >= 2")
        return ["linear_attention" if family == "mamba2" else "hybrid"] * n
    if family == "zamba2":
        if n < 2:
            raise ValueError("zamba2: n_layers must be >= 2")
        types = ["linear_attention"] * n
        types[n // 2] = "hybrid"
        return types
    if n < 3:
        raise ValueError(f"{family}: n_layers must be >= 3 (one attention layer between Mamba layers)")
    attn = n // 2
    if family == "nemotron_h" and n >= 5:
        cycle = ["linear_attention", "moe", "linear_attention", "mlp"]
        others = [cycle[i % 4] for i in range(n - 1)]
    else:
        others = ["linear_attention"] * (n - 1)
    return others[:attn] + ["full_attention"] + others[attn:]


def tiny_mamba_config(family: str, *, n_layers: int | None = None):
    """The tiny config of ``family`` (not yet instantiated into a model)."""
    _check_family(family)
    mod, cfg_cls_name, _, _ = _CLASSES[family]
    cfg_cls = getattr(importlib.import_module(f"transformers.models.{mod}.configuration_{mod}"), cfg_cls_name)
    types = _layout(family, n_layers)
    n = len(types)
    attn_idx = [i for i, t in enumerate(types) if t in ("full_attention", "hybrid")]
    common: dict[str, Any] = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, tie_word_embeddings=False)

    if family == "mamba2":
        kw = dict(num_heads=MAMBA_NUM_HEADS, head_dim=MAMBA_HEAD_DIM, expand=MAMBA_EXPAND, state_size=MAMBA_D_STATE,
                  n_groups=MAMBA_N_GROUPS, conv_kernel=MAMBA_CONV_KERNEL, chunk_size=MAMBA_CHUNK_SIZE,
                  num_hidden_layers=n)
    elif family in ("bamba", "granitemoehybrid", "falcon_h1"):
        kw = dict(num_hidden_layers=n, intermediate_size=INTERMEDIATE_SIZE, num_attention_heads=NUM_ATTENTION_HEADS,
                  num_key_value_heads=NUM_KEY_VALUE_HEADS, max_position_embeddings=512,
                  mamba_n_heads=MAMBA_NUM_HEADS, mamba_d_head=MAMBA_HEAD_DIM, mamba_n_groups=MAMBA_N_GROUPS,
                  mamba_d_state=MAMBA_D_STATE, mamba_d_conv=MAMBA_CONV_KERNEL, mamba_expand=MAMBA_EXPAND,
                  mamba_chunk_size=MAMBA_CHUNK_SIZE)
        if family == "bamba":
            kw.update(attn_layer_indices=attn_idx)
        elif family == "granitemoehybrid":
            kw.update(layer_types=types, num_local_experts=NUM_EXPERTS, num_experts_per_tok=NUM_EXPERTS_PER_TOK,
                      intermediate_size=MOE_INTERMEDIATE_SIZE, shared_intermediate_size=SHARED_INTERMEDIATE_SIZE,
                      # non-unit muP-style multipliers (real Granite-4.0-H uses non-unit ones too)
                      embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25,
                      logits_scaling=2.0)
        else:  # falcon_h1
            kw.update(mamba_d_ssm=None, mamba_rms_norm=False, mamba_norm_before_gate=False,
                      # non-unit multipliers so that adapters that ignore them are caught
                      ssm_multipliers=[0.5, 1.5, 0.75, 1.25, 2.0],  # z, x, B, C, dt sections of in_proj output
                      ssm_in_multiplier=0.8, ssm_out_multiplier=1.2, attention_in_multiplier=1.1,
                      attention_out_multiplier=0.9, key_multiplier=0.7, embedding_multiplier=1.5,
                      lm_head_multiplier=0.6, mlp_multipliers=[1.3, 0.7])
    elif family == "nemotron_h":
        kw = dict(layers_block_type=types, num_attention_heads=NUM_ATTENTION_HEADS,
                  num_key_value_heads=NUM_KEY_VALUE_HEADS, head_dim=HIDDEN_SIZE // NUM_ATTENTION_HEADS,
                  max_position_embeddings=512, intermediate_size=INTERMEDIATE_SIZE,
                  mamba_num_heads=MAMBA_NUM_HEADS, mamba_head_dim=MAMBA_HEAD_DIM, ssm_state_size=MAMBA_D_STATE,
                  n_groups=MAMBA_N_GROUPS, conv_kernel=MAMBA_CONV_KERNEL, expand=MAMBA_EXPAND,
                  chunk_size=MAMBA_CHUNK_SIZE, n_routed_experts=NUM_EXPERTS, num_experts_per_tok=NUM_EXPERTS_PER_TOK,
                  n_shared_experts=1, moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
                  moe_shared_expert_intermediate_size=SHARED_INTERMEDIATE_SIZE, n_group=1, topk_group=1)
    elif family == "zamba2":
        kw = dict(num_hidden_layers=n, layers_block_type=types, n_mamba_heads=MAMBA_NUM_HEADS,
                  mamba_d_state=MAMBA_D_STATE, mamba_ngroups=MAMBA_N_GROUPS, mamba_d_conv=MAMBA_CONV_KERNEL,
                  mamba_expand=MAMBA_EXPAND, chunk_size=MAMBA_CHUNK_SIZE, intermediate_size=INTERMEDIATE_SIZE,
                  num_attention_heads=NUM_ATTENTION_HEADS, num_key_value_heads=NUM_ATTENTION_HEADS,
                  num_mem_blocks=1, adapter_rank=8, max_position_embeddings=512)
        common["tie_word_embeddings"] = True  # Zamba2's default (and the released checkpoints)
    else:  # pragma: no cover
        raise AssertionError(family)

    cfg = cfg_cls(**common, **kw)
    return cfg


def build_tiny_mamba(family: str, *, seed: int = 0, n_layers: int | None = None) -> torch.nn.Module:
    """Build only (same weights as ``make_tiny_mamba`` for the same seed), fp32, CPU, eval mode."""
    cfg = tiny_mamba_config(family, n_layers=n_layers)
    mod, _, lm_cls_name, _ = _CLASSES[family]
    lm_cls = getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), lm_cls_name)
    torch.manual_seed(seed)
    model = lm_cls(cfg).to(device="cpu", dtype=torch.float32)
    return model.eval()


def make_tiny_mamba(family: str, save_dir: str | os.PathLike, *, seed: int = 0,
                    n_layers: int | None = None) -> torch.nn.Module:
    """Build the tiny ``family`` causal LM, ``save_pretrained(save_dir)``, reload it and return it in eval mode.

    Reload goes through ``AutoModelForCausalLM.from_pretrained`` (falling back to the concrete class).
    """
    model = build_tiny_mamba(family, seed=seed, n_layers=n_layers)
    save_dir = os.fspath(save_dir)
    model.save_pretrained(save_dir)
    del model
    try:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32)
    except Exception:
        mod, _, lm_cls_name, _ = _CLASSES[family]
        lm_cls = getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), lm_cls_name)
        reloaded = lm_cls.from_pretrained(save_dir, dtype=torch.float32)
    return reloaded.to("cpu").eval()


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def mamba_mixers(model: torch.nn.Module, family: str) -> dict[int, torch.nn.Module]:
    """``{layer_index: mamba_mixer_module}`` for the layers that carry a Mamba-2 mixer."""
    layers = _get_path(model, FAMILY_FACTS[family]["layers_path"])
    mixer_cls = FAMILY_FACTS[family]["mixer_class"]
    out: dict[int, torch.nn.Module] = {}
    for i, layer in enumerate(layers):
        for name in ("mixer", "mamba", "mamba_decoder"):
            m = getattr(layer, name, None)
            if m is not None and type(m).__name__ == "Zamba2MambaDecoderLayer":
                m = m.mamba
            if m is not None and type(m).__name__ == mixer_cls:
                out[i] = m
                break
    return out

"""Tiny, random-init models of the *real* Hugging Face Gated DeltaNet (GDN) hybrid classes.

Used by the test-suite to exercise every GDN family shipped by the installed ``transformers``
without touching the Hub. Every model is:

* built from an explicit tiny config (hidden 64, intermediate 128, vocab 256, 4 layers of which exactly
  one is an attention layer, at index 3), GDN heads: 2 key heads / 4 value heads (head sharing,
  ratio 2) with key head dim = value head dim = 16; attention: 2 query heads / 1 kv head;
  MoE families: 4 experts, top-2;
* fp32, deterministic (``torch.manual_seed(seed)`` before construction);
* saved with ``save_pretrained`` and reloaded with the proper ``Auto*`` class (falling back to the
  concrete class), then put in eval mode.

Public API
----------
``GDN_FAMILIES``        list of ``(family, layout)`` pairs available in this install.
``tiny_config(...)``    the tiny config for a ``(family, layout)``.
``make_tiny_model(...)`` build -> save -> reload -> eval.
``build_tiny_model(...)`` build only (same weights as ``make_tiny_model`` for the same seed).
``family_info(...)``    static facts (module, mixer class, mixer attribute, attention layer type...).
``SAFE_VOCAB``          exclusive upper bound for random text token ids (keeps clear of the
                        image/video special tokens that the conditional-generation configs place
                        at the top of the tiny vocab).

Layouts: ``"causal_lm"`` (``*ForCausalLM`` on the text config) and ``"conditional_generation"``
(``*ForConditionalGeneration`` on the composite text+vision config, with a tiny vision tower).
``family="qwen3_5_text"`` / ``"qwen3_5_moe_text"`` / ``"qwen4_exp_text"`` are accepted as aliases of
the corresponding ``causal_lm`` layout (that is the ``model_type`` those causal-LM configs carry).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "GDN_FAMILIES",
    "FAMILY_ALIASES",
    "SAFE_VOCAB",
    "FamilyInfo",
    "family_info",
    "tiny_config",
    "make_tiny_model",
    "build_tiny_model",
]

# --------------------------------------------------------------------------------------------------
# Tiny sizes
# --------------------------------------------------------------------------------------------------
VOCAB_SIZE = 256
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_ATTENTION_HEADS = 2
NUM_KEY_VALUE_HEADS = 1
HEAD_DIM = HIDDEN_SIZE // NUM_ATTENTION_HEADS  # 32
LINEAR_NUM_KEY_HEADS = 2
LINEAR_NUM_VALUE_HEADS = 4
LINEAR_KEY_HEAD_DIM = 16
LINEAR_VALUE_HEAD_DIM = 16
LINEAR_CONV_KERNEL_DIM = 4
NUM_EXPERTS = 4
NUM_EXPERTS_PER_TOK = 2
MOE_INTERMEDIATE_SIZE = 32
SHARED_EXPERT_INTERMEDIATE_SIZE = 32
ATTENTION_LAYER_INDEX = 3

# Special multimodal token ids of the conditional-generation configs live at the top of the tiny vocab.
IMAGE_TOKEN_ID = 252
VIDEO_TOKEN_ID = 253
VISION_START_TOKEN_ID = 254
VISION_END_TOKEN_ID = 255
SAFE_VOCAB = 248  # draw random text ids from [0, SAFE_VOCAB)
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
PAD_TOKEN_ID = 0


@dataclass(frozen=True)
class FamilyInfo:
    family: str
    module: str  # transformers.models.<family>.modeling_<family>
    mixer_class: str  # GDN mixer class name
    mixer_attr: str  # attribute of the decoder layer holding the mixer
    attention_layer_type: str  # layer_types entry of the (single) softmax-attention layer
    text_config_class: str
    causal_lm_class: str
    composite_config_class: str | None  # None -> no conditional-generation layout
    conditional_generation_class: str | None
    is_moe: bool


_FAMILIES: dict[str, FamilyInfo] = {
    "qwen3_5": FamilyInfo(
        family="qwen3_5",
        module="transformers.models.qwen3_5.modeling_qwen3_5",
        mixer_class="Qwen3_5GatedDeltaNet",
        mixer_attr="linear_attn",
        attention_layer_type="full_attention",
        text_config_class="Qwen3_5TextConfig",
        causal_lm_class="Qwen3_5ForCausalLM",
        composite_config_class="Qwen3_5Config",
        conditional_generation_class="Qwen3_5ForConditionalGeneration",
        is_moe=False,
    ),
    "qwen3_next": FamilyInfo(
        family="qwen3_next",
        module="transformers.models.qwen3_next.modeling_qwen3_next",
        mixer_class="Qwen3NextGatedDeltaNet",
        mixer_attr="linear_attn",
        attention_layer_type="full_attention",
        text_config_class="Qwen3NextConfig",
        causal_lm_class="Qwen3NextForCausalLM",
        composite_config_class=None,
        conditional_generation_class=None,
        is_moe=True,
    ),
    "qwen3_5_moe": FamilyInfo(
        family="qwen3_5_moe",
        module="transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
        mixer_class="Qwen3_5MoeGatedDeltaNet",
        mixer_attr="linear_attn",
        attention_layer_type="full_attention",
        text_config_class="Qwen3_5MoeTextConfig",
        causal_lm_class="Qwen3_5MoeForCausalLM",
        composite_config_class="Qwen3_5MoeConfig",
        conditional_generation_class="Qwen3_5MoeForConditionalGeneration",
        is_moe=True,
    ),
    "olmo_hybrid": FamilyInfo(
        family="olmo_hybrid",
        module="transformers.models.olmo_hybrid.modeling_olmo_hybrid",
        mixer_class="OlmoHybridGatedDeltaNet",
        mixer_attr="linear_attn",
        attention_layer_type="full_attention",
        text_config_class="OlmoHybridConfig",
        causal_lm_class="OlmoHybridForCausalLM",
        composite_config_class=None,
        conditional_generation_class=None,
        is_moe=False,
    ),
    "qwen4_exp": FamilyInfo(
        family="qwen4_exp",
        module="transformers.models.qwen4_exp.modeling_qwen4_exp",
        mixer_class="Qwen4ExpTextGatedDeltaNet",
        mixer_attr="linear_attn",
        attention_layer_type="indexed_attention",  # Qwen4-Exp rejects "full_attention" (it remaps it)
        text_config_class="Qwen4ExpTextConfig",
        causal_lm_class="Qwen4ExpForCausalLM",
        composite_config_class="Qwen4ExpConfig",
        conditional_generation_class="Qwen4ExpForConditionalGeneration",
        is_moe=True,
    ),
}

# model_type of the causal-LM (text) configs -> family
FAMILY_ALIASES: dict[str, str] = {
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen4_exp_text": "qwen4_exp",
}

LAYOUTS = ("causal_lm", "conditional_generation")


def _resolve_family(family: str) -> str:
    family = FAMILY_ALIASES.get(family, family)
    if family not in _FAMILIES:
        known = sorted(_FAMILIES) + sorted(FAMILY_ALIASES)
        raise ValueError(f"Unknown GDN family {family!r}; known: {known}")
    return family


def _import_module(family: str):
    return importlib.import_module(_FAMILIES[family].module)


def _get(family: str, name: str):
    """Class `name` from the family's modeling module, else from its configuration module."""
    mod = _import_module(family)
    if hasattr(mod, name):
        return getattr(mod, name)
    cfg_mod = importlib.import_module(_FAMILIES[family].module.replace(".modeling_", ".configuration_"))
    return getattr(cfg_mod, name)


def family_info(family: str) -> FamilyInfo:
    return _FAMILIES[_resolve_family(family)]


def _available_pairs() -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for fam, info in _FAMILIES.items():
        try:
            mod = _import_module(fam)
        except Exception:  # family not shipped by this transformers
            continue
        if hasattr(mod, info.causal_lm_class) and hasattr(mod, info.mixer_class):
            pairs.append((fam, "causal_lm"))
        if info.conditional_generation_class and hasattr(mod, info.conditional_generation_class):
            pairs.append((fam, "conditional_generation"))
    return pairs


GDN_FAMILIES: list[tuple[str, str]] = _available_pairs()


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def _layer_types(n_layers: int, attn_type: str) -> list[str]:
    if n_layers < 2:
        raise ValueError("need at least 2 layers (>=1 linear_attention and exactly 1 attention layer)")
    attn_idx = ATTENTION_LAYER_INDEX if n_layers > ATTENTION_LAYER_INDEX else n_layers - 1
    return [attn_type if i == attn_idx else "linear_attention" for i in range(n_layers)]


def _qwen_rope() -> dict[str, Any]:
    # head_dim 32 * partial 0.25 -> rotary dim 8 -> 4 frequencies split (T, H, W) = (2, 1, 1)
    return {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    }


def _text_kwargs(family: str, n_layers: int) -> dict[str, Any]:
    info = _FAMILIES[family]
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=n_layers,
        num_attention_heads=NUM_ATTENTION_HEADS,
        num_key_value_heads=NUM_KEY_VALUE_HEADS,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        linear_conv_kernel_dim=LINEAR_CONV_KERNEL_DIM,
        linear_key_head_dim=LINEAR_KEY_HEAD_DIM,
        linear_value_head_dim=LINEAR_VALUE_HEAD_DIM,
        linear_num_key_heads=LINEAR_NUM_KEY_HEADS,
        linear_num_value_heads=LINEAR_NUM_VALUE_HEADS,
        layer_types=_layer_types(n_layers, info.attention_layer_type),
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    if family == "olmo_hybrid":
        # OLMo-hybrid has no `head_dim` field (head_dim = hidden / heads = 32). The released checkpoints
        # are NoPE: `OlmoHybridModel.rotary_emb` is None iff rope_parameters["rope_theta"] is None.
        # (rope_parameters=None would be standardised to rope_theta=10000 -> RoPE on.) Override with
        # rope_parameters={"rope_type": "default", "rope_theta": 10000.0} to get RoPE.
        kw.update(
            intermediate_size=INTERMEDIATE_SIZE,
            linear_allow_neg_eigval=True,
            rope_parameters={"rope_type": "default", "rope_theta": None},
        )
        return kw
    kw.update(head_dim=HEAD_DIM, rope_parameters=_qwen_rope())
    if family == "qwen3_5":
        kw.update(intermediate_size=INTERMEDIATE_SIZE)
    elif family == "qwen3_next":
        kw.update(
            intermediate_size=INTERMEDIATE_SIZE,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=NUM_EXPERTS_PER_TOK,
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
            shared_expert_intermediate_size=SHARED_EXPERT_INTERMEDIATE_SIZE,
            decoder_sparse_step=1,
            norm_topk_prob=True,
        )
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    elif family == "qwen3_5_moe":
        # every Qwen3.5-MoE decoder layer is sparse: there is no `intermediate_size` field
        kw.update(
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=NUM_EXPERTS_PER_TOK,
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
            shared_expert_intermediate_size=SHARED_EXPERT_INTERMEDIATE_SIZE,
        )
    elif family == "qwen4_exp":
        kw.update(
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=NUM_EXPERTS_PER_TOK,
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
            shared_expert_intermediate_size=SHARED_EXPERT_INTERMEDIATE_SIZE,
            norm_topk_prob=True,
            # hyper-connections (hidden stream is hc_count * hidden wide between layers; GDN sees hidden)
            hc_count=2,
            hc_lowrank=8,
            # QSA indexer: mandatory, every attention layer builds one
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=16,
            indexer_budget=8,
            indexer_compress_ratio=4,
            # no per-layer n-gram embeddings (PLE) by default; enable via ple_layer_ids=[1, ...]
            ple_layer_ids=[],
            ple_embed_dim=16,
            heads_per_ngram=2,
            ngram_size=3,
            ngram_vocab_size_base=64,
            make_ngram_vocab_size_divisible_by=8,
            split_ngram_parts=1,
            output_gate_type=None,
        )
    return kw


def _vision_kwargs(text_hidden: int) -> dict[str, Any]:
    return dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text_hidden,
        num_position_embeddings=16,
        hidden_act="gelu_pytorch_tanh",
    )


def tiny_config(family: str, layout: str = "causal_lm", *, n_layers: int = 4, **config_overrides):
    """Return the tiny config of ``(family, layout)``.

    ``config_overrides`` go to the *text* config (for the conditional-generation layout, keys
    ``vision_config`` (dict) and composite-level keys such as ``image_token_id`` are routed to the
    right place).
    """
    family = _resolve_family(family)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    info = _FAMILIES[family]
    text_kw = _text_kwargs(family, n_layers)
    overrides = dict(config_overrides)

    if layout == "causal_lm":
        text_kw.update(overrides)
        if "num_hidden_layers" in overrides and "layer_types" not in overrides:
            text_kw["layer_types"] = _layer_types(text_kw["num_hidden_layers"], info.attention_layer_type)
        return _get(family, info.text_config_class)(**text_kw)

    if info.composite_config_class is None:
        raise ValueError(f"family {family!r} has no conditional-generation layout")
    composite_keys = {
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "tie_word_embeddings",
    }
    vision_over = overrides.pop("vision_config", {}) or {}
    comp_over = {k: overrides.pop(k) for k in list(overrides) if k in composite_keys}
    text_kw.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        text_kw["layer_types"] = _layer_types(text_kw["num_hidden_layers"], info.attention_layer_type)
    vision_kw = _vision_kwargs(text_kw["hidden_size"])
    vision_kw.update(vision_over)
    comp_kw = dict(
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        tie_word_embeddings=False,
    )
    comp_kw.update(comp_over)
    return _get(family, info.composite_config_class)(text_config=text_kw, vision_config=vision_kw, **comp_kw)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def _auto_class(layout: str):
    import transformers

    if layout == "causal_lm":
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForImageTextToText


def _model_class(family: str, layout: str):
    info = _FAMILIES[family]
    if layout == "causal_lm":
        return _get(family, info.causal_lm_class)
    if info.conditional_generation_class is None:
        raise ValueError(f"family {family!r} has no conditional-generation layout")
    return _get(family, info.conditional_generation_class)


def build_tiny_model(
    family: str,
    *,
    layout: str = "causal_lm",
    n_layers: int = 4,
    seed: int = 0,
    attn_implementation: str | None = None,
    **config_overrides,
):
    """Construct (no save / reload) the tiny fp32 model in eval mode. Deterministic in ``seed``."""
    family = _resolve_family(family)
    config = tiny_config(family, layout, n_layers=n_layers, **config_overrides)
    model_cls = _model_class(family, layout)
    build_kw: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation is not None:
        build_kw["attn_implementation"] = attn_implementation
    torch.manual_seed(seed)
    model = model_cls._from_config(config, **build_kw)
    _moderate_decays(model, seed)
    return model.eval()


@torch.no_grad()
def _moderate_decays(model, seed: int) -> None:
    """Give every GDN layer per-token decays ``exp(g)`` of about 0.7-0.97 (trained models' range).

    HF's init draws ``A = exp(A_log)`` from U(0, 16), so ``g = -A softplus(a + dt_bias)`` is about -7 to -21 and
    ``exp(g) < 1e-3``: the state would forget everything each token, equal the last write, and a test of the
    state recurrence could not see an error in the decay. ``A`` from U(0.02, 0.3) keeps the memory.
    """
    g = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        A_log = getattr(module, "A_log", None)
        if isinstance(A_log, torch.nn.Parameter) and "DeltaNet" in type(module).__name__:
            A_log.copy_(torch.empty(A_log.shape).uniform_(0.02, 0.3, generator=g).log().to(A_log.dtype))


def make_tiny_model(
    family: str,
    save_dir: str | os.PathLike,
    *,
    layout: str = "causal_lm",
    n_layers: int = 4,
    seed: int = 0,
    attn_implementation: str | None = None,
    use_auto_class: bool = True,
    realign: bool = True,
    **config_overrides,
):
    """Build a tiny random-init model of the real HF class, ``save_pretrained(save_dir)``, reload
    it with ``from_pretrained(save_dir)`` (Auto class, falling back to the concrete class) and
    return the reloaded fp32 model in eval mode.

    ``realign=True`` copies every reloaded parameter/buffer into a fresh allocation. Tensors loaded
    from safetensors can sit at addresses that are not 64-byte aligned, which makes CPU BLAS pick a
    different kernel and changes results by ~1e-8 (seen on Qwen3-Next's ``shared_expert_gate``);
    after realigning, the reloaded model reproduces ``build_tiny_model`` logits bit-for-bit, and no
    tensor references the files in ``save_dir`` any more (safe with temporary directories).

    ``attn_implementation=None`` keeps the HF default (sdpa where supported); pass ``"eager"`` to
    force eager attention (applied both at construction and at reload).
    """
    family = _resolve_family(family)
    model_cls = _model_class(family, layout)
    model = build_tiny_model(
        family,
        layout=layout,
        n_layers=n_layers,
        seed=seed,
        attn_implementation=attn_implementation,
        **config_overrides,
    )
    save_dir = os.fspath(save_dir)
    os.makedirs(save_dir, exist_ok=True)
    model.save_pretrained(save_dir)
    del model

    load_kw: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation is not None:
        load_kw["attn_implementation"] = attn_implementation
    reloaded = None
    if use_auto_class:
        try:
            reloaded = _auto_class(layout).from_pretrained(save_dir, **load_kw)
        except (ValueError, KeyError):
            reloaded = None
        if reloaded is not None and type(reloaded) is not model_cls:
            reloaded = None
    if reloaded is None:
        reloaded = model_cls.from_pretrained(save_dir, **load_kw)
    if realign:
        with torch.no_grad():
            for p in reloaded.parameters():  # deduplicated: tied weights stay tied
                p.data = p.data.clone()
            for mod in reloaded.modules():
                for name, buf in list(mod._buffers.items()):
                    if buf is not None:
                        mod._buffers[name] = buf.clone()
    return reloaded.eval()

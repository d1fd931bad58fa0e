"""Tiny random-init models of flash-linear-attention's (fla) real classes, built from fla's config classes, saved
with ``save_pretrained`` and reloaded through transformers' ``AutoModelForCausalLM`` from a directory (the real fla
layer code: projections, short convs, norms, gates; on a CPU the triton kernels are routed to torch,
``writesae_plugin.adapters.fla_cpu``), fp32, eval mode.

``make_tiny_deltanet(path)``: fla ``DeltaNetForCausalLM``, hidden 64, vocab 256, 3 DeltaNet layers of 4 heads,
``d_k = 16``, ``d_v = 32`` (``expand_v = 2``), short convs of width 4, ``initializer_range = 0.1`` so reads are
O(0.1).
``make_tiny_gla(path)``: fla ``GLAForCausalLM``, hidden 64, vocab 256, 3 GLA layers of 4 heads sharing 2 key/value
heads (``num_kv_heads = 2``), ``d_k = 16``, ``d_v = 32``, short convs, low-rank gate of rank 16, the fused gated
output norm, ``initializer_range = 0.2``.
``make_tiny_rwkv7(path)``: fla ``RWKV7ForCausalLM``, hidden 64, vocab 256, 3 RWKV-7 layers of 4 heads, ``d_k = d_v =
16`` (fla 0.6's init fails for ``value_dim != hidden_size``), LoRA ranks 16, fused norms (fla's default), the
squared-ReLU FFN; parameters re-drawn so that decays and erase strengths are far from constant (see
``build_tiny_rwkv7``).
"""

from __future__ import annotations

import pytest
import torch

from tiny_recurrent_models import _save_reload

VOCAB = 256


def require_fla():
    """Import fla (registers its configs with transformers' Auto classes), or skip with the reason."""
    pytest.importorskip("triton", reason="the [fla] extra (flash-linear-attention + triton) is not installed")
    return pytest.importorskip("fla", reason="the [fla] extra (flash-linear-attention + triton) is not installed")


def deltanet_config(**overrides):
    require_fla()
    from fla.models import DeltaNetConfig

    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_heads=4, expand_k=1.0, expand_v=2.0,
              conv_size=4, hidden_ratio=2, max_position_embeddings=512, initializer_range=0.1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    return DeltaNetConfig(**kw)


def build_tiny_deltanet(seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(deltanet_config(**overrides), dtype=torch.float32).eval()


def make_tiny_deltanet(save_dir, seed: int = 0, **overrides):
    return _save_reload(build_tiny_deltanet(seed, **overrides), save_dir)


def gla_config(**overrides):
    require_fla()
    from fla.models import GLAConfig

    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_heads=4, num_kv_heads=2, expand_k=1.0,
              expand_v=2.0, use_short_conv=True, conv_size=4, gate_low_rank_dim=16, hidden_ratio=2,
              max_position_embeddings=512, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
    kw.update(overrides)
    return GLAConfig(**kw)


def build_tiny_gla(seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(gla_config(**overrides), dtype=torch.float32).eval()


def make_tiny_gla(save_dir, seed: int = 0, **overrides):
    return _save_reload(build_tiny_gla(seed, **overrides), save_dir)


def rwkv7_config(**overrides):
    require_fla()
    from fla.models import RWKV7Config

    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, head_dim=16, decay_low_rank_dim=16,
              gate_low_rank_dim=16, a_low_rank_dim=16, v_low_rank_dim=16, hidden_ratio=2, max_position_embeddings=512,
              initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    return RWKV7Config(**kw)


def build_tiny_rwkv7(seed: int = 0, **overrides):
    """fla's own init zeroes o_proj and the FFN's value projection and gives smooth per-channel decay biases; the
    tiny model re-draws every parameter but the norms and embeddings (token-shift mixes, LoRA weights and biases,
    k_k, k_a, r_k, projections) so that decays, erase strengths a, the erase keys and the v_first mix vary per token
    and channel and every layer's read reaches the logits."""
    import warnings

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fla's "potentially buggy FLA implementation of RWKV" notice
        model = AutoModelForCausalLM.from_config(rwkv7_config(**overrides), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "embeddings" in name:
                continue
            if name.endswith(("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")):
                p.copy_(torch.rand(p.shape, generator=g))
            elif p.dim() == 1 or name.endswith(("k_k", "k_a", "r_k")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith(("k_k", "k_a")) else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 / p.shape[-1] ** 0.5) * 2)
    return model


def make_tiny_rwkv7(save_dir, seed: int = 0, **overrides):
    return _save_reload(build_tiny_rwkv7(seed, **overrides), save_dir)

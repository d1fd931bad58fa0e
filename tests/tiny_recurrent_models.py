"""Tiny random-init models of the real Hugging Face classes of the families beyond GDN / Mamba-2: Kimi Linear
(``kimi_linear``: KDA layers + one MLA attention layer) and xLSTM (``xlstm``: mLSTM blocks), saved with
``save_pretrained`` and reloaded with the Auto class from a directory (the real loading code, offline), fp32, eval mode.

``make_tiny_kimi(path)``: hidden 64, vocab 256, 4 layers (layer 3 full attention, MLA), KDA with 4 heads of
``d_k = d_v = 16`` (KDA has as many key heads as value heads), dense MLPs in layers 0 and 2, a small MoE (4 experts,
top 2) in layers 1 and 3, ``initializer_range=0.1`` so reads are O(0.1-1).
``make_tiny_xlstm(path)``: hidden 128, 3 mLSTM blocks, 4 heads, ``d_k = 16``, ``d_v = 32``, chunk 16, random gates.
"""

from __future__ import annotations

import os

import torch

VOCAB = 256


def _save_reload(model, save_dir):
    from transformers import AutoModelForCausalLM

    save_dir = os.fspath(save_dir)
    os.makedirs(save_dir, exist_ok=True)
    model.save_pretrained(save_dir)
    cls = type(model)
    reloaded = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32)
    assert type(reloaded) is cls, (type(reloaded), cls)
    with torch.no_grad():  # fresh, aligned allocations (see tests/tiny_models.make_tiny_model)
        for p in reloaded.parameters():
            p.data = p.data.clone()
    return reloaded.eval()


def kimi_config(**overrides):
    from transformers import KimiLinearConfig

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
              kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
              num_experts_per_tok=2, num_local_experts=4, n_group=1, topk_group=1,
              layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
              mlp_layer_types=["dense", "sparse", "dense", "sparse"],
              linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
              initializer_range=0.1)  # O(0.1-1) reads, so 1e-5 parity checks are meaningful
    kw.update(overrides)
    return KimiLinearConfig(**kw)


def build_tiny_kimi(seed: int = 0, **overrides):
    from transformers import KimiLinearForCausalLM

    torch.manual_seed(seed)
    return KimiLinearForCausalLM._from_config(kimi_config(**overrides), dtype=torch.float32).eval()


def make_tiny_kimi(save_dir, seed: int = 0, **overrides):
    return _save_reload(build_tiny_kimi(seed, **overrides), save_dir)


def xlstm_config(**overrides):
    from transformers import xLSTMConfig

    # qk_dim = hidden * qk_dim_factor must be a multiple of 64: the layer uses it as is, the cache rounds it up
    kw = dict(vocab_size=VOCAB, hidden_size=128, embedding_dim=128, num_hidden_layers=3, num_blocks=3, num_heads=4,
              qk_dim_factor=0.5, v_dim_factor=1.0, ffn_proj_factor=1.0, ffn_round_up_to_multiple_of=16,
              chunk_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    return xLSTMConfig(**kw)


def build_tiny_xlstm(seed: int = 0, **overrides):
    """Tiny ``xLSTMForCausalLM``: hidden 128, 3 mLSTM blocks, 4 heads, d_k = 16, d_v = 32, chunk 16. transformers
    initialises the gate projections to zero (constant gates); they are drawn at random here so the input gate varies over
    tokens and the max stabiliser switches between its two branches."""
    from transformers import xLSTMForCausalLM

    torch.manual_seed(seed)
    model = xLSTMForCausalLM._from_config(xlstm_config(**overrides), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.backbone.blocks:
            layer = block.mlstm_layer
            for lin, scale, bias, shift in ((layer.igate_preact, 0.05, 1.0, 0.0), (layer.fgate_preact, 0.05, 1.0, 2.0),
                                            (layer.ogate_preact, 0.1, 0.0, 0.0)):
                lin.weight.copy_(scale * torch.randn(lin.weight.shape, generator=g))
                if lin.bias is not None:
                    lin.bias.copy_(shift + bias * torch.randn(lin.bias.shape, generator=g))
    return model


def make_tiny_xlstm(save_dir, seed: int = 0, **overrides):
    return _save_reload(build_tiny_xlstm(seed, **overrides), save_dir)

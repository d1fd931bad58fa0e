"""A tiny random-init Qwen3.5 text model, built with the real HF classes and loaded back from disk.

Used by ``writesae hooks`` when no model is given, so the self-check runs offline on any machine.
"""

from __future__ import annotations

import os

import torch


def tiny_qwen35_config(n_layers: int = 4, d_head: int = 16):
    """Qwen3.5 text config: GDN layers (2 key heads, 4 value heads) and one full-attention layer last."""
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        layer_types=["linear_attention"] * (n_layers - 1) + ["full_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=d_head,
        linear_value_head_dim=d_head, max_position_embeddings=2048,
    )


def build_tiny_qwen35(save_dir: str | os.PathLike, seed: int = 0, **config_kwargs):
    """Build with ``torch.manual_seed(seed)``, ``save_pretrained(save_dir)``, and reload with
    ``AutoModelForCausalLM.from_pretrained(save_dir)`` (the real loading code, offline)."""
    from transformers import AutoModelForCausalLM, Qwen3_5ForCausalLM

    torch.manual_seed(seed)
    Qwen3_5ForCausalLM(tiny_qwen35_config(**config_kwargs)).save_pretrained(save_dir)
    return AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32).eval()

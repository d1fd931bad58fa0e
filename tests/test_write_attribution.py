"""Write attribution: effective attention vs brute-force deletion, adjoint scores vs exact edits, erasure."""

from __future__ import annotations

import pytest
import torch

import writesae_plugin  # noqa: F401
from writesae_plugin.adapters import WriteEdit, hook_model
from writesae_plugin.experiments.write_attribution import (ErasureConfig, dictionary_scores, effective_attention,
                                                           run_erasure, write_contributions)
from writesae_plugin.sae import WriteSAE, WriteSAEConfig

L = 1
P = f"blocks.{L}.linear_attn."


def test_effective_attention_reproduces_reads_and_deletions(qwen, tokens):
    model = hook_model(qwen)
    with torch.no_grad():
        _, c = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(P))
        A = effective_attention(c[P + "hook_query"], c[P + "hook_write_key"], c[P + "hook_log_decay"],
                                c[P + "hook_beta"])
        contrib = write_contributions(A, c[P + "hook_v"])  # [b, H, T, T, d_v]
        assert (contrib.sum(3).transpose(1, 2) - c[P + "hook_read"]).abs().max() <= 1e-5
        assert torch.equal(A.triu(1), torch.zeros_like(A))
        for b, s, h in [(0, 5, 1), (1, 40, 3), (0, 66, 0)]:  # brute force: delete write s, measure the reads
            with model.edits([WriteEdit(layer=L, pos=s, head=h, batch=b, op="delete")]):
                _, e = model.run_with_cache(tokens, names_filter=[P + "hook_read"])
            delta = (e[P + "hook_read"] - c[P + "hook_read"])[b, :, h]  # [T, d_v]
            assert (delta + contrib[b, h, :, s]).abs().max() <= 1e-5


def test_dictionary_scores_equal_exact_first_order_change(qwen, tokens):
    model = hook_model(qwen)
    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=12, d_k=16, d_v=16, k=3, n_heads=4, head=2, site="write",
                                  layer=L, family="qwen3_5_text"))
    r = torch.randn(2, 70, 4, 16)
    store = {}

    def keep(x, hook):
        store["read"] = x
        return x

    def metric(_logits):  # linear in the layer's read: the adjoint is then exact, not first-order
        return (store["read"] * r).sum()

    with model.hooks(fwd_hooks=[(P + "hook_read", keep)]):
        scores = dictionary_scores(model, tokens, sae, metric)
    assert scores.shape == (2, 70, 12)
    with torch.no_grad():
        _, c = model.run_with_cache(tokens, names_filter=[P + "hook_read"])
        base = (c[P + "hook_read"] * r).sum()
        for b, s, i in [(0, 10, 3), (1, 50, 7)]:
            A = sae.W_dec[i].view(16, 16)
            with model.edits([WriteEdit(layer=L, pos=s, head=2, batch=b, matrix=A)]):
                _, e = model.run_with_cache(tokens, names_filter=[P + "hook_read"])
            exact = (e[P + "hook_read"] * r).sum() - base
            assert float(scores[b, s, i]) == pytest.approx(float(exact), rel=1e-3, abs=1e-5)


def test_erasure(qwen, tokens):
    model = hook_model(qwen)
    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=16, d_k=16, d_v=16, k=3, n_heads=4, head=1, site="write",
                                  layer=L, family="qwen3_5_text"))
    with torch.no_grad():
        sae.enc_key.mul_(100.0)
    out = run_erasure(model, sae, tokens, ErasureConfig(atoms=[0, 1, 2], max_per_atom=3))
    assert out["summary"]["n"] == len(out["records"]) > 0
    r = out["records"][0]
    assert r["pos"] != r["control_pos"] and "wilcoxon_firing_vs_control" in out["summary"]


def test_mamba2_effective_attention_matches_the_recurrence():
    from writesae_plugin.experiments.write_attribution import mamba2_effective_attention

    g = torch.Generator().manual_seed(0)
    b, T, H, N, P = 2, 37, 3, 8, 5
    C, B = torch.randn(b, T, H, N, generator=g), torch.randn(b, T, H, N, generator=g)
    dt = torch.rand(b, T, H, generator=g)
    A = -torch.rand(H, generator=g) * 2
    x = torch.randn(b, T, H, P, generator=g)
    value = dt[..., None] * x  # dt' x: the value side of the rank-1 write B (x) dt' x
    S = torch.zeros(b, H, N, P)
    y = torch.zeros(b, T, H, P)
    for t in range(T):  # brute force: S_t = exp(dt_t A) S_{t-1} + B_t (dt_t x_t)^T, y_t = S_t^T C_t
        S = (dt[:, t] * A).exp()[..., None, None] * S + B[:, t, :, :, None] * value[:, t, :, None, :]
        y[:, t] = torch.einsum("bhnp,bhn->bhp", S, C[:, t])
    A_eff = mamba2_effective_attention(C, B, dt * A)
    assert (write_contributions(A_eff, value).sum(3).transpose(1, 2) - y).abs().max() <= 1e-4

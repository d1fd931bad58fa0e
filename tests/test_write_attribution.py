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


def test_preferred_token_is_signed_by_the_read(qwen, tokens):
    """A planted rank-1 atom whose key side points against the head's queries (q . u < 0 where it is read):
    its preferred token is the one ``W_U W_O w`` ranks last, as the model's own read change shows."""
    from writesae_plugin.experiments.write_attribution import (atom_read, direct_token_scores, head_queries,
                                                               preferred_token)

    model = hook_model(qwen)
    h = 1
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=4, d_k=16, d_v=16, k=1, n_heads=4, head=h, site="write",
                                  layer=L, family="qwen3_5_text"))
    q = head_queries(model, sae, tokens)  # [2, 70, 16]
    u = -q.reshape(-1, 16).mean(0)
    u = u / u.norm()
    w = torch.randn(16, generator=torch.Generator().manual_seed(3))
    w = w / w.norm()
    with torch.no_grad():
        sae.dec_key[0, 0], sae.dec_value[0, 0] = u, w
        sae.b_enc.copy_(torch.tensor([100.0, -100.0, -100.0, -100.0]))  # atom 0 fires at every position
    plain = direct_token_scores(model, sae, w)  # W_U^T W_O w, unsigned
    assert int(plain.argmax()) != int(plain.argmin())
    r = atom_read(sae, 0, q, sae.encode_factors(*_factors(model, tokens, h)))
    assert r["positions"] == "firings" and r["n"] == 2 * 70 and r["sign"] == -1 and r["frac_negative"] > 0.5
    pref = preferred_token(model, sae, 0, tokens)
    assert pref == int(plain.argmin())
    # the model's own read: adding the atom at firings moves the head's read along -w, which scores pref highest
    P_ = model.hook_prefix(L)
    with torch.no_grad():
        _, c = model.run_with_cache(tokens, names_filter=[P_ + "hook_read"])
        total = torch.zeros(16)
        for b, t in [(0, 5), (0, 33), (1, 12), (1, 69)]:
            with model.edits([WriteEdit(layer=L, pos=t, head=h, batch=b, op="add", matrix=torch.outer(u, w))]):
                _, e = model.run_with_cache(tokens, names_filter=[P_ + "hook_read"])
            total += (e[P_ + "hook_read"] - c[P_ + "hook_read"])[b, t, h]
    assert int(direct_token_scores(model, sae, total).argmax()) == pref
    # the same matrix with both factors negated reads the same; the negated matrix promotes the other end
    with torch.no_grad():
        sae.dec_key[0, 0], sae.dec_value[0, 0] = -u, -w
    assert preferred_token(model, sae, 0, tokens) == pref
    with torch.no_grad():
        sae.dec_value[0, 0] = w
    assert preferred_token(model, sae, 0, tokens) == int(plain.argmax())
    with pytest.raises(ValueError, match="needs tokens"):
        preferred_token(model, sae, 0)


def _factors(model, tokens, h):
    P_ = model.hook_prefix(L)
    with torch.no_grad():
        _, c = model.run_with_cache(tokens, names_filter=[P_ + "hook_write_key", P_ + "hook_write_value"])
    return c[P_ + "hook_write_key"][:, :, h], c[P_ + "hook_write_value"][:, :, h]

"""Parity of the fast WriteSAE kernels with their readable references (issue 13): values and gradients, fp32.

"Relative" error is ``max |fast - reference| / max |reference|`` per tensor; the bound is 1e-5 throughout.
Shapes are small and drawn at random from a fixed seed (several per kernel), so the suite runs in seconds.
"""

from __future__ import annotations

import random

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from writesae_plugin.sae import TrainingWriteSAE, WriteSAE, WriteSAEConfig, WriteSAETrainingConfig, kernels

REL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def shapes(count: int, seed: int):
    rng = random.Random(seed)
    return [dict(N=rng.randint(1, 9), n=rng.randint(8, 40), r=rng.randint(1, 3), dk=rng.randint(1, 9),
                 dv=rng.randint(1, 9), m=rng.randint(1, 8)) for _ in range(count)]


def leaves(*shapes_, gen):
    return [torch.randn(*s, generator=gen, dtype=torch.float32).requires_grad_() for s in shapes_]


def grads_of(out: torch.Tensor, inputs, w: torch.Tensor):
    return torch.autograd.grad((out * w).sum(), inputs, allow_unused=True, retain_graph=True)


def distinct_idx(N, n, m, gen):
    return torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(N)])


@pytest.mark.parametrize("s", shapes(6, 0), ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_encoders_match_reference(s):
    gen = torch.Generator().manual_seed(1)
    N, n, r, dk, dv, m = s["N"], s["n"], s["r"], s["dk"], s["dv"], min(s["m"], s["n"])
    key, value, b_dec = leaves((n, r, dk), (n, r, dv), (dk * dv,), gen=gen)
    X = torch.randn(N, dk, dv, generator=gen)
    Xc = X - b_dec.view(dk, dv)
    ref = kernels.bilinear_encoder_reference(Xc, key, value)
    w = torch.randn(ref.shape, generator=gen)
    g_ref = grads_of(ref, (key, value, b_dec), w)
    gemm = kernels.bilinear_encoder_gemm(Xc, key, value)
    assert rel_err(gemm, ref) <= REL
    for a, b in zip(grads_of(gemm, (key, value, b_dec), w), g_ref):
        assert rel_err(a, b) <= REL
    small_blocks = kernels.bilinear_encoder_gemm(Xc, key, value, max_atom_elems=dk * dv * 3)
    assert rel_err(small_blocks, ref) <= REL
    buf = torch.empty(n, dk * dv)
    with torch.no_grad():
        assert kernels.atom_matrix(key, value, out=buf).data_ptr() == buf.data_ptr()
        assert rel_err(buf, kernels.atom_matrix(key, value)) == 0
    # selected pairs: values and gradients equal the reference's restricted to those pairs
    idx = distinct_idx(N, n, m, gen)
    with torch.no_grad():
        E = kernels.atom_matrix(key, value)
        vals0 = (Xc.reshape(N, -1) @ E.T).gather(1, idx)
    at = kernels.bilinear_pre_at(vals0, Xc.detach(), idx, key, value, b_dec)
    ref_at = ref.gather(1, idx)
    w_at = w.gather(1, idx)
    assert rel_err(at, ref_at) <= REL
    for a, b in zip(grads_of(at, (key, value, b_dec), w_at), grads_of(ref_at, (key, value, b_dec), w_at)):
        assert rel_err(a, b) <= REL
    # dense encoder
    W_enc, = leaves((dk * dv, n), gen=gen)
    dref = kernels.dense_encoder_reference(Xc, W_enc)
    with torch.no_grad():
        dvals = dref.gather(1, idx)
    dat = kernels.dense_pre_at(dvals, Xc.detach(), idx, W_enc, b_dec)
    assert rel_err(dat, dref.gather(1, idx)) <= REL
    for a, b in zip(grads_of(dat, (W_enc, b_dec), w_at), grads_of(dref.gather(1, idx), (W_enc, b_dec), w_at)):
        assert rel_err(a, b) <= REL


@pytest.mark.parametrize("s", shapes(6, 1), ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_decoders_match_reference(s):
    gen = torch.Generator().manual_seed(2)
    N, n, r, dk, dv, m = s["N"], s["n"], s["r"], s["dk"], s["dv"], min(s["m"], s["n"])
    key, value, D = leaves((n, r, dk), (n, r, dv), (n, dk * dv), gen=gen)
    idx = distinct_idx(N, n, m, gen)
    vals, = leaves((N, m), gen=gen)
    acts = torch.zeros(N, n).scatter(1, idx, vals)  # differentiable in vals
    w = torch.randn(N, dk, dv, generator=gen)
    ref = kernels.rank_decoder_reference(acts, key, value)
    for fast in (kernels.rank_decode_sparse(vals, idx, key, value), kernels.rank_decoder_gemm(acts, key, value)):
        assert rel_err(fast, ref) <= REL
        for a, b in zip(grads_of(fast, (vals, key, value), w), grads_of(ref, (vals, key, value), w)):
            assert rel_err(a, b) <= REL
    dref = kernels.dense_decoder_reference(acts, D, dk, dv)
    dfast = kernels.dense_decode_sparse(vals, idx, D).view(N, dk, dv)
    assert rel_err(dfast, dref) <= REL
    for a, b in zip(grads_of(dfast, (vals, D), w), grads_of(dref, (vals, D), w)):
        assert rel_err(a, b) <= REL


def test_jumprelu_at_matches_saelens_jumprelu():
    from sae_lens.saes.jumprelu_sae import JumpReLU

    gen = torch.Generator().manual_seed(3)
    x, log_t = leaves((7, 12), (12,), gen=gen)
    idx = distinct_idx(7, 12, 12, gen)  # every entry, permuted per row
    w = torch.randn(7, 12, generator=gen)
    ref = JumpReLU.apply(x, log_t.exp(), 0.5, False)
    fast = kernels.JumpReLUAt.apply(x.gather(1, idx), log_t.exp()[idx], 0.5)
    assert torch.equal(fast, ref.gather(1, idx))
    for a, b in zip(grads_of(fast, (x, log_t), w.gather(1, idx)), grads_of(ref, (x, log_t), w)):
        assert rel_err(a, b) <= REL


def _pair(seed, **kw):
    torch.manual_seed(seed)
    cfg = WriteSAETrainingConfig(**kw)
    fast, ref = TrainingWriteSAE(cfg), TrainingWriteSAE(cfg)
    with torch.no_grad():
        fast.b_dec.normal_(std=0.3)
        fast.b_enc.normal_(std=0.1)
        if cfg.activation == "jumprelu":
            fast.log_threshold.copy_(torch.empty_like(fast.log_threshold).uniform_(-0.5, 1.0))
    ref.load_state_dict(fast.state_dict())
    ref.kernels = "reference"
    return fast, ref


VARIANTS = [("bilinear", 1, 1), ("bilinear", 2, 2), ("bilinear", None, 1), ("dense", 1, 1), ("dense", None, 1)]


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("encoder,decoder_rank,encoder_rank", VARIANTS)
@pytest.mark.parametrize("dead", [None, "pairs", "block"])
def test_training_step_matches_reference(encoder, decoder_rank, encoder_rank, activation, dead):
    """The selected-atoms step == the einsum reference step: losses, codes, output and every gradient; aux-k both
    on selected pairs (many dead atoms) and on the block of dead atoms (n_dead <= 3 aux_k)."""
    dk, dv, n, N = 6, 5, 256, 24
    fast, ref = _pair(0, d_in=dk * dv, d_sae=n, d_k=dk, d_v=dv, k=4, encoder=encoder, decoder_rank=decoder_rank,
                      encoder_rank=encoder_rank, activation=activation, aux_k=6 if dead == "pairs" else 40)
    x = torch.nn.functional.normalize(torch.randn(N, dk * dv), dim=-1) * 5
    if activation == "jumprelu":  # thresholds at each atom's 97% quantile on this batch: ~8 codes per row
        with torch.no_grad():
            thr = fast._pre(x.view(N, dk, dv)).quantile(0.97, dim=0).clamp(min=1e-3).log()
            fast.log_threshold.copy_(thr)
            ref.log_threshold.copy_(thr)
    mask = torch.zeros(n, dtype=torch.bool)
    if dead:
        mask[::3] = True
    inp = TrainStepInput(sae_in=x, coefficients={"l0": 0.7}, dead_neuron_mask=mask, n_training_steps=1,
                         is_logging_step=False)
    assert fast._selected_atoms_step(inp) is not None  # the codes are sparse enough for the fast path
    fast.zero_grad()
    outs = []
    for sae in (fast, ref):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l0": 0.7}, dead_neuron_mask=mask,
                                                       n_training_steps=1, is_logging_step=False))
        out.loss.backward()
        outs.append(out)
    a, b = outs
    assert a.losses.keys() == b.losses.keys() and ("auxiliary_reconstruction_loss" in a.losses) == bool(dead)
    for name in a.losses:
        assert rel_err(a.losses[name], b.losses[name]) <= REL, name
    for field in ("feature_acts", "sae_out", "hidden_pre"):
        assert rel_err(getattr(a, field), getattr(b, field)) <= REL, field
    assert torch.equal(a.feature_acts != 0, b.feature_acts != 0)
    for (name, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert rel_err(p.grad, q.grad) <= REL, name


def test_fast_step_is_taken_and_falls_back_when_needed(monkeypatch):
    dk = dv = 4
    fast, _ = _pair(0, d_in=16, d_sae=64, d_k=dk, d_v=dv, k=2)
    x = torch.randn(8, 16)
    inp = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=1, is_logging_step=False)
    calls = []
    monkeypatch.setattr(kernels, "bilinear_encoder_reference", lambda *a: calls.append(1) or 1 / 0)
    fast.training_forward_pass(inp)  # the selected-atoms path never runs the einsum encoder
    monkeypatch.undo()
    seen = []
    fast.hook_sae_acts_pre.add_hook(lambda t, hook: seen.append(t.shape) or t)
    fast.training_forward_pass(inp)  # a hook on the SAE: the reference path runs so the hook sees every code
    assert seen == [(8, 64)]
    fast.reset_hooks()
    # dense JumpReLU codes (more than d_sae / 8 per row) fall back to the materialised-atom step
    jr, ref = _pair(1, d_in=16, d_sae=64, d_k=dk, d_v=dv, k=2, activation="jumprelu")
    with torch.no_grad():
        jr.log_threshold.fill_(-6.0)
        ref.log_threshold.fill_(-6.0)
    assert jr._selected_atoms_step(inp) is None
    a, b = jr.training_forward_pass(inp), ref.training_forward_pass(inp)
    assert rel_err(a.loss, b.loss) <= REL


@pytest.mark.parametrize("decoder_rank", [1, 2, None])
def test_inference_encode_decode_match_reference(decoder_rank):
    torch.manual_seed(0)
    cfg = WriteSAEConfig(d_in=30, d_sae=48, d_k=6, d_v=5, k=3, n_heads=3, head=None, decoder_rank=decoder_rank,
                         encoder_rank=2 if decoder_rank == 2 else 1)
    fast = WriteSAE(cfg)
    ref = WriteSAE(cfg)
    ref.load_state_dict(fast.state_dict())
    ref.kernels = "reference"
    x = torch.randn(2, 5, 3, 6, 5)
    assert rel_err(fast.encode(x), ref.encode(x)) <= REL
    assert rel_err(fast(x), ref(x)) <= REL
    codes = torch.randn(4, 48).relu()  # dense codes: the GEMM decoder
    assert rel_err(fast.decode(codes), ref.decode(codes)) <= REL

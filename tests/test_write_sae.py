"""WriteSAE as a SAELens architecture: layouts, factored math, folding, save/load, converter, registry."""

from __future__ import annotations

import warnings

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepInput

import writesae_plugin
from writesae_plugin.sae import (TrainingWriteSAE, WriteSAE, WriteSAEConfig, WriteSAETrainingConfig, atoms,
                                 register)
from writesae_plugin.sae.convert import load_paper_checkpoint

DK = DV = 8


def make_cfg(cls=WriteSAEConfig, **kw):
    base = dict(d_in=DK * DV, d_sae=32, d_k=DK, d_v=DV, k=4, n_heads=4, head=2)
    base.update(kw)
    return cls(**base)


def test_registration_is_idempotent_and_tolerates_other_registrants():
    from sae_lens import registry

    register()
    register()
    import importlib

    importlib.reload(writesae_plugin.sae)  # a reload re-registers the same classes under new identities
    writesae_plugin.sae.register()
    assert registry.SAE_CLASS_REGISTRY["write_sae"][0].__name__ == "WriteSAE"
    saved = dict(registry.SAE_CLASS_REGISTRY)
    try:
        class Foreign:  # another plugin took the name first
            pass

        registry.SAE_CLASS_REGISTRY["write_sae"] = (Foreign, WriteSAEConfig)
        with pytest.warns(UserWarning, match="already registered"):
            register()
        assert registry.SAE_CLASS_REGISTRY["write_sae"][0] is Foreign
    finally:
        registry.SAE_CLASS_REGISTRY.clear()
        registry.SAE_CLASS_REGISTRY.update(saved)
        importlib.reload(writesae_plugin.sae)
        writesae_plugin.sae.register()


def test_layouts_and_per_head_passthrough():
    torch.manual_seed(0)  # (was unseeded; the layouts agree to fp32 rounding, not bit for bit: batched GEMMs)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6) is None  # noqa: E731
    sae = WriteSAE(make_cfg())
    x = torch.randn(2, 5, 4, DK, DV)
    acts = sae.encode(x)
    out = sae.decode(acts)
    assert acts.shape == (2, 5, 32) and out.shape == x.shape
    assert torch.equal(out[:, :, [0, 1, 3]], x[:, :, [0, 1, 3]])
    one = sae.decode(sae.encode(x[:, :, 2]))
    assert one.shape == (2, 5, DK, DV) and close(one, out[:, :, 2])
    flat = x.reshape(2, 5, -1)
    out_flat = sae.decode(sae.encode(flat))
    assert out_flat.shape == flat.shape and close(out_flat, out.reshape(2, 5, -1))
    per_head_flat = sae.decode(sae.encode(x[:, :, 2].reshape(2, 5, -1)))
    assert per_head_flat.shape == (2, 5, DK * DV)
    shared = WriteSAE(make_cfg(head=None))
    a = shared.encode(x)
    assert a.shape == (2, 5, 4, 32) and shared.decode(a).shape == x.shape
    assert close(shared.decode(a)[:, :, 1], shared.decode(shared.encode(x[:, :, 1])))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8, 8\]"):
        sae.encode(torch.randn(3, 7))
    with pytest.raises(ValueError, match="value heads"):
        sae.encode(torch.randn(2, 5, 3, DK, DV))


@pytest.mark.parametrize("decoder_rank", [1, 2, None])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_factored_training_step_equals_dense(decoder_rank, activation):
    torch.manual_seed(0)
    kw = dict(head=None, decoder_rank=decoder_rank, activation=activation, site="write", aux_k=8,
              encoder_rank=2 if decoder_rank == 2 else 1)
    dense = TrainingWriteSAE(make_cfg(WriteSAETrainingConfig, input_layout="dense", **kw))
    fact = TrainingWriteSAE(make_cfg(WriteSAETrainingConfig, input_layout="factors", **kw))
    fact.load_state_dict(dense.state_dict())
    with torch.no_grad():
        dense.b_dec.normal_()
        fact.b_dec.copy_(dense.b_dec)
        if activation == "jumprelu":
            dense.log_threshold.fill_(-3.0)
            fact.log_threshold.fill_(-3.0)
    k, v = torch.randn(16, DK), torch.randn(16, DV)
    X = (k[:, :, None] * v[:, None, :]).reshape(16, -1)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    outs = []
    for sae, x in ((dense, X), (fact, torch.cat([k, v], -1))):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l0": 1.0}, dead_neuron_mask=dead,
                                                       n_training_steps=1, is_logging_step=False))
        out.loss.backward()
        outs.append(out)
    for name in outs[0].losses:
        assert torch.allclose(outs[0].losses[name], outs[1].losses[name], rtol=1e-4, atol=1e-5), name
    assert torch.allclose(outs[0].feature_acts, outs[1].feature_acts, atol=1e-5)
    for (n1, p1), (n2, p2) in zip(dense.named_parameters(), fact.named_parameters()):
        assert torch.allclose(p1.grad, p2.grad, rtol=1e-3, atol=1e-5), n1


def test_factored_encoder_and_error_never_form_the_matrix():
    from writesae_plugin.profiling import LargestTensor

    d, n, N = 64, 128, 512
    sae = TrainingWriteSAE(WriteSAETrainingConfig(d_in=d * d, d_sae=n, d_k=d, d_v=d, k=8, site="write",
                                                  input_layout="factors", aux_k=16))
    x = torch.randn(N, 2 * d)
    mode = LargestTensor()
    with mode:
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                       n_training_steps=1, is_logging_step=False))
        out.loss.backward()
    assert mode.largest < N * d * d / 4  # never an [N, d_k, d_v] tensor (the largest are [d_sae, d_in] weights)
    k, v = x[:, :d], x[:, d:]
    exact = atoms.bilinear_pre(k[:, :, None] * v[:, None, :], sae.enc_key, sae.enc_value)
    assert torch.allclose(atoms.bilinear_pre_factored(k, v, sae.enc_key, sae.enc_value), exact, atol=1e-4)


def test_W_dec_view_folding_and_whitening():
    sae = WriteSAE(make_cfg(activation="jumprelu"))
    W = sae.W_dec
    assert W.shape == (32, DK * DV) and not W.requires_grad
    assert torch.allclose(W.view(32, DK, DV), atoms.atom_matrices(sae.dec_key, sae.dec_value))
    with pytest.raises(AttributeError, match="read-only"):
        sae.W_dec = torch.zeros(32, 64)
    with torch.no_grad():
        sae.dec_key.mul_(torch.linspace(0.5, 2.0, 32)[:, None, None])
        sae.threshold.fill_(0.1)
    x = torch.randn(10, DK, DV)
    before = sae.decode(sae.encode(x))
    sae.fold_W_dec_norm()
    assert torch.allclose(sae.atom_norms(), torch.ones(32), atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x)), before, atol=1e-5)
    topk = WriteSAE(make_cfg())
    topk.fold_W_dec_norm()  # unit-norm atoms: nothing to fold
    with torch.no_grad():
        topk.dec_value.mul_(2)
    with pytest.raises(NotImplementedError, match="TopK"):
        topk.fold_W_dec_norm()
    with pytest.raises(NotImplementedError, match="whitening"):
        topk.fold_activation_whitening(None, None, None)
    with pytest.raises(ValueError, match="not supported by WriteSAE"):
        make_cfg(normalize_activations="covariance_whitening")
    with pytest.raises(ValueError, match="d_in must be"):
        make_cfg(d_in=10)
    with pytest.raises(ValueError, match="head=7"):
        make_cfg(head=7)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_save_load_round_trip_and_training_export(tmp_path, activation):
    torch.manual_seed(1)
    tsae = TrainingWriteSAE(make_cfg(WriteSAETrainingConfig, activation=activation, decoder_rank=2,
                                     encoder_rank=2, family="qwen3_5_text", layer=1))
    tsae.cfg.metadata.hook_name = "blocks.1.linear_attn.hook_state"
    with torch.no_grad():
        if activation == "batchtopk":
            tsae.topk_threshold.fill_(0.05)
        if activation == "jumprelu":
            tsae.log_threshold.fill_(-3.0)
    tsae.save_model(tmp_path / "train")
    reloaded = TrainingSAE.load_from_disk(tmp_path / "train")
    assert isinstance(reloaded, TrainingWriteSAE)
    sd, sd2 = tsae.state_dict(), reloaded.state_dict()
    assert sd.keys() == sd2.keys()
    # SAELens casts every tensor to cfg.dtype on load (BatchTopK's double threshold becomes float32)
    assert all(torch.allclose(sd[n].double(), sd2[n].double()) for n in sd)
    tsae.save_inference_model(tmp_path / "inf")
    sae = SAE.load_from_disk(tmp_path / "inf")
    assert isinstance(sae, WriteSAE) and sae.cfg.family == "qwen3_5_text" and sae.cfg.decoder_rank == 2
    assert sae.cfg.metadata.hook_name == "blocks.1.linear_attn.hook_state"
    x = torch.randn(6, DK, DV)
    tsae.eval()
    if activation == "topk":
        assert torch.allclose(sae.encode(x), tsae.encode(x))
    else:  # exported with its learned threshold (BatchTopK as SAELens does)
        assert sae.cfg.activation == "jumprelu"
        thr = 0.05 if activation == "batchtopk" else torch.tensor(-3.0).exp().item()
        assert torch.allclose(sae.threshold, torch.full((32,), thr))
        pre = sae._pre(x)
        assert torch.equal(sae.encode(x), pre * (pre > sae.threshold))
    sae.save_model(tmp_path / "again")
    again = SAE.load_from_disk(tmp_path / "again")
    assert torch.equal(again.encode(x), sae.encode(x))


def test_paper_checkpoint_converter(tmp_path):
    n = 16
    sd = {"V_dec": torch.randn(n, DK), "W_dec": torch.randn(DV, n), "V_enc": torch.randn(n, DK),
          "W_enc": torch.randn(n, DV), "b_enc": torch.randn(n), "bias": torch.randn(DK, DV)}
    torch.save(sd, tmp_path / "ckpt.pt")
    sae = load_paper_checkpoint(tmp_path / "ckpt.pt", k=4, hook_name="blocks.1.linear_attn.hook_state")
    x = torch.randn(3, DK, DV)
    pre = torch.einsum("nk,Nkv,nv->Nn", sd["V_enc"], x, sd["W_enc"]) + sd["b_enc"]
    assert torch.allclose(sae._pre(x), pre, atol=1e-5)
    atoms_ = torch.einsum("nk,vn->nkv", sd["V_dec"], sd["W_dec"])
    assert torch.allclose(sae.W_dec.view(n, DK, DV), atoms_, atol=1e-6)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"V_dec": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_paper_checkpoint(tmp_path / "evil.pt", k=4)
    torch.save({"V_dec": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing"):
        load_paper_checkpoint(tmp_path / "other.pt", k=4)


def test_offline_release_registry(tmp_path):
    from writesae_plugin.registry import register_local_release

    for i, head in enumerate([0, 2]):
        sae = WriteSAE(make_cfg(head=head))
        sae.cfg.metadata.hook_name = "blocks.1.linear_attn.hook_state"
        sae.save_model(tmp_path / "rel" / f"L1_H{head}")
    ids = register_local_release("writesae-test-release", tmp_path / "rel", model="tiny")
    assert sorted(ids) == ["L1_H0", "L1_H2"]
    loaded = SAE.from_pretrained("writesae-test-release", "L1_H2")
    assert isinstance(loaded, WriteSAE) and loaded.cfg.head == 2
    with pytest.raises(ValueError, match="ID L1_H9 not found in release writesae-test-release"):
        SAE.from_pretrained("writesae-test-release", "L1_H9")
    with pytest.raises(ValueError, match="not found in pretrained SAEs directory"):
        SAE.from_pretrained("no-such-release", "x")
    with pytest.raises(ValueError, match="already a SAELens release"):
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        register_local_release(next(iter(get_pretrained_saes_directory())), tmp_path / "rel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_local_release("writesae-test-release", tmp_path / "rel")  # again: no error


def test_resampling_revives_dead_atoms():
    torch.manual_seed(0)
    sae = TrainingWriteSAE(make_cfg(WriteSAETrainingConfig, head=None, resample_every=5))
    x = torch.randn(64, DK * DV)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:6] = True
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=5, is_logging_step=False))
    assert out.metrics["resampled_atoms"] == 6
    assert torch.allclose(sae.atom_norms()[:6], torch.ones(6), atol=1e-5)
    out.loss.backward()  # the step's graph is valid after resampling (the fast kernels save the weights)


@pytest.mark.parametrize("encoder, layout", [("bilinear", "dense"), ("dense", "dense"), ("bilinear", "factors")])
def test_resampling_inside_training_steps(encoder, layout):
    torch.manual_seed(0)
    sae = TrainingWriteSAE(make_cfg(WriteSAETrainingConfig, head=None, resample_every=2, encoder=encoder,
                                    input_layout=layout, site="write" if layout == "factors" else "state"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::4] = True
    width = DK + DV if layout == "factors" else DK * DV
    for step in range(1, 5):
        out = sae.training_forward_pass(TrainStepInput(sae_in=torch.randn(64, width), coefficients={},
                                                       dead_neuron_mask=dead, n_training_steps=step,
                                                       is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        assert out.metrics.get("resampled_atoms", 0) == (8 if step % 2 == 0 else 0)
        assert torch.isfinite(out.loss)


def _aux_reference(sae, k, v, pre, acts, dead):
    """The readable factored aux-k formula (full ``d_sae x d_sae`` Gram), as the plugin first had it."""
    err = sae._factored_sq_error_reference(k, v, acts).detach()
    num_dead = int(dead.sum())
    k_aux = min(sae.cfg.aux_k, num_dead)
    top = torch.where(dead[None], pre, -torch.inf).topk(k_aux, dim=-1)
    c = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    r_dot = sae._atom_dots(k, v) - acts.detach() @ sae._gram(detach_left=True) - sae._bias_dots(detach_bias=True)
    aux = (err - 2 * (c * r_dot).sum(-1) + ((c @ sae._gram()) * c).sum(-1)).mean()
    return sae.cfg.aux_loss_coefficient * min(num_dead / sae.cfg.aux_k, 1.0) * aux


@pytest.mark.parametrize("encoder", ["bilinear", "dense"])
@pytest.mark.parametrize("decoder_rank", [1, 2, None])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_factored_aux_k_on_selected_atoms_equals_full_gram(encoder, decoder_rank, activation):
    """Issue 12 item 12: the factors-layout losses use the Gram of the selected atoms only, with the values and
    gradients of the full-Gram formula; with a dense encoder or decoder the step forms the batch's writes and runs
    the selected-atoms kernels (issue 13), held to the same full-Gram reference."""
    torch.manual_seed(0)
    cfg = make_cfg(WriteSAETrainingConfig, head=None, decoder_rank=decoder_rank, activation=activation,
                   site="write", aux_k=8, input_layout="factors", encoder_rank=2 if decoder_rank == 2 else 1,
                   encoder=encoder)
    sae, ref = TrainingWriteSAE(cfg), TrainingWriteSAE(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        if activation == "jumprelu":
            sae.log_threshold.fill_(-1.0)
    ref.load_state_dict(sae.state_dict())
    k, v = torch.randn(16, DK), torch.randn(16, DV)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    inp = TrainStepInput(sae_in=torch.cat([k, v], -1), coefficients={"l0": 1.0}, dead_neuron_mask=dead,
                         n_training_steps=1, is_logging_step=False)
    taken = []
    fast_step = sae._selected_atoms_step
    sae._selected_atoms_step = lambda i: taken.append(fast_step(i)) or taken[-1]
    out = sae.training_forward_pass(inp)
    dense_parts = encoder == "dense" or decoder_rank is None
    assert len(taken) == dense_parts  # dense atoms: the selected-atoms step on the formed writes
    if dense_parts and activation == "topk":  # (at d_sae 32 BatchTopK's busiest row and JumpReLU's codes are
        assert taken[0] is not None          # denser than d_sae / 8: the inner-product path runs, also checked here)
    ref.normalize_decoder()
    pre = ref.pre_from_factors(k, v)
    acts = ref.activation_fn(pre)
    aux_ref = _aux_reference(ref, k, v, pre, acts, dead)
    mse_ref = ref._factored_sq_error_reference(k, v, acts).mean()
    assert torch.allclose(out.losses["auxiliary_reconstruction_loss"], aux_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.losses["mse_loss"], mse_ref, rtol=1e-5, atol=1e-6)
    out.losses["auxiliary_reconstruction_loss"].backward()
    aux_ref.backward()
    for (name, p), (_, q) in zip(sae.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    sae.zero_grad()
    ref.zero_grad()
    out = sae.training_forward_pass(inp)
    out.losses["mse_loss"].backward()
    ref._factored_sq_error_reference(k, v, ref.activation_fn(ref.pre_from_factors(k, v))).mean().backward()
    for (name, p), (_, q) in zip(sae.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("decoder_rank", [1, None])
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_factored_aux_k_never_forms_a_d_sae_square(decoder_rank, activation):
    """Issue 12 item 12: with dead atoms, no ``d_sae x d_sae`` Gram (nor any tensor that large) is formed."""
    from writesae_plugin.profiling import LargestTensor

    d, n, N = 8, 4096, 32
    torch.manual_seed(0)
    sae = TrainingWriteSAE(WriteSAETrainingConfig(d_in=d * d, d_sae=n, d_k=d, d_v=d, k=4, site="write",
                                                  input_layout="factors", aux_k=16, activation=activation,
                                                  decoder_rank=decoder_rank))
    dead = torch.ones(n, dtype=torch.bool)
    dead[:100] = False
    class Shapes(LargestTensor):
        def __init__(self):
            super().__init__()
            self.square = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor) and sum(s == n for s in o.shape) >= 2:
                    self.square.append((str(func), tuple(o.shape)))
            return out

    mode = Shapes()
    with mode:
        out = sae.training_forward_pass(TrainStepInput(sae_in=torch.randn(N, 2 * d), coefficients={},
                                                       dead_neuron_mask=dead, n_training_steps=1,
                                                       is_logging_step=False))
        out.loss.backward()
    assert "auxiliary_reconstruction_loss" in out.losses
    assert not mode.square  # no [d_sae, d_sae(, r, r)] Gram
    assert mode.largest < n * n // 8  # the largest are [N, d_sae, d] / [d_sae, d_in]-sized, linear in d_sae


@pytest.mark.parametrize("decoder_rank", [1, 2, None])
def test_code_gram_rows_and_union_agree_with_the_full_gram(decoder_rank):
    """Both ways of the selected-atom Gram (per row; on the union of the selected atoms) give the full-Gram value
    and gradients, and "auto" picks per row where the union's [N, |S|] @ [|S|, |S|] product is the larger cost
    (it used to leave that product out and took the union, 5-15x slower for stacked cells)."""
    torch.manual_seed(0)
    cfg = make_cfg(WriteSAETrainingConfig, head=None, d_sae=64, decoder_rank=decoder_rank, site="write",
                   input_layout="factors")
    sae = TrainingWriteSAE(cfg)
    N, K = 40, 6
    xi, yi = torch.randint(0, 64, (N, K)), torch.randint(0, 64, (N, K))
    xv, yv = torch.randn(N, K), torch.randn(N, K)
    X = torch.zeros(N, 64).scatter_add(1, xi, xv)
    Y = torch.zeros(N, 64).scatter_add(1, yi, yv)
    results = {}
    for method in ("rows", "union", "auto"):
        sae.zero_grad()
        val = sae._code_gram(xv, xi, yv, yi, method=method)
        val.sum().backward()
        results[method] = (val.detach(), [p.grad.clone() for p in sae.parameters() if p.grad is not None])
    sae.zero_grad()
    full = ((X @ sae._gram()) * Y).sum(-1)
    full.sum().backward()
    want = [p.grad.clone() for p in sae.parameters() if p.grad is not None]
    for method, (val, grads) in results.items():
        assert torch.allclose(val, full, rtol=1e-5, atol=1e-5), method
        assert len(grads) == len(want) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(grads, want))
    chosen = []
    rows = sae._atom_gram
    sae._atom_gram = lambda i, j, detach_left=False: chosen.append(i.dim()) or rows(i, j, detach_left)
    sae._code_gram(xv, xi, yv, yi)  # 40 rows x 6 x 6 pairs vs a 64 x 64 union Gram times [40, 64]: per row
    assert chosen == [2]
    with pytest.raises(ValueError, match="method"):
        sae._code_gram(xv, xi, yv, yi, method="dense")


@pytest.mark.parametrize("decoder_rank,activation", [(1, "topk"), (2, "topk"), (None, "topk"), (1, "jumprelu")])
def test_evaluate_sae_on_factors_equals_the_dense_evaluation_and_a_two_pass_reference(decoder_rank, activation):
    """evaluate_sae never forms k v^T for a WriteSAE on factors, and keeps no batch (one-pass float64 totals);
    FVU, L0 and dead fraction equal the dense-layout evaluation of the formed writes and the readable two-pass
    formula (all of X concatenated, centred)."""
    from writesae_plugin.train import evaluate_sae

    torch.manual_seed(0)
    cfg = make_cfg(WriteSAETrainingConfig, head=None, decoder_rank=decoder_rank, activation=activation, site="write",
                   input_layout="factors", encoder_rank=2 if decoder_rank == 2 else 1, d_sae=64)
    sae = TrainingWriteSAE(cfg)
    with torch.no_grad():
        sae.b_dec.normal_(std=0.2)
        if activation == "jumprelu":
            sae.log_threshold.fill_(-2.0)
    batches = [torch.randn(n, DK + DV) + 0.3 for n in (40, 40, 13)]  # a last partial batch; a nonzero mean
    scale = 2.5
    dense = [(b[:, :DK, None] * b[:, None, DK:]).reshape(b.shape[0], -1) for b in batches]
    a = evaluate_sae(sae, batches, "factors", scale)
    b = evaluate_sae(sae, dense, "dense", scale)
    X = torch.cat(dense) * scale
    acts = sae.encode(X)
    ref_fvu = float((sae.decode(acts) - X).pow(2).sum() / (X - X.mean(0)).pow(2).sum())
    for m in (a, b):
        assert m.n == 93
        assert m.fvu == pytest.approx(ref_fvu, rel=1e-5)
        assert m.l0 == pytest.approx(float((acts != 0).sum()) / 93, rel=1e-6)
        assert m.dead_fraction == pytest.approx(1 - float((acts != 0).any(0).float().mean()))

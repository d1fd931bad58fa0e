"""Mamba-2 adapter (HF ``mamba2`` and hybrids): capture, reference parity, exact edits (writes, states, decays,
queries) in prefill and decode, gradients through edits and dense hooks, training mode, errors."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from writesae_plugin.adapters import StateCapture, WriteEdit, hook_model  # noqa: E402
from writesae_plugin.adapters.mamba2 import mamba2_reference  # noqa: E402

P = "blocks.1.mixer."


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=256, hidden_size=64, state_size=16, num_heads=4, head_dim=16, expand=1,
                       n_groups=2, chunk_size=16, num_hidden_layers=2)  # 2 groups: B and C shared by 2 heads
    path = tmp_path_factory.mktemp("mamba2")
    Mamba2ForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture
def mamba(mamba_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(mamba_dir).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))  # 37: not a chunk multiple


def ref_of(c, **kw):
    return mamba2_reference(c[P + "hook_write_key"], c[P + "hook_write_value"], c[P + "hook_log_decay"],
                            c[P + "hook_query"], **kw)


def test_capture_bit_identical_and_reference_parity(mamba, ids):
    with torch.no_grad():
        plain = mamba(input_ids=ids, use_cache=True)
        model = hook_model(mamba)
        out = model(ids, return_type="hf", use_cache=True)
        _, c = model.run_with_cache(ids)
    assert torch.equal(out.logits, plain.logits)
    assert c[P + "hook_write_key"].shape == (2, 37, 4, 16) and c[P + "hook_B"].shape == (2, 37, 2, 16)
    assert torch.equal(c[P + "hook_write_key"][:, :, 0], c[P + "hook_write_key"][:, :, 1])  # group sharing
    read, S = ref_of(c)
    assert (read - c[P + "hook_read"]).abs().max() <= 1e-5
    hf_state = model.cache_of(out).layers[1].recurrent_states[0]  # HF value-first [b, H, P, N]
    assert (hf_state.transpose(-1, -2) - S).abs().max() <= 1e-5
    assert model.cfg.family == "mamba2" and model.cfg.d_k == 16 and model.cfg.n_key_heads == 2


@pytest.mark.parametrize("op", ["replace", "add", "delete"])
def test_exact_edits(mamba, ids, op):
    model = hook_model(mamba)
    g = torch.Generator().manual_seed(1)
    A = torch.outer(torch.randn(16, generator=g), torch.randn(16, generator=g))
    kw = {} if op == "delete" else {"matrix": A}
    edits = [WriteEdit(layer=1, pos=20, head=2, batch=0, op=op, **kw), WriteEdit(layer=1, pos=5, head=1, batch=1,
                                                                                 op=op, **kw)]
    with torch.no_grad():
        _, c = model.run_with_cache(ids)
        with model.edits(edits):
            _, e = model.run_with_cache(ids, names_filter=[P + "hook_read"])
    ref_edits = {}
    for b, t, h in [(0, 20, 2), (1, 5, 1)]:
        W = torch.outer(c[P + "hook_write_key"][b, t, h], c[P + "hook_write_value"][b, t, h])
        ref_edits[(b, t, h)] = {"replace": A, "add": W + A, "delete": torch.zeros_like(W)}[op]
    read, _ = ref_of(c, write_edits=ref_edits)
    assert (read - e[P + "hook_read"]).abs().max() <= 1e-5
    assert torch.equal(e[P + "hook_read"][0, :20], c[P + "hook_read"][0, :20])
    assert torch.equal(e[P + "hook_read"][1, :5], c[P + "hook_read"][1, :5])


def test_state_hook_capture_reflects_edits_and_its_edits_act_as_extra_writes(mamba, ids):
    model = hook_model(mamba)
    A = torch.outer(torch.ones(16), torch.randn(16, generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        _, c = model.run_with_cache(ids)
        with model.options(capture_states=StateCapture([3, 20, -1], heads=[2])):
            _, s = model.run_with_cache(ids, names_filter=[P + "hook_state"])
            with model.edits([WriteEdit(layer=1, pos=10, head=2, batch=0, matrix=A)]):
                _, se = model.run_with_cache(ids, names_filter=[P + "hook_state", P + "hook_read"])

            def edit(x, hook):
                x[1, 1, 0] += A  # head 2 at position 20, batch row 1
                return x

            via_state = model.run_with_hooks(ids, fwd_hooks=[(P + "hook_state", edit)])
        via_add = model.run_with_edits(ids, [WriteEdit(layer=1, pos=20, head=2, batch=1, op="add", matrix=A)])
    _, S36 = ref_of({k: v[:, :37] for k, v in c.items()})
    states = []
    for t in (3, 20):
        _, St = ref_of({k: v[:, :t + 1] for k, v in c.items()})
        states.append(St)
    assert s[P + "hook_state"].shape == (2, 3, 1, 16, 16)
    assert (s[P + "hook_state"][:, 0, 0] - states[0][:, 2]).abs().max() <= 1e-5
    assert (s[P + "hook_state"][:, 2, 0] - S36[:, 2]).abs().max() <= 1e-5
    _, S20e = ref_of({k: v[:, :21] for k, v in c.items()}, write_edits={(0, 10, 2): A})
    assert (se[P + "hook_state"][0, 1, 0] - S20e[0, 2]).abs().max() <= 1e-5  # states show the write edit
    assert (via_state - via_add).abs().max() <= 1e-5


def test_dense_write_hook_capture_and_edit(mamba, ids):
    model = hook_model(mamba)
    A = torch.outer(torch.randn(16, generator=torch.Generator().manual_seed(3)), torch.ones(16))

    def edit(x, hook):
        x[1, 30, 0] = A
        return x

    with torch.no_grad(), model.options(materialize_writes=True):
        clean, c = model.run_with_cache(ids, names_filter=[P + "hook_write", P + "hook_write_flat",
                                                            P + "hook_write_key", P + "hook_write_value"])
        dense = model.run_with_hooks(ids, fwd_hooks=[(P + "hook_write", edit)])
    assert torch.equal(clean, model(ids))
    assert torch.allclose(c[P + "hook_write"], torch.einsum("bthn,bthp->bthnp", c[P + "hook_write_key"],
                                                            c[P + "hook_write_value"]))
    assert c[P + "hook_write_flat"].shape == (2, 37, 4 * 16 * 16)
    functional = model.run_with_edits(ids, [WriteEdit(layer=1, pos=30, head=0, batch=1, matrix=A)])
    assert (dense - functional).abs().max() <= 1e-5


def test_hook_edit_of_value_factor_equals_functional_edit(mamba, ids):
    model = hook_model(mamba)
    w = torch.randn(16, generator=torch.Generator().manual_seed(2))

    def edit(x, hook):
        x[0, 12, 3] = w
        return x

    with torch.no_grad():
        _, c = model.run_with_cache(ids, names_filter=[P + "hook_write_key"])
        via_hook = model.run_with_hooks(ids, fwd_hooks=[(P + "hook_write_value", edit)])
        functional = model.run_with_edits(ids, [WriteEdit(layer=1, pos=12, head=3, batch=0,
                                                          matrix=torch.outer(c[P + "hook_write_key"][0, 12, 3], w))])
    assert (via_hook - functional).abs().max() <= 1e-5


@pytest.mark.parametrize("pos", [10, 27], ids=["edit-in-prefill", "edit-in-decode"])
def test_edits_across_prefill_and_decode_match_full_forward(mamba, ids, pos):
    model = hook_model(mamba)
    edit = WriteEdit(layer=1, pos=pos, head=3, op="add", matrix=torch.ones(16, 16))
    with torch.no_grad():
        full = model.run_with_edits(ids[:, :30], [edit])
        with model.edits([edit]):
            out = model(ids[:, :25], return_type="hf", use_cache=True)
            steps = [out.logits]
            for t in range(25, 30):
                out = model(ids[:, t:t + 1], return_type="hf", past_key_values=model.cache_of(out), use_cache=True)
                steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_decode_hooks_fire_and_match_prefill_capture(mamba, ids):
    model = hook_model(mamba)
    seen = []
    with torch.no_grad():
        _, full = model.run_with_cache(ids[:, :30])
        with model.hooks(fwd_hooks=[(P + n, lambda x, hook: seen.append((hook.name, x.clone())))
                                    for n in ("hook_write_key", "hook_write_value", "hook_read")]):
            out = model(ids[:, :29], return_type="hf", use_cache=True)
            seen.clear()
            model(ids[:, 29:30], return_type="hf", past_key_values=model.cache_of(out), use_cache=True)
    got = dict(seen)
    for n in ("hook_write_key", "hook_write_value", "hook_read"):
        assert got[P + n].shape[1] == 1
        assert (got[P + n][:, 0] - full[P + n][:, 29]).abs().max() <= 1e-5, n


def test_training_mode_keeps_hooks_firing(mamba, ids):
    model = hook_model(mamba)
    mamba.train()
    seen = []
    model.run_with_hooks(ids, fwd_hooks=[(P + "hook_write_key", lambda x, hook: seen.append(x.shape))])
    assert seen == [torch.Size([2, 37, 4, 16])]


def test_bad_edits_raise_clearly(mamba, ids):
    model = hook_model(mamba)
    with pytest.raises(ValueError, match="mode='raw'"):
        with model.edits([WriteEdit(layer=1, pos=3, head=0, op="delete", mode="delta")]):
            pass
    with pytest.raises(ValueError, match="not a Mamba-2 layer"):
        with model.edits([WriteEdit(layer=5, pos=3, head=0, op="delete")]):
            pass
    with pytest.raises(ValueError, match="keep its shape"):
        model.run_with_hooks(ids, fwd_hooks=[(P + "hook_log_decay", lambda x, hook: x[..., :2])])


def test_scalar_decay_scans_equal_the_per_token_reference():
    from writesae_plugin.adapters.scalar_decay import dense_decay_scan, scalar_decay_scan

    g = torch.Generator().manual_seed(0)
    b, T, H, N, Pd = 2, 37, 3, 5, 4
    k, v, q = torch.randn(b, T, H, N, generator=g), torch.randn(b, T, H, Pd, generator=g), torch.randn(
        b, T, H, N, generator=g)
    decay = -3 * torch.rand(b, T, H, generator=g)
    S0 = torch.randn(b, H, N, Pd, generator=g)
    read, S = mamba2_reference(k, v, decay, q, S0)
    for chunk in (1, 8, 64):
        r2, S2 = scalar_decay_scan(k, v, decay, q, S0, chunk)
        r3, S3 = dense_decay_scan(k[..., None] * v[..., None, :], decay, q, S0, chunk)
        for r, s_ in ((r2, S2), (r3, S3)):
            assert (r - read).abs().max() <= 1e-4 and (s_ - S).abs().max() <= 1e-5
    for big in (-200.0, -5000.0):  # segment sums: no overflow, no loss of precision after very negative steps
        huge = decay.clone()
        huge[:, 10] = big
        r4, _ = scalar_decay_scan(k, v, huge, q, S0, 64)
        ref = mamba2_reference(k, v, huge, q, S0)[0]
        assert torch.isfinite(r4).all() and (r4 - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("site", ["hook_log_decay", "hook_query"])
def test_decay_and_query_edits_are_exact_with_write_edits(mamba, ids, site):
    """An edit of the decay or the query (which HF's scan cannot express: dt also scales the write, C is
    shared by a group) goes through the canonical scan and composes with write edits, exactly."""
    model = hook_model(mamba)
    A = torch.outer(torch.randn(16, generator=torch.Generator().manual_seed(2)), torch.ones(16))

    def edit(x, hook):
        x = x.clone()
        if site == "hook_log_decay":
            x[0, 12:20, 1] = -0.01  # head 1 keeps its state over these positions
        else:
            x[1, 25:, 3] = -x[1, 25:, 3]  # head 3 only (its group partner keeps C)
        return x

    with torch.no_grad():
        _, c = model.run_with_cache(ids)
        with model.edits([WriteEdit(layer=1, pos=8, head=1, batch=0, matrix=A)]):
            seen = {}
            model.run_with_hooks(ids, fwd_hooks=[(P + site, edit), (P + "hook_read", lambda x, hook: seen.update(
                read=x.clone()))])
    inputs = {n: c[P + n] for n in ("hook_write_key", "hook_write_value", "hook_log_decay", "hook_query")}
    inputs[site] = edit(inputs[site], None)
    read, _ = mamba2_reference(inputs["hook_write_key"], inputs["hook_write_value"], inputs["hook_log_decay"],
                               inputs["hook_query"], write_edits={(0, 8, 1): A})
    assert (seen["read"] - read).abs().max() <= 1e-5
    assert (seen["read"] - c[P + "hook_read"]).abs().max() > 1e-3


def test_decay_and_query_edits_in_decode_match_the_full_forward(mamba, ids):
    model = hook_model(mamba)

    def edit(x, hook):
        x = x.clone()
        x[:, -1, 2] = x[:, -1, 2] * 0.3  # only the last position of this call
        return x

    with torch.no_grad():
        for site in ("hook_log_decay", "hook_query"):
            full = model.run_with_hooks(ids[:, :30], fwd_hooks=[(P + site, edit)])
            out = model(ids[:, :29], return_type="hf", use_cache=True)
            step = model.run_with_hooks(ids[:, 29:30], fwd_hooks=[(P + site, edit)], return_type="hf",
                                        past_key_values=model.cache_of(out), use_cache=True)
            assert (step.logits[:, 0] - full[:, 29]).abs().max() <= 1e-4, site
            assert (step.logits[:, 0] - model(ids[:, :30])[:, 29]).abs().max() > 1e-4, site


def test_gradients_through_edits_dense_hooks_and_spliced_saes(mamba, ids):
    """WriteEdit factors, a spliced write SAE (dense hook_write under autograd, TL == nnsight) and a
    differentiable hook_state edit all carry gradient; the SAE attribution matches finite differences."""
    from writesae_plugin.attribution import feature_attribution, feature_attribution_nnsight
    from writesae_plugin.sae import WriteSAE, WriteSAEConfig

    model = hook_model(mamba)
    u = torch.randn(16, requires_grad=True)
    model.run_with_edits(ids, [WriteEdit(layer=1, pos=20, head=1, key=u, value=torch.randn(16), batch=0)]
                         )[0, -1].logsumexp(-1).backward()
    assert u.grad is not None and u.grad.abs().sum() > 0

    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=16, d_k=16, d_v=16, k=3, n_heads=4, head=1, site="write",
                                  layer=1, family="mamba2"))
    sae.cfg.metadata.hook_name = P + "hook_write"
    with torch.no_grad():
        sae.enc_key.mul_(30.0)

    def metric(logits):
        return logits[:, -1, 7].sum() - logits[:, -1, 3].sum()

    with model.options(materialize_writes=True):
        acts, attr = feature_attribution(model, ids, sae, metric)
        acts_nn, attr_nn = feature_attribution_nnsight(model, ids, sae, metric)
        assert torch.allclose(acts, acts_nn) and torch.allclose(attr, attr_nn, atol=1e-7)
        assert attr.abs().sum() > 0
        bi, t, i = (int(x) for x in torch.nonzero(attr.abs() == attr.abs().max())[0])

        def scaled(eps):
            def scale(x, hook):
                x = x.clone()
                x[bi, t, i] = x[bi, t, i] * (1 + eps)
                return x
            with torch.no_grad(), model.saes([sae], use_error_term=True):
                return metric(model.run_with_hooks(ids, fwd_hooks=[(P + "hook_write.hook_sae_acts_post", scale)]))

        eps = 1e-2
        fd = (scaled(eps) - scaled(-eps)) / (2 * eps)
    assert float(fd) == pytest.approx(float(attr[bi, t, i]), rel=2e-2, abs=1e-6)

    D = torch.zeros(16, 16, requires_grad=True)

    def add_state(x, hook):
        return x + D  # every captured state of head 2 gets +D, under autograd

    with model.options(capture_states=StateCapture([10], heads=[2])):
        model.run_with_hooks(ids, fwd_hooks=[(P + "hook_state", add_state)])[0, -1].logsumexp(-1).backward()
    assert D.grad is not None and D.grad.abs().sum() > 0
    M = torch.zeros(16, 16, requires_grad=True)  # the same change as an extra write: the same gradient
    model.run_with_edits(ids, [WriteEdit(layer=1, pos=10, head=2, op="add", matrix=M)])[0, -1].logsumexp(-1).backward()
    assert torch.allclose(D.grad, M.grad, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------ hybrids
from tiny_mamba_models import MAMBA_FAMILIES, make_tiny_mamba  # noqa: E402


@pytest.mark.parametrize("family", MAMBA_FAMILIES)
def test_every_mamba2_family_capture_parity_and_edits(tmp_path, family):
    hf = make_tiny_mamba(family, tmp_path / family)
    tokens = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = hf(input_ids=tokens).logits
        model = hook_model(hf)
        logits, c = model.run_with_cache(tokens)
        assert torch.equal(logits, plain)
        layers = model.cfg.recurrent_layers
        assert len(layers) >= 2 and model.cfg.family == family
        for layer in layers:
            p = f"blocks.{layer}.mixer."
            read, _ = mamba2_reference(c[p + "hook_write_key"], c[p + "hook_write_value"], c[p + "hook_log_decay"],
                                       c[p + "hook_query"])
            assert (read - c[p + "hook_read"]).abs().max() <= 1e-5, (family, layer)
        layer = layers[-1]
        p = f"blocks.{layer}.mixer."
        A = torch.outer(torch.randn(16, generator=torch.Generator().manual_seed(5)), torch.ones(16))
        with model.edits([WriteEdit(layer=layer, pos=17, head=1, batch=1, matrix=A)]):
            _, e = model.run_with_cache(tokens, names_filter=[p + "hook_read"])
    read, _ = mamba2_reference(c[p + "hook_write_key"], c[p + "hook_write_value"], c[p + "hook_log_decay"],
                               c[p + "hook_query"], write_edits={(1, 17, 1): A})
    assert (read - e[p + "hook_read"]).abs().max() <= 1e-5
    assert torch.equal(e[p + "hook_read"][0], c[p + "hook_read"][0])


@pytest.mark.parametrize("family", MAMBA_FAMILIES)
def test_every_mamba2_family_decode_with_edit_matches_full_forward(tmp_path, family):
    hf = make_tiny_mamba(family, tmp_path / family)
    model = hook_model(hf)
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(6))
    layer = model.cfg.recurrent_layers[0]
    edit = WriteEdit(layer=layer, pos=27, head=2, op="add", matrix=torch.ones(16, 16))
    with torch.no_grad():
        full = model.run_with_edits(tokens, [edit])
        with model.edits([edit]):
            out = model(tokens[:, :25], return_type="hf", use_cache=True)
            steps = [out.logits]
            cache = model.cache_of(out)
            for t in range(25, 30):
                kw = {} if family == "mamba2" else {"position_ids": torch.full((2, 1), t)}  # bamba needs them
                out = model(tokens[:, t:t + 1], return_type="hf", past_key_values=cache, use_cache=True, **kw)
                steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_experiments_run_on_mamba2(tmp_path, ids):
    """Substitution (fast == naive) and the closed form (direct path == JVP on a one-layer model whose
    final norm is the identity: the group-spanning gated norm is linearised over all heads)."""
    from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM

    from writesae_plugin.experiments.closed_form import ClosedFormConfig, run_closed_form
    from writesae_plugin.experiments.substitution import (SubstitutionConfig, run_substitution,
                                                          run_substitution_naive)
    from writesae_plugin.sae import WriteSAE, WriteSAEConfig

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=256, hidden_size=64, state_size=16, num_heads=4, head_dim=16, expand=1,
                       n_groups=2, chunk_size=16, num_hidden_layers=1)
    Mamba2ForCausalLM(cfg).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf.backbone.norm_f = torch.nn.Identity()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20.0)
    model = hook_model(hf)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=16, d_k=16, d_v=16, k=3, n_heads=4, head=1, site="write",
                                  layer=0, family="mamba2"))
    with torch.no_grad():
        sae.enc_key.mul_(30.0)
    sub_cfg = SubstitutionConfig(max_firings=4, max_per_context=2)
    fast = run_substitution(model, sae, ids, sub_cfg, progress=False)
    naive = run_substitution_naive(model, sae, ids, sub_cfg)
    for a, b in zip(fast.records, naive.records):
        assert a["kl_final"] == pytest.approx(b["kl_final"], rel=1e-2, abs=1e-9)  # fp32: chunked suffix vs full
    cf = run_closed_form(model, sae, ids[:, :24], ClosedFormConfig(atoms=[2], t0=5, eps=(0.01,)), progress=False)
    for r in cf.records:
        assert r["direct"] == pytest.approx(r["jvp"], rel=1e-3, abs=1e-6)


def test_spliced_sae_tl_nnsight_parity_and_install_on_mamba2(mamba, ids):
    from nnsight import NNsight

    from writesae_plugin.experiments.install import InstallConfig, run_install
    from writesae_plugin.sae import WriteSAE, WriteSAEConfig

    model = hook_model(mamba)
    model.materialize_writes = True
    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=32, d_k=16, d_v=16, k=4, n_heads=4, head=3, site="write",
                                  layer=1, family="mamba2"))
    sae.cfg.metadata.hook_name = P + "hook_write"
    with torch.no_grad():
        clean = model(ids)
        assert torch.equal(model.run_with_saes(ids, saes=[sae], use_error_term=True), clean)
        _, c = model.run_with_cache_with_saes(ids, saes=[sae], use_error_term=True,
                                              names_filter=[P + "hook_write.hook_sae_acts_post"])
        with model.saes([sae], use_error_term=True):
            nn_model = NNsight(model)
            with nn_model.trace(ids):
                acts = nn_model.blocks[1].mixer.hook_write.hook_sae_acts_post.output.save()
    assert torch.equal(acts, c[P + "hook_write.hook_sae_acts_post"]) and acts.shape == (2, 37, 32)
    model.materialize_writes = False
    res = run_install(model, ids[:2, :20], InstallConfig(layer=1, head=2, strata=((5, 30),), max_new_tokens=4),
                      progress=False)
    assert res.summary["by_multiplier"]["3.0"]["all"]["independent_units"] == 4


def test_state_hook_in_decode(mamba, ids):
    model = hook_model(mamba)
    D = torch.ones(16, 16) * 0.1
    with torch.no_grad(), model.options(capture_states=StateCapture("last", heads=[1])):
        _, full = model.run_with_cache(ids[:, :30], names_filter=[P + "hook_state"])
        out = model(ids[:, :29], return_type="hf", use_cache=True)
        seen = []

        def edit(x, hook):
            seen.append(x.clone())
            x[0, 0, 0] += D
            return x

        step = model.run_with_hooks(ids[:, 29:30], fwd_hooks=[(P + "hook_state", edit)], return_type="hf",
                                    past_key_values=model.cache_of(out), use_cache=True)
    assert (seen[0] - full[P + "hook_state"][:, -1:]).abs().max() <= 1e-5
    with torch.no_grad():
        ref = model.run_with_edits(ids[:, :30], [WriteEdit(layer=1, pos=29, head=1, batch=0, op="add", matrix=D)])
    assert (step.logits[:, 0] - ref[:, 29]).abs().max() <= 1e-4


def test_mamba2_hook_inventory(mamba):
    model = hook_model(mamba)
    inv = model.hook_inventory()
    assert len(inv) == 12 * len(model.cfg.recurrent_layers) and all(d.startswith("[b,") for _, d in inv)


def test_selfcheck_command_on_a_mamba2_model(mamba_dir, capsys):
    from writesae_plugin.cli import main

    assert main(["hooks", "--model", str(mamba_dir), "--length", "40"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.mixer.hook_write_key" in out and "all checks passed" in out

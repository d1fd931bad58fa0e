"""Activation patching over writes and atoms: TransformerLens' patching utilities unchanged, the batched
resumed fast path against brute-force full forwards, atom + error decomposition, metrics."""

from __future__ import annotations

import pytest
import torch

import writesae_plugin  # noqa: F401
from conftest import SAFE_VOCAB
from writesae_plugin.adapters import WriteEdit, hook_model
from writesae_plugin.circuits import (kl_from, logit_diff, normalized_score, patch_atoms, patch_writes,
                                      run_edit_rows, write_patch_index)
from writesae_plugin.sae import WriteSAE, WriteSAEConfig

L = 1


@pytest.fixture
def model(qwen):
    return hook_model(qwen)


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, SAFE_VOCAB, (2, 12), generator=g)
    corrupted = clean.clone()
    corrupted[:, 4] = (clean[:, 4] + 7) % SAFE_VOCAB  # one token differs: writes from position 4 on differ
    return clean, corrupted


METRIC = logit_diff(7, 3)


def write_sae(site="write"):
    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=32, d_k=16, d_v=16, k=4, n_heads=4, head=2, site=site,
                                  family="qwen3_5_text", layer=L))
    with torch.no_grad():
        sae.enc_key.mul_(10.0)
    sae.cfg.metadata.hook_name = f"blocks.{L}.linear_attn.hook_{site}"
    return sae


def test_transformer_lens_patching_runs_unchanged_and_equals_patch_writes(model, pair):
    from transformer_lens import patching

    clean, corrupted = pair
    positions = list(range(3, 8))
    with torch.no_grad(), model.options(materialize_writes=True):
        _, cache = model.run_with_cache(clean)
        index = write_patch_index(model, clean.shape[1], layers=[L])
        index = index[index["pos"].isin(positions)]
        tl = patching.generic_activation_patch(model, corrupted, cache, METRIC,
                                               patching.layer_pos_head_vector_patch_setter, "write",
                                               index_df=index)
    ours = patch_writes(model, clean, corrupted, METRIC, layers=[L], positions=positions, progress=False)
    assert ours.scores.shape == (1, len(positions), 4)
    assert torch.allclose(tl, ours.scores.flatten(), atol=1e-4)
    assert torch.allclose(ours.scores[0, 0], torch.full((4,), ours.corrupted), atol=1e-4)  # pos 3: same write
    assert (ours.scores[0, 1:] - ours.corrupted).abs().max() > 1e-4


def test_patch_writes_equals_brute_force_full_forwards(model, pair):
    clean, corrupted = pair
    res = patch_writes(model, clean, corrupted, METRIC, layers=[0, L], positions=[4, 9], heads=[1, 3],
                       max_rows=4, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        for i, layer in enumerate([0, L]):
            p = model.hook_prefix(layer)
            for j, t in enumerate([4, 9]):
                for k, h in enumerate([1, 3]):
                    edits = [WriteEdit(layer=layer, pos=t, head=h, key=cache[p + "hook_write_key"][b, t, h],
                                       value=cache[p + "hook_write_value"][b, t, h], batch=b) for b in range(2)]
                    brute = float(METRIC(model.run_with_edits(corrupted, edits)))
                    assert res.scores[i, j, k] == pytest.approx(brute, abs=1e-4)
    assert res.clean == pytest.approx(float(METRIC(model(clean))), abs=1e-5)
    assert torch.allclose(res.normalized, (res.scores - res.corrupted) / (res.clean - res.corrupted))


@pytest.mark.parametrize("site", ["write", "state"])
def test_atom_patches_sum_with_the_error_node_to_the_write_patch(model, pair, site):
    """All atom deltas plus the error delta rebuild the clean site value exactly, so patching them
    together equals patching the whole write (write site) or the state change (state site)."""
    from writesae_plugin.circuits.patching import atom_matrices, site_codes

    clean, corrupted = pair
    sae = write_sae(site)
    res = patch_atoms(model, sae, clean, corrupted, METRIC, positions=[4, 6], progress=False)
    assert res.scores.shape == (2, len(res.index["atom"])) and res.index["atom"][-1] == "error"
    a_c, e_c = site_codes(model, sae, clean)
    a_x, e_x = site_codes(model, sae, corrupted)
    A = atom_matrices(sae)
    t = 6
    full = [WriteEdit(layer=L, pos=t, head=2, op="add", batch=b, matrix=torch.einsum(
        "i,ikv->kv", a_c[b, t] - a_x[b, t], A) + e_c[b, t] - e_x[b, t]) for b in range(2)]
    together = float(run_edit_rows(model, corrupted, L, [full], METRIC)[0])
    if site == "write":
        expected = float(patch_writes(model, clean, corrupted, METRIC, layers=[L], positions=[t], heads=[2],
                                      progress=False).scores[0, 0, 0])
    else:  # the state at t becomes the clean run's: the same as setting it through hook_state
        from writesae_plugin.adapters import StateCapture

        with torch.no_grad(), model.options(capture_states=StateCapture([t], heads=[2])):
            p = model.hook_prefix(L) + "hook_state"
            _, c = model.run_with_cache(clean, names_filter=[p])

            def set_state(x, hook):
                x[:, 0, 0] = c[p][:, 0, 0]
                return x

            expected = float(METRIC(model.run_with_hooks(corrupted, fwd_hooks=[(p, set_state)])))
    assert together == pytest.approx(expected, abs=1e-4)
    # one atom alone, against a brute-force full forward
    i = res.index["atom"][0]
    with torch.no_grad():
        brute = model.run_with_edits(corrupted, [WriteEdit(layer=L, pos=t, head=2, op="add", batch=b,
                                                           matrix=(a_c[b, t, i] - a_x[b, t, i]) * A[i])
                                                 for b in range(2)])
    assert res.scores[1, 0] == pytest.approx(float(METRIC(brute)), abs=1e-4)


def test_per_prompt_metrics_keep_rows_and_intervals(model, pair):
    clean, corrupted = pair
    per = patch_writes(model, clean, corrupted, logit_diff(7, 3, per_prompt=True), layers=[L], positions=[4, 5],
                       progress=False)
    mean = patch_writes(model, clean, corrupted, METRIC, layers=[L], positions=[4, 5], progress=False)
    assert per.rows.shape == (1, 2, 4, 2) and torch.allclose(per.scores, mean.scores, atol=1e-5)
    ci = per.effect_interval(0, 1, 2)
    assert ci["n"] == 2 and ci["mean"] == pytest.approx(float(per.scores[0, 1, 2] - per.corrupted), abs=1e-5)
    with pytest.raises(ValueError, match="per-prompt"):
        mean.effect_interval(0, 1, 2)


def test_metrics_and_bad_inputs(model, pair):
    clean, corrupted = pair
    with torch.no_grad():
        logits = model(clean)
    assert float(kl_from(logits)(logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(logit_diff([1, 2], 3)(logits)) == pytest.approx(
        float(((logits[0, -1, 1] - logits[0, -1, 3]) + (logits[1, -1, 2] - logits[1, -1, 3])) / 2), abs=1e-5)
    assert normalized_score(1.5, 2.0, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="undefined"):
        normalized_score(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        patch_writes(model, clean, corrupted[:, :5], METRIC)
    with pytest.raises(ValueError, match="per-head"):
        sae = write_sae()
        sae.cfg.head = None
        patch_atoms(model, sae, clean, corrupted, METRIC)


# ------------------------------------------------------------------------------------ attribution patching
@pytest.fixture(scope="module")
def linear_mamba(tmp_path_factory):
    """A one-layer Mamba-2 whose logits are linear in the writes (no final norm, no gated norm): attribution
    patching is exact there."""
    from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM

    class NoGate(torch.nn.Module):
        def forward(self, hidden_states, gate=None):
            return hidden_states

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("linear_mamba")
    Mamba2ForCausalLM(Mamba2Config(vocab_size=256, hidden_size=64, state_size=16, num_heads=4, head_dim=16,
                                   expand=1, n_groups=2, chunk_size=16, num_hidden_layers=1)).save_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    hf.backbone.norm_f = torch.nn.Identity()
    hf.backbone.layers[0].mixer.norm = NoGate()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20.0)
    return hook_model(hf)


def mamba_sae():
    torch.manual_seed(1)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=16, d_k=16, d_v=16, k=3, n_heads=4, head=1, site="write",
                                  layer=0, family="mamba2"))
    with torch.no_grad():
        sae.enc_key.mul_(30.0)
    sae.cfg.metadata.hook_name = "blocks.0.mixer.hook_write"
    return sae


def test_attribution_patching_is_exact_where_the_model_is_linear_in_the_writes(linear_mamba, pair):
    from writesae_plugin.circuits import attribute_atoms, attribute_writes, compare_with_patching

    clean, corrupted = pair
    model = linear_mamba
    est = attribute_writes(model, clean, corrupted, METRIC, positions=[4, 7, 11])
    act = patch_writes(model, clean, corrupted, METRIC, positions=[4, 7, 11], progress=False)
    assert torch.allclose(est.scores, act.scores, atol=1e-4, rtol=1e-4)
    cmp = compare_with_patching(est, act)
    assert cmp["n"] == 12 and cmp["pearson"] > 0.9999
    sae = mamba_sae()
    actual = patch_atoms(model, sae, clean, corrupted, METRIC, positions=[4, 9], progress=False)
    for backend in ("adjoint", "transformer_lens", "nnsight"):
        e = attribute_atoms(model, sae, clean, corrupted, METRIC, positions=[4, 9], atoms=actual.index["atom"][:-1],
                            backend=backend)
        assert e.index["atom"] == actual.index["atom"]
        assert torch.allclose(e.scores, actual.scores, atol=1e-4, rtol=1e-4), backend


def test_attribution_patching_on_gdn_routes_agree_and_track_actual_patching(model, pair):
    from writesae_plugin.circuits import attribute_atoms, attribute_writes, compare_with_patching

    clean, corrupted = pair
    est = attribute_writes(model, clean, corrupted, METRIC, layers=[0, L])
    act = patch_writes(model, clean, corrupted, METRIC, layers=[0, L], progress=False)
    cmp = compare_with_patching(est, act)
    assert cmp["n"] == 2 * 12 * 4 and cmp["pearson"] > 0.5  # nonlinear model: an approximation
    assert cmp["pearson_ci"][0] < cmp["pearson"] < cmp["pearson_ci"][1]
    assert torch.allclose(est.scores[:, :4], act.scores[:, :4], atol=1e-5)  # before the corruption: no effect
    sae = write_sae()
    routes = [attribute_atoms(model, sae, clean, corrupted, METRIC, positions=[4, 6], backend=b)
              for b in ("adjoint", "transformer_lens", "nnsight")]
    for r in routes[1:]:
        assert r.index["atom"] == routes[0].index["atom"]
        assert torch.allclose(r.scores, routes[0].scores, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="backend"):
        attribute_atoms(model, sae, clean, corrupted, METRIC, backend="magic")


# ------------------------------------------------------------------------------------------ path patching
def test_path_patching_through_reads(model, linear_mamba, pair):
    from writesae_plugin.circuits import Reads, path_patch, read_deltas

    clean, _ = pair
    A = torch.outer(torch.randn(16, generator=torch.Generator().manual_seed(5)), torch.ones(16))
    sender = [WriteEdit(layer=L, pos=4, head=2, matrix=A)]
    full = path_patch(model, clean, sender, [Reads(L)], METRIC)
    assert full["path"] == pytest.approx(full["total"], abs=1e-5) and full["path_fraction"] == pytest.approx(1, abs=1e-3)
    none = path_patch(model, clean, sender, [Reads(L, positions=(0, 1, 2, 3))], METRIC)  # reads before s
    assert none["path"] == pytest.approx(none["base"], abs=1e-6)
    other_head = path_patch(model, clean, sender, [Reads(L, heads=(0, 1, 3))], METRIC)
    assert other_head["path"] == pytest.approx(other_head["base"], abs=1e-6)
    d = read_deltas(model, clean, sender, L)
    assert d[:, :4].abs().max() == 0 and d[:, 4:, 2].abs().max() > 0 and d[:, :, [0, 1, 3]].abs().max() == 0
    # only the last read: the same as adding that read's delta by hand
    last = path_patch(model, clean, sender, [Reads(L, positions=(11,))], METRIC)

    def add(x, hook):
        x = x.clone()
        x[:, 11] += d[:, 11]
        return x

    with torch.no_grad():
        by_hand = float(METRIC(model.run_with_hooks(clean, fwd_hooks=[(model.hook_prefix(L) + "hook_read", add)])))
    assert last["path"] == pytest.approx(by_hand, abs=1e-6)
    # a later layer's write value as receiver mediates part of the effect; the layer's own reads all of it
    later = path_patch(model, clean, [WriteEdit(layer=0, pos=4, head=2, matrix=A)],
                       [f"blocks.{L}.hook_write_value"], METRIC)
    assert later["path"] != pytest.approx(later["base"], abs=1e-7)
    # linear model: path effects over a partition of the read positions add up to the total effect
    lm, s0 = linear_mamba, [WriteEdit(layer=0, pos=3, head=1, matrix=A)]
    parts = [path_patch(lm, clean, s0, [Reads(0, positions=p)], METRIC) for p in ((3, 4, 5), (6, 7, 8, 9, 10, 11))]
    assert sum(p["path"] - p["base"] for p in parts) == pytest.approx(parts[0]["total"] - parts[0]["base"], abs=1e-4)
    per = path_patch(model, clean, sender, [Reads(L, positions=(11,))], logit_diff(7, 3, per_prompt=True))
    assert per["path"] == pytest.approx(last["path"], abs=1e-6)
    assert per["path_effect"]["n"] == 2 and per["path_effect"]["mean"] == pytest.approx(per["path"] - per["base"],
                                                                                          abs=1e-6)
    with pytest.raises(TypeError, match="receivers"):
        path_patch(model, clean, sender, [3], METRIC)


@pytest.mark.parametrize("site", ["hook_write_key", "hook_write_value", "hook_log_decay", "hook_query"])
def test_zero_perturbations_of_factor_decay_and_query_hooks_carry_exact_gradients(model, linear_mamba, pair, site):
    """Attribution through any write-side hook: a zero added under autograd gets the gradient that central
    finite differences give (GDN and Mamba-2)."""
    clean, _ = pair
    for m, layer in ((model, L), (linear_mamba, 0)):
        name = m.hook_prefix(layer) + site
        holder = {}

        def add_zero(x, hook):
            holder["z"] = torch.zeros_like(x, requires_grad=True)
            return x + holder["z"]

        METRIC(m.run_with_hooks(clean, fwd_hooks=[(name, add_zero)])).backward()
        g = holder["z"].grad
        assert g is not None and g.abs().max() > 0, (site, m.cfg.family)
        idx = tuple(int(i) for i in torch.nonzero(g.abs() == g.abs().max())[0])

        def shifted(eps):
            def hook(x, hook):
                x = x.clone()
                x[idx] += eps
                return x
            with torch.no_grad():
                return float(METRIC(m.run_with_hooks(clean, fwd_hooks=[(name, hook)])))

        eps = 1e-3  # the last position is strongly curved: larger steps carry O(eps^2) error
        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert fd == pytest.approx(float(g[idx]), rel=3e-2, abs=1e-5), (site, m.cfg.family)


def test_a_write_edit_and_a_differentiable_write_replacement_in_one_forward_are_refused(model, linear_mamba, pair):
    clean, _ = pair
    for m, layer in ((model, L), (linear_mamba, 0)):
        z = torch.zeros(16, 16, requires_grad=True)

        def add(x, hook):
            return x + z

        with m.options(materialize_writes=True), pytest.raises(ValueError, match="add up silently"):
            with m.edits([WriteEdit(layer=layer, pos=3, head=1, op="delete")]):
                m.run_with_hooks(clean, fwd_hooks=[(m.hook_prefix(layer) + "hook_write", add)])

"""mamba-ssm ``MambaLMHeadModel`` (Mamba2 layers) through the adapter, on the CPU stand-in of the package
(``fake_mamba_ssm``; the real package is checked on a GPU by ``scripts/gpu_check_mamba_ssm.py``): capture
parity with the fused path off, reference parity, exact edits in prefill and decode, the model variants
mamba-ssm configs allow, resuming at a layer, generation, SAEs and experiments, errors."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from fake_mamba_ssm import InferenceParams, tiny_mamba_ssm, unfused_copy  # noqa: E402

from writesae_plugin.adapters import StateCapture, UnsupportedModelError, WriteEdit, hook_model  # noqa: E402
from writesae_plugin.adapters.mamba2 import mamba2_reference  # noqa: E402

P = "blocks.1.mixer."


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))  # 19: not a chunk multiple


def ref_of(c, p=P, **kw):
    return mamba2_reference(c[p + "hook_write_key"], c[p + "hook_write_value"], c[p + "hook_log_decay"],
                            c[p + "hook_query"], **kw)


def test_capture_bit_identical_with_the_fused_path_off_and_reference_parity(ids):
    mamba = tiny_mamba_ssm()
    plain, fused = unfused_copy(mamba), mamba
    with torch.no_grad():
        want, want_fused = plain(ids).logits, fused(ids).logits
        model = hook_model(mamba)
        out = model(ids, return_type="hf", use_cache=True)
        _, c = model.run_with_cache(ids)
    assert torch.equal(out.logits, want) and (out.logits - want_fused).abs().max() <= 1e-5
    assert all(m.mixer.use_mem_eff_path for m in mamba.backbone.layers)  # the user's setting is kept
    assert model.cfg.family == "mamba_ssm" and model.cfg.recurrent_layers == (0, 1)
    assert (model.cfg.d_k, model.cfg.d_v, model.cfg.n_heads, model.cfg.n_key_heads) == (8, 16, 4, 2)
    assert c[P + "hook_x"].shape == (2, 19, 4, 16) and c[P + "hook_B"].shape == (2, 19, 2, 8)
    assert torch.equal(c[P + "hook_write_key"][:, :, 0], c[P + "hook_write_key"][:, :, 1])  # group sharing
    read, S = ref_of(c)
    assert (read - c[P + "hook_read"]).abs().max() <= 1e-5
    ssm_state = out.past_key_values.key_value_memory_dict[1][1]  # mamba-ssm value-first [b, H, P, N]
    assert (ssm_state.transpose(-1, -2) - S).abs().max() <= 1e-5
    assert out.past_key_values.seqlen_offset == 19


@pytest.mark.parametrize("op", ["replace", "add", "delete"])
def test_exact_edits(ids, op):
    model = hook_model(tiny_mamba_ssm())
    g = torch.Generator().manual_seed(1)
    A = torch.outer(torch.randn(8, generator=g), torch.randn(16, generator=g))
    kw = {} if op == "delete" else {"matrix": A}
    edits = [WriteEdit(layer=1, pos=12, head=2, batch=0, op=op, **kw),
             WriteEdit(layer=1, pos=3, head=1, batch=1, op=op, **kw)]
    with torch.no_grad():
        _, c = model.run_with_cache(ids)
        with model.edits(edits):
            _, e = model.run_with_cache(ids, names_filter=[P + "hook_read"])
    ref_edits = {}
    for b, t, h in [(0, 12, 2), (1, 3, 1)]:
        W = torch.outer(c[P + "hook_write_key"][b, t, h], c[P + "hook_write_value"][b, t, h])
        ref_edits[(b, t, h)] = {"replace": A, "add": W + A, "delete": torch.zeros_like(W)}[op]
    read, _ = ref_of(c, write_edits=ref_edits)
    assert (read - e[P + "hook_read"]).abs().max() <= 1e-5
    assert torch.equal(e[P + "hook_read"][0, :12], c[P + "hook_read"][0, :12])
    assert (e[P + "hook_read"] - c[P + "hook_read"]).abs().max() > 1e-3


@pytest.mark.parametrize("pos", [6, 15], ids=["edit-in-prefill", "edit-in-decode"])
def test_decode_through_the_cache_with_edits_matches_the_full_forward(ids, pos):
    model = hook_model(tiny_mamba_ssm())
    edit = WriteEdit(layer=1, pos=pos, head=3, op="replace", key=torch.ones(8), value=torch.linspace(-1, 1, 16))
    with torch.no_grad():
        full = model.run_with_edits(ids, [edit])
        cache = InferenceParams(max_seqlen=32, max_batch_size=2)  # mamba-ssm's own cache type
        with model.edits([edit]):
            steps = [model(ids[:, :12], past_key_values=cache)]
            for t in range(12, 19):
                steps.append(model(ids[:, t:t + 1], past_key_values=cache))
    assert cache.seqlen_offset == 19
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4
    with torch.no_grad():  # a several-token continuation of a cache runs step by step
        cache = model.hf_model.new_cache(2, 32)
        with model.edits([edit]):
            cont = torch.cat([model(ids[:, :5], past_key_values=cache), model(ids[:, 5:], past_key_values=cache)], 1)
    assert (cont - full).abs().max() <= 1e-4 and cache.seqlen_offset == 19


def test_decode_hooks_fire_per_token_and_match_the_prefill_capture(ids):
    model = hook_model(tiny_mamba_ssm())
    with torch.no_grad():
        _, full = model.run_with_cache(ids)
        cache = model.hf_model.new_cache(2, 32)
        model(ids[:, :10], past_key_values=cache)
        _, step = model.run_with_cache(ids[:, 10:11], past_key_values=cache)
    for name in ("hook_write_key", "hook_write_value", "hook_log_decay", "hook_query", "hook_read"):
        assert step[P + name].shape[1] == 1
        assert (step[P + name][:, 0] - full[P + name][:, 10]).abs().max() <= 1e-5, name


def test_state_capture_and_decay_edits_are_exact(ids):
    model = hook_model(tiny_mamba_ssm())
    with torch.no_grad():
        with model.options(capture_states=StateCapture(positions=[4, -1], heads=[0, 3])):
            _, c = model.run_with_cache(ids)
        g = c[P + "hook_log_decay"].clone()
        g[:, 7, 1] = g[:, 7, 1] - 2.0

        def decay_edit(x, hook):
            x[:, 7, 1] -= 2.0
            return x

        with model.hooks(fwd_hooks=[(P + "hook_log_decay", decay_edit)]):
            _, e = model.run_with_cache(ids, names_filter=[P + "hook_read"])
    _, S4 = mamba2_reference(c[P + "hook_write_key"][:, :5], c[P + "hook_write_value"][:, :5],
                             c[P + "hook_log_decay"][:, :5], c[P + "hook_query"][:, :5])
    assert (c[P + "hook_state"][:, 0] - S4[:, [0, 3]]).abs().max() <= 1e-5
    read, _ = mamba2_reference(c[P + "hook_write_key"], c[P + "hook_write_value"], g, c[P + "hook_query"])
    assert (read - e[P + "hook_read"]).abs().max() <= 1e-5


VARIANTS = {
    "gate-in-kernel (rmsnorm=False)": dict(ssm_cfg={"rmsnorm": False}),
    "D per channel": dict(ssm_cfg={"D_has_hdim": True}),
    "norm before gate": dict(ssm_cfg={"norm_before_gate": True}),
    "mixer MLP (d_ssm < d_inner)": dict(ssm_cfg={"d_ssm": 32, "expand": 2}),
    "block MLP, LayerNorm, no fp32 residual": dict(d_intermediate=48, rms_norm=False, residual_in_fp32=False,
                                                   fused_add_norm=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_variants_capture_and_edit_exactly(ids, variant):
    mamba = tiny_mamba_ssm(**copy.deepcopy(VARIANTS[variant]))
    with torch.no_grad():
        want = unfused_copy(mamba)(ids).logits
        model = hook_model(mamba)
        logits, c = model.run_with_cache(ids)
        H = model.cfg.n_heads
        edit = WriteEdit(layer=0, pos=5, head=H - 1, op="delete")
        with model.edits([edit]):
            edited, e = model.run_with_cache(ids, names_filter=["blocks.0.mixer.hook_read"])
    assert torch.equal(logits, want)
    read, _ = ref_of(c, p="blocks.0.mixer.", write_edits={(b, 5, H - 1): torch.zeros(8, 16) for b in range(2)})
    assert (read - e["blocks.0.mixer.hook_read"]).abs().max() <= 1e-5
    assert torch.equal(edited[:, :5], logits[:, :5]) and (edited[:, 5:] - logits[:, 5:]).abs().max() > 1e-4


def test_training_mode_keeps_the_hooks_firing(ids):
    mamba = tiny_mamba_ssm().train()
    model = hook_model(mamba)
    _, c = model.run_with_cache(ids, names_filter=[P + "hook_write_value"])
    assert c[P + "hook_write_value"].shape == (2, 19, 4, 16) and mamba.backbone.layers[1].mixer.use_mem_eff_path


def test_resume_at_a_layer_and_stop_before_the_final_norm(ids):
    mamba = tiny_mamba_ssm()
    model = hook_model(mamba)
    seen = {}
    handle = mamba.backbone.norm_f.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        logits = model(ids)
    handle.remove()
    with torch.no_grad():
        for layer in (0, 1):
            model.check_resumable(ids, layer)
            edit = WriteEdit(layer=layer, pos=5, head=1, batch=0, key=torch.randn(model.cfg.d_k, generator=g),
                             value=torch.randn(model.cfg.d_v, generator=g))
            state = model.resume_state(ids, layer)
            with model.edits([edit]):
                resumed = model.run_from_layer(state)
            torch.testing.assert_close(resumed, model.run_with_edits(ids, [edit]), rtol=0, atol=1e-6)
            # continuing a cache runs one token per call here: the replay follows call by call
            out = model(ids[:1, :5], return_type="hf", use_cache=True)
            with model.edits([edit]):
                cont = model.run_from_layer(state.select([0], start=5), past_key_values=model.cache_of(out))
            torch.testing.assert_close(cont[0], model.run_with_edits(ids[:1], [edit])[0, 5:], rtol=0, atol=2e-5)
        final = model(ids, stop_at_layer=2)
    assert torch.equal(final, seen["x"].float())
    assert logits.shape == (2, 19, 104)


def test_generate_is_greedy_through_the_cache(ids):
    model = hook_model(tiny_mamba_ssm())
    with torch.no_grad():
        out = model.generate(ids[:1, :6], max_new_tokens=5)
        seq = ids[:1, :6]
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        d = model.hf_model.generate(ids[:1, :6], max_new_tokens=3, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out, seq)
    assert len(d.logits) == 3 and torch.equal(d.sequences, seq[:, :9])
    with torch.no_grad():  # sampling from the single most likely token is greedy
        sampled = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=True, top_k=1)
    assert torch.equal(sampled, seq)


def test_selfcheck_runs_on_a_mamba_ssm_model(ids):
    from writesae_plugin.selfcheck import run_selfcheck

    report = run_selfcheck(hook_model(tiny_mamba_ssm()), ids[:1, :12], repeats=1)
    assert report.ok, report.table()


def test_spliced_sae_parity_substitution_and_install(ids):
    from nnsight import NNsight

    from writesae_plugin.experiments.install import InstallConfig, run_install
    from writesae_plugin.experiments.substitution import (SubstitutionConfig, run_substitution,
                                                          run_substitution_naive)
    from writesae_plugin.sae import WriteSAE, WriteSAEConfig

    model = hook_model(tiny_mamba_ssm())
    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=128, d_sae=16, d_k=8, d_v=16, k=3, n_heads=4, head=2, site="write",
                                  layer=1, family="mamba2"))
    with torch.no_grad():
        sae.enc_key.mul_(30.0)
    sae.cfg.metadata.hook_name = P + "hook_write"
    with torch.no_grad(), model.options(materialize_writes=True):
        clean = model(ids)
        assert torch.equal(model.run_with_saes(ids, saes=[sae], use_error_term=True), clean)
        _, c = model.run_with_cache_with_saes(ids, saes=[sae], use_error_term=True,
                                              names_filter=[P + "hook_write.hook_sae_acts_post"])
        with model.saes([sae], use_error_term=True):
            nn_model = NNsight(model)
            with nn_model.trace(ids):
                acts = nn_model.blocks[1].mixer.hook_write.hook_sae_acts_post.output.save()
    assert torch.equal(acts, c[P + "hook_write.hook_sae_acts_post"]) and acts.shape == (2, 19, 16)
    sub_cfg = SubstitutionConfig(max_firings=4, max_per_context=2)
    fast = run_substitution(model, sae, ids, sub_cfg, progress=False)
    naive = run_substitution_naive(model, sae, ids, sub_cfg)
    assert len(fast.records) == len(naive.records) > 0
    for a, b in zip(fast.records, naive.records):
        assert a["kl_final"] == pytest.approx(b["kl_final"], rel=1e-2, abs=1e-9)
    res = run_install(model, ids[:2, :12], InstallConfig(layer=1, head=2, strata=((3, 10),), max_new_tokens=3),
                      progress=False)
    block = res.summary["by_multiplier"]["3.0"]["all"]
    assert block["prompts"] == 2 and block["independent_units"] == len(res.records) // len(res.config["multipliers"])


def test_bad_input_raises_clearly(ids):
    mamba = tiny_mamba_ssm()
    model = hook_model(mamba)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="no padding mask"):
        model(ids, attention_mask=mask)
    assert model(ids, attention_mask=torch.ones_like(ids)).shape == (2, 19, 104)
    with pytest.raises(TypeError, match="InferenceParams"):
        model(ids, past_key_values=object())
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model.hf_model.model(ids, seq_idx=torch.zeros_like(ids, dtype=torch.int32))
    with pytest.raises(ValueError, match="out of range"):
        model.run_with_edits(ids, [WriteEdit(layer=1, pos=2, head=4, op="delete")])
    with pytest.raises(ValueError, match="one mode"):
        model.run_with_edits(ids, [WriteEdit(layer=1, pos=2, head=0, op="delete", mode="delta")])
    with pytest.raises(ValueError, match="shape"):
        model.run_with_edits(ids, [WriteEdit(layer=1, pos=2, head=0, matrix=torch.ones(16, 8))])
    other = tiny_mamba_ssm()
    other.backbone.layers[0].mixer.forward = lambda *a, **k: None
    with pytest.raises(UnsupportedModelError, match="replaced"):
        hook_model(other)
    mamba1 = tiny_mamba_ssm()
    for block in mamba1.backbone.layers:
        block.mixer = torch.nn.Linear(64, 64)
    with pytest.raises(UnsupportedModelError, match="no Mamba2 mixer"):
        hook_model(mamba1)

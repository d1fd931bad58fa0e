"""Model lifetime and opt-in hooks (issue 12, items 6-8): hooking twice, unhook(), deep copies, and SAEs or
hooks on the dense write / state hooks turning on what they need."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import writesae_plugin  # noqa: F401  (registers the architecture)
from conftest import SAFE_VOCAB
from tiny_mamba_models import make_tiny_mamba
from writesae_plugin.adapters import StateCapture, WriteEdit, hook_model
from writesae_plugin.attribution import feature_attribution, feature_attribution_nnsight
from writesae_plugin.sae import WriteSAE, WriteSAEConfig


@pytest.fixture(params=["qwen3_5", "kimi_linear", "xlstm", "mamba2", "rwkv7"])
def hf_and_layer(request, qwen, tmp_path):
    """(plain HF model, a recurrent layer, its family name) for one GDN, KDA, xLSTM, Mamba-2 and RWKV-7 (fla)
    model."""
    if request.param == "qwen3_5":
        return qwen, 1, "qwen3_5_text"
    if request.param == "kimi_linear":
        from tiny_recurrent_models import make_tiny_kimi

        return make_tiny_kimi(tmp_path / "kimi"), 1, "kimi_linear"
    if request.param == "xlstm":
        from tiny_recurrent_models import make_tiny_xlstm

        return make_tiny_xlstm(tmp_path / "xlstm"), 1, "xlstm"
    if request.param == "rwkv7":
        from tiny_fla_models import make_tiny_rwkv7

        return make_tiny_rwkv7(tmp_path / "rwkv7"), 1, "rwkv7"
    torch.manual_seed(0)
    return make_tiny_mamba("mamba2", tmp_path / "m2"), 1, "mamba2"


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, SAFE_VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def write_sae(family, layer, hook, site="write", head=1):
    torch.manual_seed(0)
    d_k, d_v = (16, 32) if family == "xlstm" else (16, 16)  # the tiny xLSTM's heads are 16 x 32
    sae = WriteSAE(WriteSAEConfig(d_in=d_k * d_v, d_sae=32, d_k=d_k, d_v=d_v, k=4, n_heads=4, head=head, site=site,
                                  family=family, layer=layer))
    with torch.no_grad():
        sae.enc_key.mul_(30.0)  # non-trivial codes on the tiny random model's small writes
    sae.cfg.metadata.hook_name = hook
    return sae


# ----------------------------------------------------------------------------------------------- item 6
def test_hooking_twice_returns_the_wrapper_and_unhook_restores_the_plain_model(hf_and_layer, ids):
    hf, layer, _ = hf_and_layer
    with torch.no_grad():
        plain = hf(ids).logits
        model = hook_model(hf)
        assert hook_model(hf) is model and hook_model(model) is model
        assert torch.equal(model(ids), plain) and torch.equal(hf(ids).logits, plain)
        edit = WriteEdit(layer=layer, pos=5, head=1, op="delete")
        edited = model.run_with_edits(ids, [edit])
        assert (edited - plain).abs().max() > 1e-4
        assert model.unhook() is hf
        assert torch.equal(hf(ids).logits, plain)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in hf.modules())
        with pytest.raises(RuntimeError, match="unhooked"):
            model(ids)
        again = hook_model(hf)
        assert again is not model
        assert torch.equal(again.run_with_edits(ids, [edit]), edited)


def test_hook_model_refuses_a_second_tokenizer(qwen, tiny_tokenizer):
    from transformers import AutoTokenizer

    model = hook_model(qwen, tokenizer=tiny_tokenizer)
    other = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    with pytest.raises(ValueError, match="another tokenizer"):
        hook_model(qwen, tokenizer=other)
    assert hook_model(qwen, tokenizer=tiny_tokenizer) is model


# ----------------------------------------------------------------------------------------------- item 7
def test_deepcopy_is_independent(hf_and_layer, ids):
    hf, layer, family = hf_and_layer
    model = hook_model(hf)
    model.set_write_mode("raw")
    sae = write_sae(family, layer, model.hook_prefix(layer) + "hook_write")
    model.add_sae(sae)
    twin = copy.deepcopy(model)
    assert twin is not model and twin.hf_model is not hf
    assert twin.acts_to_saes.keys() == model.acts_to_saes.keys()
    assert twin.acts_to_saes[sae.cfg.metadata.hook_name] is not sae
    edit = WriteEdit(layer=layer, pos=5, head=1, op="delete")
    with torch.no_grad():
        assert torch.equal(twin(ids), model(ids))  # same weights, same spliced SAE
        model.reset_saes()
        twin.reset_saes()
        clean = model(ids)
        assert torch.equal(twin.run_with_edits(ids, [edit]), model.run_with_edits(ids, [edit]))
        # the original's edits never reach the copy, and the copy's hooks fire on its own forwards
        with pytest.raises(RuntimeError, match="never reached"):
            with model.edits([edit]):
                assert torch.equal(twin(ids), clean)
        fired = []
        twin.run_with_hooks(ids, fwd_hooks=[(twin.hook_prefix(layer) + "hook_write_key",
                                             lambda x, hook: fired.append(hook.name))])
        model(ids)
        assert fired == [twin.hook_prefix(layer) + "hook_write_key"]
        # weights are independent
        next(twin.hf_model.parameters()).data.add_(1.0)
        assert torch.equal(model(ids), clean)


def test_copy_and_pickle_refusals(qwen, ids):
    model = hook_model(qwen)
    with pytest.raises(TypeError, match="deepcopy"):
        copy.copy(model)
    with pytest.raises(TypeError, match="save_pretrained"):
        pickle.dumps(model)
    model.add_hook("blocks.1.linear_attn.hook_write_key", lambda x, hook: x)
    with pytest.raises(RuntimeError, match="reset_hooks"):
        copy.deepcopy(model)


# ----------------------------------------------------------------------------------------------- item 8
def test_write_sae_splice_turns_dense_writes_on_for_its_run(hf_and_layer, ids):
    hf, layer, family = hf_and_layer
    model = hook_model(hf)
    hook = model.hook_prefix(layer) + "hook_write"
    sae = write_sae(family, layer, hook)
    assert not model.materialize_writes
    with torch.no_grad():
        clean = model(ids)
        spliced = model.run_with_saes(ids, saes=[sae])
        _, cache = model.run_with_cache_with_saes(ids, saes=[sae])
        with model.options(materialize_writes=True):
            reference = model.run_with_saes(ids, saes=[sae])
    assert (spliced - clean).abs().max() > 1e-4  # the SAE ran (without its error term)
    assert torch.equal(spliced, reference)
    assert cache[hook + ".hook_sae_acts_post"].shape == (2, ids.shape[1], 32)
    assert not model.materialize_writes and model.acts_to_saes == {}
    with torch.no_grad():
        _, unfiltered = model.run_with_cache(ids)
    assert hook not in unfiltered.cache_dict  # off again, and not materialised by an unfiltered cache
    with pytest.raises(KeyError, match="names_filter"):
        unfiltered[hook]
    # attribution through the spliced SAE, without switching anything on by hand
    metric = lambda logits: logits[:, -1, 7].sum() - logits[:, -1, 3].sum()  # noqa: E731
    acts, attr = feature_attribution(model, ids, sae, metric)
    with model.options(materialize_writes=True):
        acts_on, attr_on = feature_attribution(model, ids, sae, metric)
    # (with materialize_writes on, the other layers' write derivatives take the dense path: fp32 rounding)
    assert torch.equal(acts, acts_on) and torch.allclose(attr, attr_on, atol=1e-6)
    acts_nn, attr_nn = feature_attribution_nnsight(model, ids, sae, metric)  # nnsight sees the splice too
    assert torch.allclose(acts_nn, acts) and torch.allclose(attr_nn, attr, atol=1e-7)


def test_named_dense_hooks_fire_and_tl_patching_needs_no_switch(qwen, ids):
    from transformer_lens import patching

    from writesae_plugin.circuits.patching import write_patch_index

    model = hook_model(qwen)
    hook = "blocks.1.linear_attn.hook_write"
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=[hook, hook + "_flat"])
        with model.options(materialize_writes=True):
            _, ref = model.run_with_cache(ids, names_filter=[hook])
        assert torch.equal(cache[hook], ref[hook])
        assert cache[hook + "_flat"].shape == (2, ids.shape[1], 4 * 16 * 16)
        index = write_patch_index(model, ids.shape[1], layers=[1])
        index = index[index["pos"].isin([3, 4])]
        metric = lambda logits: logits[:, -1, 7].mean()  # noqa: E731
        scores = patching.generic_activation_patch(model, ids.flip(0), cache, metric,
                                                   patching.layer_pos_head_vector_patch_setter, "write",
                                                   index_df=index)
    assert scores.shape == (8,) and torch.isfinite(scores).all()


def test_state_sae_splice_captures_every_position(hf_and_layer, ids):
    hf, layer, family = hf_and_layer
    model = hook_model(hf)
    hook = model.hook_prefix(layer) + "hook_state"
    sae = write_sae(family, layer, hook, site="state")
    with torch.no_grad():
        clean = model(ids)
        _, cache = model.run_with_cache_with_saes(ids, saes=[sae])
        spliced = model.run_with_saes(ids, saes=[sae])
        with model.options(capture_states=StateCapture("all")):
            reference = model.run_with_saes(ids, saes=[sae])
            _, states = model.run_with_cache(ids, names_filter=[hook])
        _, named = model.run_with_cache(ids, names_filter=[hook])
    assert cache[hook + ".hook_sae_acts_post"].shape == (2, ids.shape[1], 32)
    assert (spliced - clean).abs().max() > 1e-4 and torch.equal(spliced, reference)
    assert torch.equal(named[hook], states[hook]) and named[hook].shape[1] == ids.shape[1]
    assert model.state_capture is None


def test_mamba_ssm_models_hook_once_copy_and_unhook(ids):
    from fake_mamba_ssm import tiny_mamba_ssm

    mamba = tiny_mamba_ssm()
    model = hook_model(mamba)
    tokens = ids[:, :12] % 97
    assert hook_model(mamba) is model and hook_model(model.hf_model) is model  # the raw model or its wrapper
    twin = copy.deepcopy(model)
    edit = WriteEdit(layer=1, pos=4, head=0, op="delete")
    with torch.no_grad():
        assert torch.equal(twin.run_with_edits(tokens, [edit]), model.run_with_edits(tokens, [edit]))
        assert twin.hf_model.model is not mamba
        model.unhook()
        again = hook_model(mamba)
        assert again is not model and torch.equal(again(tokens), twin(tokens))

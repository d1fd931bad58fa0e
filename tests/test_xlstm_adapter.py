"""xLSTM (mLSTM) adapter (transformers ``xlstm``) on a tiny real ``xLSTMForCausalLM``: what is particular to xLSTM:
capture, the backend's per-token recurrence and the canonical scalar-decay frame as references, the stabiliser,
edits against the backend recurrence, decay / query edits, transformers' inference chunks, bad input. The contract
every family meets (decode, exact edits, hooks, nnsight, a spliced WriteSAE, the self-check and every experiment
command): tests/test_family_contract.py. Gradients: tests/test_gradients.py (family "xlstm"); resume / padding
refusals: tests/test_resume.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import writesae_plugin  # noqa: F401  (registers the SAE architecture)
from tiny_recurrent_models import make_tiny_xlstm
from writesae_plugin.adapters import HookNameError, StateCapture, WriteEdit, hook_model
from writesae_plugin.adapters.mamba2 import mamba2_reference
from writesae_plugin.adapters.xlstm import stabiliser, xlstm_reference

L = 1
P = f"blocks.{L}.mlstm."
D_K, D_V = 16, 32


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_xlstm(tmp_path_factory.mktemp("xlstm") / "m")


@pytest.fixture(scope="module")
def model(hf):
    return hook_model(hf)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))  # 40: 2 chunks + a tail


def layer_cache(model, tokens, layer=L, **kw):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(f"blocks.{layer}."), **kw)
    return {k.rsplit(".", 1)[-1]: v for k, v in cache.items()}


def backend_reference(c, **kw):
    return xlstm_reference(c["hook_q"], c["hook_k"], c["hook_v"], c["hook_igate"], c["hook_fgate"], **kw)


def test_capture_is_bit_identical_and_matches_both_references(hf, model, tokens):
    with torch.no_grad():
        plain = hf(input_ids=tokens, use_cache=True)
        with model.options(materialize_writes=True, capture_states=StateCapture("all")):
            out, cache = model.run_with_cache(tokens, return_type="hf")
    assert torch.equal(out.logits, plain.logits)
    assert model.cfg.family == "xlstm" and model.cfg.recurrent_layers == (0, 1, 2)
    assert (model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v) == (4, D_K, D_V)
    for layer in model.cfg.recurrent_layers:
        c = {k.rsplit(".", 1)[-1]: v for k, v in cache.items() if k.startswith(f"blocks.{layer}.")}
        h, (C, n, m) = backend_reference(c)
        assert c["hook_read"].abs().max() > 1.0
        assert (h - c["hook_read"]).abs().max() <= 1e-5  # the backend (chunkwise + tail) == its per-token form
        for ref, got in zip((C, n, m), out.cache.rnn_state[layer]):  # the cache's stabilised triple
            assert (ref - got).abs().max() <= 1e-5
        # the canonical frame: S = C~, W = k (exp(i~ - m) v)^T, decay exp(g), read S^T query
        read, S = mamba2_reference(c["hook_write_key"], c["hook_write_value"], c["hook_log_decay"], c["hook_query"])
        assert (read - c["hook_read"]).abs().max() <= 1e-5 and (S - C).abs().max() <= 1e-5
        assert (c["hook_state"][:, -1] - C).abs().max() <= 1e-5
        assert torch.equal(c["hook_write"], torch.einsum("bthk,bthv->bthkv", c["hook_write_key"],
                                                         c["hook_write_value"]))
        assert torch.equal(c["hook_write_key"], c["hook_k"])
        assert c["hook_log_decay"].max() <= 0


def test_the_stabiliser_takes_both_branches_and_is_the_cache_m(model, tokens):
    with torch.no_grad():
        c = layer_cache(model, tokens)
        out = model(tokens, return_type="hf")
    m, m_prev = stabiliser(c["hook_igate"], c["hook_fgate"], None)
    input_branch = c["hook_igate"] >= F.logsigmoid(c["hook_fgate"]) + m_prev
    assert 0.05 < input_branch.float().mean() < 0.95
    assert (m[:, -1, :, None] - out.cache.rnn_state[L][2]).abs().max() <= 1e-5
    value = torch.exp(c["hook_igate"] - m)[..., None] * c["hook_v"]
    assert torch.allclose(c["hook_write_value"], value)


def _edits():
    g = torch.Generator().manual_seed(5)
    u, w = torch.randn(D_K, generator=g), torch.randn(D_V, generator=g)
    return u, w, [WriteEdit(layer=L, pos=20, head=2, batch=0, key=u, value=w),
                  WriteEdit(layer=L, pos=5, head=1, batch=0, op="delete"),
                  WriteEdit(layer=L, pos=39, head=3, batch=1, op="add", matrix=torch.outer(u, w))]


def test_functional_edits_equal_the_edited_backend_recurrence(model, tokens):
    u, w, edits = _edits()
    with torch.no_grad(), model.options(capture_states=StateCapture([4, 21, -1])):
        clean = layer_cache(model, tokens)
        clean_logits = model(tokens)
        with model.edits(edits):
            edited = layer_cache(model, tokens)
            logits = model(tokens)
    W39 = torch.outer(clean["hook_write_key"][1, 39, 3], clean["hook_write_value"][1, 39, 3])
    ref_edits = {(0, 20, 2): torch.outer(u, w), (0, 5, 1): torch.zeros(D_K, D_V), (1, 39, 3): W39 + torch.outer(u, w)}
    h, _ = backend_reference(clean, write_edits=ref_edits)
    assert (h - edited["hook_read"]).abs().max() <= 1e-5
    _, S = mamba2_reference(clean["hook_write_key"], clean["hook_write_value"], clean["hook_log_decay"],
                            clean["hook_query"], write_edits=ref_edits)
    assert (edited["hook_state"][:, -1] - S).abs().max() <= 1e-5
    assert torch.equal(edited["hook_read"][0, :5], clean["hook_read"][0, :5])
    assert torch.equal(edited["hook_read"][1, :39], clean["hook_read"][1, :39])
    assert torch.equal(edited["hook_read"][:, :, 0], clean["hook_read"][:, :, 0])
    assert torch.equal(logits[0, :5], clean_logits[0, :5]) and torch.equal(logits[1, :39], clean_logits[1, :39])
    assert not torch.allclose(logits[0, 5:], clean_logits[0, 5:])


def test_decay_and_query_edits_change_the_matrix_memory_and_the_read(model, tokens):
    with torch.no_grad():
        clean = layer_cache(model, tokens)
        g2 = clean["hook_log_decay"].clone()
        g2[0, 10:20] = 0.0
        q2 = clean["hook_query"].clone()
        q2[1, 30] = -q2[1, 30]
        with model.hooks(fwd_hooks=[(P + "hook_log_decay", lambda x, hook: g2.clone()),
                                    (P + "hook_query", lambda x, hook: q2.clone())]):
            edited = layer_cache(model, tokens)
    ref, _ = mamba2_reference(clean["hook_write_key"], clean["hook_write_value"], g2, q2)
    assert (ref - edited["hook_read"]).abs().max() <= 1e-5
    assert (edited["hook_read"][0, :10] - clean["hook_read"][0, :10]).abs().max() <= 1e-5


def test_bad_inputs_raise_clear_errors(model, tokens):
    with pytest.raises(HookNameError, match="valid names"):
        model.run_with_cache(tokens, names_filter=["blocks.1.mlstm.hook_beta"])
    with pytest.raises(ValueError, match="one mode"):
        with model.edits([WriteEdit(layer=L, pos=3, head=0, op="delete", mode="delta")]):
            pass
    with pytest.raises(ValueError, match="one mode.*use write_mode='raw'"), model.options(write_mode="delta"):
        model(tokens)
    with pytest.raises(ValueError, match="not an mLSTM layer"):
        with model.edits([WriteEdit(layer=3, pos=3, head=0, op="delete")]):
            pass
    with pytest.raises(ValueError, match=r"shapes \[16\] and \[32\]"):
        with model.edits([WriteEdit(layer=L, pos=3, head=0, key=torch.zeros(16), value=torch.zeros(16))]):
            pass


def test_edits_are_placed_across_transformers_inference_chunks(model, tokens):
    """With ``max_inference_chunksize`` below the input length transformers runs each block once per chunk; edits
    still land at their absolute positions (with an fp32 cache: without one transformers keeps the state between
    chunks in bf16)."""
    from tiny_recurrent_models import build_tiny_xlstm

    chunked = hook_model(build_tiny_xlstm(max_inference_chunksize=16))
    edits = [WriteEdit(layer=L, pos=25, head=2, op="delete"), WriteEdit(layer=2, pos=5, head=1, op="delete")]
    with torch.no_grad():
        ref = model.run_with_edits(tokens, edits)
        got = chunked.run_with_edits(tokens, edits, use_cache=True)
    assert (got - ref).abs().max() <= 1e-5 and (ref - model(tokens)).abs().max() > 1e-3


def test_padded_batches_are_refused_since_xlstm_takes_no_mask(model, tokens):
    """transformers' xLSTM ignores ``attention_mask``: a left-padded row would run over its pads. The hooked model
    says so instead of returning that row's wrong result; a mask without padding is fine."""
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    with torch.no_grad():
        with pytest.raises(ValueError, match="no attention mask"):
            model(tokens, attention_mask=mask)
        assert torch.equal(model(tokens, attention_mask=torch.ones_like(tokens)), model(tokens))


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba", "rwkv"])
def test_recurrent_models_without_a_matrix_write_get_a_clear_error(model_type):
    """Mamba-1 / Falcon-Mamba (per-channel state) and transformers' RWKV-4: refused, naming the reason and the
    supported families."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from writesae_plugin.adapters import UnsupportedModelError

    kw = {"rwkv": dict(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64),
          }.get(model_type, dict(hidden_size=32, num_hidden_layers=1, state_size=4, intermediate_size=64))
    cfg = AutoConfig.for_model(model_type, vocab_size=64, **kw)
    hf = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match=r"cannot be hooked: .*supported families: .*xLSTM \(xlstm\)"):
        hook_model(hf)

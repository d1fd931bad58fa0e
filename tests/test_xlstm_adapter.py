"""xLSTM (mLSTM) adapter (transformers ``xlstm``) on a tiny real ``xLSTMForCausalLM``: capture, the backend's
per-token recurrence and the canonical scalar-decay frame as references, the stabiliser, decode, exact edits
(functional / hook / dense / state / decay / query), TransformerLens and nnsight access, a spliced WriteSAE,
the self-check and the experiment commands, bad input. Gradients: tests/test_gradients.py (family "xlstm");
resume / padding refusals: tests/test_resume.py."""

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


def test_prefill_then_decode_equals_full_forward_and_decode_hooks_fire(model, tokens):
    seen = []
    with torch.no_grad():
        full, full_cache = model.run_with_cache(tokens)
        with model.hooks(fwd_hooks=[(P + "hook_write_value", lambda x, hook: seen.append(x))]):
            out = model(tokens[:, :30], return_type="hf")
            logits = [out.logits]
            for t in range(30, 40):
                out = model(tokens[:, t:t + 1], return_type="hf", past_key_values=out.cache)
                logits.append(out.logits)
    assert (torch.cat(logits, 1) - full).abs().max() <= 1e-4
    assert len(seen) == 11 and seen[1].shape[1] == 1
    assert (torch.cat(seen, 1) - full_cache[P + "hook_write_value"]).abs().max() <= 1e-5


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


def test_hook_edits_equal_functional_edits_and_self_replacement_is_a_no_op(model, tokens):
    g = torch.Generator().manual_seed(9)
    u, w = torch.randn(D_K, generator=g), torch.randn(D_V, generator=g)

    def edit_factors(x, hook):
        x[0, 30, 2] = u if hook.name.endswith("hook_write_key") else w
        return x

    def edit_dense(x, hook):
        x[0, 30, 2] = torch.outer(u, w)
        return x

    with torch.no_grad():
        clean = model(tokens)
        functional = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=30, head=2, batch=0, key=u, value=w)])
        factors = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write_key", edit_factors),
                                                          (P + "hook_write_value", edit_factors)])
        with model.options(materialize_writes=True):
            dense = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write", edit_dense)])
        c = layer_cache(model, tokens)
        W = torch.outer(c["hook_write_key"][0, 20, 1], c["hook_write_value"][0, 20, 1])
        same = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=20, head=1, batch=0, matrix=W)])
    assert (factors - functional).abs().max() <= 1e-5 and (dense - functional).abs().max() <= 1e-5
    assert (same - clean).abs().max() <= 1e-5


def test_state_edit_equals_an_added_write(model, tokens):
    D = torch.randn(D_K, D_V, generator=torch.Generator().manual_seed(11))

    def edit_state(x, hook):
        x[1, 0, 0] += D
        return x

    with torch.no_grad():
        with model.options(capture_states=StateCapture([25], heads=[3])):
            via_state = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_state", edit_state)])
        via_add = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=25, head=3, batch=1, op="add", matrix=D)])
    assert (via_state - via_add).abs().max() <= 1e-5 and (via_add - model(tokens)).abs().max() > 1e-4


@pytest.mark.parametrize("pos,head", [(12, 0), (33, 2)], ids=["edit-in-prefill", "edit-in-decode"])
def test_edits_across_prefill_and_decode_match_the_full_forward(model, tokens, pos, head):
    edit = WriteEdit(layer=L, pos=pos, head=head, op="delete")
    with torch.no_grad():
        full = model.run_with_edits(tokens[:, :36], [edit])
        with model.edits([edit]):
            out = model(tokens[:, :30], return_type="hf")
            steps = [out.logits]
            for t in range(30, 36):
                out = model(tokens[:, t:t + 1], return_type="hf", past_key_values=out.cache)
                steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4
    assert (full - model(tokens[:, :36])).abs().max() > 1e-3


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


def test_nnsight_reads_and_edits_match_transformer_lens(model, tokens):
    from nnsight import NNsight

    w = torch.randn(D_V, generator=torch.Generator().manual_seed(2))

    def tl_value(x, hook):
        x[0, 33, 1] = w
        return x

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[P + "hook_write_value", P + "hook_igate"])
        ref = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write_value", tl_value)])
        nn_model = NNsight(model)
        with nn_model.trace(tokens):
            igate = nn_model.blocks[L].mlstm.hook_igate.output.save()  # in execution order: native, then canonical
            value = nn_model.blocks[L].mlstm.hook_write_value.output.save()
        with nn_model.trace(tokens):
            nn_model.blocks[L].mlstm.hook_write_value.output[0, 33, 1] = w
            out = nn_model.output.save()
    assert torch.equal(value, cache[P + "hook_write_value"]) and torch.equal(igate, cache[P + "hook_igate"])
    assert torch.equal(out, ref) and not torch.equal(out, model(tokens))


def test_bad_inputs_raise_clear_errors(model, tokens):
    with pytest.raises(HookNameError, match="valid names"):
        model.run_with_cache(tokens, names_filter=["blocks.1.mlstm.hook_beta"])
    with pytest.raises(ValueError, match="one mode"):
        with model.edits([WriteEdit(layer=L, pos=3, head=0, op="delete", mode="delta")]):
            pass
    with pytest.raises(NotImplementedError, match="one mode"), model.options(write_mode="delta"):
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


def test_selfcheck_and_the_experiment_commands_run_on_a_tiny_xlstm(hf, model, tmp_path, tiny_tokenizer):
    """The ``writesae hooks`` self-check, ``writesae train`` (spliced with the error term: clean logits),
    ``substitute``, ``closed-form`` and ``attribute`` on the tiny xLSTM (``patch``: tests/test_resume.py)."""
    import json

    from sae_lens import SAE

    from writesae_plugin.cli import main
    from writesae_plugin.sae import WriteSAE, WriteSAEConfig
    from writesae_plugin.selfcheck import run_selfcheck

    check = run_selfcheck(model, torch.randint(3, 240, (2, 20), generator=torch.Generator().manual_seed(1)),
                          repeats=1)
    assert check.ok and len(check.results) > 10, check.table()
    hf.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    sae = WriteSAE(WriteSAEConfig(d_in=D_K * D_V, d_sae=32, d_k=D_K, d_v=D_V, k=4, n_heads=4, head=1, site="write",
                                  layer=L, family="xlstm"))
    with torch.no_grad():
        sae.enc_key.mul_(10.0)
    sae.save_model(tmp_path / "sae")
    words = ["def", "return", "import", "self", "value", "state", "print", "class"]
    g = torch.Generator().manual_seed(0)
    (tmp_path / "text.txt").write_text("\n\n".join(" ".join(words[i] for i in torch.randint(0, 8, (20,), generator=g))
                                                   for _ in range(200)))
    args, text = ["--model", str(tmp_path / "model")], ["--dataset", str(tmp_path / "text.txt")]
    assert main(["train", *args, *text, "--layer", str(L), "--head", "1", "--d-sae", "32", "--k", "4",
                 "--total-samples", "256", "--context-length", "24", "--out", str(tmp_path / "train")]) == 0
    trained = SAE.load_from_disk(str(tmp_path / "train" / "final"))
    assert trained.cfg.family == "xlstm"
    tokens = torch.randint(3, 240, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.run_with_saes(tokens, saes=[trained], use_error_term=True), model(tokens))
    assert main(["substitute", *args, "--sae", str(tmp_path / "sae"), *text, "--contexts", "4",
                 "--context-length", "32", "--max-firings", "3", "--out", str(tmp_path / "sub")]) == 0
    assert json.loads((tmp_path / "sub" / "results.json").read_text())["summary"]["n_firings"] > 0
    assert main(["closed-form", *args, *text, "--contexts", "2", "--context-length", "24", "--sae",
                 str(tmp_path / "sae"), "--atoms", "0", "--out", str(tmp_path / "cf")]) == 0
    assert main(["attribute", *args, *text, "--contexts", "2", "--context-length", "24", "--sae",
                 str(tmp_path / "sae"), "--atoms", "0", "--out", str(tmp_path / "attr")]) == 0


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

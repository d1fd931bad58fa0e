"""TransformerLens surface (run_with_cache, run_with_hooks, hooks(), pos_slice, SAELens runner kwargs) and
nnsight traces on the hooked model."""

from __future__ import annotations

import pytest
import torch

from writesae_plugin.adapters import WriteEdit, hook_model

L = 1
P = f"blocks.{L}.linear_attn."


def test_forward_kwargs_of_saelens_runner(qwen, tokens):
    model = hook_model(qwen)
    with torch.no_grad():
        hf_out = qwen(input_ids=tokens, labels=tokens)
        logits, loss = model(tokens, return_type="both")
        per_tok = model(tokens, return_type="loss", loss_per_token=True)
        assert model(tokens, return_type=None) is None
        resid = model(tokens, stop_at_layer=2, prepend_bos=False)
        hidden = qwen(input_ids=tokens, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(tokens, names_filter=[P + "hook_write_key"], stop_at_layer=L + 1,
                                        prepend_bos=False)
    assert torch.equal(logits, hf_out.logits)
    assert torch.allclose(loss, hf_out.loss, atol=1e-5)
    assert per_tok.shape == (2, 69) and torch.allclose(per_tok.mean(), loss)
    assert torch.equal(resid, hidden[2])
    assert cache[P + "hook_write_key"].shape == (2, 70, 4, 16)
    assert isinstance(model.cfg.device, torch.device) and model.cfg.device.type == "cpu"
    assert model.W_E.shape == (256, 64) and model.W_U.shape == (64, 256)
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, return_type="probs")
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(tokens, stop_at_layer=9)


def test_final_stop_at_layer_is_the_residual_before_the_final_norm(qwen, tokens):
    model = hook_model(qwen)
    seen = {}
    h = qwen.model.norm.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        qwen(input_ids=tokens)
        h.remove()
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    assert torch.equal(resid, seen["x"])


def test_tokenizer_surface(tiny_dir, tiny_tokenizer):
    from conftest import load_tiny

    model = hook_model(load_tiny(tiny_dir, "qwen3_5"), tokenizer=tiny_tokenizer)
    toks = model.to_tokens(["the quick brown fox", "import torch"])
    assert toks.dtype == torch.long and toks.shape[0] == 2
    with torch.no_grad():
        logits = model(["the quick brown fox", "import torch"])
        single = model("the quick brown fox")
    assert logits.shape[:2] == toks.shape
    assert model.to_string(toks[1:2])[0].startswith("import torch")
    assert single.shape[0] == 1
    with pytest.raises(ValueError, match="bos_token"):
        model.to_tokens("x", prepend_bos=True)


def test_hooks_context_and_pos_slice(qwen, tokens):
    model = hook_model(qwen)
    seen = []
    with torch.no_grad():
        with model.hooks(fwd_hooks=[(P + "hook_read", lambda x, hook: seen.append(x.shape))]):
            model(tokens)
        model(tokens)
        _, full = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(P))
        _, sl = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(P), pos_slice=(10, 20))
        _, last = model.run_with_cache(tokens, names_filter=[P + "hook_write_key"], pos_slice=-1,
                                       remove_batch_dim=False)
        _, raw = model.run_with_cache(tokens, names_filter=[P + "hook_write_key"], return_cache_object=False)
    assert seen == [torch.Size([2, 70, 4, 16])]
    for name in (P + "hook_write_key", P + "hook_k", P + "hook_beta", P + "hook_read"):
        assert torch.equal(sl[name], full[name][:, 10:20])
    assert torch.equal(last[P + "hook_write_key"], full[P + "hook_write_key"][:, -1:])
    assert isinstance(raw, dict)
    with pytest.raises(ValueError, match="hook_state"), model.options(capture_states=True):
        model.run_with_cache(tokens, names_filter=[P + "hook_state"], pos_slice=-1)


def test_every_hook_is_documented(qwen):
    model = hook_model(qwen)
    inv = model.hook_inventory()
    assert len(inv) == 12 * len(model.cfg.recurrent_layers)
    assert all(desc.startswith("[b,") for _, desc in inv)


# ------------------------------------------------------------------------------------------ nnsight
def test_nnsight_reads_match_transformer_lens(qwen, tokens):
    from nnsight import NNsight

    model = hook_model(qwen)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(P))
        with model.options(materialize_writes=True):
            _, dense = model.run_with_cache(tokens, names_filter=[P + "hook_write"])
    nn_model = NNsight(model)
    with torch.no_grad(), model.options(materialize_writes=True):
        with nn_model.trace(tokens):
            k = nn_model.blocks[L].linear_attn.hook_k.output.save()
            key = nn_model.blocks[L].linear_attn.hook_write_key.output.save()
            write = nn_model.blocks[L].linear_attn.hook_write.output.save()
            logits = nn_model.output.save()
    assert torch.equal(k, cache[P + "hook_k"])
    assert torch.equal(key, cache[P + "hook_write_key"])
    assert torch.equal(write, dense[P + "hook_write"])
    assert torch.equal(logits, model(tokens))


def test_nnsight_edits_match_transformer_lens(qwen, tokens):
    from nnsight import NNsight

    model = hook_model(qwen)
    g = torch.Generator().manual_seed(2)
    u, w, kk = torch.randn(16, generator=g), torch.randn(16, generator=g), torch.randn(16, generator=g)
    W = torch.outer(u, w)

    def tl_key(x, hook):
        x[0, 33, 1] = u
        return x

    def tl_write(x, hook):
        x[1, 50, 0] = W
        return x

    def tl_k(x, hook):
        x[0, 20, 1] = kk
        return x

    nn_model = NNsight(model)
    with torch.no_grad():
        ref_key = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write_key", tl_key)])
        with nn_model.trace(tokens):
            nn_model.blocks[L].linear_attn.hook_write_key.output[0, 33, 1] = u
            out_key = nn_model.output.save()
        with model.options(materialize_writes=True):
            ref_write = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write", tl_write)])
            with nn_model.trace(tokens):
                nn_model.blocks[L].linear_attn.hook_write.output[1, 50, 0] = W
                out_write = nn_model.output.save()
        ref_k = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_k", tl_k)])
        with nn_model.trace(tokens):
            nn_model.blocks[L].linear_attn.hook_k.output[0, 20, 1] = kk
            out_k = nn_model.output.save()
        functional = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=50, head=0, batch=1, matrix=W)])
    assert torch.equal(out_key, ref_key) and not torch.equal(out_key, model(tokens))
    assert torch.equal(out_write, ref_write)
    assert (out_write - functional).abs().max() <= 1e-5
    assert torch.equal(out_k, ref_k) and not torch.equal(out_k, model(tokens))


def test_nnsight_assignment_replaces_the_write(qwen, tokens):
    from nnsight import NNsight

    model = hook_model(qwen)
    nn_model = NNsight(model)
    with torch.no_grad():
        with nn_model.trace(tokens):
            v = nn_model.blocks[L].linear_attn.hook_write_value.output
            nn_model.blocks[L].linear_attn.hook_write_value.output = v * 0
            out = nn_model.output.save()
        deleted = []
        for b in range(2):
            for t in range(70):
                for h in range(4):
                    deleted.append(WriteEdit(layer=L, pos=t, head=h, batch=b, op="delete"))
        ref = model.run_with_edits(tokens, deleted)
    assert (out - ref).abs().max() <= 1e-4

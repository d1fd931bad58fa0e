"""GLA adapter (flash-linear-attention ``GatedLinearAttention``) on a tiny real fla ``GLAForCausalLM`` loaded through
transformers' Auto class (shared key/value heads, short convs, fused gated output norm): capture (bit-identical
logits), per-token reference parity (per-channel decay, no erase; fla's value-first cache state), decode, exact edits
(functional / hook / dense / state / add), query and decay edits, TransformerLens and nnsight access, gradients, a
trained and spliced WriteSAE, the substitution test and the closed form, bad input."""

from __future__ import annotations

import pytest
import torch

from tiny_fla_models import make_tiny_gla, require_fla

require_fla()

import writesae_plugin  # noqa: E402,F401  (registers the SAE architecture)
from writesae_plugin.adapters import HookNameError, StateCapture, WriteEdit, hook_model  # noqa: E402
from writesae_plugin.adapters.gla import gla_kernel, gla_reference  # noqa: E402

L = 1
P = f"blocks.{L}.linear_attn."
H, DK, DV = 4, 16, 32


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_gla(tmp_path_factory.mktemp("gla") / "m")


@pytest.fixture(scope="module")
def model(hf):
    return hook_model(hf)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 250, (2, 70), generator=torch.Generator().manual_seed(0))  # 70: chunk kernel, past 64


def layer_cache(model, tokens, layer=L, **kw):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(f"blocks.{layer}."), **kw)
    return {k.rsplit(".", 1)[-1]: v for k, v in cache.items()}


def reference_of(c, **kw):
    return gla_reference(c["hook_query"], c["hook_write_key"], c["hook_write_value"], c["hook_log_decay"], **kw)


@pytest.mark.parametrize("T", [70, 20], ids=["chunk-kernel", "recurrent-kernel"])
def test_capture_is_bit_identical_and_matches_the_reference(hf, model, tokens, T):
    ids = tokens[:, :T]
    with torch.no_grad():
        plain = hf(input_ids=ids, use_cache=True)
        with model.options(materialize_writes=True, capture_states=StateCapture("all")):
            out, cache = model.run_with_cache(ids, return_type="hf")
    assert torch.equal(out.logits, plain.logits)
    assert model.cfg.family == "gla" and model.cfg.recurrent_layers == (0, 1, 2)
    assert (model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v) == (H, DK, DV)
    for layer in model.cfg.recurrent_layers:
        c = {k.rsplit(".", 1)[-1]: v for k, v in cache.items() if k.startswith(f"blocks.{layer}.")}
        assert c["hook_log_decay"].shape == (2, T, H, DK) and (c["hook_log_decay"] < 0).all()
        assert torch.equal(c["hook_beta"], torch.ones(2, T, H))  # GLA has no write strength
        ref = reference_of(c, return_states=True)
        assert c["hook_read"].abs().max() > 0.02  # reads well above the tolerance
        assert (ref.read - c["hook_read"]).abs().max() <= 1e-5
        assert (ref.states - c["hook_state"]).abs().max() <= 1e-5
        final = out.past_key_values[layer]["recurrent_state"]  # fla's GLA cache is value-first [b, H, d_v, d_k]
        assert final.shape == (2, H, DV, DK)
        assert (ref.final_state.transpose(-1, -2) - final).abs().max() <= 1e-5
        assert torch.equal(c["hook_write"], torch.einsum("bthk,bthv->bthkv", c["hook_write_key"],
                                                         c["hook_write_value"]))
        assert torch.equal(c["hook_write_key"], c["hook_k"]) and torch.equal(c["hook_write_value"], c["hook_v"])
        assert torch.allclose(c["hook_query"], c["hook_q"] * DK ** -0.5)
        # 2 key/value heads shared by 4 heads (fla repeats them before the kernel): heads 0, 1 share one key
        assert torch.equal(c["hook_k"][:, :, 0], c["hook_k"][:, :, 1])
        assert not torch.equal(c["hook_k"][:, :, 1], c["hook_k"][:, :, 2])


def test_the_torch_kernel_equals_the_per_token_recurrence():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 150, 3, 8, generator=g), torch.randn(2, 150, 3, 8, generator=g)
    v, gk = torch.randn(2, 150, 3, 5, generator=g), -torch.rand(2, 150, 3, 8, generator=g)
    init = torch.randn(2, 3, 8, 5, generator=g)
    o, S = gla_kernel(q, k, v, gk, torch.ones(2, 150, 3), init, True)
    ref = gla_reference(q * 8 ** -0.5, k, v, gk, initial_state=init)
    assert (o - ref.read).abs().max() <= 1e-5 and (S - ref.final_state).abs().max() <= 1e-5


def test_gpu_path_calls_fla_kernels_with_key_first_states(monkeypatch):
    """On a GPU the hook logic calls fla's own GLA kernels (q=, k=, v=, the gate by fla's name, fla's default
    key-first state layout, beta folded into v); checked here with a recording stand-in."""
    from writesae_plugin.adapters import gla

    kernels = gla.install()
    calls = []

    def fla_like(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
                 cu_seqlens=None):
        calls.append((state_v_first, initial_state is not None))
        return gla.torch_gla("chunk_gla")(q=q, k=k, v=v, g=g, initial_state=initial_state,
                                          output_final_state=output_final_state, state_v_first=state_v_first)

    monkeypatch.setitem(kernels.original, "chunk_gla", fla_like)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 5, H, d, generator=gen) for d in (DK, DK, DV))
    g, init = -torch.rand(1, 5, H, DK, generator=gen), torch.randn(1, H, DK, DV, generator=gen)
    beta = torch.full((1, 5, H), 0.5)
    o, S = kernels.main("chunk_gla", torch.device("cuda"))(q, k, v, g=g, beta=beta, initial_state=init,
                                                            output_final_state=True)
    ref_o, ref_S = gla_kernel(q, k, v, g, beta, init, True)
    assert calls == [(False, True)]
    assert (o - ref_o).abs().max() <= 1e-6 and (S - ref_S).abs().max() <= 1e-6
    assert kernels.chunk(torch.device("cpu")) is gla_kernel


def test_prefill_then_decode_equals_full_forward_and_decode_hooks_fire(model, tokens):
    seen = []
    with torch.no_grad():
        full, full_cache = model.run_with_cache(tokens)
        with model.hooks(fwd_hooks=[(P + "hook_write_key", lambda x, hook: seen.append(x))]):
            out = model(tokens[:, :50], return_type="hf")
            logits = [out.logits]
            for t in range(50, 70):
                out = model(tokens[:, t:t + 1], return_type="hf", past_key_values=out.past_key_values)
                logits.append(out.logits)
    assert (torch.cat(logits, 1) - full).abs().max() <= 1e-4
    assert len(seen) == 21 and seen[1].shape[1] == 1
    assert (torch.cat(seen, 1) - full_cache[P + "hook_write_key"]).abs().max() <= 1e-5


def test_functional_edits_equal_the_edited_recurrence(model, tokens):
    g = torch.Generator().manual_seed(5)
    u, w = torch.randn(DK, generator=g), torch.randn(DV, generator=g)
    edits = [WriteEdit(layer=L, pos=40, head=2, batch=0, key=u, value=w),
             WriteEdit(layer=L, pos=10, head=1, batch=0, op="delete"),
             WriteEdit(layer=L, pos=69, head=3, batch=1, matrix=torch.outer(u.flip(0), w))]
    ref_edits = {(0, 40, 2): (torch.outer(u, w), "raw"), (0, 10, 1): (torch.zeros(DK, DV), "raw"),
                 (1, 69, 3): (torch.outer(u.flip(0), w), "raw")}
    with torch.no_grad(), model.options(capture_states=StateCapture([5, 45, -1])):
        clean = layer_cache(model, tokens)
        clean_logits = model(tokens)
        with model.edits(edits):
            edited = layer_cache(model, tokens)
            logits = model(tokens)
    ref = reference_of(clean, write_edits=ref_edits, return_states=True)
    assert (ref.read - edited["hook_read"]).abs().max() <= 1e-5
    assert (ref.states[:, [5, 45, 69]] - edited["hook_state"]).abs().max() <= 1e-5
    assert torch.equal(edited["hook_read"][0, :10], clean["hook_read"][0, :10])  # earlier positions
    assert torch.equal(edited["hook_read"][1, :69], clean["hook_read"][1, :69])  # the other row, before its edit
    assert torch.equal(edited["hook_read"][:, :, 0], clean["hook_read"][:, :, 0])  # other heads: untouched
    assert torch.equal(logits[0, :10], clean_logits[0, :10]) and torch.equal(logits[1, :69], clean_logits[1, :69])
    assert not torch.allclose(logits[0, 10:], clean_logits[0, 10:])


def test_hook_edits_equal_functional_edits_and_self_replacement_is_a_no_op(model, tokens):
    g = torch.Generator().manual_seed(9)
    u, w = torch.randn(DK, generator=g), torch.randn(DV, generator=g)

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
    assert (functional - clean).abs().max() > 1e-3
    assert (same - clean).abs().max() <= 1e-5


def test_add_and_state_edits_act_as_extra_writes(model, tokens):
    D = torch.randn(DK, DV, generator=torch.Generator().manual_seed(11))

    def edit_state(x, hook):
        x[1, 0, 0] += D
        return x

    with torch.no_grad():
        clean = layer_cache(model, tokens)
        with model.options(capture_states=StateCapture([25], heads=[3])):
            via_state = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_state", edit_state)])
        with model.edits([WriteEdit(layer=L, pos=25, head=3, batch=1, op="add", matrix=D)]):
            via_add = model(tokens)
            edited = layer_cache(model, tokens)
    assert (reference_of(clean, extra_writes={(1, 25, 3): D}).read - edited["hook_read"]).abs().max() <= 1e-5
    assert (via_state - via_add).abs().max() <= 1e-5


@pytest.mark.parametrize("pos,head", [(12, 0), (57, 2)], ids=["edit-in-prefill", "edit-in-decode"])
def test_edits_across_prefill_and_decode_match_the_full_forward(model, tokens, pos, head):
    edit = WriteEdit(layer=L, pos=pos, head=head, op="delete")
    with torch.no_grad():
        full = model.run_with_edits(tokens[:, :60], [edit])
        with model.edits([edit]):
            out = model(tokens[:, :55], return_type="hf")
            steps = [out.logits]
            for t in range(55, 60):
                out = model(tokens[:, t:t + 1], return_type="hf", past_key_values=out.past_key_values)
                steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4
    assert (full - model(tokens[:, :60])).abs().max() > 1e-3


def test_query_and_per_channel_decay_edits_change_read_and_transitions(model, tokens):
    with torch.no_grad():
        clean = layer_cache(model, tokens)
        g2 = clean["hook_log_decay"].clone()
        g2[0, 30:40, :, :8] = 0.0  # half the key channels stop forgetting over a span
        q2 = clean["hook_query"].clone()
        q2[1, 50] = -q2[1, 50]
        with model.hooks(fwd_hooks=[(P + "hook_log_decay", lambda x, hook: g2.clone()),
                                    (P + "hook_query", lambda x, hook: q2.clone())]):
            edited = layer_cache(model, tokens)
    ref = gla_reference(q2, clean["hook_write_key"], clean["hook_write_value"], g2)
    assert (ref.read - edited["hook_read"]).abs().max() <= 1e-5
    assert (edited["hook_read"][0, :30] - clean["hook_read"][0, :30]).abs().max() <= 1e-6
    assert (edited["hook_read"][0, 30:] - clean["hook_read"][0, 30:]).abs().max() > 1e-4


def test_nnsight_reads_and_edits_match_transformer_lens(model, tokens):
    from nnsight import NNsight

    u = torch.randn(DK, generator=torch.Generator().manual_seed(2))

    def tl_key(x, hook):
        x[0, 33, 1] = u
        return x

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[P + "hook_write_key", P + "hook_log_decay"])
        ref = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write_key", tl_key)])
        nn_model = NNsight(model)
        with nn_model.trace(tokens):
            key = nn_model.blocks[L].linear_attn.hook_write_key.output.save()
            decay = nn_model.blocks[L].linear_attn.hook_log_decay.output.save()
        with nn_model.trace(tokens):
            nn_model.blocks[L].linear_attn.hook_write_key.output[0, 33, 1] = u
            out = nn_model.output.save()
    assert torch.equal(key, cache[P + "hook_write_key"]) and torch.equal(decay, cache[P + "hook_log_decay"])
    assert torch.equal(out, ref) and not torch.equal(out, model(tokens))


def test_gradients_of_the_write_value_equal_the_adjoint_of_the_reference(model, tokens):
    """d(sum of layer L's reads . R)/d(write value) through the hooks equals autograd through the reference."""
    ids = tokens[:, :24]
    R = torch.randn(2, 24, H, DV, generator=torch.Generator().manual_seed(6))
    grads = {}

    def keep(x, hook):
        x.register_hook(lambda g: grads.__setitem__("v", g))
        return x

    def loss_at_read(x, hook):
        grads["loss"] = (x * R).sum()
        return x

    model.run_with_hooks(ids, fwd_hooks=[(P + "hook_write_value", keep), (P + "hook_read", loss_at_read)])
    grads["loss"].backward()
    with torch.no_grad():
        c = layer_cache(model, ids)
    v = c["hook_write_value"].clone().requires_grad_(True)
    (gla_reference(c["hook_query"], c["hook_write_key"], v, c["hook_log_decay"]).read * R).sum().backward()
    assert (grads["v"] - v.grad).abs().max() <= 1e-5


def test_write_sae_splice_with_error_term_is_exact_and_family_is_checked(model, tokens):
    from writesae_plugin.sae import WriteSAE, WriteSAEConfig

    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=DK * DV, d_sae=32, d_k=DK, d_v=DV, k=4, n_heads=H, head=2, site="write",
                                  family="gla", layer=L))
    sae.cfg.metadata.hook_name = P + "hook_write"
    with torch.no_grad():
        clean = model(tokens)
        assert torch.equal(model.run_with_saes(tokens, saes=[sae], use_error_term=True), clean)
        spliced = model.run_with_saes(tokens, saes=[sae])
    assert not torch.allclose(spliced, clean)
    other = WriteSAE(WriteSAEConfig(d_in=DK * DV, d_sae=32, d_k=DK, d_v=DV, k=4, n_heads=H, head=2, site="write",
                                    family="delta_net", layer=L))
    other.cfg.metadata.hook_name = P + "hook_write"
    with pytest.raises(ValueError, match="trained on a 'delta_net' model"):
        model.run_with_saes(tokens, saes=[other])


def test_bad_inputs_raise_clear_errors(model, tokens):
    with pytest.raises(HookNameError, match="valid names"):
        model.run_with_cache(tokens, names_filter=["blocks.3.linear_attn.hook_write"])
    with pytest.raises(ValueError, match="not a GLA layer"):
        with model.edits([WriteEdit(layer=5, pos=3, head=0, op="delete")]):
            pass
    with pytest.raises(ValueError, match="one mode"):
        with model.edits([WriteEdit(layer=L, pos=3, head=1, op="delete", mode="delta")]):
            pass
    with pytest.raises(NotImplementedError, match="no separate delta write"):
        with model.options(write_mode="delta"):
            model(tokens)
    mask = torch.ones_like(tokens)
    mask[1, :7] = 0
    with pytest.raises(NotImplementedError, match="padded rows"):
        model(tokens, attention_mask=mask)


def test_selfcheck_train_substitution_and_closed_form_on_a_tiny_gla(hf, model, tmp_path, tiny_tokenizer):
    """``writesae hooks``' self-check, ``writesae train`` (the trained SAE spliced with the error term gives the
    clean logits), ``substitute`` and ``closed-form`` on the tiny GLA."""
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
    sae = WriteSAE(WriteSAEConfig(d_in=DK * DV, d_sae=32, d_k=DK, d_v=DV, k=4, n_heads=H, head=1, site="write",
                                  layer=L, family="gla"))
    with torch.no_grad():
        sae.enc_key.mul_(100.0)
    sae.save_model(tmp_path / "sae")
    words = ["def", "return", "import", "self", "value", "state", "print", "class"]
    g = torch.Generator().manual_seed(0)
    (tmp_path / "text.txt").write_text("\n\n".join(" ".join(words[i] for i in torch.randint(0, 8, (20,), generator=g))
                                                   for _ in range(200)))
    args, text = ["--model", str(tmp_path / "model")], ["--dataset", str(tmp_path / "text.txt")]
    assert main(["train", *args, *text, "--layer", str(L), "--head", "1", "--d-sae", "32", "--k", "4",
                 "--total-samples", "256", "--context-length", "24", "--out", str(tmp_path / "train")]) == 0
    trained = SAE.load_from_disk(str(tmp_path / "train" / "final"))
    assert trained.cfg.family == "gla"
    tokens = torch.randint(3, 240, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.run_with_saes(tokens, saes=[trained], use_error_term=True), model(tokens))
    assert main(["substitute", *args, "--sae", str(tmp_path / "sae"), *text, "--contexts", "4",
                 "--context-length", "32", "--max-firings", "3", "--out", str(tmp_path / "sub")]) == 0
    assert json.loads((tmp_path / "sub" / "results.json").read_text())["summary"]["n_firings"] > 0
    assert main(["closed-form", *args, *text, "--contexts", "2", "--context-length", "24", "--sae",
                 str(tmp_path / "sae"), "--atoms", "0", "--out", str(tmp_path / "cf")]) == 0


def test_effective_attention_with_per_channel_decay_reproduces_the_read(model, tokens):
    from writesae_plugin.experiments.write_attribution import layer_effective_attention

    A, v = layer_effective_attention(model, tokens[:, :40], L)
    with torch.no_grad():
        read = layer_cache(model, tokens[:, :40])["hook_read"]
    assert (torch.einsum("bhts,bshv->bthv", A, v.float()) - read).abs().max() <= 1e-5

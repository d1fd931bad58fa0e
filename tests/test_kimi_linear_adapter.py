"""Kimi Delta Attention adapter (transformers ``kimi_linear``) on a tiny real ``KimiLinearForCausalLM``: capture,
per-token reference parity with a per-channel decay, delta writes, decode, exact edits (raw / delta, functional /
hook / dense / state), query and decay edits, TransformerLens and nnsight access, a spliced WriteSAE, bad input.
Gradients: tests/test_gradients.py (family "kimi"); resume / padding refusals: tests/test_resume.py."""

from __future__ import annotations

import pytest
import torch

import writesae_plugin  # noqa: F401  (registers the SAE architecture)
from tiny_recurrent_models import make_tiny_kimi
from writesae_plugin.adapters import HookNameError, StateCapture, WriteEdit, hook_model
from writesae_plugin.adapters.kimi_linear import kda_l2norm
from writesae_plugin.adapters.reference import gated_deltanet_reference

L = 1  # a KDA layer (layer 3 is MLA attention)
P = f"blocks.{L}.linear_attn."


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_kimi(tmp_path_factory.mktemp("kimi") / "m")


@pytest.fixture(scope="module")
def model(hf):
    return hook_model(hf)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 250, (2, 70), generator=torch.Generator().manual_seed(0))  # 70: past a 64-chunk


def layer_cache(model, tokens, layer=L, **kw):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(f"blocks.{layer}."), **kw)
    return {k.rsplit(".", 1)[-1]: v for k, v in cache.items()}


def reference_of(c, **kw):
    return gated_deltanet_reference(c["hook_query"], c["hook_write_key"], c["hook_v"], c["hook_log_decay"],
                                    c["hook_beta"], **kw)


def test_capture_is_bit_identical_and_matches_the_per_channel_reference(hf, model, tokens):
    with torch.no_grad():
        plain = hf(input_ids=tokens, use_cache=True)
        with model.options(materialize_writes=True, capture_states=StateCapture("all")):
            out, cache = model.run_with_cache(tokens, return_type="hf")
    assert torch.equal(out.logits, plain.logits)
    assert model.cfg.family == "kimi_linear" and model.cfg.recurrent_layers == (0, 1, 2)
    H, d = model.cfg.n_heads, model.cfg.d_k
    for layer in model.cfg.recurrent_layers:
        c = {k.rsplit(".", 1)[-1]: v for k, v in cache.items() if k.startswith(f"blocks.{layer}.")}
        assert c["hook_log_decay"].shape == (2, 70, H, d)  # one log decay per key channel
        assert c["hook_write_flat"].shape == (2, 70, H * d * d)
        ref = reference_of(c, return_states=True)
        assert c["hook_read"].abs().max() > 0.02  # reads well above the tolerance
        assert (ref.read - c["hook_read"]).abs().max() <= 1e-5
        assert (ref.states - c["hook_state"]).abs().max() <= 1e-5
        assert (ref.final_state - out.past_key_values.layers[layer].recurrent_states[0]).abs().max() <= 1e-5
        assert torch.equal(c["hook_write"], torch.einsum("bthk,bthv->bthkv", c["hook_write_key"],
                                                         c["hook_write_value"]))
        assert torch.equal(c["hook_write_key"], kda_l2norm(c["hook_k"]))  # the kernel's own norm, bit for bit
        assert torch.allclose(c["hook_write_value"], c["hook_beta"][..., None] * c["hook_v"])
        assert torch.allclose(c["hook_query"], kda_l2norm(c["hook_q"]) * d ** -0.5)
    # the decay is the forget gate's output: per channel, not shared by a head
    gate = hf.model.layers[L].self_attn.forget_gate
    with torch.no_grad():
        resid = model.residual_before(tokens, L)
        g = gate(hf.model.layers[L].input_layernorm(resid))
    c = layer_cache(model, tokens)
    assert torch.equal(c["hook_log_decay"], g)
    assert (g.std(-1) > 0).all()


def test_delta_value_is_the_increment_over_the_decayed_state(model, tokens):
    with torch.no_grad(), model.options(write_mode="delta", capture_states=StateCapture("all")):
        c = layer_cache(model, tokens)
    assert (reference_of(c).delta_value - c["hook_write_value"]).abs().max() <= 1e-5
    S, alpha = c["hook_state"], c["hook_log_decay"].exp()[..., None]
    inc = S[:, 1:] - alpha[:, 1:] * S[:, :-1]  # S_t - Diag(alpha_t) S_{t-1} == k^ delta^T
    dense = torch.einsum("bthk,bthv->bthkv", c["hook_write_key"], c["hook_write_value"])
    assert (inc - dense[:, 1:]).abs().max() <= 1e-5


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


def test_left_padded_row_matches_its_unpadded_run(model):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, 250, (1, 40), generator=g), torch.randint(3, 250, (1, 33), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    with torch.no_grad():
        _, c = model.run_with_cache(batch, attention_mask=mask)
        _, cb = model.run_with_cache(b)
    assert (c[P + "hook_read"][1, 7:] - cb[P + "hook_read"][0]).abs().max() <= 1e-5


def _edits(mode):
    g = torch.Generator().manual_seed(5)
    u, w = torch.randn(16, generator=g), torch.randn(16, generator=g)
    fn = [WriteEdit(layer=L, pos=40, head=2, batch=0, key=u, value=w, mode=mode),
          WriteEdit(layer=L, pos=10, head=1, batch=0, op="delete", mode=mode),
          WriteEdit(layer=L, pos=69, head=3, batch=1, matrix=torch.outer(w, u), mode=mode)]
    ref = {(0, 40, 2): (torch.outer(u, w), mode), (0, 10, 1): (torch.zeros(16, 16), mode),
           (1, 69, 3): (torch.outer(w, u), mode)}
    return fn, ref


@pytest.mark.parametrize("mode", ["raw", "delta"])
def test_functional_edits_equal_the_edited_recurrence(model, tokens, mode):
    edits, ref_edits = _edits(mode)
    with torch.no_grad(), model.options(capture_states=StateCapture([5, 45, -1])):
        clean = layer_cache(model, tokens)
        clean_logits = model(tokens)
        with model.edits(edits):
            edited = layer_cache(model, tokens)
            logits = model(tokens)
    ref = reference_of(clean, write_edits=ref_edits, return_states=True)
    assert (ref.read - edited["hook_read"]).abs().max() <= 1e-5
    assert (ref.states[:, [5, 45, 69]] - edited["hook_state"]).abs().max() <= 1e-5
    assert torch.equal(edited["hook_read"][0, :10], clean["hook_read"][0, :10])
    assert torch.equal(edited["hook_read"][1, :69], clean["hook_read"][1, :69])
    assert torch.equal(edited["hook_read"][:, :, 0], clean["hook_read"][:, :, 0])  # other heads: untouched
    assert torch.equal(logits[0, :10], clean_logits[0, :10]) and torch.equal(logits[1, :69], clean_logits[1, :69])
    assert not torch.allclose(logits[0, 10:], clean_logits[0, 10:])


@pytest.mark.parametrize("mode", ["raw", "delta"])
def test_hook_edits_equal_functional_edits_and_self_replacement_is_a_no_op(model, tokens, mode):
    g = torch.Generator().manual_seed(9)
    u, w = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def edit_factors(x, hook):
        x[0, 30, 2] = u if hook.name.endswith("hook_write_key") else w
        return x

    def edit_dense(x, hook):
        x[0, 30, 2] = torch.outer(u, w)
        return x

    with torch.no_grad(), model.options(write_mode=mode):
        clean = model(tokens)
        functional = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=30, head=2, batch=0, key=u, value=w,
                                                             mode=mode)])
        factors = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write_key", edit_factors),
                                                          (P + "hook_write_value", edit_factors)])
        with model.options(materialize_writes=True):
            dense = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write", edit_dense)])
        c = layer_cache(model, tokens)
        W = torch.outer(c["hook_write_key"][0, 20, 1], c["hook_write_value"][0, 20, 1])
        same = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=20, head=1, batch=0, matrix=W, mode=mode)])
    assert (factors - functional).abs().max() <= 1e-5 and (dense - functional).abs().max() <= 1e-5
    assert (same - clean).abs().max() <= 1e-5


def test_add_and_state_edits_act_as_extra_writes(model, tokens):
    D = torch.randn(16, 16, generator=torch.Generator().manual_seed(11))

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
    ref = gated_deltanet_reference(q2, clean["hook_write_key"], clean["hook_v"], g2, clean["hook_beta"])
    assert (ref.read - edited["hook_read"]).abs().max() <= 1e-5
    assert (edited["hook_read"][0, :30] - clean["hook_read"][0, :30]).abs().max() <= 1e-6


def test_nnsight_reads_and_edits_match_transformer_lens(model, tokens):
    from nnsight import NNsight

    u = torch.randn(16, generator=torch.Generator().manual_seed(2))

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


def test_write_sae_splice_with_error_term_is_exact_and_family_is_checked(model, tokens):
    from writesae_plugin.sae import WriteSAE, WriteSAEConfig

    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=32, d_k=16, d_v=16, k=4, n_heads=4, head=2, site="write",
                                  family="kimi_linear", layer=L))
    sae.cfg.metadata.hook_name = P + "hook_write"
    with torch.no_grad():
        clean = model(tokens)
        assert torch.equal(model.run_with_saes(tokens, saes=[sae], use_error_term=True), clean)
        spliced = model.run_with_saes(tokens, saes=[sae])
    assert not torch.allclose(spliced, clean)
    other = WriteSAE(WriteSAEConfig(d_in=256, d_sae=32, d_k=16, d_v=16, k=4, n_heads=4, head=2, site="write",
                                    family="qwen3_5", layer=L))
    other.cfg.metadata.hook_name = P + "hook_write"
    with pytest.raises(ValueError, match="trained on a 'qwen3_5' model"):
        model.run_with_saes(tokens, saes=[other])


def test_bad_inputs_raise_clear_errors(model, tokens):
    with pytest.raises(HookNameError, match="valid names"):
        model.run_with_cache(tokens, names_filter=["blocks.3.linear_attn.hook_write"])  # layer 3 is MLA
    with pytest.raises(ValueError, match="not a Kimi Delta Attention layer"):
        with model.edits([WriteEdit(layer=3, pos=3, head=0, op="delete")]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with model.edits([WriteEdit(layer=L, pos=3, head=4, op="delete")]):
            pass
    with pytest.raises(ValueError, match="must keep its shape"):
        model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_log_decay", lambda x, hook: x[..., 0])])


def test_cpu_runs_pure_torch_even_if_a_triton_kernel_is_bound_and_calls_it_as_fla_names_arguments(
        model, tokens, monkeypatch):
    from writesae_plugin.adapters import gated_deltanet as gdn
    from writesae_plugin.adapters.kimi_linear import KDA_CHUNK, KDA_RECURRENT

    kernels = gdn._INSTALLED[model.family.module_name]
    edit = WriteEdit(layer=L, pos=5, head=1, op="delete")
    with torch.no_grad():
        clean, edited = model(tokens), model.run_with_edits(tokens, [edit])

        def triton_only(*a, **k):
            raise RuntimeError("0 active drivers")

        monkeypatch.setitem(kernels.original, KDA_CHUNK, triton_only)
        monkeypatch.setitem(kernels.original, KDA_RECURRENT, triton_only)
        assert torch.equal(model(tokens), clean)
        calls = []

        def fla_like(name):
            pure = kernels.pure[name]

            def kernel(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                       use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):  # fla's chunk_kda signature
                calls.append(name)
                return pure(q, k, v, g=g, beta=beta, initial_state=initial_state,
                            output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
            return kernel

        monkeypatch.setattr(kernels, "main", lambda name, device: fla_like(name))
        assert torch.equal(model(tokens), clean) and torch.equal(model.run_with_edits(tokens, [edit]), edited)
    assert KDA_CHUNK in calls


def test_selfcheck_and_the_experiment_commands_run_on_a_tiny_kimi_model(hf, model, tmp_path, tiny_tokenizer):
    """The ``writesae hooks`` self-check (all checks pass), ``writesae train`` (the trained SAE spliced with the
    error term gives the clean logits), ``substitute`` and ``closed-form`` on the tiny Kimi Linear model
    (``patch``: tests/test_resume.py, exact against brute force; ``attribute``: the effective attention below)."""
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
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=32, d_k=16, d_v=16, k=4, n_heads=4, head=1, site="write", layer=L,
                                  family="kimi_linear"))
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
    assert trained.cfg.family == "kimi_linear"
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

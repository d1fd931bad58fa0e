"""Kimi Delta Attention adapter (transformers ``kimi_linear``) on a tiny real ``KimiLinearForCausalLM``: what is
particular to KDA: capture, per-token reference parity with a per-channel decay, delta writes, padding, query and
decay edits, kernel binding, bad input. The contract every family meets (decode, exact edits, hooks, nnsight, a
spliced WriteSAE, the self-check and every experiment command): tests/test_family_contract.py. Gradients:
tests/test_gradients.py (family "kimi"); resume / padding refusals: tests/test_resume.py."""

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


def test_effective_attention_with_per_channel_decay_reproduces_the_read(model, tokens):
    from writesae_plugin.experiments.write_attribution import layer_effective_attention

    A, v = layer_effective_attention(model, tokens[:, :40], L)
    with torch.no_grad():
        read = layer_cache(model, tokens[:, :40])["hook_read"]
    assert (torch.einsum("bhts,bshv->bthv", A, v.float()) - read).abs().max() <= 1e-5

"""GLA adapter (flash-linear-attention ``GatedLinearAttention``) on a tiny real fla ``GLAForCausalLM`` loaded through
transformers' Auto class (shared key/value heads, short convs, fused gated output norm): what is particular to GLA:
capture (bit-identical logits), per-token reference parity (per-channel decay, no erase; fla's value-first cache
state), its kernels, query and decay edits, gradients, bad input. The contract every family meets (decode, exact
edits, hooks, nnsight, a spliced WriteSAE, the self-check and every experiment command):
tests/test_family_contract.py."""

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


def test_bad_inputs_raise_clear_errors(model, tokens):
    with pytest.raises(HookNameError, match="valid names"):
        model.run_with_cache(tokens, names_filter=["blocks.3.linear_attn.hook_write"])
    with pytest.raises(ValueError, match="not a GLA layer"):
        with model.edits([WriteEdit(layer=5, pos=3, head=0, op="delete")]):
            pass
    with pytest.raises(ValueError, match="one mode"):
        with model.edits([WriteEdit(layer=L, pos=3, head=1, op="delete", mode="delta")]):
            pass
    with pytest.raises(ValueError, match="one mode: with no erase .*use write_mode='raw'"):
        with model.options(write_mode="delta"):
            model(tokens)
    mask = torch.ones_like(tokens)
    mask[1, :7] = 0
    with pytest.raises(NotImplementedError, match="padded rows"):
        model(tokens, attention_mask=mask)


def test_effective_attention_with_per_channel_decay_reproduces_the_read(model, tokens):
    from writesae_plugin.experiments.write_attribution import layer_effective_attention

    A, v = layer_effective_attention(model, tokens[:, :40], L)
    with torch.no_grad():
        read = layer_cache(model, tokens[:, :40])["hook_read"]
    assert (torch.einsum("bhts,bshv->bthv", A, v.float()) - read).abs().max() <= 1e-5

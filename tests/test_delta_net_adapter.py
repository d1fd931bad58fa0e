"""DeltaNet adapter (flash-linear-attention ``DeltaNet``) on a tiny real fla ``DeltaNetForCausalLM`` loaded through
transformers' Auto class: what is particular to DeltaNet: capture (bit-identical logits), per-token reference
parity (the gated delta rule with a zero log decay), delta writes, query and decay edits, gradients, bad input, and
the CPU routing of fla's triton kernels (each torch function against a readable reference). The contract every
family meets (decode, exact edits, hooks, nnsight, a spliced WriteSAE, the self-check and every experiment command):
tests/test_family_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny_fla_models import make_tiny_deltanet, require_fla

require_fla()

import writesae_plugin  # noqa: E402,F401  (registers the SAE architecture)
from writesae_plugin.adapters import (HookNameError, StateCapture, UnsupportedModelError,  # noqa: E402
                                      WriteEdit, hook_model)
from writesae_plugin.adapters import fla_cpu  # noqa: E402
from writesae_plugin.adapters.reference import gated_deltanet_reference  # noqa: E402

L = 1
P = f"blocks.{L}.linear_attn."
H, DK, DV = 4, 16, 32


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_deltanet(tmp_path_factory.mktemp("deltanet") / "m")


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
    return gated_deltanet_reference(c["hook_query"], c["hook_write_key"], c["hook_v"], c["hook_log_decay"],
                                    c["hook_beta"], **kw)


@pytest.mark.parametrize("T", [70, 20], ids=["chunk-kernel", "recurrent-kernel"])
def test_capture_is_bit_identical_and_matches_the_reference(hf, model, tokens, T):
    ids = tokens[:, :T]
    with torch.no_grad():
        plain = hf(input_ids=ids, use_cache=True)
        with model.options(materialize_writes=True, capture_states=StateCapture("all")):
            out, cache = model.run_with_cache(ids, return_type="hf")
    assert torch.equal(out.logits, plain.logits)
    assert model.cfg.family == "delta_net" and model.cfg.recurrent_layers == (0, 1, 2)
    assert (model.cfg.n_heads, model.cfg.n_key_heads, model.cfg.d_k, model.cfg.d_v) == (H, H, DK, DV)
    for layer in model.cfg.recurrent_layers:
        c = {k.rsplit(".", 1)[-1]: v for k, v in cache.items() if k.startswith(f"blocks.{layer}.")}
        assert c["hook_write_flat"].shape == (2, T, H * DK * DV)
        assert torch.equal(c["hook_log_decay"], torch.zeros(2, T, H))  # DeltaNet does not decay
        ref = reference_of(c, return_states=True)
        assert c["hook_read"].abs().max() > 0.02  # reads well above the tolerance
        assert (ref.read - c["hook_read"]).abs().max() <= 1e-5
        assert (ref.states - c["hook_state"]).abs().max() <= 1e-5
        final = out.past_key_values[layer]["recurrent_state"]  # fla's cache: [b, H, d_k, d_v], key-first
        assert (ref.final_state - final).abs().max() <= 1e-5
        assert torch.equal(c["hook_write"], torch.einsum("bthk,bthv->bthkv", c["hook_write_key"],
                                                         c["hook_write_value"]))
        assert torch.equal(c["hook_write_key"], fla_cpu.fla_l2norm(c["hook_k"]))  # the kernel's own norm
        assert torch.allclose(c["hook_write_value"], c["hook_beta"][..., None] * c["hook_v"])
        assert torch.allclose(c["hook_query"], fla_cpu.fla_l2norm(c["hook_q"]) * DK ** -0.5)
    # the native key is what the layer hands the kernel: k_proj, short conv, SiLU
    attn = hf.model.layers[L].attn
    with torch.no_grad():
        x = hf.model.layers[L].attn_norm(model.residual_before(ids, L))
        k = F.silu(F.conv1d(attn.k_proj(x).transpose(1, 2), attn.k_conv1d.weight, padding=3,
                            groups=attn.key_dim)[..., :T]).transpose(1, 2)
        beta = attn.b_proj(x).sigmoid()
    c = layer_cache(model, ids)
    assert (c["hook_k"] - k.reshape(2, T, H, DK)).abs().max() <= 1e-6
    assert (c["hook_beta"] - beta).abs().max() <= 1e-6


def test_delta_value_is_the_increment_over_the_previous_state(model, tokens):
    with torch.no_grad(), model.options(write_mode="delta", capture_states=StateCapture("all")):
        c = layer_cache(model, tokens)
    assert (reference_of(c).delta_value - c["hook_write_value"]).abs().max() <= 1e-5
    S = c["hook_state"]
    dense = torch.einsum("bthk,bthv->bthkv", c["hook_write_key"], c["hook_write_value"])
    assert (S[:, 1:] - S[:, :-1] - dense[:, 1:]).abs().max() <= 1e-5  # S_t - S_{t-1} == k^ delta^T


def test_query_and_decay_edits_change_read_and_transitions(model, tokens):
    with torch.no_grad():
        clean = layer_cache(model, tokens)
        g2 = clean["hook_log_decay"].clone()
        g2[0, 30:40, 1] = -0.5  # head 1 of row 0 forgets over a span
        q2 = clean["hook_query"].clone()
        q2[1, 50] = -q2[1, 50]
        with model.hooks(fwd_hooks=[(P + "hook_log_decay", lambda x, hook: g2.clone()),
                                    (P + "hook_query", lambda x, hook: q2.clone())]):
            edited = layer_cache(model, tokens)
    ref = gated_deltanet_reference(q2, clean["hook_write_key"], clean["hook_v"], g2, clean["hook_beta"])
    assert (ref.read - edited["hook_read"]).abs().max() <= 1e-5
    assert (edited["hook_read"][0, :30] - clean["hook_read"][0, :30]).abs().max() <= 1e-6
    assert (edited["hook_read"][0, 30:, 1] - clean["hook_read"][0, 30:, 1]).abs().max() > 1e-3


def test_gradients_of_the_write_value_equal_the_adjoint_of_the_reference(model, tokens):
    """d(sum of layer L's reads . R)/d(write value) through the hooks equals autograd through the reference with
    the writes replaced (raw mode: the transitions, erase included, stay the model's)."""
    ids = tokens[:, :16]
    R = torch.randn(2, 16, H, DV, generator=torch.Generator().manual_seed(6))
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
    wv = c["hook_write_value"].clone().requires_grad_(True)
    writes = {(i, t, h): (torch.outer(c["hook_write_key"][i, t, h], wv[i, t, h]), "raw")
              for i in range(2) for t in range(16) for h in range(H)}
    (reference_of(c, write_edits=writes).read * R).sum().backward()
    assert grads["v"].abs().max() > 1e-3
    assert (grads["v"] - wv.grad).abs().max() <= 1e-5


def test_bad_inputs_raise_clear_errors(model, tokens):
    with pytest.raises(HookNameError, match="valid names"):
        model.run_with_cache(tokens, names_filter=["blocks.3.linear_attn.hook_write"])
    with pytest.raises(ValueError, match="not a DeltaNet layer"):
        with model.edits([WriteEdit(layer=5, pos=3, head=0, op="delete")]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with model.edits([WriteEdit(layer=L, pos=3, head=4, op="delete")]):
            pass
    with pytest.raises(ValueError, match="must keep its shape"):
        model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_log_decay", lambda x, hook: x[..., 0])])
    mask = torch.ones_like(tokens)
    mask[1, :7] = 0
    with pytest.raises(NotImplementedError, match="padded rows"):
        model(tokens, attention_mask=mask)
    with torch.no_grad():  # an all-ones mask (fla packs the rows) is a plain batch
        assert (model(tokens, attention_mask=torch.ones_like(tokens)) - model(tokens)).abs().max() <= 1e-5


def test_unhookable_fla_models_get_an_error_listing_the_supported_families():
    require_fla()
    from fla.models import RWKV6Config
    from transformers import AutoModelForCausalLM

    rwkv = AutoModelForCausalLM.from_config(RWKV6Config(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                                        num_heads=2))
    with pytest.raises(UnsupportedModelError, match=r"model_type='rwkv6'.*DeltaNet \(fla delta_net\), GLA \(fla gla\), "
                                                    r"RWKV-7 \(fla rwkv7\)"):
        hook_model(rwkv)


def test_fla_does_not_take_over_transformers_mamba2(tmp_path):
    """``import fla`` re-registers transformers' ``mamba2`` type with fla's class; after the routing, transformers'
    own class loads again, and an fla-class Mamba-2 model is refused with what to do."""
    from fla.models import Mamba2Config as FlaMamba2Config
    from transformers import AutoModelForCausalLM, Mamba2Config

    from writesae_plugin.adapters.fla_cpu import keep_transformers_model_types

    cfg = Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=16, state_size=8,
                       n_groups=1, expand=2, chunk_size=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m2")
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "m2")).__module__.startswith("transformers.")
    from transformers import AutoConfig

    AutoConfig.register("mamba2", FlaMamba2Config, exist_ok=True)  # what import fla does
    fla_model = AutoModelForCausalLM.from_pretrained(tmp_path / "m2")
    assert type(fla_model).__module__.startswith("fla.")
    with pytest.raises(UnsupportedModelError, match="flash-linear-attention's class.*route_cpu_to_torch"):
        hook_model(fla_model)
    assert keep_transformers_model_types() == ["mamba2"]
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "m2")).__module__.startswith("transformers.")


def test_gpu_path_calls_fla_kernels_by_fla_argument_names(model, monkeypatch):
    """On a GPU the hook logic calls fla's own ``chunk_delta_rule`` (q=, k=, v=, beta=, no g) unless the decay was
    edited, and edits propagate with fla's ``chunk_gated_delta_rule``; checked here with a recording stand-in."""
    from writesae_plugin.adapters import delta_net

    kernels = delta_net.install()
    calls = []

    def fla_like(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, cu_seqlens=None):
        calls.append(sorted(n for n, x in dict(beta=beta, initial_state=initial_state).items() if x is not None))
        return delta_net.torch_delta_rule(q, k, v, beta, initial_state=initial_state,
                                          output_final_state=output_final_state,
                                          use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

    monkeypatch.setitem(kernels.original, delta_net.DN_CHUNK, fla_like)
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 5, H, DK, generator=g), torch.randn(1, 5, H, DK, generator=g), torch.randn(1, 5, H, DV)
    beta = torch.rand(1, 5, H, generator=g)
    o, _ = kernels.main(delta_net.DN_CHUNK, torch.device("cuda"))(q, k, v, g=torch.zeros(1, 5, H), beta=beta,
                                                                  use_qk_l2norm_in_kernel=True)
    ref, _ = delta_net.deltanet_kernel(q, k, v, torch.zeros(1, 5, H), beta, use_qk_l2norm_in_kernel=True)
    assert calls == [["beta"]] and torch.equal(o, ref)
    assert kernels.main(delta_net.DN_CHUNK, torch.device("cpu")) is delta_net.deltanet_kernel


# ---------------------------------------------------------------------------------------- the CPU routing
def test_routed_norms_swiglu_and_convs_match_readable_references():
    g = torch.Generator().manual_seed(1)
    x, r, w, b = (torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 24, generator=g),
                  torch.randn(24, generator=g), torch.randn(24, generator=g))
    y, res = fla_cpu.torch_layer_norm(x, w, None, r, 1e-6, prenorm=True, is_rms_norm=True)
    assert torch.allclose(y, F.rms_norm(x + r, (24,), w, 1e-6), atol=1e-6) and torch.equal(res, x + r)
    assert torch.allclose(fla_cpu.torch_layer_norm(x, w, b, eps=1e-5), F.layer_norm(x, (24,), w, b, 1e-5), atol=1e-5)
    gn = fla_cpu.torch_layer_norm(x, w, b, eps=1e-5, num_groups=4)
    ref = F.group_norm(x.reshape(15, 24), 4, w, b, 1e-5).reshape(3, 5, 24)
    assert torch.allclose(gn, ref, atol=1e-5)
    z = torch.randn(3, 5, 24, generator=g)
    assert torch.allclose(fla_cpu.torch_norm_gated(x, z, w, None), F.rms_norm(x, (24,), w, 1e-6) * F.silu(z),
                          atol=1e-6)
    assert torch.allclose(fla_cpu.torch_swiglu(x, z), F.silu(x) * z)
    # the short conv: nn.Conv1d with left padding W - 1; prefill in two parts and token-by-token decode agree
    conv = torch.nn.Conv1d(24, 24, 4, padding=3, groups=24, bias=True)
    with torch.no_grad():
        full = F.silu(conv(x.transpose(1, 2))[..., :5]).transpose(1, 2)
        weight = conv.weight[:, 0]
        y1, s1 = fla_cpu.torch_causal_conv1d(x[:, :2], weight, conv.bias, output_final_state=True, activation="silu")
        y2, _ = fla_cpu.torch_causal_conv1d(x[:, 2:], weight, conv.bias, initial_state=s1, activation="silu")
        assert torch.allclose(torch.cat([y1, y2], 1), full, atol=1e-6)
        cache, steps = torch.zeros(3, 24, 4), []
        for t in range(5):
            y_t, cache = fla_cpu.torch_causal_conv1d_update(x[:, t:t + 1], cache, None, weight, conv.bias, "silu")
            steps.append(y_t)
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-6)
        packed, _ = fla_cpu.torch_causal_conv1d(x[:1, :3].reshape(1, 3, 24).repeat(1, 2, 1), weight, conv.bias,
                                                activation="silu", cu_seqlens=torch.tensor([0, 3, 6]))
        assert torch.equal(packed[:, :3], packed[:, 3:])


def test_a_plain_cpu_qwen35_fails_with_fla_installed_until_routed_then_runs_transformers_torch_path():
    """transformers' behaviour with fla importable, in a fresh process (the test session is routed): a plain CPU
    forward of a Gated DeltaNet model fails in fla's triton kernel; after ``route_cpu_to_torch()`` it runs, with the
    logits of transformers' own torch kernel (the pure function, called directly)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import inspect, sys, warnings
        warnings.filterwarnings("ignore")
        import torch
        sys.path.insert(0, "tests")
        from tiny_models import build_tiny_model
        import transformers.models.qwen3_5.modeling_qwen3_5 as mq
        m = build_tiny_model("qwen3_5", n_layers=2)
        ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                m(ids)
            print("PLAIN-RAN")
        except Exception as e:
            print("PLAIN-FAILED", type(e).__name__)
        from writesae_plugin.adapters import route_cpu_to_torch
        assert route_cpu_to_torch()
        with torch.no_grad():
            routed = m(ids).logits
        pure = inspect.unwrap(mq.torch_chunk_gated_delta_rule.__wrapped_by_writesae__)
        mq.torch_chunk_gated_delta_rule = pure  # transformers' torch function itself, as without fla
        with torch.no_grad():
            print("ROUTED-EQUALS-TORCH", torch.equal(routed, m(ids).logits))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "PLAIN-FAILED" in out.stdout and "ROUTED-EQUALS-TORCH True" in out.stdout, out.stdout + out.stderr[-2000:]


def test_gpu_tensors_keep_fla_kernels_and_routes_are_installed_once():
    from fla.modules.norm import layernorm

    route = layernorm.rms_norm
    assert route.__writesae_cpu_route__ is route.__wrapped__  # the original is kept for other devices
    calls = []
    routed = fla_cpu.cpu_router(lambda *a, **k: calls.append("fla") or "fla", lambda *a, **k: "torch")
    assert routed(torch.zeros(1)) == "torch" and routed(torch.zeros(1, device="meta")) == "fla"
    assert fla_cpu.route_cpu_to_torch() and layernorm.rms_norm is route  # idempotent


def test_effective_attention_reproduces_the_read(model, tokens):
    from writesae_plugin.experiments.write_attribution import layer_effective_attention

    A, v = layer_effective_attention(model, tokens[:, :40], L)
    with torch.no_grad():
        read = layer_cache(model, tokens[:, :40])["hook_read"]
    assert (torch.einsum("bhts,bshv->bthv", A, v.float()) - read).abs().max() <= 1e-5

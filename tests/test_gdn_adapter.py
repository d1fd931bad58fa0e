"""Gated DeltaNet adapter: capture, reference parity, decode, exact edits, bad input (docs/method.md 1-4)."""

from __future__ import annotations

import pytest
import torch

from conftest import GDN_FAMILIES, SAFE_VOCAB, load_tiny
from writesae_plugin.adapters import (HookNameError, StateCapture, UnsupportedModelError, WriteEdit,
                                      hook_model)
from writesae_plugin.adapters.reference import gated_deltanet_reference, l2_normalize

NATIVE = ("hook_q", "hook_k", "hook_v", "hook_beta")
L = 1  # a GDN layer of the tiny models (layer 3 is attention)


def layer_cache(model, tokens, layer=L, **kw):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(f"blocks.{layer}."), **kw)
    return {k.rsplit(".", 1)[-1]: v for k, v in cache.items()}


def reference_of(c, **kw):
    return gated_deltanet_reference(c["hook_query"], c["hook_write_key"], c["hook_v"], c["hook_log_decay"],
                                    c["hook_beta"], **kw)


def final_states(out, layer=L):
    return out.past_key_values.layers[layer].recurrent_states[0]


# ------------------------------------------------------------------------------------------ capture
@pytest.mark.parametrize("family,layout", GDN_FAMILIES)
def test_capture_is_bit_identical_and_matches_reference(tiny_dir, family, layout):
    hf = load_tiny(tiny_dir, family, layout)
    tokens = torch.randint(0, SAFE_VOCAB, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = hf(input_ids=tokens, use_cache=True)
        model = hook_model(hf)
        with model.options(materialize_writes=True, capture_states=StateCapture("all")):
            out, cache = model.run_with_cache(tokens, return_type="hf")
    assert torch.equal(out.logits, plain.logits)
    layers = model.cfg.recurrent_layers
    assert len(layers) >= 2 and all(f"blocks.{l}.linear_attn.hook_write" in cache for l in layers)
    for l in layers:
        c = {k.rsplit(".", 1)[-1]: v for k, v in cache.items() if k.startswith(f"blocks.{l}.")}
        H, d_k, d_v = model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v
        assert c["hook_write_key"].shape == (2, 70, H, d_k) and c["hook_write_value"].shape == (2, 70, H, d_v)
        assert c["hook_write_flat"].shape == (2, 70, H * d_k * d_v)
        ref = reference_of(c, return_states=True)
        assert (ref.read - c["hook_read"]).abs().max() <= 1e-5
        assert (ref.final_state - final_states(out, l)).abs().max() <= 1e-5
        assert (ref.states - c["hook_state"]).abs().max() <= 1e-5
        dense = torch.einsum("bthk,bthv->bthkv", c["hook_write_key"], c["hook_write_value"])
        assert torch.equal(c["hook_write"], dense)
        # the write factors are (k^, beta v), k^ = the kernel's l2norm of k, repeated per value head
        beta_v = c["hook_beta"][..., None] * c["hook_v"]
        assert torch.allclose(c["hook_write_value"], beta_v)
        k_hat = l2_normalize(c["hook_k"]).repeat_interleave(H // model.cfg.n_key_heads, dim=2)
        assert torch.equal(c["hook_write_key"], k_hat)


def test_head_sharing_keys_are_repeated_per_value_head(qwen, tokens):
    model = hook_model(qwen)
    with torch.no_grad():
        c = layer_cache(model, tokens)
    k = c["hook_write_key"]
    assert model.cfg.n_key_heads == 2 and model.cfg.n_heads == 4
    assert torch.equal(k[:, :, 0], k[:, :, 1]) and torch.equal(k[:, :, 2], k[:, :, 3])
    assert not torch.equal(k[:, :, 1], k[:, :, 2])


def test_delta_mode_value_is_the_actual_increment(qwen, tokens):
    model = hook_model(qwen)
    with torch.no_grad(), model.options(write_mode="delta", capture_states=StateCapture("all")):
        c = layer_cache(model, tokens)
    ref = reference_of(c)
    assert (ref.delta_value - c["hook_write_value"]).abs().max() <= 1e-5
    # S_t - alpha_t S_{t-1} == k^ delta^T
    S = c["hook_state"]
    alpha = c["hook_log_decay"].exp()[..., None, None]
    inc = S[:, 1:] - alpha[:, 1:] * S[:, :-1]
    dense = torch.einsum("bthk,bthv->bthkv", c["hook_write_key"], c["hook_write_value"])
    assert (inc - dense[:, 1:]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------ decode, padding
def test_prefill_then_decode_equals_full_forward(qwen, tokens):
    model = hook_model(qwen)
    seen = []
    with torch.no_grad():
        full, full_cache = model.run_with_cache(tokens)
        with model.hooks(fwd_hooks=[(f"blocks.{L}.linear_attn.hook_write_key", lambda x, hook: seen.append(x))]):
            out = model(tokens[:, :50], return_type="hf")
            past = out.past_key_values
            logits = [out.logits]
            for t in range(50, 70):
                out = model(tokens[:, t:t + 1], return_type="hf", past_key_values=past)
                logits.append(out.logits)
            step = model(tokens[:, 66:68], return_type="hf", past_key_values=None)  # fresh short prefill
    assert step.logits.shape[1] == 2
    logits = torch.cat(logits, dim=1)
    assert (logits - full).abs().max() <= 1e-4
    keys = torch.cat(seen[:21], dim=1)
    assert (keys - full_cache[f"blocks.{L}.linear_attn.hook_write_key"]).abs().max() <= 1e-5


def test_left_padding_rows_match_unpadded_runs(qwen):
    model = hook_model(qwen)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, SAFE_VOCAB, (1, 40), generator=g), torch.randint(0, SAFE_VOCAB, (1, 33), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    with torch.no_grad():
        _, c = model.run_with_cache(batch, attention_mask=mask)
        _, cb = model.run_with_cache(b)
    name = f"blocks.{L}.linear_attn.hook_read"
    assert (c[name][1, 7:] - cb[name][0]).abs().max() <= 1e-5
    assert c[f"blocks.{L}.linear_attn.hook_write_value"][1, :7].abs().max() == 0


# ------------------------------------------------------------------------------------------ exact edits
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
def test_functional_edits_equal_edited_recurrence(qwen, tokens, mode):
    model = hook_model(qwen)
    edits, ref_edits = _edits(mode)
    with torch.no_grad():
        clean = layer_cache(model, tokens)
        clean_logits = model(tokens)
        with model.edits(edits):
            edited = layer_cache(model, tokens)
            logits = model(tokens)
    ref = reference_of(clean, write_edits=ref_edits)
    assert (ref.read - edited["hook_read"]).abs().max() <= 1e-5
    # positions before the first edit of a row, and the other row before its edit, change by exactly 0
    assert torch.equal(edited["hook_read"][0, :10], clean["hook_read"][0, :10])
    assert torch.equal(edited["hook_read"][1, :69], clean["hook_read"][1, :69])
    assert torch.equal(logits[0, :10], clean_logits[0, :10]) and torch.equal(logits[1, :69], clean_logits[1, :69])
    assert not torch.allclose(logits[0, 10:], clean_logits[0, 10:])


def test_single_edits_compose_additively(qwen, tokens):
    model = hook_model(qwen)
    e1, e2 = _edits("raw")[0][:2]
    with torch.no_grad():
        clean = layer_cache(model, tokens)["hook_read"]
        r1 = model_read(model, tokens, [e1]) - clean
        r2 = model_read(model, tokens, [e2]) - clean
        r12 = model_read(model, tokens, [e1, e2]) - clean
    assert (r12 - (r1 + r2)).abs().max() <= 1e-5  # linearity of the state in the writes (raw mode)


def model_read(model, tokens, edits):
    with model.edits(edits):
        return layer_cache(model, tokens)["hook_read"]


def test_replacing_a_write_by_itself_is_a_no_op(qwen, tokens):
    model = hook_model(qwen)
    with torch.no_grad():
        c = layer_cache(model, tokens)
        clean = model(tokens)
        W = torch.outer(c["hook_write_key"][0, 20, 1], c["hook_write_value"][0, 20, 1])
        same = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=20, head=1, batch=0, matrix=W)])
        via_hook = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{L}.linear_attn.hook_write_value",
                                                            lambda x, hook: x.clone())])
    assert (same - clean).abs().max() <= 1e-6
    assert torch.equal(via_hook, clean)


@pytest.mark.parametrize("mode", ["raw", "delta"])
def test_hook_edits_equal_functional_edits(qwen, tokens, mode):
    model = hook_model(qwen)
    g = torch.Generator().manual_seed(9)
    u, w = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def edit_factors(x, hook):
        if hook.name.endswith("hook_write_key"):
            x[0, 30, 2] = u
        else:
            x[0, 30, 2] = w
        return x

    def edit_dense(x, hook):
        x[0, 30, 2] = torch.outer(u, w)
        return x

    prefix = f"blocks.{L}.linear_attn."
    with torch.no_grad(), model.options(write_mode=mode):
        functional = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=30, head=2, batch=0, key=u, value=w,
                                                             mode=mode)])
        factors = model.run_with_hooks(tokens, fwd_hooks=[(prefix + "hook_write_key", edit_factors),
                                                          (prefix + "hook_write_value", edit_factors)])
        with model.options(materialize_writes=True):
            dense = model.run_with_hooks(tokens, fwd_hooks=[(prefix + "hook_write", edit_dense)])
    assert (factors - functional).abs().max() <= 1e-5
    assert (dense - functional).abs().max() <= 1e-5


def test_add_and_state_edit_act_as_extra_writes(qwen, tokens):
    model = hook_model(qwen)
    g = torch.Generator().manual_seed(11)
    D = torch.randn(16, 16, generator=g)
    with torch.no_grad():
        clean = layer_cache(model, tokens)

        def edit_state(x, hook):
            x[1, 0, 0] += D  # heads=[3] -> axis 2 holds head 3 only
            return x

        with model.options(capture_states=StateCapture([25], heads=[3])):
            via_state = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{L}.linear_attn.hook_state",
                                                                 edit_state)])
            with model.edits([WriteEdit(layer=L, pos=25, head=3, batch=1, op="add", matrix=D)]):
                via_add = model(tokens)
                edited = layer_cache(model, tokens)
    ref = reference_of(clean, extra_writes={(1, 25, 3): D})
    assert (ref.read - edited["hook_read"]).abs().max() <= 1e-5
    assert (via_state - via_add).abs().max() <= 1e-5
    assert edited["hook_state"].shape == (2, 1, 1, 16, 16)


def test_states_reflect_write_edits(qwen, tokens):
    model = hook_model(qwen)
    edits, ref_edits = _edits("raw")
    with torch.no_grad(), model.options(capture_states=StateCapture([5, 45, -1])):
        clean = layer_cache(model, tokens)
        with model.edits(edits):
            edited = layer_cache(model, tokens)
    ref = reference_of(clean, write_edits=ref_edits, return_states=True)
    assert (ref.states[:, [5, 45, 69]] - edited["hook_state"]).abs().max() <= 1e-5


@pytest.mark.parametrize("pos,head", [(12, 0), (57, 2)], ids=["edit-in-prefill", "edit-in-decode"])
def test_edits_across_prefill_and_decode_match_full_forward(qwen, tokens, pos, head):
    model = hook_model(qwen)
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


def test_edits_are_differentiable(qwen, tokens):
    model = hook_model(qwen)
    u = torch.randn(16, requires_grad=True)
    w = torch.randn(16)
    logits = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=30, head=1, key=u, value=w, batch=0)])
    logits[0, -1].logsumexp(-1).backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors(qwen, tokens):
    model = hook_model(qwen)
    with pytest.raises(HookNameError, match="valid names"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.linear_attn.hook_writ", lambda x, hook: x)])
    with pytest.raises(HookNameError, match="valid names"):
        model.run_with_cache(tokens, names_filter=["blocks.3.linear_attn.hook_write"])  # layer 3 is attention
    with pytest.raises(ValueError, match=r"shapes \[16\] and \[16\]"):
        with model.edits([WriteEdit(layer=L, pos=3, head=0, key=torch.zeros(15), value=torch.zeros(16))]):
            pass
    with pytest.raises(ValueError, match="not a Gated DeltaNet layer"):
        with model.edits([WriteEdit(layer=3, pos=3, head=0, op="delete")]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with model.edits([WriteEdit(layer=L, pos=3, head=4, op="delete")]):
            pass
    with pytest.raises(ValueError, match="batch"):
        model.run_with_edits(tokens, [WriteEdit(layer=L, pos=3, head=0, batch=2, op="delete")])
    with pytest.raises(RuntimeError, match=r"never reached.*covered positions \[0, \d+\); position 70 is past the end"):
        model.run_with_edits(tokens, [WriteEdit(layer=L, pos=70, head=0, op="delete")])
    with pytest.raises(RuntimeError, match="no forward call ran in the block"):
        with model.edits([WriteEdit(layer=L, pos=1, head=0, op="delete")]):
            pass
    with pytest.raises(ValueError, match="non-negative"):
        WriteEdit(layer=L, pos=-1, head=0, op="delete")
    with pytest.raises(ValueError, match="NaN"):
        WriteEdit(layer=L, pos=1, head=0, matrix=torch.full((16, 16), float("nan"))).atom(16, 16)
    with pytest.raises(ValueError, match="must keep its shape"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{L}.linear_attn.hook_write_key",
                                                 lambda x, hook: x[:, :, :2])])
    with pytest.raises(ValueError, match="NaN"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{L}.linear_attn.hook_write_value",
                                                 lambda x, hook: x * float("nan"))])
    with pytest.raises(ValueError, match="write mode"):
        model.set_write_mode("dense")
    with pytest.raises(ValueError, match="out of range"), model.options(capture_states=StateCapture([99])):
        model(tokens)


def test_unsupported_model_names_supported_families(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    llama = LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="qwen3_5.*qwen3_next.*olmo_hybrid"):
        hook_model(llama)
    with pytest.raises(TypeError):
        hook_model("Qwen/Qwen3.5-0.8B")


# ------------------------------------------------------------------------------------------ kernels
def test_cpu_uses_pure_torch_kernel_even_if_fla_is_bound(qwen, tokens, monkeypatch):
    from writesae_plugin.adapters import gated_deltanet as gdn

    model = hook_model(qwen)
    kernels = gdn._INSTALLED[model.family.module_name]

    def triton_only(*a, **k):
        raise RuntimeError("0 active drivers")  # what fla's triton kernel does on CPU

    with torch.no_grad():
        clean = model(tokens)
        monkeypatch.setitem(kernels.original, gdn.CHUNK, triton_only)
        monkeypatch.setitem(kernels.original, gdn.RECURRENT, triton_only)
        again = model(tokens)
    assert torch.equal(clean, again)


def test_replaced_layer_forward_is_refused(tiny_dir, tokens):
    import types

    hf = load_tiny(tiny_dir, "qwen3_5")
    mixer = hf.model.layers[0].linear_attn
    mixer.forward = types.MethodType(lambda self, hidden_states, **kw: torch.zeros_like(hidden_states), mixer)
    with pytest.raises(UnsupportedModelError, match="use_kernels"):
        hook_model(hf)
    hf2 = load_tiny(tiny_dir, "qwen3_5")
    model = hook_model(hf2)
    mixer = hf2.model.layers[0].linear_attn
    mixer.forward = types.MethodType(lambda self, hidden_states, **kw: torch.zeros_like(hidden_states), mixer)
    with pytest.raises(RuntimeError, match="without calling the gated delta rule"):
        model(tokens)


def test_factor_capture_never_materialises_dense_writes(qwen):
    from writesae_plugin.profiling import LargestTensor

    model = hook_model(qwen)
    tokens = torch.randint(0, SAFE_VOCAB, (2, 256))
    dense_numel = 2 * 256 * 4 * 16 * 16
    names = lambda n: "hook_write_" in n or n.endswith("hook_read")  # noqa: E731
    with torch.no_grad():
        with LargestTensor() as probe:
            model.run_with_cache(tokens, names_filter=names)
        factored = probe.largest
        with LargestTensor() as probe, model.options(materialize_writes=True):
            model.run_with_cache(tokens, names_filter=names)
        dense = probe.largest
    assert factored < dense_numel <= dense


@pytest.mark.parametrize("family,layout", GDN_FAMILIES)
def test_edits_are_exact_in_every_family(tiny_dir, family, layout):
    model = hook_model(load_tiny(tiny_dir, family, layout))
    tokens = torch.randint(0, SAFE_VOCAB, (2, 70), generator=torch.Generator().manual_seed(4))
    layer = model.cfg.recurrent_layers[-1]
    edits = [WriteEdit(layer=layer, pos=66, head=3, batch=1, op="delete", mode="delta"),
             WriteEdit(layer=layer, pos=20, head=0, batch=1, matrix=torch.ones(16, 16))]
    with torch.no_grad():
        clean = layer_cache(model, tokens, layer)
        with model.edits(edits):
            edited = layer_cache(model, tokens, layer)
    if family == "olmo_hybrid":  # beta = 2 sigmoid(b): the negative-eigenvalue range is exercised
        assert clean["hook_beta"].max() > 1.0
    ref = reference_of(clean, write_edits={(1, 66, 3): (torch.zeros(16, 16), "delta"),
                                           (1, 20, 0): (torch.ones(16, 16), "raw")})
    assert (ref.read - edited["hook_read"]).abs().max() <= 1e-5
    assert torch.equal(edited["hook_read"][0], clean["hook_read"][0])


def test_query_and_log_decay_edits_change_read_and_transitions(qwen, tokens):
    model = hook_model(qwen)
    with torch.no_grad():
        clean = layer_cache(model, tokens)
        g2 = clean["hook_log_decay"].clone()
        g2[0, 30:40] = 0.0  # no decay over a span
        q2 = clean["hook_query"].clone()
        q2[1, 50] = -q2[1, 50]
        hooks = [(f"blocks.{L}.linear_attn.hook_log_decay", lambda x, hook: g2.clone()),
                 (f"blocks.{L}.linear_attn.hook_query", lambda x, hook: q2.clone())]
        with model.hooks(fwd_hooks=hooks):
            edited = layer_cache(model, tokens)
    ref = gated_deltanet_reference(q2, clean["hook_write_key"], clean["hook_v"], g2, clean["hook_beta"])
    assert (ref.read - edited["hook_read"]).abs().max() <= 1e-5
    # a transition/read edit re-runs the layer's kernel on canonical inputs: equal to rounding before t=30
    assert (edited["hook_read"][0, :30] - clean["hook_read"][0, :30]).abs().max() <= 1e-6


def test_edits_work_under_inference_mode(qwen, tokens):
    """Inference tensors track no version counter: edits are then found by comparison."""
    model = hook_model(qwen)
    with torch.no_grad():
        ref = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{L}.linear_attn.hook_write_value",
                                                       lambda x, hook: x.mul_(0.5))])
        clean = model(tokens)
    with torch.inference_mode():
        inplace = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{L}.linear_attn.hook_write_value",
                                                           lambda x, hook: x.mul_(0.5))])
        plain = model(tokens)
    assert torch.equal(inplace, ref) and not torch.equal(inplace, clean)
    assert torch.equal(plain, clean)


def test_bound_kernel_is_called_the_way_fla_names_its_arguments(qwen, tokens, monkeypatch):
    """On a GPU transformers binds fla's kernels, which take ``q, k, v`` (not ``query=``) and no ``chunk_size``:
    the adapter passes q, k, v by position and only the arguments HF itself passed."""
    from writesae_plugin.adapters import gated_deltanet as gdn

    model = hook_model(qwen)
    kernels = gdn._INSTALLED[model.family.module_name]
    calls = []

    def fla_like(name):
        pure = kernels.pure[name]

        def kernel(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                   use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):  # fla 0.6's signature
            calls.append(name)
            return pure(q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=output_final_state,
                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
        return kernel

    edit = WriteEdit(layer=L, pos=5, head=1, op="delete")
    with torch.no_grad():
        clean, edited = model(tokens), model.run_with_edits(tokens, [edit])
        monkeypatch.setattr(kernels, "main", lambda name, device: fla_like(name))
        assert torch.equal(model(tokens), clean) and torch.equal(model.run_with_edits(tokens, [edit]), edited)
    assert gdn.CHUNK in calls


def test_key_heads_repeated_before_the_kernel_name_the_transformers_version(qwen, tokens, monkeypatch):
    """transformers < 5.23 repeats the key heads to the value heads before calling the kernel."""
    import sys

    from writesae_plugin.adapters import gated_deltanet as gdn

    model = hook_model(qwen)
    module = sys.modules[model.family.module_name]
    dispatch, rep = getattr(module, gdn.CHUNK), model.cfg.n_heads // model.cfg.n_key_heads
    assert rep > 1

    def old_transformers(query, key, value, **kw):
        return dispatch(query.repeat_interleave(rep, dim=2), key.repeat_interleave(rep, dim=2), value, **kw)

    monkeypatch.setattr(module, gdn.CHUNK, old_transformers)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"transformers >= 5\.23"):
        model(tokens)


def test_kernel_calls_allocate_on_the_kernel_device():
    from writesae_plugin.adapters.gated_deltanet import on_device_of

    with on_device_of((torch.empty(2, device="meta"),), {}):
        assert torch.zeros(3).device.type == "meta"
    with on_device_of((), {"x": torch.empty(2)}):
        assert torch.zeros(3).device.type == "cpu"

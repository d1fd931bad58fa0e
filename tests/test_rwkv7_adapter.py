"""RWKV-7 adapter (flash-linear-attention ``RWKV7Attention``) on a tiny real fla ``RWKV7ForCausalLM`` loaded through
transformers' Auto class (fused norms, token shift, LoRA gates, the v_first value residual, the output correction):
what is particular to RWKV-7: capture (bit-identical logits), per-token reference parity (the DPLR transition:
per-channel decay and the a . kk^ erase), the CPU routes of fla's RWKV-7 kernels, scan and kernel propagation,
transition and query edits, v_first under an edit, gradients, effective attention, bad input. The contract every
family meets (decode, exact edits, hooks, nnsight, a spliced WriteSAE, the self-check and every experiment command):
tests/test_family_contract.py."""

from __future__ import annotations

import pytest
import torch

from tiny_fla_models import make_tiny_rwkv7, require_fla

require_fla()

import writesae_plugin  # noqa: E402,F401  (registers the SAE architecture)
from writesae_plugin.adapters import HookNameError, StateCapture, WriteEdit, hook_model  # noqa: E402
from writesae_plugin.adapters.rwkv7 import (dplr_scan, rwkv7_kernel, rwkv7_reference,  # noqa: E402
                                            torch_rwkv7)

L = 1
P = f"blocks.{L}.linear_attn."
H, DK, DV = 4, 16, 16


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_rwkv7(tmp_path_factory.mktemp("rwkv7") / "m")


@pytest.fixture(scope="module")
def model(hf):
    return hook_model(hf)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 250, (2, 70), generator=torch.Generator().manual_seed(0))  # 70: past fla's 64


def layer_cache(model, tokens, layer=L, **kw):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(f"blocks.{layer}."), **kw)
    return {k.rsplit(".", 1)[-1]: v for k, v in cache.items()}


def reference_of(c, query=None, log_decay=None, kk=None, a=None, **kw):
    return rwkv7_reference(c["hook_query"] if query is None else query, c["hook_write_key"], c["hook_write_value"],
                           c["hook_log_decay"] if log_decay is None else log_decay, c["hook_kk"] if kk is None else kk,
                           c["hook_a"] if a is None else a, **kw)


@pytest.mark.parametrize("T", [70, 20], ids=["chunk-kernel", "recurrent-kernel"])
def test_capture_is_bit_identical_and_matches_the_reference(hf, model, tokens, T):
    ids = tokens[:, :T]
    with torch.no_grad():  # no grad, T < 64: fla's layer calls fused_mul_recurrent_rwkv7; else chunk_rwkv7
        plain = hf(input_ids=ids, use_cache=True)
        with model.options(materialize_writes=True, capture_states=StateCapture("all")):
            out, cache = model.run_with_cache(ids, return_type="hf")
    assert torch.equal(out.logits, plain.logits)
    assert model.cfg.family == "rwkv7" and model.cfg.recurrent_layers == (0, 1, 2)
    assert (model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v) == (H, DK, DV)
    for layer in model.cfg.recurrent_layers:
        c = {k.rsplit(".", 1)[-1]: v for k, v in cache.items() if k.startswith(f"blocks.{layer}.")}
        w, a = c["hook_log_decay"], c["hook_a"]
        assert w.shape == (2, T, H, DK) and (w < 0).all() and (w >= -0.6066).all()
        assert w.std() > 0.05 and a.std() > 0.05 and a.min() < 0.3 and a.max() > 0.7  # non-trivial decay and erase
        assert torch.allclose(c["hook_kk"].norm(dim=-1), torch.ones(2, T, H), atol=1e-4)
        ref = reference_of(c, return_states=True)
        assert c["hook_read"].abs().max() > 0.1  # reads well above the tolerance
        assert (ref.read - c["hook_read"]).abs().max() <= 1e-5
        assert (ref.states - c["hook_state"]).abs().max() <= 1e-5
        final = out.past_key_values[layer]["recurrent_state"]  # fla's RWKV-7 cache is key-first [b, H, d_k, d_v]
        assert final.shape == (2, H, DK, DV) and (ref.final_state - final).abs().max() <= 1e-5
        assert torch.equal(c["hook_write"], torch.einsum("bthk,bthv->bthkv", c["hook_write_key"],
                                                         c["hook_write_value"]))
        assert torch.equal(c["hook_write_key"], c["hook_k"]) and torch.equal(c["hook_write_value"], c["hook_v"])
        assert torch.equal(c["hook_query"], c["hook_r"]) and torch.equal(c["hook_log_decay"], c["hook_w"])


def test_the_torch_dplr_kernel_equals_the_per_token_reference():
    g = torch.Generator().manual_seed(3)
    b, T, Hh, K, V = 2, 150, 3, 8, 5
    q, k = torch.randn(b, T, Hh, K, generator=g), torch.randn(b, T, Hh, K, generator=g)
    v = torch.randn(b, T, Hh, V, generator=g)
    w = -0.6 * torch.rand(b, T, Hh, K, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(b, T, Hh, K, generator=g), dim=-1)
    a = torch.rand(b, T, Hh, K, generator=g)
    init = torch.randn(b, Hh, K, V, generator=g)
    ref = rwkv7_reference(q, k, v, w, kk, a, initial_state=init)
    o, S = rwkv7_kernel(q, k, v, w, kk, a, init, True)
    assert ref.read.abs().max() > 1.0
    assert (o - ref.read).abs().max() <= 1e-5 and (S - ref.final_state).abs().max() <= 1e-5
    # fla's two entry points on CPU tensors (chunk: a = -kk, b = kk . a; recurrent: kk, a; scale applied to r)
    o1, S1 = torch_rwkv7("chunk_rwkv7")(r=q, w=w, k=k, v=v, a=-kk, b=kk * a, scale=0.5, initial_state=init,
                                         output_final_state=True)
    o2, S2 = torch_rwkv7("fused_mul_recurrent_rwkv7")(q, w, k, v, kk, a, 0.5, init, True)
    ref2 = rwkv7_reference(q * 0.5, k, v, w, kk, a, initial_state=init)
    for o_, S_ in ((o1, S1), (o2, S2)):
        assert (o_ - ref2.read).abs().max() <= 1e-5 and (S_ - ref2.final_state).abs().max() <= 1e-5
    # packed sequences run one at a time
    cu = torch.tensor([0, 40, 150])
    flat = [x[:1].reshape(1, T, *x.shape[2:]) for x in (q, w, k, v, kk, a)]
    o3, S3 = torch_rwkv7("fused_mul_recurrent_rwkv7")(*flat, 1.0, init, True, cu_seqlens=cu)
    o4, _ = dplr_scan(flat[0][:, 40:], flat[2][:, 40:], flat[3][:, 40:], flat[1][:, 40:], -flat[4][:, 40:],
                      flat[4][:, 40:] * flat[5][:, 40:], init[1:2])
    assert torch.equal(o3[:, 40:], o4) and S3.shape == (2, Hh, K, V)


def test_cpu_routes_of_fla_rwkv7_helpers_equal_fla_torch_references():
    """The CPU routes of fla's triton helpers against fla's own pure-torch reference functions."""
    from fla.modules.token_shift import token_shift_ref
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    from writesae_plugin.adapters import fla_cpu

    g = torch.Generator().manual_seed(7)
    x, cache = torch.randn(2, 9, 12, generator=g), torch.randn(2, 12, generator=g)
    y, c = fla_cpu.torch_token_shift(x, output_cache=True)
    assert torch.equal(y, token_shift_ref(x)) and torch.equal(c, x[:, -1])
    y, _ = fla_cpu.torch_token_shift(x, cache=cache, output_cache=True)
    assert torch.equal(y[:, 0], cache - x[:, 0]) and torch.equal(y[:, 1:], token_shift_ref(x)[:, 1:])
    cu = torch.tensor([0, 4, 9])
    assert torch.equal(fla_cpu.torch_token_shift(x[:1], cu_seqlens=cu), token_shift_ref(x[:1], cu))
    k, a, ka = (torch.randn(2, 9, 12, generator=g) for _ in range(3))
    assert torch.equal(fla_cpu.torch_k_rwkv7(k, a, ka), k_update_ref(k, a, ka))
    o, gate = torch.randn(2, 9, 12, generator=g), torch.randn(2, 9, 12, generator=g)
    r, kk, v = (torch.randn(2, 9, 3, 4, generator=g) for _ in range(3))
    rk = torch.randn(3, 4, generator=g)
    assert torch.allclose(fla_cpu.torch_gate_output_correction(o, r, kk, rk, v, gate),
                          gate_output_correction_ref(o, r, kk, rk, v, gate), atol=1e-6)
    assert torch.allclose(fla_cpu.torch_l2_norm(k), torch.nn.functional.normalize(k, dim=-1, eps=1e-12), atol=1e-5)
    mixes = [torch.rand(1, 1, 12, generator=g) for _ in range(6)]
    for mine, theirs in zip(fla_cpu.torch_addcmul_rwkv7(o, gate, *mixes), torch_addcmul_rwkv7(o, gate, *mixes)):
        assert torch.equal(mine, theirs)
    assert torch.equal(fla_cpu.torch_sqrelu_fwd(o), torch.relu(o) ** 2)


def test_gpu_path_calls_fla_chunk_kernel_with_dplr_arguments(monkeypatch):
    """On a GPU the edits propagate with fla's own chunk_rwkv7 (chunk_dplr_delta_rule) given a = -kk^, b = kk^ . a,
    scale 1, initial_state = D and zero keys and values; checked here with a recording stand-in."""
    from writesae_plugin.adapters import rwkv7

    kernels = rwkv7.install()
    calls = []

    def fla_like(**kw):
        calls.append(sorted(kw))
        return torch_rwkv7("chunk_rwkv7")(**kw)

    monkeypatch.setitem(kernels.original, "chunk_rwkv7", fla_like)
    gen = torch.Generator().manual_seed(4)
    q, kk = torch.randn(1, 5, H, DK, generator=gen), torch.nn.functional.normalize(torch.randn(1, 5, H, DK), dim=-1)
    a, w = torch.rand(1, 5, H, DK, generator=gen), -0.5 * torch.rand(1, 5, H, DK, generator=gen)
    D = torch.randn(1, H, DK, DV, generator=gen)
    zk, zv = torch.zeros(1, 5, H, DK), torch.zeros(1, 5, H, DV)
    o, S = kernels.chunk(torch.device("cuda"))(q, zk, zv, w, kk, a, D, True)
    ref = rwkv7_reference(q, zk, zv, w, kk, a, initial_state=D)
    assert calls == [["a", "b", "initial_state", "k", "output_final_state", "r", "scale", "v", "w"]]
    assert (o - ref.read).abs().max() <= 1e-5 and (S - ref.final_state).abs().max() <= 1e-5
    assert kernels.chunk(torch.device("cpu")) is rwkv7_kernel


def test_many_edits_propagate_by_scan_and_by_kernel_alike(model, tokens):
    """Changes at many positions (an SAE spliced everywhere) take the per-token scan over the batch rows; a few take
    the zero-value kernel rows; both equal the reference with the changes as extra writes."""
    hooks = model.blocks[L].linear_attn
    with torch.no_grad():
        c = layer_cache(model, tokens[:, :30])
    g = torch.Generator().manual_seed(12)
    entries = {(bi, t, h): 0.3 * torch.randn(DK, DV, generator=g) for bi, t, h in
               [(0, 3, 1), (1, 3, 2), (0, 17, 0), (1, 29, 3), (0, 20, 1), (0, 20, 2)]}
    out = {m: hooks._propagate_dplr(rwkv7_kernel, entries, 2, 30, c["hook_query"], c["hook_log_decay"], c["hook_kk"],
                                    c["hook_a"], method=m) for m in ("scan", "kernel")}
    ref = reference_of(c, extra_writes=entries, return_states=True)
    clean = reference_of(c, return_states=True)
    for d_read, d_final in out.values():
        assert (d_read - (ref.read - clean.read)).abs().max() <= 1e-5
        assert (d_final - (ref.final_state - clean.final_state)).abs().max() <= 1e-5
        assert torch.equal(d_read[:, :3], torch.zeros(2, 3, H, DV))


def test_transition_and_query_edits_change_read_and_transitions(model, tokens):
    """``hook_log_decay`` and ``hook_query`` edits run the canonical DPLR kernel; native ``hook_kk`` / ``hook_a``
    edits change the erase of the model's own kernel call; all equal the reference with the edited inputs."""
    with torch.no_grad():
        clean = layer_cache(model, tokens)
        g2 = clean["hook_log_decay"].clone()
        g2[0, 30:40, :, :8] = 0.0  # half the key channels stop forgetting over a span
        q2 = clean["hook_query"].clone()
        q2[1, 50] = -q2[1, 50]
        with model.hooks(fwd_hooks=[(P + "hook_log_decay", lambda x, hook: g2.clone()),
                                    (P + "hook_query", lambda x, hook: q2.clone())]):
            edited = layer_cache(model, tokens)
        a2 = clean["hook_a"].clone()
        a2[0, 20:] = 0.0  # no erase from position 20 on
        kk2 = clean["hook_kk"].clone()
        kk2[1, 35, 1] = kk2[1, 35, 1].flip(-1)
        with model.hooks(fwd_hooks=[(P + "hook_a", lambda x, hook: a2.clone()),
                                    (P + "hook_kk", lambda x, hook: kk2.clone())]):
            erased = layer_cache(model, tokens)
    ref = reference_of(clean, query=q2, log_decay=g2)
    assert (ref.read - edited["hook_read"]).abs().max() <= 1e-5
    assert (edited["hook_read"][0, :30] - clean["hook_read"][0, :30]).abs().max() <= 1e-6
    assert (edited["hook_read"][0, 30:] - clean["hook_read"][0, 30:]).abs().max() > 1e-4
    ref = reference_of(clean, kk=kk2, a=a2)
    assert (ref.read - erased["hook_read"]).abs().max() <= 1e-5
    assert torch.equal(erased["hook_read"][0, :20], clean["hook_read"][0, :20])
    assert torch.equal(erased["hook_write_key"], clean["hook_write_key"])  # the write key k~ is the layer's
    assert (erased["hook_read"][0, 20:] - clean["hook_read"][0, 20:]).abs().max() > 1e-4


def test_an_edit_of_layer_0_changes_its_state_only_not_v_first(model, tokens):
    """Layer 0's value is handed to later layers as v_first; an edit of layer 0's write changes layer 0's state
    and reads (and so the later layers' inputs), never the v_first they mix in."""
    seen = {}
    mixer1 = model.family.mixers[1]
    def record(module, args, kwargs):
        seen[len(seen)] = kwargs["v_first"].clone()

    handle = mixer1.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            clean = layer_cache(model, tokens[:, :30], layer=0)
            edit = WriteEdit(layer=0, pos=5, head=1, batch=0, value=torch.zeros(DV),
                             key=clean["hook_write_key"][0, 5, 1])
            with model.edits([edit]):
                edited = layer_cache(model, tokens[:, :30], layer=0)
    finally:
        handle.remove()
    assert torch.equal(seen[0], seen[1])  # v_first as the model computed it
    assert torch.equal(seen[0].reshape(2, 30, H, DV), clean["hook_v"])  # layer 0's own value
    assert (edited["hook_read"][0, 5:] - clean["hook_read"][0, 5:]).abs().max() > 1e-4


def test_gradients_of_the_canonical_hooks_equal_autograd_through_the_reference(model, tokens):
    """d(sum of layer L's reads . R)/d(write value, write key, log decay) through the hooks equals autograd through
    the reference recurrence."""
    ids = tokens[:, :24]
    R = torch.randn(2, 24, H, DV, generator=torch.Generator().manual_seed(6))
    grads = {}

    def keep(x, hook):
        x.register_hook(lambda g: grads.__setitem__(hook.name.rsplit(".", 1)[-1], g))
        return x

    def loss_at_read(x, hook):
        grads["loss"] = (x * R).sum()
        return x

    names = ("hook_write_value", "hook_write_key", "hook_log_decay")
    model.run_with_hooks(ids, fwd_hooks=[*((P + n, keep) for n in names), (P + "hook_read", loss_at_read)])
    grads["loss"].backward()
    with torch.no_grad():
        c = layer_cache(model, ids)
    leaves = {n: c[n].clone().requires_grad_(True) for n in names}
    read = rwkv7_reference(c["hook_query"], leaves["hook_write_key"], leaves["hook_write_value"],
                           leaves["hook_log_decay"], c["hook_kk"], c["hook_a"]).read
    (read * R).sum().backward()
    for n in names:
        assert (grads[n] - leaves[n].grad).abs().max() <= 1e-5, n


def test_bad_inputs_raise_clear_errors(model, tokens):
    with pytest.raises(HookNameError, match="valid names"):
        model.run_with_cache(tokens, names_filter=["blocks.3.linear_attn.hook_write"])
    with pytest.raises(ValueError, match="not a RWKV-7 layer"):
        with model.edits([WriteEdit(layer=5, pos=3, head=0, op="delete")]):
            pass
    with pytest.raises(ValueError, match="one mode"):
        with model.edits([WriteEdit(layer=L, pos=3, head=1, op="delete", mode="delta")]):
            pass
    with pytest.raises(ValueError, match="one mode: .*rank 2.*use write_mode='raw'"):
        with model.options(write_mode="delta"):
            model(tokens)


def test_effective_attention_and_dictionary_scores_on_the_dplr_transitions(model, tokens):
    from writesae_plugin.experiments.write_attribution import dictionary_scores, layer_effective_attention
    from writesae_plugin.sae import WriteSAE, WriteSAEConfig

    ids = tokens[:, :40]
    A, v = layer_effective_attention(model, ids, L)
    with torch.no_grad():
        read = layer_cache(model, ids)["hook_read"]
    assert (torch.einsum("bhts,bshv->bthv", A, v.float()) - read).abs().max() <= 1e-5
    # the adjoint score of an atom = the derivative of the metric along (atom - write) at that position
    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=DK * DV, d_sae=8, d_k=DK, d_v=DV, k=2, n_heads=H, head=2, site="write",
                                  family="rwkv7", layer=L))

    def metric(logits):
        return logits[:, -1, 7].sum()

    scores = dictionary_scores(model, ids, sae, metric)
    eps, pos, atom = 1e-2, 20, 3
    A_i = torch.outer(sae.dec_key[atom, 0].detach(), sae.dec_value[atom, 0].detach())
    with torch.no_grad():
        c = layer_cache(model, ids)
        W = torch.outer(c["hook_write_key"][0, pos, 2], c["hook_write_value"][0, pos, 2])
        base = metric(model(ids[:1]))
        moved = metric(model.run_with_edits(ids[:1], [WriteEdit(layer=L, pos=pos, head=2, batch=0,
                                                                matrix=W + eps * (A_i - W))]))
    assert abs((moved - base).item() / eps - scores[0, pos, atom].item()) <= 0.02 * max(1.0, abs(scores[0, pos, atom]))



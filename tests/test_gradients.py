"""Gradients everywhere (issue 12 item 5): every hook point's output is on the autograd path of the logits.

For every hook of every family (Gated DeltaNet on a tiny Qwen3.5, Kimi Delta Attention on a tiny Kimi Linear,
xLSTM's mLSTM on a tiny xLSTM, Mamba-2 on a tiny Mamba2 and a hybrid, fla's RWKV-7 on a tiny RWKV-7):
nnsight's ``.grad`` inside ``with metric.backward():`` works and equals the gradient TransformerLens backward
hooks give; for the canonical hooks both equal finite differences of an exact edit on one element; the
capture-only logits stay bit-identical to plain HF with autograd on, and the model's parameter gradients
are HF's (a single-token decode step has no backward in plain HF either: the cache is updated in place).
Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) through a hook edit gives the
finite-difference directional derivative.
"""

from __future__ import annotations

import pytest
import torch

from writesae_plugin.adapters import StateCapture, hook_model
from writesae_plugin.experiments.closed_form import eager_attention

GDN_HOOKS = ["hook_q", "hook_k", "hook_v", "hook_beta", "hook_write_key", "hook_write_value", "hook_log_decay",
             "hook_query", "hook_read"]
MAMBA_HOOKS = ["hook_x", "hook_B", "hook_C", "hook_dt", "hook_write_key", "hook_write_value", "hook_log_decay",
               "hook_query", "hook_read"]
XLSTM_HOOKS = ["hook_q", "hook_k", "hook_v", "hook_igate", "hook_fgate", "hook_write_key", "hook_write_value",
               "hook_log_decay", "hook_query", "hook_read"]
RWKV7_HOOKS = ["hook_r", "hook_w", "hook_k", "hook_v", "hook_kk", "hook_a", "hook_write_key", "hook_write_value",
               "hook_log_decay", "hook_query", "hook_read"]
CANONICAL = {"hook_write_key", "hook_write_value", "hook_log_decay", "hook_query", "hook_read", "hook_write",
             "hook_write_flat", "hook_state"}
DENSE = {"hook_write": {"materialize_writes": True}, "hook_write_flat": {"materialize_writes": True},
         "hook_state": {"capture_states": StateCapture([4, 9, 14], heads=[0, 2])}}


def metric(logits):
    return logits[:, -1, 5].sum() - 0.5 * logits[:, -3, 11].sum()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_mamba_models import make_tiny_mamba
    from tiny_models import make_tiny_model
    from tiny_recurrent_models import make_tiny_kimi, make_tiny_xlstm

    from writesae_plugin.adapters.fla_cpu import fla_available

    root = tmp_path_factory.mktemp("grad_models")
    found = {"gdn": make_tiny_model("qwen3_5", root / "qwen"), "mamba2": make_tiny_mamba("mamba2", root / "m2"),
             "bamba": make_tiny_mamba("bamba", root / "bamba"), "kimi": make_tiny_kimi(root / "kimi"),
             "xlstm": make_tiny_xlstm(root / "xlstm")}
    if fla_available():  # fla's RWKV-7 (the [fla] extra)
        from tiny_fla_models import make_tiny_rwkv7

        # seed 2: with seed 0 the query direction of test_forward_mode_ad_through_a_hook_edit moves the metric by
        # 1.5e-3 out of terms summing to 10 in absolute value (forward and reverse mode then differ by fp32 rounding,
        # 4e-4 relative), with seed 1 the state direction moves it by 0.027 (finite differences at h = 1e-4 are off
        # by 2%); jvp equals reverse mode to 1e-6 on all four seeds tried
        found["rwkv7"] = make_tiny_rwkv7(root / "rwkv7", seed=2)
    return found


@pytest.fixture(scope="module")
def toks():
    return torch.randint(0, 240, (2, 21), generator=torch.Generator().manual_seed(3))  # 21: past one Mamba chunk


_HOOKED: dict = {}


def _setup(models, fam):
    if fam not in models:
        pytest.skip(f"{fam}: the [fla] extra (flash-linear-attention + triton) is not installed")
    hf = models[fam]
    if id(hf) not in _HOOKED:
        _HOOKED[id(hf)] = hook_model(hf)
    model = _HOOKED[id(hf)]
    layer = model.cfg.recurrent_layers[-1]
    return hf, model, layer, model.hook_prefix(layer)


def _tl_grad(model, toks, name, **opts):
    got = {}

    def bwd(grad, hook):
        got["g"] = grad[0] if isinstance(grad, tuple) else grad

    with model.options(**opts), model.hooks(bwd_hooks=[(name, bwd)]):
        metric(model(toks)).backward()
    return got["g"]


def _nnsight_grad(model, toks, block_attr, layer, hook, **opts):
    from nnsight import NNsight

    nn_model = NNsight(model)
    with model.options(**opts), nn_model.trace(toks):
        out = getattr(getattr(nn_model.blocks[layer], block_attr), hook).output
        with metric(nn_model.output).backward():
            grad = out.grad.save()
    return grad


def _fd(model, toks, name, index, eps=1e-3, **opts):
    def run(e):
        def edit(x, hook):
            x = x.clone()
            x[index] = x[index] + e
            return x

        with torch.no_grad(), model.options(**opts):
            return float(metric(model.run_with_hooks(toks, fwd_hooks=[(name, edit)])))

    return (run(eps) - run(-eps)) / (2 * eps)


@pytest.mark.parametrize("fam", ["gdn", "kimi", "xlstm", "mamba2", "bamba", "rwkv7"])
def test_capture_logits_bit_identical_with_autograd_and_parameter_gradients_are_hf(models, toks, fam):
    hf, model, _, _ = _setup(models, fam)
    assert torch.equal(model(toks), hf(toks, use_cache=False).logits)  # autograd on: the derivative paths are zero in value
    params = [p for p in hf.parameters() if p.requires_grad]
    metric(hf(toks, use_cache=False).logits).backward()  # (xLSTM: a cache breaks backward in plain HF)
    ref = [p.grad.clone() for p in params]
    hf.zero_grad()
    metric(model(toks)).backward()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6)
    hf.zero_grad()


@pytest.mark.parametrize("fam", ["gdn", "kimi", "xlstm", "mamba2", "bamba", "rwkv7"])
def test_nnsight_grad_equals_transformer_lens_backward_hooks_on_every_hook(models, toks, fam):
    _, model, layer, prefix = _setup(models, fam)
    hooks = (GDN_HOOKS if fam in ("gdn", "kimi") else XLSTM_HOOKS if fam == "xlstm" else RWKV7_HOOKS if fam == "rwkv7"
             else MAMBA_HOOKS)
    for hook in [*hooks, *DENSE]:
        opts = DENSE.get(hook, {})
        tl = _tl_grad(model, toks, prefix + hook, **opts)
        nn = _nnsight_grad(model, toks, model.family.block_attr, layer, hook, **opts)
        assert tl.abs().max() > 0, hook
        torch.testing.assert_close(nn, tl, rtol=1e-5, atol=1e-8, msg=hook)


@pytest.mark.parametrize("fam", ["gdn", "kimi", "xlstm", "mamba2", "rwkv7"])
def test_canonical_hook_gradients_equal_finite_differences(models, toks, fam):
    _, model, layer, prefix = _setup(models, fam)
    for hook in sorted(CANONICAL):
        opts = DENSE.get(hook, {})
        grad = _nnsight_grad(model, toks, model.family.block_attr, layer, hook, **opts)
        g = grad.abs()
        index = tuple(int(i) for i in torch.nonzero(g == g.max())[0])
        eps = min(max(1e-3 / float(g.max()), 1e-5), 0.1)  # a step that keeps the metric's change ~1e-3
        fd = _fd(model, toks, prefix + hook, index, eps=eps, **opts)
        assert fd == pytest.approx(float(grad[index]), rel=3e-2, abs=1e-6), (hook, fd, float(grad[index]))


@pytest.mark.parametrize("fam", ["gdn", "kimi", "xlstm", "mamba2", "rwkv7"])
@pytest.mark.parametrize("hook", ["hook_write_value", "hook_write_key", "hook_log_decay", "hook_query"])
def test_forward_mode_ad_through_a_hook_edit(models, toks, fam, hook):
    """``torch.func.jvp`` and ``forward_ad`` through an edit that replaces the hook by ``x + eps * direction``."""
    import torch.autograd.forward_ad as fwAD

    _, model, layer, prefix = _setup(models, fam)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[prefix + hook])
    shape = cache[prefix + hook].shape
    direction = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    direction[:, :4] = 0  # edits at several positions of both rows, not all

    name = prefix + hook
    # the tiny models forget fast (decays ~ 0 move the logits ~1e-6): at a decay edit, move them to slower
    # forgetting first, so the directional derivative is well above the finite differences' noise
    base = 0.1 if hook == "hook_log_decay" else 1.0

    def run(eps):
        def edit(x, hook):
            return base * x + eps * direction

        return metric(model.run_with_hooks(toks, fwd_hooks=[(name, edit)]))

    with torch.no_grad(), eager_attention(model):  # CPU SDPA has no forward-mode derivative
        # the metric curves fast along these directions (a central difference at h = 1e-2 gives 40% of the slope
        # on GDN), and fp32 noise rules out tiny steps: a fourth-order central difference at h = 1e-3
        h = 1e-3
        f = {i: float(run(torch.tensor(i * h))) for i in (-2, -1, 1, 2)}
        fd = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)
        value, tangent = torch.func.jvp(run, (torch.tensor(0.0),), (torch.tensor(1.0),))
        with fwAD.dual_level():
            t_fwd = fwAD.unpack_dual(run(fwAD.make_dual(torch.tensor(0.0), torch.tensor(1.0)))).tangent
        if base == 1.0:
            assert float(value) == float(metric(model(toks)))  # the primal is the model's own value
    eps = torch.tensor(0.0, requires_grad=True)
    with eager_attention(model):
        run(eps).backward()  # reverse mode: the same directional derivative without truncation error
    assert abs(fd) > 1e-5
    assert float(tangent) == pytest.approx(float(eps.grad), rel=1e-4, abs=1e-7)
    assert float(tangent) == pytest.approx(fd, rel=2e-2, abs=1e-6)
    assert float(t_fwd) == pytest.approx(fd, rel=2e-2, abs=1e-6)


@pytest.mark.parametrize("fam", ["gdn", "kimi", "xlstm", "mamba2", "rwkv7"])
def test_forward_mode_ad_through_dense_write_and_state_edits(models, toks, fam):
    _, model, layer, prefix = _setup(models, fam)
    for hook in ("hook_write", "hook_state"):
        opts = DENSE[hook]
        with torch.no_grad(), model.options(**opts):
            _, cache = model.run_with_cache(toks, names_filter=[prefix + hook])
        direction = torch.randn(cache[prefix + hook].shape, generator=torch.Generator().manual_seed(4))

        def run(eps, name=prefix + hook, direction=direction, opts=opts):
            def edit(x, hook):
                return x + eps * direction

            with model.options(**opts):
                return metric(model.run_with_hooks(toks, fwd_hooks=[(name, edit)]))

        with torch.no_grad(), eager_attention(model):
            h = 1e-4  # the direction moves every captured state: a small step keeps the response linear
            fd = float((run(torch.tensor(h)) - run(torch.tensor(-h))) / (2 * h))
            _, tangent = torch.func.jvp(run, (torch.tensor(0.0),), (torch.tensor(1.0),))
        assert abs(fd) > 1e-5, hook
        assert float(tangent) == pytest.approx(fd, rel=2e-2, abs=1e-5), hook


@pytest.mark.parametrize("fam", ["gdn", "kimi"])
def test_delta_mode_write_gradients_equal_finite_differences(models, toks, fam):
    _, model, layer, prefix = _setup(models, fam)
    with model.options(write_mode="delta"):
        for hook in ("hook_write_value", "hook_write_key"):
            tl = _tl_grad(model, toks, prefix + hook)
            nn = _nnsight_grad(model, toks, "linear_attn", layer, hook)
            torch.testing.assert_close(nn, tl, rtol=1e-5, atol=1e-8)
            index = tuple(int(i) for i in torch.nonzero(nn.abs() == nn.abs().max())[0])
            assert _fd(model, toks, prefix + hook, index) == pytest.approx(float(nn[index]), rel=2e-2, abs=1e-5)


def test_delta_rule_scan_equals_the_kernel_and_a_per_token_reference():
    import inspect

    import transformers.models.qwen3_5.modeling_qwen3_5 as mq

    from writesae_plugin.adapters import ops

    g = torch.Generator().manual_seed(0)
    b, T, H, dk, dv = 2, 37, 3, 8, 5
    q = torch.randn(b, T, H, dk, generator=g)
    k = torch.nn.functional.normalize(torch.randn(b, T, H, dk, generator=g), dim=-1)
    kw, wv = torch.randn(b, T, H, 2, dk, generator=g), torch.randn(b, T, H, 2, dv, generator=g)
    beta, decay = torch.rand(b, T, H, generator=g), -torch.rand(b, T, H, generator=g)
    S0 = torch.randn(b, H, dk, dv, generator=g)
    S, reads = S0.clone(), []
    for t in range(T):
        kt = k[:, t]
        S = decay[:, t].exp()[..., None, None] * (S - beta[:, t, :, None, None] * kt[..., None]
                                                 * torch.einsum("bhk,bhkv->bhv", kt, S)[:, :, None, :])
        S = S + torch.einsum("bhrk,bhrv->bhkv", kw[:, t], wv[:, t])
        reads.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o, S_T = ops.delta_rule_scan(q, kw, wv, k, beta, decay, S0, chunk=16)
    torch.testing.assert_close(o, torch.stack(reads, 1), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(S_T, S, rtol=1e-5, atol=2e-5)
    v = torch.randn(b, T, H, dv, generator=g)
    kernel = inspect.unwrap(mq.torch_chunk_gated_delta_rule)
    ko, kS = kernel(q, k, v, g=decay, beta=beta, initial_state=S0, output_final_state=True,
                    use_qk_l2norm_in_kernel=False)
    o2, S2 = ops.delta_rule_scan(q * dk ** -0.5, k, beta[..., None] * v, k, beta, decay, S0)
    torch.testing.assert_close(o2, ko, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(S2, kS, rtol=1e-5, atol=2e-5)


def test_delta_rule_scan_with_per_channel_decay_equals_the_kda_kernel_and_a_per_token_reference():
    import inspect

    import transformers.models.kimi_linear.modeling_kimi_linear as mk

    from writesae_plugin.adapters import ops

    g = torch.Generator().manual_seed(0)
    b, T, H, dk, dv = 2, 37, 3, 8, 5
    q = torch.randn(b, T, H, dk, generator=g)
    k = torch.nn.functional.normalize(torch.randn(b, T, H, dk, generator=g), dim=-1)
    kw, wv = torch.randn(b, T, H, 2, dk, generator=g), torch.randn(b, T, H, 2, dv, generator=g)
    beta, decay = torch.rand(b, T, H, generator=g), -torch.rand(b, T, H, dk, generator=g)
    S0 = torch.randn(b, H, dk, dv, generator=g)
    S, reads = S0.clone(), []
    for t in range(T):  # (I - beta k k^T) Diag(alpha) S + writes
        kt, A = k[:, t], decay[:, t].exp()[..., None] * S
        S = A - beta[:, t, :, None, None] * kt[..., None] * torch.einsum("bhk,bhkv->bhv", kt, A)[:, :, None, :]
        S = S + torch.einsum("bhrk,bhrv->bhkv", kw[:, t], wv[:, t])
        reads.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o, S_T = ops.delta_rule_scan(q, kw, wv, k, beta, decay, S0, chunk=16)
    torch.testing.assert_close(o, torch.stack(reads, 1), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(S_T, S, rtol=1e-5, atol=2e-5)
    v = torch.randn(b, T, H, dv, generator=g)
    kernel = inspect.unwrap(mk.chunk_kimi_delta_attention)
    ko, kS = kernel(q, k, v, g=decay, beta=beta, initial_state=S0, output_final_state=True,
                    use_qk_l2norm_in_kernel=False)
    o2, S2 = ops.delta_rule_scan(q * dk ** -0.5, k, beta[..., None] * v, k, beta, decay, S0)
    torch.testing.assert_close(o2, ko, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(S2, kS, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("fam", ["gdn", "kimi", "xlstm", "mamba2", "rwkv7"])
def test_hook_gradients_with_a_write_edit_in_the_same_forward(models, toks, fam):
    """With a WriteEdit changing the layer's states, the hooks' gradients are those of the edited layer."""
    from writesae_plugin.adapters import WriteEdit

    _, model, layer, prefix = _setup(models, fam)
    gen = torch.Generator().manual_seed(5)
    edit = WriteEdit(layer=layer, pos=6, head=1, op="add", key=3 * torch.randn(model.cfg.d_k, generator=gen),
                     value=3 * torch.randn(model.cfg.d_v, generator=gen))
    for hook in ("hook_log_decay", "hook_query", "hook_write_value"):
        with model.edits([edit]):
            tl = _tl_grad(model, toks, prefix + hook)
            nn = _nnsight_grad(model, toks, model.family.block_attr, layer, hook)
        torch.testing.assert_close(nn, tl, rtol=1e-5, atol=1e-8, msg=hook)
        g = tl[:, 7:].abs()  # positions after the edit, where the edited states are read
        index = tuple(int(i) for i in torch.nonzero(g == g.max())[0])
        index = (index[0], index[1] + 7, *index[2:])
        eps = min(max(1e-3 / float(g.max()), 1e-5), 0.1)

        def run(e, index=index, name=prefix + hook):
            def bump(x, hook):
                x = x.clone()
                x[index] = x[index] + e
                return x

            with torch.no_grad(), model.edits([edit]):
                return float(metric(model.run_with_hooks(toks, fwd_hooks=[(name, bump)])))

        fd = (run(eps) - run(-eps)) / (2 * eps)
        assert fd == pytest.approx(float(tl[index]), rel=3e-2, abs=1e-6), (hook, fd, float(tl[index]))


@pytest.mark.parametrize("fam", ["gdn", "kimi", "xlstm", "mamba2", "bamba", "rwkv7"])
def test_edits_under_autograd_keep_the_models_bits_before_the_edit_and_in_other_rows(models, toks, fam):
    """With autograd on, an edited layer takes its read/decay derivatives through the canonical kernel; its
    values must still be the model's own kernel's (found by the README check: 1e-5 logit drift before the edit)."""
    from writesae_plugin.adapters import WriteEdit

    _, model, layer, _ = _setup(models, fam)
    g = torch.Generator().manual_seed(1)
    u, w = torch.randn(model.cfg.d_k, generator=g), torch.randn(model.cfg.d_v, generator=g)
    edit = WriteEdit(layer=layer, pos=12, head=1, key=u, value=w, batch=0)
    assert torch.is_grad_enabled()
    clean = model(toks)
    edited = model.run_with_edits(toks, [edit])
    assert torch.equal(edited[:, :12], clean[:, :12]) and torch.equal(edited[1], clean[1])
    assert (edited[0, 12:] - clean[0, 12:]).abs().max() > 1e-4
    with torch.no_grad():
        assert torch.equal(model.run_with_edits(toks, [edit]), edited.detach())

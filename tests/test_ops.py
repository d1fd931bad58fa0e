"""Fast paths of adapters/ops.py against their readable references (values and gradients)."""

from __future__ import annotations

import inspect

import pytest
import torch

from writesae_plugin.adapters import ops
from writesae_plugin.adapters.reference import propagated_states_reference


def _kernel():
    import transformers.models.qwen3_5.modeling_qwen3_5 as mq

    return inspect.unwrap(mq.torch_chunk_gated_delta_rule)


def _layer(seed=0, b=2, T=21, H=3, dk=8, dv=5):
    gen = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(b, T, H, dk, generator=gen), dim=-1)
    g = -torch.rand(b, T, H, generator=gen)
    beta = torch.rand(b, T, H, generator=gen)
    beta[0, 5] = 0.0  # a delta-mode position (transition alpha I)
    return gen, k, g, beta


def _perturbations(gen, b, T, H, dk, dv, dense: bool):
    if dense:  # every (row, position), as the adapter does when a state SAE needs gradients
        rows = torch.ones(b, T, dtype=torch.bool).nonzero()
        batch, pos = rows[:, 0], rows[:, 1]
    else:  # a few, two at one (row, position), unsorted
        batch, pos = torch.tensor([1, 0, 1, 1]), torch.tensor([9, 3, 2, 9])
    D = torch.randn(batch.numel(), H, dk, dv, generator=gen)
    return ops.Perturbations(batch, pos, D)


@pytest.mark.parametrize("dense", [False, True])
def test_propagated_states_fast_paths_equal_the_per_token_reference(dense):
    b, T, H, dk, dv = 2, 21, 3, 8, 5
    gen, k, g, beta = _layer(b=b, T=T, H=H, dk=dk, dv=dv)
    pert = _perturbations(gen, b, T, H, dk, dv, dense)
    positions = torch.tensor([0, 2, 3, 9, 15, T - 1])
    ref = propagated_states_reference(pert.batch, pert.pos, pert.delta_state, k, g, beta, positions, b)
    scale = ref.abs().max()
    for method in ("scan", "kernel", "auto"):
        got = ops.propagated_states(_kernel(), pert, k, g, beta, positions, b, method=method)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max() / scale) <= 1e-5, method


def test_propagated_states_kernel_assembly_is_bit_identical_to_the_loop():
    b, T, H, dk, dv = 2, 21, 3, 8, 5
    gen, k, g, beta = _layer(b=b, T=T, H=H, dk=dk, dv=dv)
    positions = torch.tensor([0, 2, 3, 9, 15, T - 1])
    for dense in (False, True):
        pert = _perturbations(gen, b, T, H, dk, dv, dense)
        outs, grads = [], []
        for fn in (ops.propagated_states_kernel, ops._propagated_states_kernel_loop):
            D = pert.delta_state.clone().requires_grad_(True)
            out = fn(_kernel(), ops.Perturbations(pert.batch, pert.pos, D), k, g, beta, positions, b)
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            (grad,) = torch.autograd.grad((out * w).sum(), D)
            outs.append(out)
            grads.append(grad)
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(grads[0], grads[1])


def test_propagated_states_scan_gradients_equal_the_kernel_path():
    """Gradients with respect to the perturbations and the transitions (key, log decay, beta)."""
    b, T, H, dk, dv = 2, 17, 2, 8, 5
    gen, k, g, beta = _layer(seed=3, b=b, T=T, H=H, dk=dk, dv=dv)
    positions = torch.tensor([1, 4, 9, T - 1])
    pert = _perturbations(gen, b, T, H, dk, dv, dense=True)
    w = torch.randn(b, positions.numel(), H, dk, dv, generator=gen)
    grads = {}
    for method in ("scan", "kernel"):
        leaves = [t.clone().requires_grad_(True) for t in (pert.delta_state, k, g, beta)]
        D, k_, g_, b_ = leaves
        out = ops.propagated_states(_kernel(), ops.Perturbations(pert.batch, pert.pos, D), k_, g_, b_,
                                    positions, b, method=method)
        grads[method] = torch.autograd.grad((out * w).sum(), leaves)
    for name, a, c in zip(("D", "k", "g", "beta"), grads["scan"], grads["kernel"]):
        assert float((a - c).abs().max() / c.abs().max()) <= 1e-5, name


def test_propagated_states_edge_cases():
    b, T, H, dk, dv = 2, 9, 2, 4, 3
    gen, k, g, beta = _layer(b=b, T=T, H=H, dk=dk, dv=dv)
    none = ops.Perturbations(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                             torch.zeros(0, H, dk, dv))
    late = ops.Perturbations(torch.tensor([0]), torch.tensor([7]), torch.randn(1, H, dk, dv, generator=gen))
    positions = torch.tensor([2, 5])
    for method in ("scan", "kernel"):
        for pert in (none, late):  # nothing, or nothing before the wanted positions: zeros
            out = ops.propagated_states(_kernel(), pert, k, g, beta, positions, b, method=method)
            assert out.shape == (b, 2, H, dk, dv) and not out.any()
    with pytest.raises(ValueError, match="method"):
        ops.propagated_states(_kernel(), late, k, g, beta, positions, b, method="fast")


def test_states_at_scan_and_kernel_equal_the_per_token_reference():
    from writesae_plugin.adapters.reference import gated_deltanet_reference

    b, T, H, dk, dv = 2, 19, 3, 8, 5
    gen, k, g, beta = _layer(seed=5, b=b, T=T, H=H, dk=dk, dv=dv)
    v = torch.randn(b, T, H, dv, generator=gen)
    S0 = torch.randn(b, H, dk, dv, generator=gen)
    ref = gated_deltanet_reference(torch.zeros(b, T, H, dk), k, v, g, beta, S0, return_states=True).states
    scale = ref.abs().max()
    positions = torch.tensor([0, 3, 3, 11, 16])
    for method in ("scan", "kernel", "auto"):
        full = ops.states_at(_kernel(), k, v, g, beta, S0, 17, method=method)
        some = ops.states_at(_kernel(), k, v, g, beta, S0, 17, method=method, positions=positions)
        assert full.shape == (b, 17, H, dk, dv) and some.shape == (b, 5, H, dk, dv)
        assert float((full - ref[:, :17]).abs().max() / scale) <= 1e-5, method
        assert float((some - ref[:, positions]).abs().max() / scale) <= 1e-5, method
    # gradients (values and transitions) of the scan equal the kernel path's
    w = torch.randn(b, positions.numel(), H, dk, dv, generator=gen)
    grads = {}
    for method in ("scan", "kernel"):
        leaves = [t.clone().requires_grad_(True) for t in (k, v, g, beta, S0)]
        out = ops.states_at(_kernel(), *leaves, 17, method=method, positions=positions)
        grads[method] = torch.autograd.grad((out * w).sum(), leaves)
    for name, a, c in zip(("k", "v", "g", "beta", "S0"), grads["scan"], grads["kernel"]):
        assert float((a - c).abs().max() / c.abs().max()) <= 1e-5, name
    with pytest.raises(ValueError, match="out of range"):
        ops.states_at(_kernel(), k, v, g, beta, S0, 5, positions=torch.tensor([5]))


@pytest.mark.parametrize("dense", [False, True])
def test_propagate_scan_and_kernel_equal_the_per_token_reference(dense):
    from writesae_plugin.adapters.reference import gated_deltanet_reference

    b, T, H, dk, dv = 2, 21, 3, 8, 5
    gen, k, g, beta = _layer(seed=7, b=b, T=T, H=H, dk=dk, dv=dv)
    q = torch.nn.functional.normalize(torch.randn(b, T, H, dk, generator=gen), dim=-1)
    qs = q * dk ** -0.5
    pert = _perturbations(gen, b, T, H, dk, dv, dense)
    extra = {}
    for r in range(pert.batch.numel()):
        for h in range(H):
            key = (int(pert.batch[r]), int(pert.pos[r]), h)
            extra[key] = extra.get(key, 0) + pert.delta_state[r, h]
    ref = gated_deltanet_reference(qs, k, torch.zeros(b, T, H, dv), g, beta, extra_writes=extra)
    got = {}
    for method in ("scan", "kernel", "auto"):
        res = ops.propagate(_kernel(), pert, q, qs, k, g, beta, method=method)
        assert float((res.delta_read - ref.read).abs().max() / ref.read.abs().max()) <= 1e-5, method
        assert float((res.delta_final - ref.final_state).abs().max() / ref.final_state.abs().max()) <= 1e-5, method
        got[method] = res
    first = int(pert.pos.min())
    assert not got["scan"].delta_read[:, :first].any()  # nothing before the first perturbation, exactly
    if not dense:
        assert not got["scan"].delta_read[0, :3].any()  # row 0 is perturbed at 3 only
    # derivatives through the read query and the transitions (an edited layer under autograd)
    w = torch.randn(b, T, H, dv, generator=gen)
    grads = {}
    for method in ("scan", "kernel"):
        leaves = [t.clone().requires_grad_(True) for t in (qs, g, beta)]
        qs_, g_, b_ = leaves
        res = ops.propagate(_kernel(), pert, qs_ / dk ** -0.5, qs_, k, g_, b_, method=method)
        grads[method] = torch.autograd.grad((res.delta_read * w).sum() + res.delta_final.sum(), leaves)
    for name, a, c in zip(("query", "g", "beta"), grads["scan"], grads["kernel"]):
        assert float((a - c).abs().max() / c.abs().max()) <= 1e-5, name

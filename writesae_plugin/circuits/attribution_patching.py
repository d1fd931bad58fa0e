"""Attribution patching (gradient x delta) for writes, WriteSAE atoms and SAE error nodes.

The first-order estimate of a patch's effect on the metric, from one forward and one backward pass of the
corrupted run: ``<G_s, Delta W_s>`` with ``G_s = d metric / d W_s`` (the gradient of a change of the write
at s, which is also that of a state change at s) and ``Delta W_s`` the patch (clean - corrupted write;
``(a_i^clean - a_i^corr) A_i`` for an atom; ``e^clean - e^corr`` for the error node).

Three routes, tested against each other: ``adjoint`` (a zero dense perturbation of ``hook_write`` under
autograd; the adapter's exact adjoint gives every ``G_s`` at once), ``transformer_lens`` (the SAE spliced
with its error term, backward hooks on ``hook_sae_acts_post``), ``nnsight`` (the same in a trace). Compare
with :mod:`.patching` (actual patching) by :func:`compare_with_patching`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .patching import (Metric, PatchResult, _check_pair, atom_matrices, head_slice, sae_options, scalar,
                       site_codes)

BACKENDS = ("adjoint", "transformer_lens", "nnsight")


def write_gradients(model, tokens: Tensor, metric: Metric, layers: Sequence[int] | None = None,
                    ) -> tuple[float, dict[int, Tensor]]:
    """``(metric(tokens), {layer: G [b, T, H, d_k, d_v]})``: the gradient of the metric with respect to
    an additive change of each write (raw writes). Materialises ``T x d_k x d_v`` per head and layer."""
    layers = list(model.cfg.recurrent_layers if layers is None else layers)
    zeros: dict[int, Tensor] = {}

    def perturb(layer):
        def hook(W, hook):
            zeros[layer] = torch.zeros_like(W, dtype=torch.float32, requires_grad=True)
            return W + zeros[layer]
        return hook

    with torch.enable_grad(), model.options(materialize_writes=True, write_mode="raw"):
        logits = model.run_with_hooks(tokens, fwd_hooks=[(model.hook_prefix(l_) + "hook_write", perturb(l_))
                                                         for l_ in layers])
        value = metric(logits)
        if value.dim() > 1:
            raise ValueError(f"metric must return a scalar or one value per prompt, got shape {list(value.shape)}")
        value = scalar(value)
        grads = torch.autograd.grad(value, [zeros[l_] for l_ in layers], allow_unused=True)
    return float(value), {l_: (g if g is not None else torch.zeros_like(zeros[l_])).detach()
                          for l_, g in zip(layers, grads)}


@torch.no_grad()
def attribute_writes(model, clean: Tensor, corrupted: Tensor, metric: Metric, layers: Sequence[int] | None = None,
                     positions: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> PatchResult:
    """Estimated metric after patching each clean write into the corrupted run: ``corrupted +
    sum_b <G_{b,s}, W^clean_{b,s} - W^corr_{b,s}>``; ``scores [L, P, H]`` as :func:`.patching.patch_writes`."""
    _check_pair(clean, corrupted)
    layers = list(model.cfg.recurrent_layers if layers is None else layers)
    positions = list(range(clean.shape[1]) if positions is None else positions)
    heads = list(range(model.cfg.n_heads) if heads is None else heads)
    base, G = write_gradients(model, corrupted, metric, layers)
    names = [model.hook_prefix(l_) + n for l_ in layers for n in ("hook_write_key", "hook_write_value")]
    with model.options(write_mode="raw"):
        _, cc = model.run_with_cache(clean, names_filter=names)
        _, cx = model.run_with_cache(corrupted, names_filter=names)
    scores = torch.zeros(len(layers), len(positions), len(heads))
    for i, l_ in enumerate(layers):
        p = model.hook_prefix(l_)
        pos, hd = torch.tensor(positions), torch.tensor(heads)
        g = G[l_][:, pos][:, :, hd]  # [b, P, H', N, P_v]

        def bil(cache):  # <G, k v^T> = k^T G v without forming k v^T
            k = cache[p + "hook_write_key"][:, pos][:, :, hd].float()
            v = cache[p + "hook_write_value"][:, pos][:, :, hd].float()
            return torch.einsum("bthn,bthnp,bthp->th", k, g, v)

        scores[i] = base + bil(cc) - bil(cx)
    clean_value = float(scalar(metric(model(clean))))
    return PatchResult(scores, clean_value, base, {"layer": layers, "pos": positions, "head": heads,
                                                   "estimate": "attribution patching"})


def attribute_atoms(model, sae, clean: Tensor, corrupted: Tensor, metric: Metric,
                    positions: Sequence[int] | None = None, atoms: Sequence[int] | None = None,
                    include_error: bool = True, max_atoms: int = 64, backend: str = "adjoint") -> PatchResult:
    """Estimated metric after patching each atom's contribution (and the error node) from the clean into the
    corrupted run; ``scores [P, n_atoms (+1: error last)]`` as :func:`.patching.patch_atoms`.

    ``backend``: ``adjoint`` (``(a^c - a^x) u^T G w`` and ``<G, e^c - e^x>``), ``transformer_lens`` /
    ``nnsight`` (the gradients of the spliced SAE's ``hook_sae_acts_post``, every feature, active or not, and
    of its ``hook_sae_error``, from zero perturbations added through TL hooks or nnsight assignments)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_pair(clean, corrupted)
    positions = list(range(clean.shape[1]) if positions is None else positions)
    model.check_sae_fits(sae, model.hook_prefix(sae.cfg.layer) + f"hook_{sae.cfg.site}")
    with torch.no_grad():
        a_c, e_c = site_codes(model, sae, clean)
        a_x, e_x = site_codes(model, sae, corrupted)
    delta = (a_c - a_x)[:, positions]
    if atoms is None:
        total = delta.abs().sum((0, 1))
        atoms = [int(i) for i in total.argsort(descending=True)[:max_atoms] if total[i] > 0]
    atoms = list(atoms)
    L, h = sae.cfg.layer, sae.cfg.head
    base, G = write_gradients(model, corrupted, metric, [L])
    g = G[L][:, positions, h]  # [b, P, N, P_v]
    A = atom_matrices(sae)[atoms]  # [n, N, P_v]
    if backend == "adjoint":
        atom_grad = torch.einsum("btkv,ikv->bti", g, A)
        err_grad = g
    else:
        full, full_err = _grads_by_perturbation(model, sae, corrupted, metric, backend == "nnsight")
        atom_grad = full[:, positions][:, :, atoms]
        err_grad = head_slice(sae, full_err)[:, positions]
    cols = [base + (delta[:, :, atoms] * atom_grad).sum(0)]
    if include_error:
        err = (e_c - e_x)[:, positions]
        cols.append((base + torch.einsum("btkv,btkv->t", err_grad, err))[:, None])
    with torch.no_grad():
        clean_value = float(scalar(metric(model(clean))))
    return PatchResult(torch.cat(cols, 1).detach(), clean_value, base,
                       {"pos": positions, "atom": atoms + (["error"] if include_error else []),
                        "estimate": f"attribution patching ({backend})"})


def _grads_by_perturbation(model, sae, tokens, metric, nnsight: bool) -> tuple[Tensor, Tensor]:
    """``(d metric / d a [b, T, d_sae], d metric / d e [hook shape])``: zeros added to the spliced SAE's
    ``hook_sae_acts_post`` and ``hook_sae_error`` under autograd (TransformerLens hooks, or nnsight
    assignments in a trace). Every feature gets its gradient, active or not."""
    acts_name = sae.cfg.metadata.hook_name + ".hook_sae_acts_post"
    err_name = sae.cfg.metadata.hook_name + ".hook_sae_error"
    opts = sae_options(sae)
    holder: dict[str, Tensor] = {}
    with torch.enable_grad(), model.options(**opts), model.saes([sae], use_error_term=True):
        if not nnsight:
            def add_zero(key):
                def hook(x, hook):
                    holder[key] = torch.zeros_like(x, requires_grad=True)
                    return x + holder[key]
                return hook

            value = scalar(metric(model.run_with_hooks(tokens, fwd_hooks=[(acts_name, add_zero("a")),
                                                                           (err_name, add_zero("e"))])))
            g_a, g_e = torch.autograd.grad(value, [holder["a"], holder["e"]])
            return g_a.detach(), g_e.detach()
        from nnsight import NNsight

        with torch.no_grad():
            _, c = model.run_with_cache(tokens, names_filter=[err_name])
        nn_model = NNsight(model)
        envoy = nn_model
        for part in sae.cfg.metadata.hook_name.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        b, T = tokens.shape
        dev = c[err_name].device
        z = torch.zeros(b, T, sae.cfg.d_sae, device=dev, requires_grad=True)
        z_err = torch.zeros(c[err_name].shape, device=dev, requires_grad=True)
        with nn_model.trace(tokens):
            envoy.hook_sae_acts_post.output = envoy.hook_sae_acts_post.output + z
            envoy.hook_sae_error.output = envoy.hook_sae_error.output + z_err
            value = metric(nn_model.output)
            value = (value.mean() if value.dim() == 1 else value).save()
        g_a, g_e = torch.autograd.grad(value, [z, z_err])
        return g_a.detach(), g_e.detach()


def compare_with_patching(estimate: PatchResult, actual: PatchResult) -> dict:
    """Agreement of an attribution-patching estimate with actual patching over the same index: Pearson (with a
    Fisher-z 95% interval) and Spearman correlation of the effects (score - corrupted), max abs difference, n."""
    from scipy import stats

    x = (estimate.scores - estimate.corrupted).flatten().double()
    y = (actual.scores - actual.corrupted).flatten().double()
    if x.shape != y.shape:
        raise ValueError(f"the estimate and the actual patching cover different indices ({x.numel()} vs "
                         f"{y.numel()} entries)")
    out = {"n": int(x.numel()), "max_abs_difference": float((x - y).abs().max()) if x.numel() else float("nan")}
    if x.numel() >= 3 and x.std() > 0 and y.std() > 0:
        r = float(stats.pearsonr(x.numpy(), y.numpy())[0])
        out["pearson"] = r
        out["spearman"] = float(stats.spearmanr(x.numpy(), y.numpy())[0])
        if x.numel() > 3 and abs(r) < 1:  # Fisher z interval (95%)
            import math

            z, half = math.atanh(r), 1.96 / math.sqrt(x.numel() - 3)
            out["pearson_ci"] = [math.tanh(z - half), math.tanh(z + half)]
    return out

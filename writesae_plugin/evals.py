"""SAELens ``run_evals`` on a WriteSAE at the flat write hook, plus per-head reconstruction metrics.

A write SAE as ``writesae train`` saves it (hook ``...hook_write``) is evaluated at its layer's
``hook_write_flat`` (the 3-D form SAELens' activation store reads) without editing its config.

SAELens' reconstruction metrics compare the whole hook vector. For a per-head WriteSAE the other heads
pass through unchanged, which inflates them; ``run_write_evals`` therefore also reports explained variance,
FVU, MSE and L0 on the SAE's own head (``head_metrics``). CE / KL recovered are exact as SAELens computes
them (the splice changes only that head).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


def _flat_hook(sae) -> str:
    """The ``hook_write_flat`` hook of a write-site WriteSAE whose ``metadata.hook_name`` is its layer's
    ``hook_write`` (as ``writesae train`` and the releases save it) or ``hook_write_flat``."""
    name = sae.cfg.metadata.hook_name or ""
    if getattr(sae.cfg, "site", "write") != "write" or not name.endswith(("hook_write", "hook_write_flat")):
        raise ValueError(f"run_write_evals needs a write-site WriteSAE whose metadata.hook_name is a layer's "
                         f"hook_write or hook_write_flat; got site {getattr(sae.cfg, 'site', None)!r}, hook {name!r}")
    return name if name.endswith("hook_write_flat") else name + "_flat"


@contextmanager
def _at_flat_hook(sae):
    """``sae`` reading ``hook_write_flat`` (the 3-D hook SAELens' evals need) while inside; its hook name is
    restored after."""
    old = sae.cfg.metadata.hook_name
    sae.cfg.metadata.hook_name = _flat_hook(sae)
    try:
        yield sae
    finally:
        sae.cfg.metadata.hook_name = old


@torch.no_grad()
def head_metrics(model, sae, tokens: Tensor, batch_size: int = 8) -> dict[str, float]:
    """Reconstruction of the SAE's site on its own head(s) over ``tokens`` ``[N, T]``."""
    name = _flat_hook(sae)
    sq, tot, l0, n, xs = 0.0, 0.0, 0.0, 0, []
    with model.options(materialize_writes=True, write_mode=sae.cfg.write_mode):
        for i in range(0, tokens.shape[0], batch_size):
            _, cache = model.run_with_cache(tokens[i:i + batch_size], names_filter=[name],
                                            stop_at_layer=sae.cfg.layer + 1 if sae.cfg.layer >= 0 else None)
            x = cache[name]
            X, _ = sae._select(x)
            X = X.reshape(-1, sae.cfg.d_k, sae.cfg.d_v)
            acts = sae.encode(X)
            recon = sae.decode(acts)
            sq += (recon - X).pow(2).sum().item()
            l0 += (acts != 0).sum().item()
            n += X.shape[0]
            xs.append(X.reshape(X.shape[0], -1))
    X = torch.cat(xs)
    tot = (X - X.mean(0)).pow(2).sum().item()
    return {"explained_variance": 1 - sq / tot, "fvu": sq / tot, "mse": sq / (n * sae.cfg.d_in),
            "l0": l0 / n, "n_matrices": n}


def run_write_evals(model, sae, tokens: Tensor, batch_size_prompts: int = 8, n_batches: int = 4,
                    compute_kl: bool = True) -> dict[str, Any]:
    """``{"saelens": run_evals metrics, "head": head_metrics}`` on token contexts ``tokens`` ``[N, T]``."""
    from datasets import Dataset
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    T = tokens.shape[1]
    sae.cfg.metadata.context_size = T
    sae.cfg.metadata.prepend_bos = False
    ds = Dataset.from_dict({"tokens": tokens.tolist()})
    cfg = EvalConfig(batch_size_prompts=batch_size_prompts, n_eval_reconstruction_batches=n_batches,
                     n_eval_sparsity_variance_batches=n_batches, compute_kl=compute_kl, compute_ce_loss=True,
                     compute_l2_norms=True, compute_sparsity_metrics=True, compute_variance_metrics=True)
    with _at_flat_hook(sae), model.options(materialize_writes=True, write_mode=sae.cfg.write_mode):
        store = ActivationsStore.from_sae(model, sae, ds, context_size=T, streaming=False,
                                          store_batch_size_prompts=batch_size_prompts, n_batches_in_buffer=2,
                                          train_batch_size_tokens=batch_size_prompts * T, total_tokens=tokens.numel(),
                                          device=str(model.cfg.device))
        metrics, _ = run_evals(sae, store, model, ActivationScaler(), cfg, exclude_special_tokens=False)
    return {"saelens": metrics, "head": head_metrics(model, sae, tokens, batch_size_prompts)}

"""SHIFT-style editing: ablate or install a chosen set of write atoms to change a behaviour, against
random-atom controls of the same size.

The SAE is spliced with its error term (so the unedited run is the model's own); ablation sets the chosen
atoms' codes to 0, install sets them to ``value`` (default: each atom's largest activation on the data) at
the chosen positions. The behaviour metric is per prompt (``logits [b, T, V] -> [b]``), reported as a mean
with a 95% t-interval before and after; the controls are ``n_controls`` random sets of atoms of the same
size, drawn from the atoms active on the data, and the edit's effect is compared with theirs.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .patching import sae_options

RowMetric = Callable[[Tensor], Tensor]  # logits [b, T, V] -> [b]


def mean_ci(x: Tensor, confidence: float = 0.95) -> dict:
    """Mean with a Student-t interval (n, sd) of per-prompt values."""
    from scipy import stats

    x = x.double().flatten()
    n = x.numel()
    m = float(x.mean()) if n else float("nan")
    if n < 2:
        return {"mean": m, "lo": float("nan"), "hi": float("nan"), "n": n}
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(x.std()) / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n, "sd": float(x.std())}


@torch.no_grad()
def _run(model, sae, tokens: Tensor, metric: RowMetric, atoms: Sequence[int], value: Tensor | None,
         positions: Sequence[int] | None) -> Tensor:
    name = sae.cfg.metadata.hook_name + ".hook_sae_acts_post"
    atoms = list(atoms)

    idx = torch.tensor(atoms, dtype=torch.long)

    def hook(x, hook):  # x [b, T, (heads,) d_sae]: every chosen position x every chosen atom
        x = x.clone()
        view = x if positions is None else x[:, list(positions)]  # a copy when positions are given
        view[..., idx] = 0 if value is None else value.to(x.dtype)
        if positions is not None:
            x[:, list(positions)] = view
        return x

    with model.options(**sae_options(sae)), model.saes([sae], use_error_term=True):
        out = metric(model.run_with_hooks(tokens, fwd_hooks=[(name, hook)] if atoms else []))
    if out.dim() != 1 or out.shape[0] != tokens.shape[0]:
        raise ValueError(f"the behaviour metric must return one value per prompt [{tokens.shape[0]}], got "
                         f"{list(out.shape)}")
    return out.float()


@torch.no_grad()
def edit_atoms(model, sae, tokens: Tensor, metric: RowMetric, atoms: Sequence[int], mode: str = "ablate",
               value: float | Sequence[float] | None = None, positions: Sequence[int] | None = None,
               n_controls: int = 20, seed: int = 0, progress: bool = True) -> dict:
    """Ablate (``mode="ablate"``) or install (``mode="install"``) ``atoms`` of ``sae`` on ``tokens`` and
    report the behaviour before/after with intervals, and against ``n_controls`` random atom sets."""
    if mode not in ("ablate", "install"):
        raise ValueError(f"mode must be 'ablate' or 'install', got {mode!r}")
    atoms = [int(a) for a in atoms]
    if not atoms or any(not 0 <= a < sae.cfg.d_sae for a in atoms):
        raise ValueError(f"atoms must be a non-empty list of indices in [0, {sae.cfg.d_sae}), got {atoms}")
    name = sae.cfg.metadata.hook_name + ".hook_sae_acts_post"
    with model.options(**sae_options(sae)), model.saes([sae], use_error_term=True):
        _, cache = model.run_with_cache(tokens, names_filter=[name])
    acts = cache[name]
    active = (acts != 0).flatten(0, -2).any(0).nonzero().flatten().tolist()
    peak = acts.flatten(0, -2).max(0).values

    def values_for(chosen):
        if mode == "ablate":
            return None
        if value is None:
            return peak[chosen]
        v = torch.as_tensor(value, dtype=torch.float32)
        return v.expand(len(chosen)) if v.dim() == 0 else v

    before = _run(model, sae, tokens, metric, [], None, positions)
    after = _run(model, sae, tokens, metric, atoms, values_for(atoms), positions)
    # controls: atoms that are active on the data (an install at a never-active atom's peak, 0, does nothing)
    pool = [a for a in active if a not in atoms]
    rng = torch.Generator().manual_seed(seed)
    controls = []
    for _ in tqdm(range(n_controls if len(pool) >= len(atoms) else 0), desc="control atom sets",
                  disable=not progress):
        pick = [pool[i] for i in torch.randperm(len(pool), generator=rng)[:len(atoms)].tolist()]
        vals = values_for(pick) if value is None or mode == "ablate" else values_for(atoms)
        controls.append(float((_run(model, sae, tokens, metric, pick, vals, positions) - before).mean()))
    effect = after - before
    ctrl = torch.tensor(controls)
    out = {"mode": mode, "atoms": atoms, "before": mean_ci(before), "after": mean_ci(after),
           "effect": mean_ci(effect), "controls": {"n": len(controls), "effects": controls}}
    if controls:
        out["controls"].update(mean_ci(ctrl))
        out["controls"]["p_at_least_as_large"] = float(((ctrl.abs() >= abs(float(effect.mean()))).sum() + 1)
                                                       / (len(controls) + 1))
    return out

"""Path patching through the recurrence: the effect of a write edit (a patch, an atom, a deletion) restricted
to chosen reads or mediated by chosen downstream hooks.

A write at ``(layer, s, head)`` reaches the output only through the reads ``o_t`` of its own head at
``t >= s`` (``o_t`` changes by ``c (Phi(t, s) Delta W)^T q_t``, docs/method.md 4). :class:`Reads` selects some of them:
the sender's change of exactly those reads is applied, every other read keeps its base value. A hook name
as receiver (any later hook, e.g. ``blocks.3.linear_attn.hook_write_value``) measures the effect mediated
by that activation: its values from the sender run are patched into the base run, the sender itself not.

Two forwards per query (sender run capturing the receivers, base run patched), both exact: the sender's
edits use the adapter's exact machinery (one extra kernel call), the receivers are plain hook edits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..adapters import WriteEdit
from .patching import Metric, scalar


@dataclass(frozen=True)
class Reads:
    """Receiver: the reads (``hook_read``) of recurrent ``layer`` at ``positions`` and ``heads`` (None = all)."""

    layer: int
    positions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None


def _receiver_name(model, r) -> str:
    if isinstance(r, Reads):
        return model.hook_prefix(r.layer) + "hook_read"
    if isinstance(r, str):
        model.check_hook_names([r])
        return model.canonical_hook_name(r)
    raise TypeError(f"receivers must be Reads(...) or hook names, got {type(r).__name__}")


@torch.no_grad()
def path_patch(model, tokens: Tensor, sender: Sequence[WriteEdit], receivers: Sequence[Reads | str],
               metric: Metric) -> dict:
    """``{"base", "total", "path", "path_fraction"}``: the metric of the unedited run, of the run with the
    ``sender`` edits everywhere, and of the run where only the ``receivers`` see the sender's effect;
    ``path_fraction = (path - base) / (total - base)`` (NaN when the sender has no effect). With a
    per-prompt metric also ``path_effect`` / ``total_effect``: mean and 95% interval over prompts."""
    sender = list(sender)
    if not sender:
        raise ValueError("path_patch needs at least one sender WriteEdit")
    names = [_receiver_name(model, r) for r in receivers]
    if not names:
        raise ValueError("path_patch needs at least one receiver")
    with model.edits(sender):
        total_logits, sent = model.run_with_cache(tokens, names_filter=sorted(set(names)))
    T = tokens.shape[1]

    def receiver_hook(r, name):
        def hook(x, hook):
            new = sent[name]
            if x.shape != new.shape:
                raise ValueError(f"{name}: the receiver's shape changed between runs ({list(new.shape)} vs "
                                 f"{list(x.shape)})")
            if isinstance(r, Reads):
                pos = torch.arange(T) if r.positions is None else torch.tensor(r.positions)
                heads = torch.arange(x.shape[2]) if r.heads is None else torch.tensor(r.heads)
                x = x.clone()
                x[:, pos[:, None], heads[None, :]] = new[:, pos[:, None], heads[None, :]].to(x.dtype)
                return x
            return new.to(x.dtype)
        return hook

    path_logits = model.run_with_hooks(tokens, fwd_hooks=[(n, receiver_hook(r, n)) for r, n in zip(receivers, names)])
    values = [metric(x) for x in (model(tokens), total_logits, path_logits)]
    base, total, path = (float(scalar(v)) for v in values)
    frac = (path - base) / (total - base) if abs(total - base) > 1e-12 else float("nan")
    out = {"base": base, "total": total, "path": path, "path_fraction": frac}
    if values[0].dim() == 1:  # per-prompt metric: effects with intervals over prompts
        from .editing import mean_ci

        out["path_effect"] = mean_ci(values[2].float() - values[0].float())
        out["total_effect"] = mean_ci(values[1].float() - values[0].float())
    return out


@torch.no_grad()
def read_deltas(model, tokens: Tensor, sender: Sequence[WriteEdit], layer: int) -> Tensor:
    """``Delta o [b, T, H, d_v]``: the change of every read of ``layer`` caused by the ``sender`` edits (the
    recurrence path of each write, before any nonlinearity)."""
    name = model.hook_prefix(layer) + "hook_read"
    _, base = model.run_with_cache(tokens, names_filter=[name])
    with model.edits(list(sender)):
        _, sent = model.run_with_cache(tokens, names_filter=[name])
    return sent[name] - base[name]

"""Activation patching over cache writes and WriteSAE atoms (clean -> corrupted), exact and batched.

Semantics (docs/method.md 3, raw writes): patching the write at ``(layer, pos, head)`` replaces the corrupted
run's write there by the clean run's; the transitions (decays, erase terms) stay the corrupted run's,
exactly as an edit of ``hook_write`` does. Patching an atom ``i`` of a WriteSAE at ``pos`` adds
``(a_i^clean - a_i^corr) A_i`` to the corrupted write (state site: to the state, which acts as an extra
write at ``pos``); patching the SAE's error node adds ``e^clean - e^corr`` with ``e = X - SAE(X)``.

Speed: layers below the patched one are identical to the corrupted run, so each layer's patches resume
from the corrupted run's output of the layer before it (``run_from_layer``), many patches as rows of one batch, each edit
one extra kernel call for all rows. ``transformer_lens.patching.generic_activation_patch`` runs unchanged
on the same hooks (``activation_name="write"`` with ``materialize_writes``, or ``"write_value"``; use
:func:`write_patch_index` as its ``index_df`` on hybrids whose attention layers have no write).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..adapters import StateCapture, WriteEdit

Metric = Callable[[Tensor], Tensor]  # logits [b, T, V] -> scalar, or per prompt [b] (then kept per row)


def scalar(v: Tensor) -> Tensor:
    """A metric value reduced to a scalar (the batch mean of a per-prompt metric), keeping its graph."""
    v = torch.as_tensor(v)
    return v.mean() if v.dim() == 1 else v


def _value(v: Tensor) -> Tensor:
    """A metric's value as a detached fp32 tensor: ``[]`` (scalar metric) or ``[b]`` (per-prompt metric)."""
    v = torch.as_tensor(v).detach().float().cpu()
    if v.dim() > 1:
        raise ValueError(f"a metric must return a scalar or one value per prompt [b], got {list(v.shape)}")
    return v


# ---------------------------------------------------------------------------------------------- metrics
def logit_diff(answer: Tensor | Sequence[int] | int, wrong: Tensor | Sequence[int] | int, pos: int = -1,
               per_prompt: bool = False) -> Metric:
    """Metric: ``logit[answer] - logit[wrong]`` at ``pos`` (one id, or one per row), averaged over the batch
    (``per_prompt=True``: one value per row, so results carry per-prompt values and intervals)."""
    def metric(logits: Tensor) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        a = torch.as_tensor(answer, device=logits.device).expand(logits.shape[0])
        w = torch.as_tensor(wrong, device=logits.device).expand(logits.shape[0])
        last = logits[:, pos].float()
        d = last[rows, a] - last[rows, w]
        return d if per_prompt else d.mean()

    return metric


def kl_from(reference_logits: Tensor, pos: int = -1) -> Metric:
    """Metric: mean over the batch of ``KL(p_reference || p)`` at ``pos`` (0 when the run equals the
    reference; use the clean logits as the reference to score how far a patch is from the clean run)."""
    ref = reference_logits[:, pos].float().log_softmax(-1)

    def metric(logits: Tensor) -> Tensor:
        lp = logits[:, pos].float().log_softmax(-1)
        return (ref.exp() * (ref - lp)).sum(-1).mean()

    return metric


def normalized_score(patched: Tensor | float, clean: float, corrupted: float) -> Tensor | float:
    """``(patched - corrupted) / (clean - corrupted)``: 0 = no effect, 1 = fully restores the clean metric."""
    if abs(clean - corrupted) < 1e-12:
        raise ValueError(f"the clean and corrupted metrics are equal ({clean:.6g}): the normalised score is "
                         "undefined; choose inputs or a metric that distinguishes them")
    return (patched - corrupted) / (clean - corrupted)


# ---------------------------------------------------------------------------------------------- helpers
def write_patch_index(model, n_pos: int, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None):
    """A ``pandas.DataFrame`` of (layer, pos, head_index) over the recurrent layers, for TransformerLens'
    ``generic_activation_patch(index_df=...)`` on hybrids (attention layers have no write hook)."""
    import pandas as pd

    layers = list(model.cfg.recurrent_layers if layers is None else layers)
    heads = list(range(model.cfg.n_heads) if heads is None else heads)
    rows = [(l_, p, h) for l_ in layers for p in range(n_pos) for h in heads]
    return pd.DataFrame(rows, columns=["layer", "pos", "head_index"])


def _check_pair(clean: Tensor, corrupted: Tensor) -> None:
    if clean.shape != corrupted.shape or clean.dim() != 2:
        raise ValueError(f"clean and corrupted tokens must both be [batch, pos] of one shape, got "
                         f"{list(clean.shape)} and {list(corrupted.shape)}")


@torch.no_grad()
def run_edit_rows(model, tokens: Tensor, layer: int, patches: list[list[WriteEdit]], metric: Metric,
                  max_rows: int = 64, state=None) -> list[Tensor]:
    """``metric`` of the run on ``tokens`` ``[B, T]`` under each list of edits in ``patches`` (all at layers
    ``>= layer``; ``batch`` of each edit indexes ``tokens``' rows), as ``_value`` tensors. The run resumes at ``layer``
    (``model.resume_state``, or ``state`` if given); patches are stacked as rows (``B`` rows each), ``max_rows`` rows
    per forward."""
    B = tokens.shape[0]
    state = model.resume_state(tokens, layer) if state is None else state
    per_call = max(1, max_rows // B)
    values = []
    for s in range(0, len(patches), per_call):
        group = patches[s:s + per_call]
        edits = []
        for j, patch in enumerate(group):
            for e in patch:
                rows = range(B) if e.batch is None else [e.batch]
                edits += [WriteEdit(layer=e.layer, pos=e.pos, head=e.head, op=e.op, key=e.key, value=e.value,
                                    matrix=e.matrix, batch=j * B + r, mode=e.mode) for r in rows]
        with model.edits(edits):
            logits = model.run_from_layer(state.repeat(len(group)))
        values += [_value(metric(logits[j * B:(j + 1) * B])) for j in range(len(group))]
    return values


# ---------------------------------------------------------------------------------------------- writes
@dataclass
class PatchResult:
    """``scores[...]``: the (batch-mean) metric after each patch; ``clean`` / ``corrupted``: the unpatched
    metrics; ``index``: what each axis of ``scores`` enumerates. With a per-prompt metric, ``rows[..., b]``,
    ``clean_rows`` and ``corrupted_rows`` keep the per-prompt values (for intervals)."""

    scores: Tensor
    clean: float
    corrupted: float
    index: dict = field(default_factory=dict)
    rows: Tensor | None = None
    clean_rows: Tensor | None = None
    corrupted_rows: Tensor | None = None

    @property
    def normalized(self) -> Tensor:
        return normalized_score(self.scores, self.clean, self.corrupted)

    def effect_interval(self, *index) -> dict:
        """Mean effect ``score - corrupted`` of one patch over prompts with its 95% t-interval (needs a
        per-prompt metric)."""
        from .editing import mean_ci

        if self.rows is None:
            raise ValueError("per-prompt values were not kept: use a per-prompt metric (per_prompt=True)")
        return mean_ci(self.rows[index] - self.corrupted_rows)


def _result(values: list[Tensor], shape: tuple, base_clean: Tensor, base_corr: Tensor, index: dict) -> PatchResult:
    """Assemble a :class:`PatchResult` from per-patch metric values (scalars or per-prompt rows)."""
    stacked = torch.stack(values) if values else torch.zeros(0)
    if stacked.dim() == 2:  # per-prompt
        rows = stacked.view(*shape, stacked.shape[-1])
        return PatchResult(rows.mean(-1), float(base_clean.mean()), float(base_corr.mean()), index, rows,
                           base_clean, base_corr)
    return PatchResult(stacked.view(*shape), float(base_clean), float(base_corr), index)


@torch.no_grad()
def patch_writes(model, clean: Tensor, corrupted: Tensor, metric: Metric, layers: Sequence[int] | None = None,
                 positions: Sequence[int] | None = None, heads: Sequence[int] | None = None, max_rows: int = 64,
                 progress: bool = True) -> PatchResult:
    """Patch each clean write ``(layer, pos, head)`` into the corrupted run; ``scores [L, P, H]``. A write
    that is bitwise the same in both runs (e.g. before the first differing token) is a no-op patch: its
    score is the corrupted run's metric, without a forward."""
    _check_pair(clean, corrupted)
    layers = list(model.cfg.recurrent_layers if layers is None else layers)
    positions = list(range(clean.shape[1]) if positions is None else positions)
    heads = list(range(model.cfg.n_heads) if heads is None else heads)
    names = [model.hook_prefix(l_) + n for l_ in layers for n in ("hook_write_key", "hook_write_value")]
    with model.options(write_mode="raw"):
        _, cache = model.run_with_cache(clean, names_filter=names)
        _, cx = model.run_with_cache(corrupted, names_filter=names)
        base_clean, base_corr = _value(metric(model(clean))), _value(metric(model(corrupted)))
        values: list[Tensor] = []
        bar = tqdm(total=len(layers) * len(positions) * len(heads), desc="patching writes", disable=not progress)
        for i, l_ in enumerate(layers):
            p = model.hook_prefix(l_)
            key, value = cache[p + "hook_write_key"], cache[p + "hook_write_value"]
            same = [torch.equal(key[:, t, h], cx[p + "hook_write_key"][:, t, h])
                    and torch.equal(value[:, t, h], cx[p + "hook_write_value"][:, t, h])
                    for t in positions for h in heads]
            patches = [[WriteEdit(layer=l_, pos=t, head=h, key=key[b, t, h], value=value[b, t, h], batch=b)
                        for b in range(clean.shape[0])] for t in positions for h in heads]
            todo = [pt for pt, sm in zip(patches, same) if not sm]
            done = iter(run_edit_rows(model, corrupted, l_, todo, metric, max_rows))
            values += [base_corr if sm else next(done) for sm in same]
            bar.update(len(patches))
        bar.close()
    return _result(values, (len(layers), len(positions), len(heads)), base_clean, base_corr,
                   {"layer": layers, "pos": positions, "head": heads})


# ---------------------------------------------------------------------------------------------- atoms
def sae_options(*saes) -> dict:
    """Adapter options under which every SAE's hook fires with the input it was trained on: its write mode
    (one for all), dense writes for write-site SAEs, the states of all heads for state-site SAEs (so a
    per-head SAE's head index addresses the hook's head axis)."""
    modes = {s.cfg.write_mode for s in saes}
    if len(modes) > 1:
        raise ValueError("the SAEs of one forward must share a write mode (raw or delta)")
    opts = {"write_mode": modes.pop(), "materialize_writes": any(s.cfg.site == "write" for s in saes)}
    if any(s.cfg.site == "state" for s in saes):
        opts["capture_states"] = StateCapture("all")
    return opts


def head_slice(sae, x: Tensor) -> Tensor:
    """The SAE's own head of a tensor shaped like its hook (``[b,T,H,N,P]``, flat ``[b,T,H*N*P]``, or already
    per-head ``[b,T,N,P]``) as ``[b,T,N,P]``."""
    cfg = sae.cfg
    if x.dim() == 5:
        return x[:, :, cfg.head]
    if x.dim() == 3 and x.shape[-1] == cfg.n_heads * cfg.d_k * cfg.d_v:
        return x.view(*x.shape[:2], cfg.n_heads, cfg.d_k, cfg.d_v)[:, :, cfg.head]
    return x.reshape(*x.shape[:2], cfg.d_k, cfg.d_v)


def atom_matrices(sae) -> Tensor:
    """All decoder atoms as matrices ``[d_sae, d_k, d_v]`` (materialised: for small dictionaries)."""
    from ..sae import atoms as atom_ops

    if sae.cfg.decoder_rank is None:
        return sae.dec_dense.detach().view(-1, sae.cfg.d_k, sae.cfg.d_v)
    return atom_ops.atom_matrices(sae.dec_key, sae.dec_value).detach()


@torch.no_grad()
def site_codes(model, sae, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes [b, T, d_sae], error [b, T, d_k, d_v])`` of a per-head WriteSAE at its site (write: the raw
    or delta write the SAE was trained on; state: the state after each position), ``error = X - SAE(X)``."""
    from ..experiments.substitution import capture_site

    if sae.cfg.head is None:
        raise ValueError("atom patching needs a per-head WriteSAE (cfg.head set)")
    key, value, states = capture_site(model, sae, tokens, sae.cfg.write_mode)
    X = states.float() if states is not None else key[..., :, None].float() * value[..., None, :]
    codes = sae.encode(X)
    recon = sae._decode_matrices(codes)
    return codes, X - recon


@torch.no_grad()
def patch_atoms(model, sae, clean: Tensor, corrupted: Tensor, metric: Metric, positions: Sequence[int] | None = None,
                atoms: Sequence[int] | None = None, include_error: bool = True, max_atoms: int = 64,
                max_rows: int = 64, progress: bool = True) -> PatchResult:
    """Patch each atom's contribution (and the error node) from the clean into the corrupted run at each
    position; ``scores [P, n_atoms (+1: error last)]``. Default atoms: those active in either run at the
    chosen positions, the ``max_atoms`` with the largest total ``|a_clean - a_corr|``."""
    _check_pair(clean, corrupted)
    positions = list(range(clean.shape[1]) if positions is None else positions)
    model.check_sae_fits(sae, model.hook_prefix(sae.cfg.layer) + f"hook_{sae.cfg.site}")
    a_c, e_c = site_codes(model, sae, clean)
    a_x, e_x = site_codes(model, sae, corrupted)
    delta = (a_c - a_x)[:, positions]  # [b, P, d_sae]
    if atoms is None:
        total = delta.abs().sum((0, 1))
        atoms = [int(i) for i in total.argsort(descending=True)[:max_atoms] if total[i] > 0]
    atoms = list(atoms)
    A = atom_matrices(sae)
    L, h, B = sae.cfg.layer, sae.cfg.head, clean.shape[0]

    def adds(t_idx: int, t: int, change: Callable[[int], Tensor]) -> list[WriteEdit]:
        return [WriteEdit(layer=L, pos=t, head=h, op="add", matrix=change(b), batch=b, mode=sae.cfg.write_mode)
                for b in range(B)]

    patches = []
    for j, t in enumerate(positions):
        for i in atoms:
            patches.append(adds(j, t, lambda b, j=j, i=i: delta[b, j, i] * A[i]))
        if include_error:
            patches.append(adds(j, t, lambda b, t=t: e_c[b, t] - e_x[b, t]))
    with model.options(write_mode=sae.cfg.write_mode):
        vals = []
        step = max(1, max_rows // B)
        for s in tqdm(range(0, len(patches), step), desc="patching atoms", disable=not progress):
            vals += run_edit_rows(model, corrupted, L, patches[s:s + step], metric, max_rows)
        base_clean, base_corr = _value(metric(model(clean))), _value(metric(model(corrupted)))
    n = len(atoms) + int(include_error)
    return _result(vals, (len(positions), n), base_clean, base_corr,
                   {"pos": positions, "atom": atoms + (["error"] if include_error else [])})

"""Many WriteSAEs trained as one module: cells (layer, head) stacked along the atom axis (issue 13).

:class:`StackedTrainingWriteSAE` holds ``C`` cells' dictionaries of the same shape and settings. The atoms of
cell ``c`` are rows ``c n .. (c + 1) n - 1`` of the factor parameters (``enc_key``, ``enc_value``, ``dec_key``,
``dec_value`` ``[C n, r, d]``) and of ``b_enc`` ``[C n]``; ``b_dec`` is ``[C, d_in]``. A training batch is
``[N, C, d]``: row ``i`` of every cell (``d = d_k d_v`` for the dense layout, ``d_k + d_v`` for factors).

One step serves every cell with a few batched GEMMs: the selecting GEMM is one ``bmm`` over the cell axis, and
everything after it works on the selected (row, atom) pairs with global atom indices ``c n + i``, through the
same kernels as one cell (``kernels.py``). The loss is the sum of the cells' losses; different cells share no
parameter, so each cell's gradient is its own loss's gradient, and the trainer (``cells.StackedTrainer``) clips
gradients per cell and keeps SAELens' per-atom dead counters, so a stacked run trains each cell as its own run
would.

Reference: the cells' own ``TrainingWriteSAE``s (:meth:`StackedTrainingWriteSAE.cell` gives one); the test
``tests/test_cells.py::test_stacked_training_equals_cells_one_at_a_time`` holds a stacked run equal to training
the cells one after another (final weights, fp32 tolerance).

Stacked: bilinear encoder, rank-r decoder, TopK or BatchTopK, dense or factor layout (:func:`stackable`); other
settings train one cell after another (``cells.train_cells``).

Data parallel (:meth:`StackedTrainingWriteSAE.data_parallel`, under torchrun): every rank holds every cell and is
given the whole global batch; it computes the step on its contiguous share of the rows with the losses scaled to
the global batch, so the all-reduced (summed) gradient is the single-process gradient. BatchTopK's batch-wide
selection and threshold are taken over all ranks (an all-gather of each rank's candidates), and resampling uses
the whole batch on every rank, so the parameters stay identical on all ranks.
"""

from __future__ import annotations

import copy

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from torch import Tensor, nn

from . import kernels
from .config import WriteSAETrainingConfig
from .training import TrainingWriteSAE

_FACTORS = ("enc_key", "enc_value", "dec_key", "dec_value", "b_enc")
# settings that must agree between stacked cells (layer, head and hook names may differ)
_SHARED = ("d_in", "d_sae", "d_k", "d_v", "encoder", "encoder_rank", "decoder_rank", "activation", "k", "aux_k",
           "aux_loss_coefficient", "resample_every", "input_layout", "topk_threshold_lr", "apply_b_dec_to_input",
           "dtype", "device")


def stackable(cfg: WriteSAETrainingConfig) -> str | None:
    """None when cells of ``cfg``'s settings can train stacked, else the reason they cannot (one line)."""
    if cfg.encoder != "bilinear":
        return "a dense encoder"
    if cfg.decoder_rank is None:
        return "a dense decoder"
    if cfg.activation not in ("topk", "batchtopk"):
        return f"activation {cfg.activation!r}"
    return None


class StackedTrainingWriteSAE(TrainingWriteSAE):
    """``C`` cells' training WriteSAEs as one module (see the module docstring for the layout)."""

    def __init__(self, cells: list[TrainingWriteSAE]):
        if not cells:
            raise ValueError("StackedTrainingWriteSAE needs at least one cell")
        cfgs = [s.cfg for s in cells]
        why = stackable(cfgs[0])
        if why is not None:
            raise ValueError(f"cells with {why} cannot be stacked; train them one after another")
        for c in cfgs[1:]:
            diff = [f for f in _SHARED if getattr(c, f) != getattr(cfgs[0], f)]
            if diff:
                raise ValueError(f"stacked cells must share their SAE settings; {diff} differ")
        cfg = copy.deepcopy(cfgs[0])
        cfg.d_sae = len(cells) * cfgs[0].d_sae
        with torch.random.fork_rng(devices=[]):  # the cells' own initialisation is copied in below
            super().__init__(cfg)
        self.cell_cfgs = [copy.deepcopy(c) for c in cfgs]
        self.n_cells, self.n = len(cells), cfgs[0].d_sae
        with torch.no_grad():
            for name in _FACTORS:
                getattr(self, name).copy_(torch.cat([getattr(s, name).detach() for s in cells]))
        self.b_dec = nn.Parameter(torch.stack([s.b_dec.detach() for s in cells]).clone())
        if cfg.activation == "batchtopk":
            self.topk_threshold = torch.stack([s.topk_threshold for s in cells]).clone()
        self._place = None  # data parallel: this rank's place (distributed.Place)

    def data_parallel(self, place) -> None:
        """Train data-parallel as rank ``place.rank`` of ``place.world_size`` (see the module docstring)."""
        self._place = place if place is not None and place.distributed else None

    # ------------------------------------------------------------------ cells in and out
    def cell(self, c: int) -> TrainingWriteSAE:
        """Cell ``c`` as its own ``TrainingWriteSAE`` on this module's device (a copy of its parameters; the global
        RNG is untouched: it is built on the CPU, as the cells were, and moved)."""
        with torch.random.fork_rng(devices=[]):
            sae = TrainingWriteSAE(copy.deepcopy(self.cell_cfgs[c]))
        sae.to(self.b_enc.device)
        sae.kernels = self.kernels
        self._copy(sae, c, into_cell=True)
        return sae

    @torch.no_grad()
    def set_cell(self, c: int, sae: TrainingWriteSAE) -> None:
        """Write ``sae``'s parameters back as cell ``c``."""
        self._copy(sae, c, into_cell=False)

    @torch.no_grad()
    def _copy(self, sae: TrainingWriteSAE, c: int, into_cell: bool) -> None:
        rows = slice(c * self.n, (c + 1) * self.n)
        pairs = [(getattr(sae, name), getattr(self, name)[rows]) for name in _FACTORS]
        pairs.append((sae.b_dec, self.b_dec[c]))
        if self.cfg.activation == "batchtopk":
            pairs.append((sae.topk_threshold, self.topk_threshold[c]))
        for mine, stacked in pairs:
            (mine if into_cell else stacked).copy_(stacked if into_cell else mine)

    # ------------------------------------------------------------------ the step
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One step of every cell: ``step_input.sae_in`` ``[N, C, d]``; the dead mask is ``[C n]`` (SAELens'
        per-atom counters over the stacked atoms). Returns ``feature_acts`` / ``hidden_pre`` ``[N, C n]`` and
        ``metrics["mse_per_cell"]`` ``[C]`` (each cell's MSE loss)."""
        self.normalize_decoder()
        x = step_input.sae_in
        C, n = self.n_cells, self.n
        if x.dim() != 3 or x.shape[1] != C:
            raise ValueError(f"a stacked step takes batches [N, {C} cells, d], got {list(x.shape)}")
        mask = None if step_input.dead_neuron_mask is None else step_input.dead_neuron_mask.view(C, n)
        resampled = None
        if self.cfg.resample_every and step_input.n_training_steps > 0 and mask is not None and \
                step_input.n_training_steps % self.cfg.resample_every == 0:
            # before the step's graph exists, as for one cell; on the whole batch (every rank alike)
            resampled = self._resample(x.transpose(0, 1), mask)
        B = x.shape[0]
        if self._place is not None:
            if B % self._place.world_size:
                raise ValueError(f"data-parallel batches must split evenly: {B} rows over "
                                 f"{self._place.world_size} ranks")
            share = B // self._place.world_size
            x = x[self._place.rank * share:(self._place.rank + 1) * share]
        X = x.transpose(0, 1)
        if self.cfg.input_layout == "factors":
            losses, acts, pre, mse = self._factored_cells_step(X, mask, B)
        else:
            losses, acts, pre, mse = self._dense_cells_step(X, mask, B)
        N = x.shape[0]
        if N != B:  # this rank's rows: the losses as shares of the global batch's (summed over ranks)
            losses = {key: value * (N / B) for key, value in losses.items()}
            mse = mse * (N / B)
        out = TrainStepOutput(sae_in=x, sae_out=x, feature_acts=acts.transpose(0, 1).reshape(N, C * n),
                              hidden_pre=pre.detach().transpose(0, 1).reshape(N, C * n),
                              loss=sum(losses.values()), losses=losses)
        out.metrics["mse_per_cell"] = mse
        if self.cfg.activation == "batchtopk":
            self._update_thresholds(acts.detach())
        if resampled is not None:
            out.metrics["resampled_atoms"] = resampled
        return out

    def _offsets(self, device) -> Tensor:
        return (torch.arange(self.n_cells, device=device) * self.n).view(self.n_cells, 1, 1)

    def _dense_support(self, pre: Tensor, n_rows: int) -> tuple[Tensor, Tensor | None]:
        """Each row's codes ``[C, N, m]`` (local atom indices) and, for BatchTopK, which are kept."""
        cfg = self.cfg
        C, N, n = pre.shape
        if cfg.activation == "topk":
            return pre.topk(cfg.k, dim=-1, sorted=False).indices, None
        support = self._batch_topk(pre.relu(), int(cfg.k * n_rows))
        idx, keep = kernels.select_support(support.view(C * N, n))
        return idx.view(C, N, -1), keep.view(C, N, -1)

    def _batch_topk(self, relu: Tensor, count: int) -> Tensor:
        """BatchTopK per cell: the ``count`` largest of ``relu [C, N, n]`` over the (global) batch, as a mask. Data
        parallel: the ``count``-th largest over every rank's candidates is the threshold."""
        C, N, n = relu.shape
        flat = relu.reshape(C, N * n)
        if self._place is None:
            chosen = flat.topk(count, dim=-1).indices
            return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, chosen, True).view(C, N, n)
        import torch.distributed as dist

        local = flat.topk(min(count, N * n), dim=-1).values.contiguous()
        parts = [torch.empty_like(local) for _ in range(self._place.world_size)]
        dist.all_gather(parts, local)
        threshold = torch.cat(parts, 1).topk(count, dim=-1).values[:, -1:]
        return (flat >= threshold).view(C, N, n)

    def _aux_support(self, pre: Tensor, mask: Tensor | None):
        """Aux-k codes on each cell's dead atoms: ``(indices [C, N, K], valid [C, N, K], scale [C])`` with ``K`` the
        largest ``min(aux_k, n_dead)`` of the cells (``valid`` marks a cell's first ``min(aux_k, n_dead)``), or
        None when no cell has a dead atom."""
        cfg = self.cfg
        if mask is None or cfg.aux_loss_coefficient == 0:
            return None
        n_dead = mask.sum(1)
        if int(n_dead.max()) == 0:
            return None
        k_aux = n_dead.clamp(max=cfg.aux_k)
        K = int(k_aux.max())
        C, N, _ = pre.shape
        idx = torch.where(mask[:, None, :], pre, -torch.inf).topk(K, dim=-1)
        valid = (torch.arange(K, device=pre.device)[None] < k_aux[:, None])[:, None, :].expand(C, N, K)
        scale = (n_dead.to(pre.dtype) / cfg.aux_k).clamp(max=1.0)
        return idx, valid, scale

    def _dense_cells_step(self, X: Tensor, mask: Tensor | None, n_rows: int):
        cfg = self.cfg
        C, N = X.shape[:2]
        n, d_in = self.n, cfg.d_in
        Xf = X.reshape(C, N, d_in).to(self.b_enc.dtype)
        b_dec = self.b_dec if cfg.apply_b_dec_to_input else None
        Xc = Xf - b_dec[:, None] if b_dec is not None else Xf
        with torch.no_grad():
            E = kernels.atom_matrix(self.enc_key, self.enc_value, out=self._atoms_buffer(Xf)).view(C, n, d_in)
            pre0 = torch.bmm(Xc, E.transpose(1, 2))  # [C, N, n]: every cell's selecting GEMM at once
            pre = pre0 + self.b_enc.view(C, 1, n)
            idx, keep = self._dense_support(pre, n_rows)
            m = idx.shape[-1]
            aux = self._aux_support(pre, mask)
            all_idx = idx if aux is None else torch.cat([idx, aux[0].indices], -1)
            vals0 = pre0.gather(-1, all_idx).reshape(C * N, -1)
            gidx = (all_idx + self._offsets(X.device)).reshape(C * N, -1)
        sel = kernels.bilinear_pre_at(vals0, Xc.reshape(C * N, cfg.d_k, cfg.d_v), gidx, self.enc_key,
                                      self.enc_value, b_dec)
        sel = sel + kernels.gather_rows(self.b_enc, gidx)
        values = sel[:, :m].relu()
        if keep is not None:
            values = values * keep.reshape(C * N, m)
        dec = self._decode_selected(values, gidx[:, :m]).view(C, N, d_in)
        target = Xc if b_dec is not None else Xf - self.b_dec[:, None]
        mse = (dec - target).pow(2).sum((1, 2)) / N
        losses = {"mse_loss": mse.sum()}
        if aux is not None:
            _, valid, scale = aux
            residual = Xf - (dec.detach() + self.b_dec.detach()[:, None])
            codes = sel[:, m:].relu() * valid.reshape(C * N, -1)
            aux_recon = self._decode_selected(codes, gidx[:, m:]).view(C, N, d_in)
            err = (aux_recon - residual).pow(2).sum((1, 2)) / N
            losses["auxiliary_reconstruction_loss"] = cfg.aux_loss_coefficient * (scale * err).sum()
        acts = torch.zeros_like(pre).scatter(-1, idx, values.detach().view(C, N, m))
        return losses, acts, pre, mse.detach()

    # factored layout: k v^T never formed; the same inner-product algebra as one cell (training.py / atoms.py)
    def _factored_cells_step(self, X: Tensor, mask: Tensor | None, n_rows: int):
        cfg = self.cfg
        C, N = X.shape[:2]
        dk, dv, n = cfg.d_k, cfg.d_v, self.n
        if X.shape[-1] != dk + dv:
            raise ValueError(f"input_layout='factors' expects rows of d_k + d_v = {dk + dv}, got {X.shape[-1]}")
        X = X.to(self.b_enc.dtype)
        k, v = X[..., :dk], X[..., dk:]
        B = self.b_dec.view(C, dk, dv)
        off = self._offsets(X.device)
        pre = self._pre_factored(k, v, B)  # [C, N, n], differentiable in every encoder parameter
        if cfg.activation == "topk":
            top = pre.topk(cfg.k, dim=-1, sorted=False)
            values, idx = top.values.relu(), top.indices
            acts = torch.zeros_like(pre).scatter(-1, idx, values)
        else:  # BatchTopK per cell, then each row's nonzero codes
            relu = pre.relu()
            acts = relu * self._batch_topk(relu.detach(), int(cfg.k * n_rows))
            support = acts.detach() != 0
            m = max(int(support.sum(-1).max()), 1)
            idx = (support.to(acts.dtype) + acts.detach().abs()).topk(min(m, n), dim=-1).indices
            values = acts.gather(-1, idx)
        gidx = (idx + off).reshape(C * N, -1)
        err = self._factored_err(k, v, values, gidx, B)
        mse = err.mean(1)
        losses = {"mse_loss": mse.sum()}
        aux = self._aux_support(pre.detach(), mask)
        if aux is not None:
            _, valid, scale = aux
            K = valid.shape[-1]
            masked = torch.where(mask[:, None, :], pre, -torch.inf).topk(K, dim=-1)
            c = (masked.values.relu() * valid).reshape(C * N, K)
            cidx = (masked.indices + off).reshape(C * N, K)
            a = values.detach().reshape(C * N, -1)
            # <R, A_j> with the residual R detached (as one cell's aux-k): gradient only through A_j
            r_dot = (c * (self._dots_at(k, v, cidx) - self._bias_dots_at(B.detach(), cidx, C))).sum(-1) \
                - self._code_gram(a, gidx, c, cidx, detach_left=True)
            per_row = err.detach().reshape(-1) - 2 * r_dot + self._code_gram(c, cidx, c, cidx)
            losses["auxiliary_reconstruction_loss"] = cfg.aux_loss_coefficient * (scale * per_row.view(C, N).mean(1)).sum()
        return losses, acts.detach(), pre, mse.detach()

    def _pre_factored(self, k: Tensor, v: Tensor, B: Tensor) -> Tensor:
        """``(u~.k)(w~.v) - u~^T B w~ + b_enc`` per cell: ``k [C, N, d_k]``, ``v [C, N, d_v]`` -> ``[C, N, n]``."""
        C, n, cfg = self.n_cells, self.n, self.cfg
        EK = self.enc_key.view(C, n, -1, cfg.d_k)
        EV = self.enc_value.view(C, n, -1, cfg.d_v)
        pre = (torch.einsum("cNk,cnjk->cNnj", k, EK) * torch.einsum("cNv,cnjv->cNnj", v, EV)).sum(-1)
        if cfg.apply_b_dec_to_input:
            pre = pre - torch.einsum("cnjk,ckv,cnjv->cn", EK, B, EV)[:, None]
        return pre + self.b_enc.view(C, 1, n)

    def _dots_at(self, k: Tensor, v: Tensor, gidx: Tensor) -> Tensor:
        """``<k v^T, A_i>_F`` at the atoms ``gidx [C N, K]`` -> ``[C N, K]``."""
        kf, vf = k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])
        U, W = self.dec_key[gidx], self.dec_value[gidx]  # [C N, K, r, d]
        return (torch.einsum("Nk,NKjk->NKj", kf, U) * torch.einsum("Nv,NKjv->NKj", vf, W)).sum(-1)

    def _bias_dots_at(self, B: Tensor, gidx: Tensor, C: int) -> Tensor:
        """``<B_c, A_i>_F`` at the atoms ``gidx [C N, K]`` of each row's cell -> ``[C N, K]``."""
        U, W = self.dec_key[gidx], self.dec_value[gidx]
        U, W = U.view(C, -1, *U.shape[1:]), W.view(C, -1, *W.shape[1:])
        return torch.einsum("cNKjk,ckv,cNKjv->cNK", U, B, W).reshape(gidx.shape)

    def _factored_err(self, k: Tensor, v: Tensor, values: Tensor, gidx: Tensor, B: Tensor) -> Tensor:
        """``||k v^T - (sum c A + B_c)||_F^2`` ``[C, N]`` from inner products of each row's selected atoms."""
        C, N = k.shape[:2]
        vals = values.reshape(C * N, -1)
        kk = (k * k).sum(-1) * (v * v).sum(-1)
        cross = (self._dots_at(k, v, gidx) * vals).sum(-1).view(C, N)
        quad = self._code_gram(vals, gidx, vals, gidx).view(C, N)
        xb = torch.einsum("cNk,ckv,cNv->cN", k, B, v)
        rb = (self._bias_dots_at(B, gidx, C) * vals).sum(-1).view(C, N)
        return kk - 2 * cross + quad - 2 * (xb - rb) + (B * B).sum((1, 2))[:, None]

    @torch.no_grad()
    def _update_thresholds(self, acts: Tensor) -> None:
        """BatchTopK: each cell's EMA of its smallest positive code (as one cell's ``_update_threshold``)."""
        lowest = torch.where(acts > 0, acts, torch.inf).flatten(1).amin(1).double()
        if self._place is not None:
            import torch.distributed as dist

            dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        has = torch.isfinite(lowest)
        lr = self.cfg.topk_threshold_lr
        self.topk_threshold.copy_(torch.where(has, self.topk_threshold * (1 - lr) + lr * lowest,
                                              self.topk_threshold))

    @torch.no_grad()
    def _resample(self, X: Tensor, mask: Tensor) -> int:
        """Each cell's dead atoms resampled as one cell's ``resample_dead_atoms`` does (rare: a loop is fine)."""
        total = 0
        for c in range(self.n_cells):
            if bool(mask[c].any()):
                sae = self.cell(c)
                total += sae.resample_dead_atoms(X[c], mask[c])
                self.set_cell(c, sae)
        return total


__all__ = ["StackedTrainingWriteSAE", "stackable"]

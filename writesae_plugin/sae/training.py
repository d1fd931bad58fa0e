"""Training WriteSAE for SAELens' ``SAETrainer``.

* Decoder factors are renormalised to unit norm before every step (atoms stay unit-Frobenius for rank 1).
* Loss: MSE (summed over the matrix, mean over the batch) + aux-k on dead atoms (coefficient
  ``aux_loss_coefficient``, default 1/32; docs/method.md 5) + the L0 penalty for JumpReLU.
* ``input_layout="factors"``: batches are ``[N, d_k + d_v]`` concatenated write factors; encoder, MSE and
  aux-k are computed from inner products only (``atoms.py``), never forming ``k v^T``, for bilinear encoders and
  rank-r decoders; a dense encoder or decoder (``n_f x d_in`` atoms) forms the batch's ``[N, d_in]`` writes and takes
  the dense layout's selected-atoms step, which is cheaper for dense atoms than any inner-product formula.
* Optional resampling of dead atoms every ``resample_every`` steps (the paper's recipe): a dead atom is
  re-initialised to the leading singular pair of a badly reconstructed input's residual.
* BatchTopK keeps an EMA threshold and is exported as a threshold (``jumprelu``) WriteSAE, as SAELens does.
* Dense layout, fast kernels (``kernels="fast"``, the default, and no hooks attached to the SAE): one no-grad GEMM
  against the materialised encoder atoms gives every pre-activation; the codes (TopK / BatchTopK / JumpReLU
  support and band) and the aux-k atoms are chosen from it, and values and gradients are then computed at the
  selected (row, atom) pairs only (``kernels.py``). Codes denser than ``d_sae / 8`` per row fall back to the
  materialised-atom GEMMs. ``kernels="reference"`` runs the readable einsum step (tests hold the two equal).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.jumprelu_sae import JumpReLU as JumpReLUFn
from sae_lens.saes.jumprelu_sae import Step
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopK
from torch import Tensor, nn

from . import atoms, kernels
from .config import WriteSAETrainingConfig
from .write_sae import WriteSAEMixin


class _TrainJumpReLU(nn.Module):
    def __init__(self, sae):
        super().__init__()
        self._sae = [sae]

    def forward(self, x: Tensor) -> Tensor:
        sae = self._sae[0]
        return JumpReLUFn.apply(x, sae.log_threshold.exp(), sae.cfg.jumprelu_bandwidth, False)


class TrainingWriteSAE(WriteSAEMixin, TrainingSAE[WriteSAETrainingConfig]):
    """Training WriteSAE (``architecture = "write_sae"`` in SAELens' training registry)."""

    def __init__(self, cfg: WriteSAETrainingConfig, use_error_term: bool = False):
        if not isinstance(cfg, WriteSAETrainingConfig):
            raise TypeError(f"TrainingWriteSAE needs a WriteSAETrainingConfig, got {type(cfg).__name__}")
        super().__init__(cfg, use_error_term)
        self._last_layout = None

    def initialize_weights(self) -> None:
        WriteSAEMixin.initialize_weights(self)
        if self.cfg.activation == "batchtopk":
            self.register_buffer("topk_threshold", torch.zeros((), dtype=torch.double, device=self.device))
        if self.cfg.activation == "jumprelu":
            del self.threshold
            init = torch.full((self.cfg.d_sae,), float(self.cfg.jumprelu_init_threshold), dtype=self.dtype,
                              device=self.device)
            self.log_threshold = nn.Parameter(init.log() if self.device.type != "meta" else init)

    def get_activation_fn(self):
        if self.cfg.activation == "topk":
            return TopK(self.cfg.k)
        if self.cfg.activation == "batchtopk":
            return BatchTopK(self.cfg.k)
        return _TrainJumpReLU(self)

    def get_coefficients(self) -> dict[str, float]:
        return {"l0": self.cfg.l0_coefficient} if self.cfg.activation == "jumprelu" else {}

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        X, layout = self._select(x)
        X = self.hook_sae_input(X)
        pre = self.hook_sae_acts_pre(self._pre(X))
        acts = self.hook_sae_acts_post(self.activation_fn(pre))
        self._last_layout = layout
        return acts, pre

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_with_hidden_pre(x)[0]

    # ------------------------------------------------------------------ unit-norm decoder
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.decoder_rank is None:
            self.dec_dense.div_(self.dec_dense.norm(dim=-1, keepdim=True).clamp(min=1e-12))
        else:
            self.dec_key.div_(self.dec_key.norm(dim=-1, keepdim=True).clamp(min=1e-12))
            self.dec_value.div_(self.dec_value.norm(dim=-1, keepdim=True).clamp(min=1e-12))

    # ------------------------------------------------------------------ the step
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self.normalize_decoder()
        x = step_input.sae_in
        resampled = None
        if self.cfg.resample_every and step_input.n_training_steps > 0 and \
                step_input.n_training_steps % self.cfg.resample_every == 0 and step_input.dead_neuron_mask is not None:
            # before this step's graph exists: the fast step saves the weights for its backward, so changing them
            # in place after the forward would invalidate it
            resampled = self.resample_dead_atoms(x, step_input.dead_neuron_mask)
        if self.cfg.input_layout == "factors":
            out = self._factored_step(step_input)
        else:
            out = self._dense_step(step_input)
        if self.cfg.activation == "batchtopk":
            self._update_threshold(out.feature_acts)
            out.metrics["topk_threshold"] = float(self.topk_threshold)
        if resampled is not None:
            out.metrics["resampled_atoms"] = resampled
        return out

    def _hooks_attached(self) -> bool:
        return any(len(hp._forward_hooks) or len(hp._backward_hooks) for hp in self.hook_dict.values())

    def _dense_step(self, step_input: TrainStepInput) -> TrainStepOutput:
        if self.kernels == "fast" and not self._hooks_attached():
            out = self._selected_atoms_step(step_input)
            if out is not None:
                return out
        sae_in = step_input.sae_in
        acts, pre = self.encode_with_hidden_pre(sae_in)
        recon = self.decode(acts)
        mse = (recon - sae_in).pow(2).reshape(sae_in.shape[0], -1).sum(-1).mean()
        losses = {"mse_loss": mse}
        losses.update(self._aux_losses(step_input, pre, acts, residual=(sae_in - recon).detach()))
        return TrainStepOutput(sae_in=sae_in, sae_out=recon, feature_acts=acts, hidden_pre=pre,
                               loss=sum(losses.values()), losses=losses)

    def _selected_atoms_step(self, step_input: TrainStepInput) -> TrainStepOutput | None:
        """The dense-layout step on the selected (row, atom) pairs; None when the codes are too dense for it.

        Same losses, codes and gradients as ``_dense_step``'s reference path (fp32 rounding aside).
        """
        cfg = self.cfg
        sae_in = step_input.sae_in
        X, layout = self._select(sae_in)
        if layout.passthrough is not None:
            return None  # a per-head SAE on a multi-head input: the reference path keeps the other heads
        lead = X.shape[:-2]
        Xf = X.reshape(-1, cfg.d_in).to(self.b_enc.dtype)
        N, n = Xf.shape[0], cfg.d_sae
        b_dec = self.b_dec if cfg.apply_b_dec_to_input else None
        Xc = Xf - b_dec if b_dec is not None else Xf  # centred input; carries b_dec's gradient
        with torch.no_grad():
            E = None if cfg.encoder == "dense" else kernels.atom_matrix(self.enc_key, self.enc_value,
                                                                      out=self._atoms_buffer(Xf))
            pre0 = Xc @ self.W_enc if E is None else Xc @ E.T
            pre = pre0 + self.b_enc
            keep = None
            if cfg.activation == "topk":
                idx = pre.topk(cfg.k, dim=-1, sorted=False).indices
            elif cfg.activation == "batchtopk":
                chosen = pre.relu().flatten().topk(int(cfg.k * N)).indices
                support = torch.zeros(N * n, dtype=torch.bool, device=pre.device)
                support[chosen] = True
                idx, keep = kernels.select_support(support.view(N, n))
            else:  # JumpReLU: values on the support, threshold gradients on the rectangle band around it
                t = self.log_threshold.exp()
                z = (pre - t) / cfg.jumprelu_bandwidth
                idx, _ = kernels.select_support((pre > t) | ((z > -0.5) & (z < 0.5)))
            m = idx.shape[1]
            if m * 8 > n:
                return None
            mask = step_input.dead_neuron_mask
            n_dead = int(mask.sum()) if mask is not None else 0
            use_aux = n_dead > 0 and cfg.aux_loss_coefficient != 0
            k_aux = min(cfg.aux_k, n_dead)
            # aux-k codes live on the dead atoms only: while those are few (<= 3 k_aux) the block of dead atoms is
            # cheaper as small GEMMs than k_aux selected pairs per row
            aux_block = use_aux and n_dead <= 3 * k_aux
            all_idx = idx
            if aux_block:
                dead_idx = mask.nonzero().flatten()
                aux_local = pre.index_select(1, dead_idx).topk(k_aux, dim=-1).indices
            elif use_aux:
                aux_idx = torch.where(mask[None], pre, -torch.inf).topk(k_aux, dim=-1).indices
                all_idx = torch.cat([idx, aux_idx], 1)
            vals0 = pre0.gather(1, all_idx)
        if E is None:
            sel = kernels.dense_pre_at(vals0, Xc, all_idx, self.W_enc, b_dec)
        else:
            sel = kernels.bilinear_pre_at(vals0, Xc.view(N, cfg.d_k, cfg.d_v), all_idx, self.enc_key,
                                          self.enc_value, b_dec)
        sel = sel + kernels.gather_rows(self.b_enc, all_idx)
        if cfg.activation == "jumprelu":
            thr = self.log_threshold.exp()
            values = kernels.JumpReLUAt.apply(sel[:, :m], thr[idx], cfg.jumprelu_bandwidth)
        else:
            values = sel[:, :m].relu()
            if keep is not None:
                values = values * keep
        dec = self._decode_selected(values, idx)  # reconstruction minus b_dec
        # ||dec + b_dec - x||^2 = ||dec - Xc||^2 (b_dec's gradient through Xc) with one fused kernel each way
        mse = F.mse_loss(dec, Xc if b_dec is not None else Xf - self.b_dec, reduction="sum") / sae_in.shape[0]
        losses = {"mse_loss": mse}
        if cfg.activation == "jumprelu":
            l0 = Step.apply(pre, self.log_threshold.exp(), cfg.jumprelu_bandwidth, False).sum(-1).mean()
            losses["l0_loss"] = step_input.coefficients.get("l0", cfg.l0_coefficient) * l0
        recon = dec.detach() + self.b_dec.detach()
        if use_aux:
            residual = Xf - recon
            if aux_block:
                aux_recon = self._aux_recon_dead_block(Xc, dead_idx, aux_local)
            else:
                aux_recon = self._decode_selected(sel[:, m:].relu(), aux_idx)
            aux = F.mse_loss(aux_recon, residual, reduction="sum") / N
            scale = min(n_dead / cfg.aux_k, 1.0)
            losses["auxiliary_reconstruction_loss"] = cfg.aux_loss_coefficient * scale * aux
        acts = torch.zeros_like(pre).scatter(1, idx, values).reshape(*lead, n)
        sae_out = self._restore(recon.reshape(*lead, cfg.d_k, cfg.d_v), layout)
        return TrainStepOutput(sae_in=sae_in, sae_out=sae_out, feature_acts=acts, hidden_pre=pre.reshape(*lead, n),
                               loss=sum(losses.values()), losses=losses)

    def _atoms_buffer(self, like: Tensor) -> Tensor:
        """A reusable ``[d_sae, d_in]`` buffer (not a parameter or saved buffer) for the no-grad encoder atoms."""
        buf = getattr(self, "_enc_atoms_buf", None)
        shape = (self.cfg.d_sae, self.cfg.d_in)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._enc_atoms_buf = buf
        return buf

    def _aux_recon_dead_block(self, Xc: Tensor, dead: Tensor, local: Tensor) -> Tensor:
        """Aux-k reconstruction ``[N, d_in]`` (no bias) from the dead atoms ``dead [n_dead]`` alone: their encoder and
        decoder atoms are materialised (``[n_dead, d_in]``) and the codes (the top ``local [N, k_aux]`` of each row's
        dead pre-activations, ReLU'd) meet them in two small GEMMs; ``Xc [N, d_in]`` is the centred input."""
        cfg = self.cfg
        rows = kernels.gather_rows
        if cfg.encoder == "dense":
            pre = Xc @ rows(self.W_enc.T, dead).T
        else:
            pre = Xc @ kernels.atom_matrix(rows(self.enc_key, dead), rows(self.enc_value, dead)).T
        pre = pre + rows(self.b_enc, dead)
        codes = torch.zeros_like(pre).scatter(1, local, pre.gather(1, local).relu())
        if cfg.decoder_rank is None:
            return codes @ rows(self.dec_dense, dead)
        return codes @ kernels.atom_matrix(rows(self.dec_key, dead), rows(self.dec_value, dead))

    def _decode_selected(self, values: Tensor, idx: Tensor) -> Tensor:
        """``sum_a values_Na A_{idx_Na}`` ``[N, d_in]`` (no bias) from the selected atoms only."""
        if self.cfg.decoder_rank is None:
            return kernels.dense_decode_sparse(values, idx, self.dec_dense)
        return kernels.rank_decode_sparse(values, idx, self.dec_key, self.dec_value).reshape(idx.shape[0], -1)

    def _split(self, sae_in: Tensor) -> tuple[Tensor, Tensor]:
        dk, dv = self.cfg.d_k, self.cfg.d_v
        if sae_in.shape[-1] != dk + dv:
            raise ValueError(f"input_layout='factors' expects batches [N, d_k + d_v] = [N, {dk + dv}], "
                             f"got {list(sae_in.shape)}")
        return sae_in[..., :dk], sae_in[..., dk:]

    def _factored_step(self, step_input: TrainStepInput) -> TrainStepOutput:
        k, v = self._split(step_input.sae_in)
        if (self.cfg.encoder == "dense" or self.cfg.decoder_rank is None) and self.kernels == "fast" \
                and not self._hooks_attached():
            # A dense encoder or decoder has n_f x d_in atoms: the inner-product formulas below then cost a
            # [N, n_f, d_k] contraction or a per-row Gram of the selected atoms (17-28x the GEMM floor); the batch's
            # writes formed as [N, d_in] (the size of a dense-layout batch) and the selected-atoms step cost about
            # one GEMM. Same losses and gradients (tests/test_write_sae.py holds both to the full-Gram reference).
            X = (k[:, :, None] * v[:, None, :]).reshape(k.shape[0], self.cfg.d_in)
            out = self._selected_atoms_step(dataclasses.replace(step_input, sae_in=X))
            if out is not None:
                return out
        pre = self.hook_sae_acts_pre(self.pre_from_factors(k, v))
        acts = self.hook_sae_acts_post(self.activation_fn(pre))
        err = self._factored_sq_error(k, v, acts, pre)
        losses = {"mse_loss": err.mean()}
        losses.update(self._aux_losses(step_input, pre, acts, factors=(k, v, err.detach())))
        if step_input.is_logging_step:  # SAELens' logger compares dense sae_in and sae_out
            dense_in = (k[:, :, None] * v[:, None, :]).reshape(k.shape[0], -1)
            sae_in, sae_out = dense_in, self._decode_matrices(acts).reshape(k.shape[0], -1)
        else:
            sae_in = sae_out = step_input.sae_in
        return TrainStepOutput(sae_in=sae_in, sae_out=sae_out, feature_acts=acts, hidden_pre=pre,
                               loss=sum(losses.values()), losses=losses)

    def _gram(self, detach_left: bool = False) -> Tensor:
        """``G_il = <A_i, A_l>_F`` ``[d_sae, d_sae]`` from factors (no atom matrix formed); with
        ``detach_left`` the gradient flows through ``A_l`` only. Readable reference only: the training step
        uses ``_code_gram`` on the selected atoms (tests hold them equal)."""
        d = (lambda t: t.detach()) if detach_left else (lambda t: t)  # noqa: E731
        if self.cfg.decoder_rank is None:
            return d(self.dec_dense) @ self.dec_dense.T
        UU = torch.einsum("ijk,lmk->iljm", d(self.dec_key), self.dec_key)
        WW = torch.einsum("ijv,lmv->iljm", d(self.dec_value), self.dec_value)
        return (UU * WW).sum((-1, -2))

    def _atom_gram(self, i: Tensor, j: Tensor, detach_left: bool = False) -> Tensor:
        """``<A_i, A_j>_F`` for index tensors ``i [..., K1]``, ``j [..., K2]`` -> ``[..., K1, K2]``, touching only
        those atoms' factors."""
        d = (lambda t: t.detach()) if detach_left else (lambda t: t)  # noqa: E731
        if self.cfg.decoder_rank is None:
            return d(self.dec_dense)[i] @ self.dec_dense[j].transpose(-1, -2)
        UU = torch.einsum("...ajk,...bmk->...abjm", d(self.dec_key)[i], self.dec_key[j])
        WW = torch.einsum("...ajv,...bmv->...abjm", d(self.dec_value)[i], self.dec_value[j])
        return (UU * WW).sum((-1, -2))

    def _code_gram(self, xv: Tensor, xi: Tensor, yv: Tensor, yi: Tensor, detach_left: bool = False,
                   method: str = "auto") -> Tensor:
        """``sum_ab x_a y_b <A_{xi_a}, A_{yi_b}>_F`` per row ``[N]`` for sparse codes (values ``[N, K]`` at atom
        indices ``[N, K]``): the Gram of the selected atoms only, never ``d_sae x d_sae``.

        ``method``: ``"rows"`` (each row's ``[K1, K2]`` Gram), ``"union"`` (the Gram of the union of the selected
        atoms ``[|Sx|, |Sy|]``, then ``[N, |Sx|] @ [|Sx|, |Sy|]``) or ``"auto"``, whichever costs fewer flops.
        """
        N, K1 = xi.shape
        K2 = yi.shape[1]
        r = 1 if self.cfg.decoder_rank is None else self.cfg.decoder_rank
        D = self.cfg.d_in if self.cfg.decoder_rank is None else r * (self.cfg.d_k + self.cfg.d_v)
        # flops of one atom pair's inner product: a dense dot of d_in, or r^2 factor dots of d_k + d_v
        pair = D if self.cfg.decoder_rank is None else r * D
        uniq = None
        if method == "auto":
            uniq = torch.unique(xi, return_inverse=True), torch.unique(yi, return_inverse=True)
            nx, ny = uniq[0][0].numel(), uniq[1][0].numel()
            per_row = N * K1 * K2 * pair + N * (K1 + K2) * D
            union = nx * ny * pair + (nx + ny) * D + N * nx * ny  # the last term: [N, nx] @ [nx, ny]
            method = "rows" if per_row <= union else "union"
        if method == "rows":
            return torch.einsum("Na,Nab,Nb->N", xv, self._atom_gram(xi, yi, detach_left), yv)
        if method != "union":
            raise ValueError(f"method must be 'auto', 'rows' or 'union', got {method!r}")
        (Sx, ix), (Sy, iy) = uniq or (torch.unique(xi, return_inverse=True), torch.unique(yi, return_inverse=True))
        nx, ny = Sx.numel(), Sy.numel()
        X = xv.new_zeros(N, nx).scatter_add(1, ix, xv)
        Y = yv.new_zeros(N, ny).scatter_add(1, iy, yv)
        return ((X @ self._atom_gram(Sx, Sy, detach_left)) * Y).sum(-1)

    def _sparse_codes(self, acts: Tensor, pre: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Codes as ``(values, indices)`` ``[N, m]``: each row's nonzero atoms (``k`` for TopK).

        JumpReLU passes its straight-through gradient to the threshold at zero codes whose pre-activation is
        within the bandwidth of the threshold, so with ``pre`` those atoms are selected too (with value 0), and
        the loss's gradient reaches them exactly as through the full formula.
        """
        if self.cfg.activation == "topk":
            score = acts.detach().abs()
            m = self.cfg.k
        else:
            support = acts.detach() != 0
            if self.cfg.activation == "jumprelu" and pre is not None:
                support |= (pre.detach() - self.log_threshold.detach().exp()).abs() <= self.cfg.jumprelu_bandwidth
            score = support.to(acts.dtype) + acts.detach().abs()
            m = max(int(support.sum(-1).max()), 1) if acts.shape[0] else 1
        idx = score.topk(min(m, acts.shape[-1]), dim=-1).indices
        return acts.gather(-1, idx), idx

    def _atom_dots(self, k: Tensor, v: Tensor) -> Tensor:
        """``<k v^T, A_i>_F`` ``[N, d_sae]``."""
        if self.cfg.decoder_rank is None:
            M = self.dec_dense.view(self.cfg.d_sae, self.cfg.d_k, self.cfg.d_v)
            return torch.einsum("Nk,nkv,Nv->Nn", k, M, v)
        return atoms.bilinear_pre_factored(k, v, self.dec_key, self.dec_value)

    def _bias_dots(self, detach_bias: bool = False) -> Tensor:
        """``<b_dec, A_i>_F`` ``[d_sae]``."""
        B = self.b_dec.view(self.cfg.d_k, self.cfg.d_v)
        if detach_bias:
            B = B.detach()
        if self.cfg.decoder_rank is None:
            return self.dec_dense @ B.reshape(-1)
        return torch.einsum("njk,kv,njv->n", self.dec_key, B, self.dec_value)

    def _factored_sq_error(self, k: Tensor, v: Tensor, acts: Tensor, pre: Tensor | None = None) -> Tensor:
        """``||k v^T - (sum_i a_i A_i + B)||_F^2`` per row, from inner products only (the Gram of each row's
        selected atoms, never ``d_sae x d_sae``)."""
        if self.cfg.activation == "topk" and self.cfg.decoder_rank is not None:
            values, indices = acts.topk(self.cfg.k, dim=-1)
            return atoms.factored_sq_error(k, v, values, indices, self.dec_key, self.dec_value,
                                           self.b_dec.view(self.cfg.d_k, self.cfg.d_v))
        B = self.b_dec.view(self.cfg.d_k, self.cfg.d_v)
        kk = (k * k).sum(-1) * (v * v).sum(-1)
        cross = (acts * self._atom_dots(k, v)).sum(-1)
        values, indices = self._sparse_codes(acts, pre)
        quad = self._code_gram(values, indices, values, indices)  # ||sum_i a_i A_i||^2 on the active atoms
        xb = torch.einsum("Nk,kv,Nv->N", k, B, v)
        rb = acts @ self._bias_dots()
        return kk - 2 * cross + quad - 2 * (xb - rb) + (B * B).sum()

    def _factored_sq_error_reference(self, k: Tensor, v: Tensor, acts: Tensor) -> Tensor:
        """Readable reference of ``_factored_sq_error`` with the full ``d_sae x d_sae`` Gram (tests only)."""
        B = self.b_dec.view(self.cfg.d_k, self.cfg.d_v)
        kk = (k * k).sum(-1) * (v * v).sum(-1)
        cross = (acts * self._atom_dots(k, v)).sum(-1)
        quad = ((acts @ self._gram()) * acts).sum(-1)
        xb = torch.einsum("Nk,kv,Nv->N", k, B, v)
        rb = acts @ self._bias_dots()
        return kk - 2 * cross + quad - 2 * (xb - rb) + (B * B).sum()

    # ------------------------------------------------------------------ auxiliary losses
    def _aux_losses(self, step_input, pre, acts, residual=None, factors=None) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.cfg.activation == "jumprelu":
            thr = self.log_threshold.exp()
            l0 = Step.apply(pre, thr, self.cfg.jumprelu_bandwidth, False).sum(-1).mean()
            losses["l0_loss"] = step_input.coefficients.get("l0", self.cfg.l0_coefficient) * l0
        mask = step_input.dead_neuron_mask
        if mask is None or int(mask.sum()) == 0 or self.cfg.aux_loss_coefficient == 0:
            return losses
        num_dead = int(mask.sum())
        k_aux = min(self.cfg.aux_k, num_dead)
        scale = min(num_dead / self.cfg.aux_k, 1.0)
        masked = torch.where(mask[None], pre, -torch.inf)
        top = masked.topk(k_aux, dim=-1)
        aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        if factors is None:  # dense residual R: ||sum_j c_j A_j - R||^2 (no decoder bias)
            recon = (aux_acts @ self._decoder_matrix())
            aux = (recon - residual.reshape(recon.shape)).pow(2).sum(-1).mean()
        else:  # R = k v^T - X^ ; ||R - sum c A||^2 = ||R||^2 - 2 c.<R, A> + c^T G c, G on the selected atoms
            k, v, rr = factors
            c, ci = top.values.relu(), top.indices
            a, ai = self._sparse_codes(acts.detach())
            # <R, A_j> with the residual R detached (as SAELens' dense aux-k): gradient only through A_j
            r_dot = (aux_acts * (self._atom_dots(k, v) - self._bias_dots(detach_bias=True))).sum(-1) \
                - self._code_gram(a, ai, c, ci, detach_left=True)
            aux = (rr - 2 * r_dot + self._code_gram(c, ci, c, ci)).mean()
        losses["auxiliary_reconstruction_loss"] = self.cfg.aux_loss_coefficient * scale * aux
        return losses

    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out) -> dict[str, Tensor]:
        residual = (step_input.sae_in - sae_out).detach()
        return self._aux_losses(step_input, hidden_pre, feature_acts, residual=residual)

    @torch.no_grad()
    def _update_threshold(self, acts: Tensor) -> None:
        positive = acts[acts > 0]
        if positive.numel():
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold.mul_(1 - lr).add_(lr * positive.min().double())

    # ------------------------------------------------------------------ resampling (paper recipe)
    @torch.no_grad()
    def resample_dead_atoms(self, sae_in: Tensor, dead_mask: Tensor) -> int:
        """Re-initialise dead atoms to the top singular pair of the worst-reconstructed inputs' residuals.

        Returns the number of atoms resampled. Forms ``d_k x d_v`` matrices only for those few inputs.
        """
        dead = dead_mask.nonzero().flatten()
        if dead.numel() == 0:
            return 0
        if self.cfg.input_layout == "factors":
            k, v = self._split(sae_in)
            X = k[:, :, None] * v[:, None, :]
        else:
            X, _ = self._select(sae_in)
            X = X.reshape(-1, self.cfg.d_k, self.cfg.d_v)
        acts, _ = self.encode_with_hidden_pre(X)
        R = X - self._decode_matrices(acts)
        worst = R.flatten(1).norm(dim=-1).argsort(descending=True)
        n = min(dead.numel(), worst.numel())
        U, S, Vh = torch.linalg.svd(R[worst[:n]])
        idx = dead[:n]
        if self.cfg.decoder_rank is None:
            self.dec_dense[idx] = (U[:, :, 0, None] * Vh[:, None, 0, :]).reshape(n, -1)
        else:
            self.dec_key[idx] = 0
            self.dec_value[idx] = 0
            self.dec_key[idx, 0] = U[:, :, 0]
            self.dec_value[idx, 0] = Vh[:, 0, :]
        if self.cfg.encoder == "dense":
            self.W_enc[:, idx] = (U[:, :, 0, None] * Vh[:, None, 0, :]).reshape(n, -1).T * 0.2
        else:
            self.enc_key[idx] = 0
            self.enc_value[idx] = 0
            self.enc_key[idx, 0] = U[:, :, 0] * 0.2
            self.enc_value[idx, 0] = Vh[:, 0, :]
        self.b_enc[idx] = 0
        return int(n)

    # ------------------------------------------------------------------ export
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        if self.cfg.activation == "batchtopk":
            thr = state_dict.pop("topk_threshold")
            state_dict["threshold"] = torch.ones_like(state_dict["b_enc"]) * thr.to(state_dict["b_enc"].dtype)
        if self.cfg.activation == "jumprelu":
            state_dict["threshold"] = state_dict.pop("log_threshold").exp()

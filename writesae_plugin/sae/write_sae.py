"""The WriteSAE: a SAELens SAE whose decoder atoms are rank-r matrices ``sum_j u_ij w_ij^T`` (docs/method.md 5).

Input layouts (``encode``) and what ``decode`` returns:

* ``[..., d_k, d_v]`` or flat ``[..., d_k*d_v]``: one head's matrix; codes ``[..., d_sae]``.
* ``[b, p, H, d_k, d_v]`` (5-D) or flat ``[..., H*d_k*d_v]``: a layer's write/state hook. A per-head SAE
  (``cfg.head = h``) encodes head h only (codes ``[..., d_sae]``); ``decode`` then returns the full layout
  with head h reconstructed and every other head passed through unchanged, so a spliced per-head SAE
  changes only its head. A head-shared SAE (``cfg.head = None``) encodes every head (codes
  ``[..., H, d_sae]``).

``decode(encode(x))`` is the whole reconstruction in ``x``'s layout (what SAELens splicing uses). The
layout of the last ``encode`` is remembered for the matching ``decode``; ``decode`` of codes that did not
come from ``encode`` returns ``[..., d_k, d_v]`` (per head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import SAE
from sae_lens.saes.topk_sae import TopK
from torch import Tensor, nn

from . import atoms, kernels
from .config import WriteSAEConfig


@dataclass
class _Layout:
    lead: tuple[int, ...]  # shape of the codes without d_sae
    flat: bool
    passthrough: Tensor | None  # the whole input when one head was selected
    head_axis: bool


class JumpReLU(nn.Module):
    """``x * (x > threshold)`` with a per-atom threshold (a buffer owned by the SAE)."""

    def __init__(self, sae):
        super().__init__()
        self._sae = [sae]  # not a submodule

    def forward(self, x: Tensor) -> Tensor:
        return x * (x > self._sae[0].threshold)


class WriteSAEMixin:
    """Parameters, encode and decode shared by the inference and training WriteSAE.

    ``kernels`` (an instance attribute, not saved) picks the implementation: ``"fast"`` (default) encodes with one
    GEMM against the materialised encoder atoms, decodes gradient-free sparse codes from their selected atoms
    only, and trains TopK / BatchTopK / JumpReLU steps on the selected (row, atom) pairs (``kernels.py``);
    ``"reference"`` runs the readable einsum forms the fast ones are tested against.
    """

    cfg: Any
    kernels: str = "fast"

    # ------------------------------------------------------------------ parameters
    def initialize_weights(self) -> None:
        cfg, dt, dev = self.cfg, self.dtype, self.device
        n, dk, dv = cfg.d_sae, cfg.d_k, cfg.d_v
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dt, device=dev))
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dt, device=dev))
        if cfg.decoder_rank is None:
            W = torch.empty(n, cfg.d_in, dtype=dt, device=dev)
            if dev.type != "meta":
                nn.init.kaiming_uniform_(W)
                W /= W.norm(dim=-1, keepdim=True)
            self.dec_dense = nn.Parameter(W)
        else:
            r = cfg.decoder_rank
            self.dec_key = nn.Parameter(_unit(torch.randn(n, r, dk, dtype=dt, device=dev)))
            self.dec_value = nn.Parameter(_unit(torch.randn(n, r, dv, dtype=dt, device=dev)))
        if cfg.encoder == "dense":
            self.W_enc = nn.Parameter(self._decoder_matrix().detach().T.clone().contiguous())
        else:
            re = cfg.encoder_rank
            if cfg.decoder_rank is not None and cfg.decoder_rank >= re:
                ek, ev = self.dec_key.detach()[:, :re].clone(), self.dec_value.detach()[:, :re].clone()
            else:
                ek = _unit(torch.randn(n, re, dk, dtype=dt, device=dev))
                ev = _unit(torch.randn(n, re, dv, dtype=dt, device=dev))
            self.enc_key, self.enc_value = nn.Parameter(ek), nn.Parameter(ev)
        if cfg.activation in ("jumprelu", "batchtopk"):
            self.register_buffer("threshold", torch.zeros(n, dtype=dt, device=dev))

    def get_activation_fn(self):
        if self.cfg.activation == "topk":
            return TopK(self.cfg.k)
        return JumpReLU(self)

    # ------------------------------------------------------------------ views
    def _decoder_matrix(self) -> Tensor:
        """``[d_sae, d_in]`` (materialised)."""
        if self.cfg.decoder_rank is None:
            return self.dec_dense
        return atoms.atom_matrices(self.dec_key, self.dec_value).reshape(self.cfg.d_sae, self.cfg.d_in)

    @property
    def W_dec(self) -> Tensor:
        """Read-only ``[d_sae, d_in]`` view of the atoms (built on demand, detached)."""
        return self._decoder_matrix().detach()

    @W_dec.setter
    def W_dec(self, value) -> None:
        raise AttributeError("WriteSAE.W_dec is a read-only view of the factored decoder; edit dec_key/dec_value")

    def atom_norms(self) -> Tensor:
        """Frobenius norm of every atom ``[d_sae]``."""
        return self._decoder_matrix().norm(dim=-1)

    # ------------------------------------------------------------------ layouts
    def _select(self, x: Tensor) -> tuple[Tensor, _Layout]:
        """Input in any supported layout -> ``[..., d_k, d_v]`` matrices and the layout to restore."""
        cfg = self.cfg
        dk, dv, d_in, H = cfg.d_k, cfg.d_v, cfg.d_in, cfg.n_heads
        if x.dim() >= 2 and tuple(x.shape[-2:]) == (dk, dv) and not (x.shape[-1] == d_in and x.dim() >= 1 and
                                                                      x.shape[-2] != dk):
            flat = False
            mats = x
        elif x.shape[-1] == d_in:
            flat, mats = True, x.reshape(*x.shape[:-1], dk, dv)
        elif H > 1 and x.shape[-1] == H * d_in:
            flat, mats = True, x.reshape(*x.shape[:-1], H, dk, dv)
        else:
            raise ValueError(f"WriteSAE input must be [..., {dk}, {dv}], [..., H={H}, {dk}, {dv}], "
                             f"[..., {d_in}] or [..., {H * d_in}]; got {list(x.shape)}")
        head_axis = (flat and x.shape[-1] == H * d_in and H > 1) or (not flat and mats.dim() >= 5)
        if head_axis and mats.shape[-3] != H:
            raise ValueError(f"this WriteSAE was made for a hook with {H} value heads, got an input with "
                             f"{mats.shape[-3]} heads ({list(x.shape)}); family/layer mismatch?")
        if head_axis and cfg.head is not None:
            sel = mats[..., cfg.head, :, :]
            return sel, _Layout(tuple(sel.shape[:-2]), flat, x, True)
        return mats, _Layout(tuple(mats.shape[:-2]), flat, None, head_axis)

    def _restore(self, recon: Tensor, layout: _Layout | None) -> Tensor:
        """``[..., d_k, d_v]`` reconstruction -> the layout of the input it came from."""
        if layout is None:
            return recon
        if layout.passthrough is not None:
            x = layout.passthrough
            H, dk, dv = self.cfg.n_heads, self.cfg.d_k, self.cfg.d_v
            mats = x.reshape(*x.shape[:-1], H, dk, dv) if layout.flat else x
            out = mats.clone()
            out[..., self.cfg.head, :, :] = recon.to(out.dtype)
            return out.reshape(x.shape)
        if layout.flat:
            lead = recon.shape[:-3] if layout.head_axis else recon.shape[:-2]
            return recon.reshape(*lead, -1)
        return recon

    # ------------------------------------------------------------------ encode / decode
    def _pre(self, X: Tensor) -> Tensor:
        """Pre-activations ``[N.., d_sae]`` of matrices ``[N.., d_k, d_v]`` (bias-subtracted inside)."""
        cfg = self.cfg
        lead = X.shape[:-2]
        Xf = X.reshape(-1, cfg.d_k, cfg.d_v).to(self.b_enc.dtype)
        if cfg.apply_b_dec_to_input:
            Xf = Xf - self.b_dec.view(cfg.d_k, cfg.d_v)
        if cfg.encoder == "dense":
            pre = kernels.dense_encoder_reference(Xf, self.W_enc)
        elif self.kernels == "reference":
            pre = kernels.bilinear_encoder_reference(Xf, self.enc_key, self.enc_value)
        else:
            pre = kernels.bilinear_encoder_gemm(Xf, self.enc_key, self.enc_value)
        return (pre + self.b_enc).reshape(*lead, cfg.d_sae)

    def pre_from_factors(self, k: Tensor, v: Tensor) -> Tensor:
        """Pre-activations of factored writes ``k v^T`` (``k [N.., d_k]``, ``v [N.., d_v]``).

        Bilinear encoder: ``(u~.k)(w~.v) - u~^T B w~ + b`` with no ``d_k x d_v`` per row. A dense encoder
        has to form the matrices.
        """
        cfg = self.cfg
        if cfg.encoder == "dense":
            return self._pre(k[..., :, None] * v[..., None, :])
        lead = k.shape[:-1]
        kf, vf = k.reshape(-1, cfg.d_k).to(self.b_enc.dtype), v.reshape(-1, cfg.d_v).to(self.b_enc.dtype)
        pre = atoms.bilinear_pre_factored(kf, vf, self.enc_key, self.enc_value)
        if cfg.apply_b_dec_to_input:
            B = self.b_dec.view(cfg.d_k, cfg.d_v)
            pre = pre - torch.einsum("njk,kv,njv->n", self.enc_key, B, self.enc_value)
        return (pre + self.b_enc).reshape(*lead, cfg.d_sae)

    def encode(self, x: Tensor) -> Tensor:
        """Codes of ``x`` (see the module docstring for layouts)."""
        X, layout = self._select(x)
        X = self.hook_sae_input(X)
        pre = self.hook_sae_acts_pre(self._pre(X))
        acts = self.hook_sae_acts_post(self.activation_fn(pre))
        self._last_layout = layout
        return acts

    def encode_factors(self, k: Tensor, v: Tensor) -> Tensor:
        """Codes of factored writes ``k v^T`` (the write site), never forming ``k v^T`` (bilinear)."""
        pre = self.hook_sae_acts_pre(self.pre_from_factors(k, v))
        return self.hook_sae_acts_post(self.activation_fn(pre))

    def _decode_matrices(self, acts: Tensor) -> Tensor:
        cfg = self.cfg
        lead = acts.shape[:-1]
        a = acts.reshape(-1, cfg.d_sae).to(self.b_dec.dtype)
        sparse = None
        if self.kernels != "reference" and not a.requires_grad and a.shape[0]:
            # codes that need no gradient of their own (all of an inference encode): decode from each row's
            # nonzero atoms only when that is much less work than the dense product
            idx, _ = kernels.select_support(a != 0)
            if idx.shape[1] * 8 <= cfg.d_sae:
                sparse = idx, a.gather(1, idx)
        if sparse is not None:
            idx, vals = sparse
            if cfg.decoder_rank is None:
                out = kernels.dense_decode_sparse(vals, idx, self.dec_dense)
            else:
                out = kernels.rank_decode_sparse(vals, idx, self.dec_key, self.dec_value).reshape(-1, cfg.d_in)
        elif cfg.decoder_rank is None:
            out = a @ self.dec_dense
        elif self.kernels == "reference":
            out = kernels.rank_decoder_reference(a, self.dec_key, self.dec_value).reshape(-1, cfg.d_in)
        else:
            out = kernels.rank_decoder_gemm(a, self.dec_key, self.dec_value).reshape(-1, cfg.d_in)
        return (out + self.b_dec).reshape(*lead, cfg.d_k, cfg.d_v)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction in the layout of the ``encode`` these codes came from."""
        layout = getattr(self, "_last_layout", None)
        if layout is not None and tuple(feature_acts.shape[:-1]) != layout.lead:
            layout = None
        self._last_layout = None
        recon = self.hook_sae_recons(self._decode_matrices(feature_acts))
        return self._restore(recon, layout)

    def reconstruction_sq_error_factors(self, k: Tensor, v: Tensor) -> Tensor:
        """``||k v^T - decode(encode_factors(k, v))||_F^2`` per row, without forming matrices (TopK)."""
        cfg = self.cfg
        if cfg.decoder_rank is None or cfg.activation != "topk":
            acts = self.encode_factors(k, v)
            recon = self._decode_matrices(acts)
            return (k[..., :, None] * v[..., None, :] - recon).pow(2).sum((-1, -2))
        pre = self.pre_from_factors(k, v)
        values, indices = torch.topk(pre, cfg.k, dim=-1)
        values = values.relu()
        B = self.b_dec.view(cfg.d_k, cfg.d_v)
        return atoms.factored_sq_error(k.reshape(-1, cfg.d_k), v.reshape(-1, cfg.d_v),
                                       values.reshape(-1, cfg.k), indices.reshape(-1, cfg.k),
                                       self.dec_key, self.dec_value, B).reshape(k.shape[:-1])

    # ------------------------------------------------------------------ folding / whitening
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Make every atom unit-norm, moving its norm into the encoder (exact for JumpReLU/threshold
        codes; for TopK only when the norms are already 1, since rescaling changes the selection)."""
        norms = self.atom_norms().detach().clamp(min=1e-12)
        if torch.allclose(norms, torch.ones_like(norms), atol=1e-6):
            return
        if self.cfg.activation == "topk":
            raise NotImplementedError("folding atom norms into a TopK WriteSAE changes which atoms are selected; "
                                      "WriteSAE training keeps atoms unit-norm, so there is nothing to fold")
        if self.cfg.decoder_rank is None:
            self.dec_dense.div_(norms[:, None])
        else:
            r = self.cfg.decoder_rank
            self.dec_key.div_(norms.sqrt()[:, None, None])
            self.dec_value.div_(norms.sqrt()[:, None, None])
            assert r >= 1
        if self.cfg.encoder == "dense":
            self.W_enc.mul_(norms[None, :])
        else:
            self.enc_key.mul_(norms[:, None, None])
        self.b_enc.mul_(norms)
        if hasattr(self, "threshold"):
            self.threshold.mul_(norms)

    def fold_activation_whitening(self, *args, **kwargs):
        raise NotImplementedError("WriteSAE does not support activation whitening: a whitened basis breaks the "
                                  "rank-1 matrix structure of the atoms")

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold ``x -> x * s`` normalisation: encoder scaled by ``s``, decoder output by ``1/s``."""
        with torch.no_grad():
            if self.cfg.encoder == "dense":
                self.W_enc.mul_(scaling_factor)
            else:
                self.enc_key.mul_(scaling_factor)
            if self.cfg.decoder_rank is None:
                self.dec_dense.div_(scaling_factor)
            else:
                self.dec_value.div_(scaling_factor)
            self.b_dec.div_(scaling_factor)
        self.cfg.normalize_activations = "none"


def _unit(x: Tensor) -> Tensor:
    if x.device.type == "meta":
        return x
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class WriteSAE(WriteSAEMixin, SAE[WriteSAEConfig]):
    """Inference WriteSAE, registered with SAELens as architecture ``"write_sae"``."""

    def __init__(self, cfg: WriteSAEConfig, use_error_term: bool = False):
        if not isinstance(cfg, WriteSAEConfig):
            raise TypeError(f"WriteSAE needs a WriteSAEConfig, got {type(cfg).__name__}")
        super().__init__(cfg, use_error_term)
        self._last_layout = None

    def check_site(self, hook_shape: tuple[int, ...], family: str | None = None) -> None:
        """Raise if this SAE does not fit a hook of ``hook_shape`` (``[b, p, H, d_k, d_v]`` or flat)."""
        cfg = self.cfg
        shape = tuple(hook_shape)
        if family and cfg.family and family != cfg.family:
            raise ValueError(f"WriteSAE trained on family {cfg.family!r} cannot be spliced into {family!r}")
        if len(shape) >= 2 and shape[-2:] == (cfg.d_k, cfg.d_v):
            H = shape[-3] if len(shape) >= 5 else None
        elif shape[-1] in (cfg.d_in, cfg.n_heads * cfg.d_in):
            H = shape[-1] // cfg.d_in if shape[-1] != cfg.d_in else None
        else:
            raise ValueError(f"WriteSAE (d_k={cfg.d_k}, d_v={cfg.d_v}) does not fit a hook of shape {list(shape)}")
        if H is not None and H != cfg.n_heads:
            raise ValueError(f"WriteSAE expects {cfg.n_heads} value heads, the hook has {H}")


def describe(sae) -> str:
    cfg = sae.cfg
    head = "all heads (shared)" if cfg.head is None else f"head {cfg.head}"
    return (f"WriteSAE {cfg.variant} {cfg.activation}(k={cfg.k}) d_sae={cfg.d_sae} on {cfg.site} "
            f"[{cfg.d_k}x{cfg.d_v}] {head}, {cfg.family} layer {cfg.layer}, {cfg.write_mode} writes")


__all__ = ["WriteSAE", "WriteSAEMixin", "describe"]

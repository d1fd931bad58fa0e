"""Matrix-atom algebra of the WriteSAE (docs/method.md section 5), as plain functions on tensors.

Shapes: ``n`` atoms, rank ``r``, key side ``d_k``, value side ``d_v``; ``X`` is ``[N, d_k, d_v]``, a factored
write is ``(k [N, d_k], v [N, d_v])`` with ``X = k v^T``.

* bilinear encoder (rank r): ``pre_i = sum_j u~_ij^T X w~_ij``; on a factored write
  ``sum_j (u~_ij . k)(w~_ij . v)``: no ``d_k x d_v`` matrix is ever formed.
* decoder: ``X^ = sum_i c_i sum_j u_ij w_ij^T``.
* factored loss: ``||k v^T - X^||_F^2 = |k|^2 |v|^2 - 2 sum_i c_i sum_j (u_ij.k)(w_ij.v) + c^T G c`` with the
  Gram ``G_il = sum_jm (u_ij.u_lm)(w_ij.w_lm)``, evaluated on the active atoms only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bilinear_pre(X: Tensor, enc_key: Tensor, enc_value: Tensor) -> Tensor:
    """``[N, d_k, d_v]`` dense input -> ``[N, n]`` (reference form)."""
    return torch.einsum("njk,Nkv,njv->Nn", enc_key, X, enc_value)


def bilinear_pre_factored(k: Tensor, v: Tensor, enc_key: Tensor, enc_value: Tensor) -> Tensor:
    """Factored write ``k [N, d_k]``, ``v [N, d_v]`` -> ``[N, n]`` without forming ``k v^T``."""
    return (torch.einsum("Nk,njk->Nnj", k, enc_key) * torch.einsum("Nv,njv->Nnj", v, enc_value)).sum(-1)


def atom_matrices(dec_key: Tensor, dec_value: Tensor) -> Tensor:
    """Atoms as matrices ``[n, d_k, d_v]`` (materialised: for inspection and ``W_dec``)."""
    return torch.einsum("njk,njv->nkv", dec_key, dec_value)


def decode(acts: Tensor, dec_key: Tensor, dec_value: Tensor) -> Tensor:
    """``[N, n]`` codes -> ``[N, d_k, d_v]``. Sparse codes use only their nonzero atoms' factors."""
    return torch.einsum("Nn,njk,njv->Nkv", acts, dec_key, dec_value)


def decode_sparse(values: Tensor, indices: Tensor, dec_key: Tensor, dec_value: Tensor) -> Tensor:
    """Top-k codes ``values, indices [N, K]`` -> ``[N, d_k, d_v]`` touching only K atoms per row."""
    U, W = dec_key[indices], dec_value[indices]  # [N, K, r, d]
    return torch.einsum("NK,NKjk,NKjv->Nkv", values, U, W)


def factored_sq_error(k: Tensor, v: Tensor, values: Tensor, indices: Tensor, dec_key: Tensor,
                      dec_value: Tensor, bias: Tensor | None = None) -> Tensor:
    """``||k v^T - (sum_K c u w^T + B)||_F^2`` per row ``[N]`` without forming any ``d_k x d_v`` per row.

    ``bias`` ``[d_k, d_v]`` (the decoder bias) is handled through its products with the factors.
    """
    U, W = dec_key[indices], dec_value[indices]  # [N, K, r, d_k], [N, K, r, d_v]
    kk = (k * k).sum(-1) * (v * v).sum(-1)
    cross = ((torch.einsum("Nk,NKjk->NKj", k, U) * torch.einsum("Nv,NKjv->NKj", v, W)).sum(-1) * values).sum(-1)
    gram = (torch.einsum("NKjk,NLmk->NKLjm", U, U) * torch.einsum("NKjv,NLmv->NKLjm", W, W)).sum((-1, -2))
    quad = torch.einsum("NK,NKL,NL->N", values, gram, values)
    err = kk - 2 * cross + quad
    if bias is not None:
        # ||X - R - B||^2 = ||X - R||^2 - 2 <X - R, B> + ||B||^2 ; <k v^T, B> = k^T B v ; <u w^T, B> = u^T B w
        xb = torch.einsum("Nk,kv,Nv->N", k, bias, v)
        rb = (torch.einsum("NKjk,kv,NKjv->NKj", U, bias, W).sum(-1) * values).sum(-1)
        err = err - 2 * (xb - rb) + (bias * bias).sum()
    return err

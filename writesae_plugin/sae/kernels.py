"""Fast WriteSAE kernels and, beside each, the readable reference it is tested against (tests/test_sae_kernels.py).

Shapes: ``N`` rows, ``n`` atoms (``d_sae``), ``r`` the rank of an atom, ``m`` atoms selected per row, a row is
one head's ``d_k x d_v`` matrix (``d_in = d_k * d_v`` flat). Encoders map ``[N, d_k, d_v] -> [N, n]``
pre-activations (before ``b_enc``), decoders map codes ``[N, n] -> [N, d_k, d_v]`` (before ``b_dec``).

Three forms of the same maths, fastest last:

* **reference** (``*_reference``): einsum strings as executable shape docs; the bilinear encoder forms an
  ``[N, n, r, d_v]`` intermediate, so it is slow at real sizes.
* **materialised atoms**: the bilinear encoder's atoms ``vec(sum_j u~_j w~_j^T)`` (``encoder_matrix``) and the
  rank-r decoder's atoms (``decoder_matrix``) are formed once, ``[n, d_in]``, and each map is one GEMM; autograd
  folds the atom gradient back to the factors. Exact gradients for every code (used for inference and as the
  fallback when codes are dense).
* **selected atoms** (``*_at`` / ``*_sparse``): after one no-grad GEMM chooses the codes, a TopK / BatchTopK /
  JumpReLU step only needs values and gradients at the ``m << n`` selected (row, atom) pairs, so everything after
  that GEMM is ``O(N m r d_in)``: batched ``d_k x d_v`` products for factored atoms, ``embedding_bag`` (a
  weighted gather-sum) for dense rows. These are what the training step uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# readable references (one small function per encoder / decoder)
# ---------------------------------------------------------------------------------------------------------


def bilinear_encoder_reference(X: Tensor, enc_key: Tensor, enc_value: Tensor) -> Tensor:
    """``pre_Ni = sum_j u~_ij^T X_N w~_ij``: ``X [N, d_k, d_v]``, ``enc_key [n, r, d_k]``, ``enc_value [n, r, d_v]``
    -> ``[N, n]``."""
    return torch.einsum("njk,Nkv,njv->Nn", enc_key, X, enc_value)


def dense_encoder_reference(X: Tensor, W_enc: Tensor) -> Tensor:
    """``X [N, d_k, d_v]``, ``W_enc [d_in, n]`` -> ``[N, n]``."""
    return X.reshape(X.shape[0], -1) @ W_enc


def rank_decoder_reference(acts: Tensor, dec_key: Tensor, dec_value: Tensor) -> Tensor:
    """``X^_N = sum_i a_Ni sum_j u_ij w_ij^T``: ``acts [N, n]``, ``dec_key [n, r, d_k]``, ``dec_value [n, r, d_v]``
    -> ``[N, d_k, d_v]``."""
    return torch.einsum("Nn,njk,njv->Nkv", acts, dec_key, dec_value)


def dense_decoder_reference(acts: Tensor, dec_dense: Tensor, d_k: int, d_v: int) -> Tensor:
    """``acts [N, n]``, ``dec_dense [n, d_in]`` -> ``[N, d_k, d_v]``."""
    return (acts @ dec_dense).reshape(acts.shape[0], d_k, d_v)


# ---------------------------------------------------------------------------------------------------------
# materialised atoms (one GEMM per map; exact gradients for all codes)
# ---------------------------------------------------------------------------------------------------------


def atom_matrix(key: Tensor, value: Tensor, out: Tensor | None = None) -> Tensor:
    """Factored atoms ``key [n, r, d_k]``, ``value [n, r, d_v]`` -> ``[n, d_k * d_v]`` (``vec(sum_j u_j w_j^T)``).

    Rank 1 is a broadcast product, rank r a batched ``[d_k, r] @ [r, d_v]``; differentiable. ``out`` (no grad
    only): a contiguous ``[n, d_k * d_v]`` tensor to write into, so a training loop reuses one buffer instead of
    page-faulting a fresh ``n x d_in`` allocation every step.
    """
    n, r, dk = key.shape
    dv = value.shape[-1]
    o = None if out is None else out.view(n, dk, dv)
    if r == 1:
        res = torch.mul(key[:, 0, :, None], value[:, 0, None, :], **({} if o is None else {"out": o}))
    else:
        res = torch.bmm(key.transpose(1, 2), value, **({} if o is None else {"out": o}))
    return res.reshape(n, dk * dv)


def bilinear_encoder_gemm(X: Tensor, enc_key: Tensor, enc_value: Tensor, max_atom_elems: int = 1 << 26) -> Tensor:
    """Same as ``bilinear_encoder_reference`` as one GEMM against the materialised atoms: ``[N, d_k, d_v]`` ->
    ``[N, n]``. Atoms are materialised in blocks of at most ``max_atom_elems`` numbers (256 MB in fp32)."""
    Xf = X.reshape(X.shape[0], -1)
    n, d_in = enc_key.shape[0], Xf.shape[1]
    step = max(1, max_atom_elems // d_in)
    if step >= n:
        return Xf @ atom_matrix(enc_key, enc_value).T
    return torch.cat([Xf @ atom_matrix(enc_key[s:s + step], enc_value[s:s + step]).T for s in range(0, n, step)], -1)


def rank_decoder_gemm(acts: Tensor, dec_key: Tensor, dec_value: Tensor) -> Tensor:
    """Same as ``rank_decoder_reference`` as one GEMM against the materialised atoms: ``[N, n]`` ->
    ``[N, d_k, d_v]``."""
    return (acts @ atom_matrix(dec_key, dec_value)).reshape(acts.shape[0], dec_key.shape[-1], dec_value.shape[-1])


# ---------------------------------------------------------------------------------------------------------
# selected atoms (values and gradients at m chosen (row, atom) pairs only)
# ---------------------------------------------------------------------------------------------------------


def _fold_rows(grad_rows: Tensor, idx: Tensor, n: int) -> Tensor:
    """Sum per-pair gradients ``[N * m, ...]`` into the atoms ``idx [N, m]`` they belong to -> ``[n, ...]``.

    ``index_put_(accumulate=True)`` rather than ``index_add_``: on CPU the latter sorts in several parallel passes,
    each a thread wake-up that costs a scheduler tick on a busy machine, for a fold this small.
    """
    return grad_rows.new_zeros((n, *grad_rows.shape[1:])).index_put_((idx.reshape(-1),), grad_rows, accumulate=True)


class _Rows(torch.autograd.Function):
    """``weight.index_select(0, flat)`` whose backward folds with ``_fold_rows``."""

    @staticmethod
    def forward(ctx, weight, flat):
        ctx.save_for_backward(flat)
        ctx.n = weight.shape[0]
        return weight.index_select(0, flat)

    @staticmethod
    def backward(ctx, g):
        flat, = ctx.saved_tensors
        return _fold_rows(g, flat, ctx.n), None


def gather_rows(weight: Tensor, idx: Tensor) -> Tensor:
    """Rows ``weight[idx]`` ``[*idx.shape, *weight.shape[1:]]``, differentiable in ``weight``."""
    return _Rows.apply(weight, idx.reshape(-1)).reshape(*idx.shape, *weight.shape[1:])


class _BilinearAt(torch.autograd.Function):
    """Values: the pre-activations the selecting GEMM already computed. Backward: per selected pair
    ``d/du~_j = g X w~_j``, ``d/dw~_j = g X^T u~_j`` (two batched ``[d_k, d_v]`` products) and, through the
    centred input ``X - b_dec``, ``d/db_dec = -sum_pairs g u~_j w~_j^T`` (one ``[d_k, pairs] @ [pairs, d_v]``)."""

    @staticmethod
    def forward(ctx, values, X, idx, enc_key, enc_value, b_dec):
        ctx.save_for_backward(X, idx, enc_key, enc_value)
        ctx.b_dec_grad = b_dec is not None and b_dec.requires_grad
        ctx.groups = b_dec.shape[0] if b_dec is not None and b_dec.dim() == 2 else 0
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        X, idx, enc_key, enc_value = ctx.saved_tensors
        N, m = idx.shape
        n, r, dk = enc_key.shape
        dv = enc_value.shape[-1]
        flat = idx.reshape(-1)
        gr = (g.repeat_interleave(r, 1) if r > 1 else g)[..., None]
        U = enc_key.index_select(0, flat).reshape(N, m * r, dk)
        W = enc_value.index_select(0, flat).reshape(N, m * r, dv)
        Wg = W * gr
        g_key = g_value = g_bias = None
        if ctx.needs_input_grad[3]:
            gU = torch.bmm(Wg, X.transpose(1, 2))  # [N, m r, d_k] = g X w~
            g_key = _fold_rows(gU.reshape(N * m, r, dk), idx, n)
        if ctx.needs_input_grad[4]:
            gW = torch.bmm(U * gr, X)  # [N, m r, d_v] = g X^T u~
            g_value = _fold_rows(gW.reshape(N * m, r, dv), idx, n)
        if ctx.b_dec_grad:
            if ctx.groups:  # one bias per group of consecutive rows (stacked cells): [G, d_k, d_v]
                G = ctx.groups
                g_bias = -torch.bmm(U.reshape(G, -1, dk).transpose(1, 2), Wg.reshape(G, -1, dv)).reshape(G, -1)
            else:
                g_bias = -(U.reshape(-1, dk).T @ Wg.reshape(-1, dv)).reshape(-1)
        return None, None, None, g_key, g_value, g_bias


def bilinear_pre_at(values: Tensor, X: Tensor, idx: Tensor, enc_key: Tensor, enc_value: Tensor,
                    b_dec: Tensor | None = None) -> Tensor:
    """Differentiable bilinear pre-activations at selected atoms.

    Args:
        values: ``[N, m]`` the pre-activations (without ``b_enc``) at ``idx``, as computed by the selecting GEMM
            (no grad); returned as is, so selection and values agree exactly.
        X: ``[N, d_k, d_v]`` the encoder's input (centred by ``b_dec`` when ``b_dec`` is given), no grad.
        idx: ``[N, m]`` atom indices (int64).
        enc_key, enc_value: ``[n, r, d_k]``, ``[n, r, d_v]`` encoder factors; receive gradients.
        b_dec: ``[d_in]`` the decoder bias subtracted from the input before encoding, or None; ``[G, d_in]``:
            one bias per group of ``N / G`` consecutive rows (cells stacked along the rows, ``sae/stacked.py``).

    Returns ``[N, m]`` equal to ``bilinear_encoder_reference(X, ...)`` gathered at ``idx``, with its gradients.
    """
    return _BilinearAt.apply(values, X.detach(), idx, enc_key, enc_value, b_dec)


class _DenseAt(torch.autograd.Function):
    """Values: the selecting GEMM's. Backward: ``dW_enc[:, i] = sum_{pairs (N, i)} g X_N`` as a weighted
    gather-sum over the rows that selected each atom (``embedding_bag`` on the pairs sorted by atom), and
    ``d/db_dec = -W_enc (sum of g per atom)``."""

    @staticmethod
    def forward(ctx, values, X, idx, W_enc, b_dec):
        ctx.save_for_backward(X, idx, W_enc)
        ctx.b_dec_grad = b_dec is not None and b_dec.requires_grad
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        X, idx, W_enc = ctx.saved_tensors
        N, m = idx.shape
        n = W_enc.shape[1]
        flat = idx.reshape(-1)
        g_W = g_bias = None
        if ctx.needs_input_grad[3]:
            order = flat.argsort()
            rows = torch.div(order, m, rounding_mode="floor")  # the input row of each pair, grouped by atom
            counts = torch.bincount(flat, minlength=n)
            offsets = torch.cumsum(counts, 0) - counts
            g_W = F.embedding_bag(rows, X, offsets, mode="sum", per_sample_weights=g.reshape(-1)[order]).T
        if ctx.b_dec_grad:
            per_atom = g.new_zeros(n).index_add_(0, flat, g.reshape(-1))
            g_bias = -(W_enc @ per_atom)
        return None, None, None, g_W, g_bias


def dense_pre_at(values: Tensor, X: Tensor, idx: Tensor, W_enc: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Differentiable dense-encoder pre-activations at selected atoms: ``values [N, m]`` (no grad, from the
    selecting GEMM), ``X [N, d_in]`` centred input, ``idx [N, m]``, ``W_enc [d_in, n]`` -> ``[N, m]`` equal to
    ``(X @ W_enc)`` gathered at ``idx``, with gradients to ``W_enc`` and ``b_dec`` (when given)."""
    return _DenseAt.apply(values, X.detach().reshape(X.shape[0], -1), idx, W_enc, b_dec)


def rank_decode_sparse(values: Tensor, idx: Tensor, dec_key: Tensor, dec_value: Tensor) -> Tensor:
    """``X^_N = sum_a values_Na sum_j u_{idx_Na, j} w_{idx_Na, j}^T``: ``values, idx [N, m]`` -> ``[N, d_k, d_v]``,
    one batched ``[d_k, m r] @ [m r, d_v]`` product; differentiable in ``values``, ``dec_key``, ``dec_value``."""
    N, m = idx.shape
    n, r, dk = dec_key.shape
    dv = dec_value.shape[-1]
    U = gather_rows(dec_key, idx).reshape(N, m * r, dk)
    W = gather_rows(dec_value, idx).reshape(N, m * r, dv)
    c = values.repeat_interleave(r, 1) if r > 1 else values
    return torch.bmm((U * c[..., None]).transpose(1, 2), W)


def dense_decode_sparse(values: Tensor, idx: Tensor, dec_dense: Tensor) -> Tensor:
    """``X^_N = sum_a values_Na D_{idx_Na}``: ``values, idx [N, m]``, ``dec_dense [n, d_in]`` -> ``[N, d_in]`` as a
    weighted gather-sum (``embedding_bag``), never forming ``[N, m, d_in]``; differentiable."""
    return F.embedding_bag(idx, dec_dense, mode="sum", per_sample_weights=values)


# ---------------------------------------------------------------------------------------------------------
# selection and activations on the selected pairs
# ---------------------------------------------------------------------------------------------------------


def select_support(support: Tensor) -> tuple[Tensor, Tensor]:
    """Rows' supports ``[N, n]`` (bool) -> ``(idx [N, m], keep [N, m])`` with ``m`` the largest support; rows with
    fewer entries are padded with distinct atoms outside their support (``keep`` False)."""
    m = max(int(support.sum(-1).max()), 1) if support.shape[0] else 1
    idx = support.to(torch.float32).topk(min(m, support.shape[-1]), dim=-1, sorted=False).indices
    return idx, support.gather(-1, idx)


class JumpReLUAt(torch.autograd.Function):
    """SAELens' JumpReLU (``x * (x > t)``, straight-through threshold gradient with a rectangle kernel) with one
    threshold per entry (``threshold`` has ``x``'s shape), so it applies to gathered (row, atom) pairs."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold)

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        bw = ctx.bandwidth
        z = (x - t) / bw
        rect = ((z > -0.5) & (z < 0.5)).to(x)
        return (x > t) * g, -(t / bw) * rect * g, None


__all__ = ["bilinear_encoder_reference", "dense_encoder_reference", "rank_decoder_reference",
           "dense_decoder_reference", "atom_matrix", "bilinear_encoder_gemm", "rank_decoder_gemm", "bilinear_pre_at",
           "dense_pre_at", "gather_rows", "rank_decode_sparse", "dense_decode_sparse", "select_support", "JumpReLUAt"]

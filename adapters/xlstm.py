"""xLSTM (mLSTM) write hooks for HF ``xlstm`` (``xLSTMForCausalLM``), on transformers' pure-torch backend.

Derived from ``transformers/models/xlstm/modeling_xlstm.py`` (transformers 5.24, without the external ``xlstm``
package): ``xLSTMLayer.forward`` projects ``q, k`` (``d_k = qk_dim / H``), ``v`` (``d_v = v_dim / H``), the input
and forget gate pre-activations ``i~ = cap(W_i x)``, ``f~ = cap(W_f x)`` ``[H]`` (``cap``: 15 tanh(./15)), and
calls ``xLSTMBackend`` (the chunkwise kernel for prefill, a per-token loop for a tail shorter than a chunk, the
step kernel for one token). Per head the backend keeps the stabilised triple ``(C~, n~, m)``, ``C~``
``[d_k, d_v]`` (key-first), ``n~`` ``[d_k]``, ``m`` a scalar::

    m_t  = max(logsigmoid(f~_t) + m_{t-1}, i~_t)
    C~_t = exp(logsigmoid(f~_t) + m_{t-1} - m_t) C~_{t-1} + exp(i~_t - m_t) k_t v_t^T
    n~_t = exp(logsigmoid(f~_t) + m_{t-1} - m_t) n~_{t-1} + exp(i~_t - m_t) k_t
    h_t  = C~_t^T q'_t / (max(|n~_t^T q'_t|, exp(-m_t)) + eps),     q'_t = d_k^-1/2 q_t

(the chunkwise kernel computes the same stabiliser per position: the max over the same unrolled terms). The
max stabiliser ``m`` depends on the gates only, never on ``C~`` or ``n~``, so the transitions are state- and
write-independent, and the plugin's canonical frame is a scalar-decay recurrence (as Mamba-2's):

* **the state** ``S_t = C~_t``: the matrix memory exactly as the cache stores it (stabilised);
* **the write** ``W_t = k_t (exp(i~_t - m_t) v_t)^T``: key ``k_t`` (the raw key), value ``exp(i~_t - m_t) v_t``;
* **the transition** ``exp(g_t) I`` with ``g_t = logsigmoid(f~_t) + m_{t-1} - m_t`` (``hook_log_decay``, <= 0);
* **the read** ``o_t = S_t^T query_t`` with ``query_t = q'_t / (max(|n~_t^T q'_t|, exp(-m_t)) + eps)``: the
  normaliser's denominator is folded into the query, so ``hook_read`` is the backend's ``h_t`` exactly.

The normaliser ``n~`` (a vector memory with its own write ``exp(i~ - m) k``) and ``m`` belong to the read: an edit
of the write, the state, the decay or the query changes ``C~`` (and the reads through it) and leaves ``n~``,
``m`` and so the denominators as the model computed them. The write has one mode (no erase: raw == delta).

Hooks under ``blocks.{l}.mlstm.``: native ``hook_q``, ``hook_k`` ``[b,p,H,d_k]``, ``hook_v`` ``[b,p,H,d_v]``,
``hook_igate``, ``hook_fgate`` ``[b,p,H]`` (pre-activations after the soft cap; edits change everything
downstream, stabiliser included); canonical ``hook_write_key``, ``hook_write_value``, opt-in ``hook_write`` /
``hook_write_flat``, ``hook_log_decay`` ``[b,p,H]``, ``hook_query`` ``[b,p,H,d_k]``, opt-in ``hook_state``,
``hook_read`` ``[b,p,H,d_v]`` (``h_t`` before the multi-head norm and the output gate). The backend runs as the
model calls it (capture-only outputs are its bits); edits are propagated exactly by the canonical chunked
scalar-decay scan (``adapters/scalar_decay.py``: the zero-value trick on the state change), since the model's
kernel folds the normaliser into its output. Readable reference: :func:`xlstm_reference` (the per-token
recurrence of the backend, from the gate pre-activations) and, in the canonical frame,
:func:`writesae_plugin.adapters.mamba2.mamba2_reference`.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .base import AdapterConfig, HookedRecurrentModel, UnsupportedModelError, WriteEdit, find_decoder_layers
from .gated_deltanet import _alias, _output
from .mamba2 import Mamba2Hooks, _derivative_path
from .ops import straight_through, through_edited_layer, unedited_deltas
from .scalar_decay import dense_decay_scan

XLSTM_MODEL_TYPES = {"xlstm": "transformers.models.xlstm.modeling_xlstm"}
CHUNK = 64  # the canonical scan's chunk


def stabiliser(igate: Tensor, fgate: Tensor, m_initial: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(m [b,T,H], m_prev [b,T,H])``: the max stabiliser after and before each token, from the gate
    pre-activations ``igate``, ``fgate`` ``[b,T,H]`` and the cached ``m_initial`` ``[b,H,1]`` (None: 0), fp32."""
    logf = F.logsigmoid(fgate.float())
    i = igate.float()
    m = torch.zeros_like(i[:, 0]) if m_initial is None else m_initial.float().reshape(i.shape[0], i.shape[2])
    out, prev = [], []
    for t in range(i.shape[1]):
        prev.append(m)
        m = torch.maximum(logf[:, t] + m, i[:, t])
        out.append(m)
    return torch.stack(out, 1), torch.stack(prev, 1)


def canonical_factors(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor,
                      n_initial: Tensor | None, m_initial: Tensor | None, eps: float):
    """The canonical frame of one mLSTM call (see the module docstring), all fp32 ``[b,T,H,...]``:
    ``(key, value, log_decay, query, n_states)`` with ``n_states`` the normaliser ``n~_t`` ``[b,T,H,d_k]``."""
    m, m_prev = stabiliser(igate, fgate, m_initial)
    g = F.logsigmoid(fgate.float()) + m_prev - m
    i_act = torch.exp(igate.float() - m)
    key, value = k.float().clone(), i_act[..., None] * v.float()  # key: never an alias of the native k
    d_k = q.shape[-1]
    qs = q.float() * d_k ** -0.5
    n = (torch.zeros_like(key[:, 0]) if n_initial is None else n_initial.float())
    ns = []
    for t in range(key.shape[1]):
        n = g[:, t, :, None].exp() * n + i_act[:, t, :, None] * key[:, t]
        ns.append(n)
    n_states = torch.stack(ns, 1)
    denom = torch.maximum((n_states * qs).sum(-1).abs(), torch.exp(-m)) + eps
    return key, value, g, qs / denom[..., None], n_states


def xlstm_reference(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, state=None, eps: float = 1e-6,
                    write_edits: dict | None = None):
    """The backend's per-token recurrence on native inputs ``q, k`` ``[b,T,H,d_k]``, ``v`` ``[b,T,H,d_v]``,
    gate pre-activations ``[b,T,H]``, ``state = (C~, n~, m)`` or None; ``write_edits[(b, t, h)] = W_new``
    replaces ``exp(i~_t - m_t) k_t v_t^T`` in ``C~`` (``n~`` and ``m`` as the model computes them). Returns
    ``(h [b,T,H,d_v], (C~, n~, m))`` in fp32 (a Python loop: slow and obviously correct)."""
    b, T, H, d_k = k.shape
    C = torch.zeros(b, H, d_k, v.shape[-1]) if state is None else state[0].float().clone()
    n = torch.zeros(b, H, d_k) if state is None else state[1].float().clone()
    m = torch.zeros(b, H) if state is None else state[2].float().reshape(b, H).clone()
    h = torch.zeros(b, T, H, v.shape[-1])
    write_edits = write_edits or {}
    for t in range(T):
        for bi in range(b):
            for hh in range(H):
                logf = F.logsigmoid(fgate[bi, t, hh].float())
                i = igate[bi, t, hh].float()
                m_new = torch.maximum(logf + m[bi, hh], i)
                f_act, i_act = torch.exp(logf + m[bi, hh] - m_new), torch.exp(i - m_new)
                W = i_act * torch.outer(k[bi, t, hh].float(), v[bi, t, hh].float())
                W = write_edits.get((bi, t, hh), W)
                C[bi, hh] = f_act * C[bi, hh] + W
                n[bi, hh] = f_act * n[bi, hh] + i_act * k[bi, t, hh].float()
                m[bi, hh] = m_new
                qs = q[bi, t, hh].float() * d_k ** -0.5
                denom = torch.maximum((n[bi, hh] @ qs).abs(), torch.exp(-m_new)) + eps
                h[bi, t, hh] = (C[bi, hh].T @ qs) / denom
    return h, (C, n, m[..., None])


class XLSTMHooks(Mamba2Hooks):
    """Hook points of one mLSTM layer (``blocks.{l}.mlstm``) and its exact edits: the canonical scalar-decay
    machinery of :class:`Mamba2Hooks` (write entries, functional edits, state capture, propagation by the
    canonical scan), driven from a forward pre-hook and a forward hook on the layer's ``xLSTMBackend``."""

    NAMES = ("hook_q", "hook_k", "hook_v", "hook_igate", "hook_fgate", "hook_write_key", "hook_write_value",
             "hook_write", "hook_write_flat", "hook_log_decay", "hook_query", "hook_state", "hook_read")

    def __init__(self, owner: HookedRecurrentModel, layer: nn.Module, layer_idx: int, dims, eps: float):
        nn.Module.__init__(self)
        self._owner = weakref.ref(owner)
        self._mixer = weakref.ref(layer)
        self.layer_idx = layer_idx
        self.n_heads, _, self.d_k, self.d_v = dims
        self.eps = eps
        for n in self.NAMES:
            setattr(self, n, HookPoint())
        self._seen_in_call = 0
        self._inputs = None

    # ---- before the backend: native hooks (their edits change the backend's inputs)
    def before(self, module, args, kwargs):
        owner = self._owner()
        owner._check_hooked()
        if args:
            raise RuntimeError(f"layer {self.layer_idx}: xLSTMBackend was called with positional arguments; the "
                               "write hooks expect transformers' keyword call")
        if owner.write_mode != "raw":
            raise ValueError(f"{XLSTMFamily.one_write_mode}; use write_mode='raw'")
        q, k, v = (kwargs[n].transpose(1, 2) for n in ("query", "key", "value"))  # [b,T,H,d]
        i, f = kwargs["igate"].transpose(1, 2), kwargs["fgate"].transpose(1, 2)  # [b,T,H]
        fired = [self._fire(hp, x) for hp, x in ((self.hook_q, q), (self.hook_k, k), (self.hook_v, v),
                                                 (self.hook_igate, i), (self.hook_fgate, f))]
        q, k, v, i, f = (fx.value for fx in fired)
        self._inputs = (q, k, v, i, f)
        new = dict(kwargs)  # the hook outputs feed the backend (so their gradients are the backend's own)
        for name, x in zip(("query", "key", "value", "igate", "fgate"), (q, k, v, i, f)):
            new[name] = x.transpose(1, 2).to(kwargs[name].dtype)
        return args, new

    # ---- after the backend: canonical hooks, edits, states, read
    def after(self, module, args, kwargs, output):
        owner = self._owner()
        q, k, v, igate, fgate = self._inputs
        self._inputs = None
        if isinstance(output, tuple):
            h, state = output
        else:
            h, state = output, None
        b, T, H, _ = k.shape
        # copies of the initial states: transformers copies the new state into the cache tensors in place
        c0, n0, m0 = (None if kwargs.get(n) is None else kwargs[n].clone()
                      for n in ("c_initial", "n_initial", "m_initial"))
        key, value, g, query, _ = canonical_factors(q, k, v, igate, fgate, n0, m0, self.eps)

        def clean(i):  # recomputed from the native inputs (a hook may have edited its tensor in place)
            return lambda: canonical_factors(q, k, v, igate, fgate, n0, m0, self.eps)[i]

        f_key = self._fire(self.hook_write_key, _alias(key), clean(0))
        f_val = self._fire(self.hook_write_value, _alias(value), clean(1))
        f_g = self._fire(self.hook_log_decay, _alias(g), clean(2))
        f_q = self._fire(self.hook_query, _alias(query), clean(3))
        key_c = f_key.original if f_key.edited else key
        value_c = f_val.original if f_val.edited else value
        g_eff = f_g.value if f_g.edited else g
        q_eff = f_q.value if f_q.edited else query
        init_c = None if c0 is None else c0.float()  # [b,H,d_k,d_v]: already key-first
        entries, dense_D = self._write_entries(owner, f_key, f_val, key_c, value_c, b, T)
        write_dense = dense_D
        offset = self._offset(owner, T)
        self._functional(owner, entries, offset, b, T, key_c, value_c, dense_D)
        states_edited = bool(entries) or (dense_D is not None and bool((dense_D != 0).any()))
        f_g, f_q, g_eff, q_eff, derivative_only = through_edited_layer(f_g, f_q, g_eff, q_eff, states_edited)
        canonical = f_g.edited or f_q.edited  # the backend cannot take these: the canonical scan runs
        h_c = h.transpose(1, 2)  # [b,T,H,d_v]
        S = None if state is None else state[0]
        if canonical:
            from .scalar_decay import scalar_decay_scan

            read_c, S_c = scalar_decay_scan(key_c, value_c, g_eff, q_eff, init_c, CHUNK)
            if derivative_only:  # the backend's bits with the canonical scan's derivatives
                h_c = h_c + (read_c - read_c.detach()).to(h.dtype)
                if S is not None:
                    S = S + (S_c - S_c.detach()).to(S.dtype)
            else:
                h_c = read_c.to(h.dtype)
                if S is not None:
                    S = S_c.to(S.dtype)
        if owner.capture_for(self) is not None:
            init_hf = None if init_c is None else init_c.transpose(-1, -2)  # _states expects HF's value-first
            state_D = self._states(owner, entries, key_c, value_c, g_eff, init_hf, b, T, dense_D)
            if state_D is not None:
                dense_D = state_D if dense_D is None else dense_D + state_D
        read = h_c.float()
        d_read = d_final = None
        if entries:
            d_read, d_final = self._propagate_canonical(entries, b, T, g_eff, q_eff)
        if dense_D is not None:
            dr, df = dense_decay_scan(dense_D, g_eff, q_eff, None, CHUNK)
            d_read, d_final = (dr, df) if d_read is None else (d_read + dr, d_final + df)
        if d_read is not None:
            read = read + d_read
        pairs = {"q": (f_q, query), "g": (f_g, g)}
        if write_dense is None:
            pairs.update(k=(f_key, key), v=(f_val, value))
        deltas = unedited_deltas(pairs)
        if deltas:
            read = read + _derivative_path(deltas, q_eff, g_eff, _output(f_key), _output(f_val), init_c, CHUNK, read)
        value_changed = (d_read is not None and bool((d_read != 0).any())) or (canonical and not derivative_only)
        f_read = self._fire(self.hook_read, read, None if value_changed else (lambda: h_c.float()))
        if S is not None and d_final is not None and bool((d_final != 0).any()):
            S = S + d_final.to(S.dtype)
        if not value_changed and not f_read.edited:
            h_new = straight_through(f_read.raw, h_c)
        else:
            h_new = f_read.value.to(h.dtype)
        h_new = h_new.transpose(1, 2)
        if state is None:
            return h_new
        return h_new, (S, state[1], state[2])

    def _offset(self, owner, T: int) -> int | None:
        """Absolute position of this call's first token: the tokens the cache held when the HF forward began
        plus those this layer already ran in this forward (transformers runs long inputs in several calls)."""
        base = owner._call_offset
        offset = None if base is None else base + self._seen_in_call
        self._seen_in_call += T
        if offset is None and any(e.layer == self.layer_idx for e in owner._pending_edits or ()):
            raise RuntimeError(f"layer {self.layer_idx}: the cache passed in does not say how many tokens it holds, so "
                               "an edit's absolute position cannot be placed; build the cache with the hooked model")
        return 0 if offset is None else offset


_HOOK_DOCS = {
    "hook_q": "[b,p,H,d_k] native query (projection); edits change the read and its normaliser",
    "hook_k": "[b,p,H,d_k] native key; edits change the write and the normaliser",
    "hook_v": "[b,p,H,d_v] native value; edits change the write",
    "hook_igate": "[b,p,H] input gate pre-activation (soft-capped); edits change write, stabiliser, normaliser",
    "hook_fgate": "[b,p,H] forget gate pre-activation (soft-capped); edits change decay, stabiliser, normaliser",
    "hook_write_key": "[b,p,H,d_k] canonical key factor k (fp32); edits replace the write only",
    "hook_write_value": "[b,p,H,d_v] canonical value factor exp(i~ - m) v (fp32); edits replace the write only",
    "hook_write": ("[b,p,H,d_k,d_v] dense write into C~ (while materialize_writes, or an SAE / named hook is on "
                   "it); edits propagate exactly, the normaliser is kept"),
    "hook_write_flat": "[b,p,H*d_k*d_v] flat dense write (as hook_write)",
    "hook_log_decay": "[b,p,H] logsigmoid(f~) + m_{t-1} - m_t (the stabilised decay of C~); edits change the "
                      "transitions of C~ only (exact, canonical scan)",
    "hook_query": "[b,p,H,d_k] d_k^-1/2 q / (max(|n~^T q'|, exp(-m)) + eps): the query with the normaliser's "
                  "denominator; edits change this head's read (exact, canonical scan)",
    "hook_state": ("[b,p_s,H_s,d_k,d_v] opt-in stabilised matrix memory C~ after the write at the captured positions "
                   "p_s and heads H_s; an edit acts as an extra write"),
    "hook_read": "[b,p,H,d_v] h_t = C~_t^T query_t (before the multi-head norm and output gate); edits replace it",
}


class XLSTMOutputMap:
    """``h [b,T,H,d_v] -> sigmoid(o~) * multihead_norm(h)`` ``[b,T,H*d_v]``: how an mLSTM read reaches
    ``out_proj`` (``xLSTMLayer.forward``), with the output gate pre-activation ``o~`` recorded during a forward.
    The closed form's direct path linearises it (the gate is constant, the norm is linearised)."""

    def __init__(self, layer: nn.Module):
        if layer.config.weight_mode != "single":
            raise NotImplementedError("the direct path of an xLSTM layer needs weight_mode='single' (its output gate "
                                      "is then a module of its own)")
        self.layer = layer

    def register(self, captured: dict) -> list:
        return [self.layer.multihead_norm.register_forward_pre_hook(
                    lambda m, a: captured.setdefault("h", a[0].clone())),
                self.layer.ogate_preact.register_forward_hook(lambda m, a, out: captured.setdefault("o", out.clone()))]

    def read(self, captured: dict) -> Tensor:
        return captured["h"]

    def apply(self, captured: dict, x: Tensor) -> Tensor:
        b, T = x.shape[:2]
        return self.layer.ogate_act_fn(captured["o"]) * self.layer.multihead_norm(x).reshape(b, T, -1)


def _reorder_rows(cache, beam_idx: Tensor) -> None:
    """Keep the cached rows ``beam_idx`` (in that order) of every layer's ``(C~, n~, m)``, as other HF caches'
    ``reorder_cache`` does (``xLSTMCache`` has none)."""
    for layer, triple in list(cache.rnn_state.items()):
        cache.rnn_state[layer] = tuple(t.index_select(0, beam_idx.to(t.device)) for t in triple)


def _give_reorder(cache) -> None:
    """Give an ``xLSTMCache`` met by the hooked model a ``reorder_cache`` method (an instance attribute; copies
    of the cache keep theirs), so the experiment paths that continue a cache with several rows work on it."""
    if hasattr(cache, "rnn_state") and not hasattr(cache, "reorder_cache"):
        cache.reorder_cache = types.MethodType(_reorder_rows, cache)


class XLSTMFamily:
    """Finds the ``xLSTMLayer`` (mLSTM) of every block and hooks its backend; hooks under ``blocks.{l}.mlstm``."""

    name = "xlstm"
    block_attr = "mlstm"
    #: why ``delta`` is refused (``HookedRecurrentModel.set_write_mode``, edits)
    one_write_mode = "xLSTM writes have one mode: with no erase the raw and delta writes coincide"
    write_rule = "scalar_decay"  # for write attribution: A_eff = Gamma . (query key^T), value exp(i~ - m) v
    layers_return_states = True  # xLSTMBlock returns (hidden, (C~, n~, m)): resume replays the state whole

    def __init__(self, hf_model: nn.Module):
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        if model_type not in XLSTM_MODEL_TYPES:
            raise UnsupportedModelError(f"{type(hf_model).__name__} (model_type={model_type!r}) is not an xLSTM model")
        self.model_type = model_type
        self.module_name = XLSTM_MODEL_TYPES[model_type]
        if importlib.util.find_spec(self.module_name) is None:
            raise UnsupportedModelError(f"{model_type} is not in the installed transformers")
        __import__(self.module_name)
        module = sys.modules[self.module_name]
        if getattr(module, "external_xlstm", False):
            raise UnsupportedModelError("transformers runs xLSTM through the external `xlstm` package here (its own "
                                        "mLSTM blocks and kernels); the write hooks support transformers' pure-torch "
                                        "xLSTM only: uninstall `xlstm`")
        if getattr(hf_model, "use_kernels", False):
            raise UnsupportedModelError("the model was loaded with use_kernels=True; load it without use_kernels")
        self.mixers: dict[int, nn.Module] = {}
        layers = None
        for m in hf_model.modules():
            if isinstance(m, nn.ModuleList) and len(m) and all(type(x).__name__ == "xLSTMBlock" for x in m):
                layers = m
        if layers is None:
            raise UnsupportedModelError(f"{type(hf_model).__name__} has no xLSTM blocks")
        for i, block in enumerate(layers):
            layer = block.mlstm_layer
            if "forward" in layer.mlstm_backend.__dict__:
                raise UnsupportedModelError(f"the forward of the xLSTM backend of block {i} was replaced; the write "
                                            "hooks need the transformers forward")
            self.mixers[i] = layer
        self._layers = layers
        self.eps = float(hf_model.config.eps)

    @staticmethod
    def dims(layer: nn.Module) -> tuple[int, int, int, int]:
        """``(heads, heads, d_k, d_v)``."""
        H = layer.config.num_heads
        return H, H, layer.qk_dim // H, layer.v_dim // H

    def decoder_layers(self, hf_model) -> nn.ModuleList:
        return find_decoder_layers(hf_model, next(iter(self.mixers.values())))

    def final_norm(self, hf_model) -> nn.Module:
        for m in hf_model.modules():
            if any(c is self._layers for c in m.children()):
                norm = getattr(m, "out_norm", None)
                if isinstance(norm, nn.Module):
                    return norm
        raise RuntimeError("could not find the xLSTM model's out_norm")

    def build_blocks(self, owner: HookedRecurrentModel) -> nn.ModuleList:
        blocks = nn.ModuleList()
        for i in range(len(self._layers)):
            block = nn.Module()
            layer = self.mixers[i]
            hooks = XLSTMHooks(owner, layer, i, self.dims(layer), self.eps)
            block.mlstm = hooks
            owner.track(layer.mlstm_backend.register_forward_pre_hook(hooks.before, with_kwargs=True))
            owner.track(layer.mlstm_backend.register_forward_hook(hooks.after, with_kwargs=True))
            blocks.append(block)
        all_hooks = [blk.mlstm for blk in blocks]

        def reset(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and not bool(mask.all()):
                raise ValueError("xLSTM takes no attention mask (transformers runs every row over all its tokens, pads "
                                 "included), so a padded batch would not give each row's own result; run rows of "
                                 "equal length, or one text at a time")
            for hk in all_hooks:
                hk._seen_in_call = 0
            cache = kwargs.get("cache", kwargs.get("cache_params"))
            if cache is not None:
                _give_reorder(cache)

        def give(module, args, output):
            cache = getattr(output, "cache", None)
            if cache is not None:
                _give_reorder(cache)

        owner.track(owner.hf_model.register_forward_pre_hook(reset, with_kwargs=True))
        owner.track(owner.hf_model.register_forward_hook(give))
        return blocks

    def make_config(self, owner: HookedRecurrentModel) -> AdapterConfig:
        hf, cfg = owner.hf_model, owner.hf_model.config
        H, _, d_k, d_v = self.dims(self.mixers[0])
        param = next(hf.parameters())
        return AdapterConfig(
            model_name=getattr(cfg, "_name_or_path", "") or type(hf).__name__, family=self.model_type,
            n_layers=len(self._layers), d_model=cfg.hidden_size, d_vocab=hf.get_output_embeddings().weight.shape[0],
            n_ctx=2048, device=torch.device(param.device), dtype=param.dtype,
            recurrent_layers=tuple(sorted(self.mixers)), d_k=d_k, d_v=d_v, n_heads=H, n_key_heads=H,
            normalization_type="RMS", positional_embedding_type="none")

    def validate_edit(self, owner, e: WriteEdit) -> None:
        if e.layer not in self.mixers:
            raise ValueError(f"WriteEdit.layer={e.layer} is not an mLSTM layer; recurrent layers are "
                             f"{sorted(self.mixers)}")
        H, _, d_k, d_v = self.dims(self.mixers[e.layer])
        if not 0 <= e.head < H:
            raise ValueError(f"WriteEdit.head={e.head} out of range: layer {e.layer} has {H} heads")
        e.atom(d_k, d_v)

    def hf_module_name(self, hf_model, layer: int) -> str:
        return next(n for n, m in hf_model.named_modules() if m is self.mixers[layer])

    @staticmethod
    def output_map(layer: nn.Module) -> "XLSTMOutputMap":
        """The read's way to ``out_proj`` (for the closed form's direct path)."""
        return XLSTMOutputMap(layer)

    def describe_hook(self, owner, name: str) -> str:
        return _HOOK_DOCS.get(name.rsplit(".", 1)[-1], "")

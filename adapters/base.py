"""The hooked model: a TransformerLens ``HookedRootModule`` around a user's Hugging Face recurrent model.

Hook inventory (per recurrent layer ``l``; GDN under ``blocks.{l}.linear_attn.``). Shapes use
``b`` batch, ``p`` positions of *this forward call*, ``H`` value heads, ``H_k`` key heads, ``d_k`` / ``d_v`` the key /
value dimensions (Mamba-2 names them ``N`` = d_state and ``P`` = head_dim, ``G`` its groups), and for ``hook_state``
``p_s`` / ``H_s`` the positions / value heads it captures (``StateCapture``; every one by default). The letters and
their meanings are ``SHAPE_SYMBOLS`` (``writesae hooks`` prints them with the inventory).

=====================  =======================  ==============================================================
hook                   shape                    semantics of an edit (return a new tensor or edit in place)
=====================  =======================  ==============================================================
``hook_q``             ``[b,p,H_k,d_k]``        native query before the in-kernel L2 norm; edits change the read
``hook_k``             ``[b,p,H_k,d_k]``        native key before the L2 norm; edits change erase *and* write
``hook_v``             ``[b,p,H,d_v]``          native value; edits change the write
``hook_beta``          ``[b,p,H]``              native beta (write strength); edits change erase and write
``hook_write_key``     ``[b,p,H,d_k]``          canonical key factor k^ of the write (fp32, per value head)
``hook_write_value``   ``[b,p,H,d_v]``          canonical value factor: ``beta v`` (raw) or ``delta`` (delta
                                                mode); edits replace the write only, never the transition
``hook_write``         ``[b,p,H,d_k,d_v]``      dense write ``key (x) value``; fires while ``materialize_writes``
                                                is on or an SAE / a named hook is on it; edits propagate exactly
``hook_write_flat``    ``[b,p,H*d_k*d_v]``      flat view of ``hook_write`` (for SAELens evals / stores)
``hook_log_decay``     ``[b,p,H]``              g (``alpha = exp(g)``); edits change the transitions
``hook_query``         ``[b,p,H,d_k]``          the read's query ``d_k^-1/2 l2norm(q)``; edits change the read
``hook_state``         ``[b,p_s,H_s,d_k,d_v]``  opt-in (``capture_states``; every position while an SAE / a named
                                                hook is on it): states after the write at the chosen positions /
                                                heads; an edit acts as an extra write there
``hook_read``          ``[b,p,H,d_v]``          o_t before the output norm (fp32); edits replace the read
=====================  =======================  ==============================================================

Write modes (docs/method.md section 3): ``raw`` (default) exposes ``W = beta k^ v^T``, and replacing it keeps the
token's erase; ``delta`` exposes ``W = k^ delta^T`` (the actual increment), and replacing it removes erase
and write (``S_s = alpha_s S_{s-1} + A``). Edits of one forward call are specified against the clean
forward and compose exactly (linearity of the state in the writes).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import numbers
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint

from ..host import SAEHostMixin

_log = logging.getLogger(__name__)

#: every symbol the hook inventories' shapes use, and what it stands for
SHAPE_SYMBOLS = {
    "b": "batch", "p": "positions of this forward call", "H": "value heads", "H_k": "key heads",
    "d_k": "key dimension", "d_v": "value dimension",
    "p_s": "positions hook_state captures (StateCapture; all by default)",
    "H_s": "value heads hook_state captures (StateCapture; all by default)",
    "N": "Mamba-2 d_state (the key side)", "P": "Mamba-2 head_dim (the value side)", "G": "Mamba-2 groups",
}


def shape_symbols(description: str) -> list[str]:
    """The symbols of the shape a hook description starts with (``"[b,p,H*d_k*d_v] ..."`` -> b, p, H, d_k, d_v)."""
    text = description.strip()
    if not text.startswith("["):
        return []
    return [sym for part in text[1:text.index("]")].split(",") for sym in part.split("*")]


WriteMode = Literal["raw", "delta"]
WRITE_MODES = ("raw", "delta")
EDIT_OPS = ("replace", "add", "delete")


class UnsupportedModelError(ValueError):
    """The model is not one of the supported recurrent families."""


class HookNameError(KeyError):
    """An unknown hook name was used."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class WriteEdit:
    """One exact edit of a cache write, for :meth:`HookedRecurrentModel.edits` / ``run_with_edits``.

    ``pos`` counts tokens from the start of the sequence held in the cache (for a forward without cache it
    is the index in the input); positions are absolute and non-negative. ``batch=None`` edits every row.
    ``layer``, ``pos``, ``head`` and ``batch`` are integers (Python or NumPy ints, or 0-d integer tensors; stored as
    ``int``); an edit at a padding position (``attention_mask`` 0) is refused. ``op``: ``replace`` the write by the
    matrix ``A`` (given as ``key``/``value`` factors ``A = key value^T`` or as ``matrix``), ``add`` ``A`` to
    the write, or ``delete`` the write. ``mode`` chooses the raw or the delta write (docs/method.md section 3).
    """

    layer: int
    pos: int
    head: int
    op: Literal["replace", "add", "delete"] = "replace"
    key: Tensor | None = None
    value: Tensor | None = None
    matrix: Tensor | None = None
    batch: int | None = None
    mode: WriteMode = "raw"

    def __post_init__(self):
        for name in ("layer", "pos", "head", "batch"):
            value = getattr(self, name)
            if value is None and name == "batch":
                continue
            if isinstance(value, bool) or not isinstance(value, (numbers.Integral, Tensor)):
                raise TypeError(f"WriteEdit.{name} must be an integer, got {value!r}")
            try:
                object.__setattr__(self, name, operator.index(value))
            except TypeError:
                raise TypeError(f"WriteEdit.{name} must be an integer, got {value!r}") from None
        if self.batch is not None and self.batch < 0:
            raise ValueError(f"WriteEdit.batch must be a non-negative row index or None, got {self.batch}")
        if self.op not in EDIT_OPS:
            raise ValueError(f"WriteEdit.op must be one of {EDIT_OPS}, got {self.op!r}")
        if self.mode not in WRITE_MODES:
            raise ValueError(f"WriteEdit.mode must be one of {WRITE_MODES}, got {self.mode!r}")
        if self.pos < 0:
            raise ValueError(f"WriteEdit.pos must be a non-negative absolute position, got {self.pos}")
        has_factors = self.key is not None or self.value is not None
        if self.op == "delete":
            if has_factors or self.matrix is not None:
                raise ValueError("WriteEdit(op='delete') takes no key, value or matrix")
        else:
            if self.matrix is not None and has_factors:
                raise ValueError("WriteEdit: give either key and value, or matrix, not both")
            if self.matrix is None and (self.key is None or self.value is None):
                raise ValueError(f"WriteEdit(op={self.op!r}) needs key and value [d_k], [d_v] or matrix [d_k, d_v]")

    def __repr__(self) -> str:
        parts = [f"layer={self.layer}", f"pos={self.pos}", f"head={self.head}", f"op={self.op!r}"]
        for name in ("key", "value", "matrix"):
            t = getattr(self, name)
            if t is not None:
                parts.append(f"{name}=<{tuple(t.shape)} {t.dtype}, norm {float(t.float().norm()):.3g}>")
        if self.batch is not None:
            parts.append(f"batch={self.batch}")
        parts.append(f"mode={self.mode!r}")
        return f"WriteEdit({', '.join(parts)})"

    def atom(self, d_k: int, d_v: int) -> Tensor | None:
        """The edit's matrix ``A`` ``[d_k, d_v]`` in fp32 (None for delete), shape-checked."""
        if self.op == "delete":
            return None
        if self.matrix is not None:
            if tuple(self.matrix.shape) != (d_k, d_v):
                raise ValueError(f"WriteEdit.matrix must have shape [d_k, d_v] = [{d_k}, {d_v}], "
                                 f"got {list(self.matrix.shape)}")
            A = self.matrix.float()
        else:
            if tuple(self.key.shape) != (d_k,) or tuple(self.value.shape) != (d_v,):
                raise ValueError(f"WriteEdit.key/value must have shapes [{d_k}] and [{d_v}], got "
                                 f"{list(self.key.shape)} and {list(self.value.shape)}")
            A = torch.outer(self.key.float(), self.value.float())
        if not torch.isfinite(A).all():
            raise ValueError("WriteEdit contains NaN or inf")
        return A


@dataclass
class StateCapture:
    """Which states ``hook_state`` exposes: ``positions`` local to the call (``"all"``, ``"last"`` or a
    list of ints, negative counting from the end) and ``heads`` (None for all value heads)."""

    positions: Literal["all", "last"] | Sequence[int] = "last"
    heads: Sequence[int] | None = None


@dataclass
class AdapterConfig:
    """The few ``HookedTransformer.cfg`` fields that TransformerLens and SAELens tooling read."""

    model_name: str
    family: str
    n_layers: int
    d_model: int
    d_vocab: int
    n_ctx: int
    device: torch.device
    dtype: torch.dtype
    recurrent_layers: tuple[int, ...]
    d_k: int
    d_v: int
    n_heads: int  # value heads of the recurrent mixers
    n_key_heads: int
    default_prepend_bos: bool = False
    tokenizer_prepends_bos: bool = False
    act_fn: str | None = None
    normalization_type: str | None = "RMS"
    positional_embedding_type: str = "rotary"
    extra: dict[str, Any] = field(default_factory=dict)


def conflicting_edit_error(layer: int, pos: int) -> ValueError:
    """A WriteEdit and a write hook replaced under autograd both change one layer's writes in one forward."""
    return ValueError(f"layer {layer}: a WriteEdit at position {pos} and a write hook replaced under autograd "
                      "(e.g. a spliced SAE) change the same writes in one forward; their changes would add up "
                      "silently. Apply the edit through the hook, or run them in separate forwards")


CACHE_NAMES = ("past_key_values", "cache", "cache_params", "inference_params")


def cache_from_kwargs(kwargs: dict):
    """The HF cache object among a forward's keyword arguments, whatever the model calls it."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class WriteActivationCache(ActivationCache):
    """TransformerLens ``ActivationCache`` that also answers to the layer-level hook aliases
    (``cache["blocks.1.hook_write_value"]`` is ``cache["blocks.1.linear_attn.hook_write_value"]``)."""

    def _resolve(self, key):
        if isinstance(key, str) and key not in self.cache_dict:
            return getattr(self.model, "hook_aliases", {}).get(key, key)
        return key

    def __getitem__(self, key):
        key = self._resolve(key)
        if isinstance(key, str) and key not in self.cache_dict and key.rsplit(".", 1)[-1] in OPT_IN_HOOKS:
            raise KeyError(f"{key} is not in this cache: the dense write and state hooks fire only when asked for. "
                           "Name it in run_with_cache(..., names_filter=[...]), or run inside "
                           "model.options(materialize_writes=True) / model.options(capture_states=...)")
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        return self._resolve(key) in self.cache_dict


class HookedRecurrentModel(SAEHostMixin, HookedRootModule):
    """A user's HF recurrent/hybrid LM with named write hook points (see the module docstring).

    The wrapped model is the user's own (same weights, same outputs); it is reachable as ``hf_model``.
    Build it with :func:`writesae_plugin.adapters.hook_model`.
    """

    def __init__(self, hf_model: nn.Module, family, tokenizer=None):
        super().__init__()
        self.hf_model = hf_model
        self.family = family
        self.tokenizer = tokenizer
        self.write_mode: WriteMode = "raw"
        self.materialize_writes = False
        self.state_capture: StateCapture | None = None
        self._pending_edits: list[WriteEdit] | None = None
        self._applied_edits: set[int] = set()
        self._edit_calls: list[tuple[int, int]] = []
        self._init_sae_host()
        key = _wrapper_key(hf_model)
        if key in _LIVE_WRAPPERS:
            raise RuntimeError(f"this {type(hf_model).__name__} is already hooked; use the existing wrapper "
                               "(hook_model returns it) or call its unhook() first")
        self._hf_handles: list = []  # every hook this wrapper put on the HF model (removed by unhook)
        self._unhooked = False
        self._call_offset: int | None = None  # tokens already in the cache at the start of this HF forward
        self.track(hf_model.register_forward_pre_hook(self._note_offset, with_kwargs=True))
        self.track(hf_model.register_forward_hook(self._clear_offset, always_call=True))
        self.blocks = family.build_blocks(self)
        self.cfg = family.make_config(self)
        self.setup()
        _LIVE_WRAPPERS[key] = self

    # ------------------------------------------------------------------ lifetime
    def track(self, handle):
        """Record a hook ``handle`` this wrapper registered on an HF module (removed by :meth:`unhook`, left
        out of copies); returns it."""
        self._hf_handles.append(handle)
        return handle

    def unhook(self) -> nn.Module:
        """Remove every hook this wrapper put on the HF model and return the plain HF model (same outputs as
        before it was hooked). The wrapper cannot run afterwards; ``hook_model`` can hook the model again."""
        if self._pending_edits is not None:
            raise RuntimeError("unhook() inside an edits() block; leave the block first")
        for handle in self._hf_handles:
            handle.remove()
        self._hf_handles.clear()
        self._unhooked = True
        key = _wrapper_key(self.hf_model)
        if _LIVE_WRAPPERS.get(key) is self:
            del _LIVE_WRAPPERS[key]
        return self.hf_model

    def _check_hooked(self) -> None:
        if self._unhooked:
            raise RuntimeError("this hooked model was unhooked (unhook()); call hook_model(model.hf_model) again")

    def __deepcopy__(self, memo):
        """An independent hooked copy: the HF model is deep-copied without this wrapper's hooks, hooked anew,
        and given this wrapper's settings and copies of its attached SAEs. Refused inside an ``edits()`` block
        and while TransformerLens hooks are attached (``reset_hooks()`` first; they are not copied); nnsight's
        wrappers are not copied (wrap the copy with ``NNsight`` again)."""
        self._check_hooked()
        if self._pending_edits is not None:
            raise RuntimeError("cannot copy a hooked model inside an edits() block")
        hooked = [n for n, hp in self.hook_dict.items() if hp._forward_hooks or hp._backward_hooks]
        if hooked:
            raise RuntimeError(f"cannot copy a hooked model while TransformerLens hooks are attached (at "
                               f"{hooked[:3]}); call reset_hooks(including_permanent=True) first and add them to the "
                               "copy")
        ours = {h.id for h in self._hf_handles}
        wrapped = set()  # nnsight's per-module wrappers (instance attributes): wrap the copy anew
        for module in self.hf_model.modules():  # our hooks and nnsight's wrappers are shared, then dropped
            for d in _hook_dicts(module):
                for hid, fn in d.items():
                    if hid in ours:
                        memo[id(fn)] = fn
            for name, value in module.__dict__.items():
                if type(value).__module__.split(".")[0] == "nnsight" or name == "__nnsight__":
                    memo[id(value)] = value
                    wrapped.add(name)
        hf_copy = copy.deepcopy(self.hf_model, memo)
        for module in hf_copy.modules():
            for d in _hook_dicts(module):
                for hid in [h for h in d if h in ours]:
                    del d[hid]
            for name in wrapped & set(module.__dict__):
                if name == "__nnsight__" or type(module.__dict__[name]).__module__.split(".")[0] == "nnsight":
                    del module.__dict__[name]
        from . import hook_model

        new = hook_model(hf_copy, tokenizer=self.tokenizer)
        new.write_mode, new.materialize_writes = self.write_mode, self.materialize_writes
        new.state_capture = copy.deepcopy(self.state_capture, memo)
        for name, wrapper in self._acts_to_saes.items():
            new._install(name, copy.deepcopy(wrapper, memo))
        return new

    def __copy__(self):
        raise TypeError("a hooked model cannot be shallow-copied (the copy would share hooks with the original); "
                        "use copy.deepcopy(model)")

    def __reduce_ex__(self, protocol):
        raise TypeError("a hooked model cannot be pickled: save model.hf_model (save_pretrained) and the SAEs, and "
                        "call hook_model on the reloaded model")

    def _note_offset(self, module, args, kwargs):
        """Pre-hook of the HF forward (every path: forward, generate, resume, run_from_layer): validate the
        token ids and the pending edits against this call, and note the cache offset."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, Tensor):
            self._check_token_ids(ids)
        cache = cache_from_kwargs(kwargs)
        mask = kwargs.get("attention_mask")
        self._call_offset = _cached_length(cache, ids, mask)
        if self._pending_edits and isinstance(ids, Tensor) and self._call_offset is not None:
            self._edit_calls.append((self._call_offset, self._call_offset + ids.shape[1]))
            self._check_edits_in_call(ids.shape[0], ids.shape[1], self._call_offset, mask)

    def _check_token_ids(self, ids: Tensor) -> None:
        """Raise ``ValueError`` unless ``ids`` is an integer ``[batch >= 1, pos >= 1]`` tensor of ids in
        ``[0, vocab)`` (the embedding's rows)."""
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor [batch, pos], got {ids.dtype} {list(ids.shape)}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"token ids must have at least one row and one position, got shape {list(ids.shape)}")
        vocab = self.hf_model.get_input_embeddings().weight.shape[0]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}) (the model's vocabulary), got ids in [{lo}, {hi}]")

    def _check_edits_in_call(self, b: int, T: int, offset: int, mask: Tensor | None) -> None:
        """Refuse pending edits of this call (positions ``[offset, offset + T)``) whose row does not exist or
        whose position is padding (``attention_mask`` 0): an edit there would silently move real tokens."""
        for e in self._pending_edits:
            if not offset <= e.pos < offset + T:
                continue
            if e.batch is not None and e.batch >= b:
                raise ValueError(f"{e} edits row {e.batch}, but the input has {b} rows")
            if mask is None or mask.dim() != 2 or mask.shape[1] < T:
                continue
            col = mask.shape[1] - T + (e.pos - offset)  # the mask covers the cached tokens and this call's
            rows = range(b) if e.batch is None else [e.batch]
            padded = [r for r in rows if not bool(mask[r, col])]
            if padded:
                raise ValueError(f"{e} is at a padding position (attention_mask 0) of row(s) {padded}; edit real "
                                 "tokens only (with left padding a row's first token is at its number of pads; "
                                 "give batch= to edit one row)")

    def _clear_offset(self, module, args, output):
        self._call_offset = None

    def hook_prefix(self, layer: int) -> str:
        """``"blocks.{layer}.linear_attn."`` (Gated DeltaNet) or ``"blocks.{layer}.mixer."`` (Mamba-2)."""
        if layer not in self.cfg.recurrent_layers:
            raise ValueError(f"layer {layer} is not recurrent; recurrent layers: {list(self.cfg.recurrent_layers)}")
        return f"blocks.{layer}.{self.family.block_attr}."

    # ------------------------------------------------------------------ switches
    def set_write_mode(self, mode: WriteMode) -> None:
        """Choose what the write hooks expose and what their edits replace: ``raw`` or ``delta``."""
        if mode not in WRITE_MODES:
            raise ValueError(f"write mode must be one of {WRITE_MODES}, got {mode!r}")
        if mode != "raw" and getattr(self.family, "one_write_mode", None):  # e.g. Mamba-2: no erase, raw == delta
            raise ValueError(f"{self.family.one_write_mode}; use write_mode='raw'")
        self.write_mode = mode

    @contextlib.contextmanager
    def options(self, *, write_mode: WriteMode | None = None, materialize_writes: bool | None = None,
                capture_states: StateCapture | None | bool = False):
        """Temporarily set ``write_mode``, ``materialize_writes`` (dense ``hook_write``) and
        ``capture_states`` (a :class:`StateCapture`, ``True`` for the last position, or ``False``)."""
        saved = (self.write_mode, self.materialize_writes, self.state_capture)
        try:
            if write_mode is not None:
                self.set_write_mode(write_mode)
            if materialize_writes is not None:
                self.materialize_writes = bool(materialize_writes)
            if capture_states is True:
                self.state_capture = StateCapture()
            elif isinstance(capture_states, StateCapture):
                self.state_capture = capture_states
            elif capture_states is None:
                self.state_capture = None
            yield self
        finally:
            self.write_mode, self.materialize_writes, self.state_capture = saved

    def writes_materialized(self, hooks: nn.Module) -> bool:
        """Whether a layer's dense ``hook_write`` / ``hook_write_flat`` fire in this call: ``materialize_writes``
        is on, or an SAE is spliced into one of them, or a TransformerLens hook is attached to one (a
        ``run_with_cache`` / ``run_with_hooks`` that names it). ``hooks``: the layer's hook module."""
        return self.materialize_writes or _live(hooks.hook_write) or _live(hooks.hook_write_flat)

    def capture_for(self, hooks: nn.Module) -> StateCapture | None:
        """The states a layer's ``hook_state`` exposes in this call: ``state_capture`` if set, else every
        position and head while an SAE or a TransformerLens hook is attached to it, else None (not fired)."""
        if self.state_capture is not None:
            return self.state_capture
        return StateCapture(positions="all") if _live(hooks.hook_state) else None

    # ------------------------------------------------------------------ functional edits
    @contextlib.contextmanager
    def edits(self, edits: Iterable[WriteEdit]):
        """Apply exact write edits to every forward run inside the block.

        Each edit applies in the call whose positions contain ``edit.pos``; leaving the block with an edit
        that no call reached raises, so nothing is silently dropped.
        """
        edits = list(edits)
        for e in edits:
            if not isinstance(e, WriteEdit):
                raise TypeError(f"edits must be WriteEdit objects, got {type(e).__name__}")
            self.family.validate_edit(self, e)
            if e.mode != "raw" and getattr(self.family, "one_write_mode", None):
                raise ValueError(f"{self.family.one_write_mode}; use mode='raw'")
        if self._pending_edits is not None:
            raise RuntimeError("edits() blocks cannot be nested; pass all edits in one list")
        self._pending_edits, self._applied_edits = edits, set()
        self._edit_calls: list[tuple[int, int]] = []  # [start, end) positions of each forward call in the block
        ok = False
        try:
            yield self
            ok = True
        finally:
            applied, self._pending_edits, self._applied_edits = self._applied_edits, None, set()
            missed = [e for i, e in enumerate(edits) if i not in applied]
            if ok and missed:
                calls = self._edit_calls
                seen = ("no forward call ran in the block" if not calls else
                        "the block's forward calls covered positions " + ", ".join(f"[{a}, {b})" for a, b in calls))
                past = [e for e in missed if calls and e.pos >= max(b for _, b in calls)]
                hint = (f"; position {past[0].pos} is past the end of the sequence ({max(b for _, b in calls)} "
                        "tokens)" if past else "")
                raise RuntimeError(f"{len(missed)} edit(s) were never reached by a forward call, e.g. {missed[0]} "
                                   f"({seen}{hint})")

    def run_with_edits(self, input, edits: Iterable[WriteEdit], **forward_kwargs):
        """``forward(input, **forward_kwargs)`` with the given exact write edits applied."""
        with self.edits(edits):
            return self(input, **forward_kwargs)

    # ------------------------------------------------------------------ TransformerLens surface
    @property
    def W_E(self) -> Tensor:
        """Token embedding ``[d_vocab, d_model]``."""
        return self.hf_model.get_input_embeddings().weight

    @property
    def W_U(self) -> Tensor:
        """Unembedding ``[d_model, d_vocab]`` (TransformerLens orientation)."""
        return self.hf_model.get_output_embeddings().weight.T

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None,
                  padding_side: str | None = None, move_to_device: bool = True,
                  truncate: bool = True) -> Tensor:
        """Tokenize like ``HookedTransformer.to_tokens``: ``[batch, pos]`` long, padded with the pad token (on the
        tokenizer's padding side unless ``padding_side`` is given). The padding mask is
        :meth:`to_tokens_and_mask`'s; every entry point that takes strings uses it."""
        return self.to_tokens_and_mask(input, prepend_bos, padding_side, move_to_device, truncate)[0]

    def to_tokens_and_mask(self, input: str | list[str], prepend_bos: bool | None = None,
                           padding_side: str | None = None, move_to_device: bool = True,
                           truncate: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(tokens [batch, pos], attention_mask [batch, pos] or None)``: the tokenizer's own mask (1 = real
        token), None when no row is padded. Never inferred from the pad id (it often equals eos, which occurs
        in real text)."""
        if self.tokenizer is None:
            raise ValueError("this hooked model has no tokenizer: pass tokenizer= to hook_model, or give tokens")
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("input must be a string or a non-empty list of strings")
        prepend = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        if prepend and not self.cfg.tokenizer_prepends_bos:
            if self.tokenizer.bos_token is None:
                raise ValueError("prepend_bos=True but the tokenizer has no bos_token")
            texts = [self.tokenizer.bos_token + t for t in texts]
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
        if len(texts) > 1 and self.tokenizer.pad_token is None:
            raise ValueError("the tokenizer has no pad token, so a list of strings cannot be batched: set "
                             "tokenizer.pad_token (e.g. to its eos token) or pass one string at a time")
        saved = self.tokenizer.padding_side
        if padding_side is not None:
            self.tokenizer.padding_side = padding_side
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=len(texts) > 1, truncation=truncate,
                                 max_length=self.cfg.n_ctx if truncate else None)
        finally:
            self.tokenizer.padding_side = saved
        tokens = enc["input_ids"]
        if tokens.shape[1] == 0:
            raise ValueError("the input tokenizes to zero tokens; give non-empty text")
        mask = enc.get("attention_mask")
        if mask is not None and bool(mask.all()):
            mask = None
        if mask is not None and not bool(mask.any(1).all()):
            raise ValueError("an input string tokenizes to zero tokens; give non-empty text in every row")
        if move_to_device:
            tokens = tokens.to(self.cfg.device)
            mask = None if mask is None else mask.to(self.cfg.device)
        return tokens, mask

    def to_string(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        if self.tokenizer is None:
            raise ValueError("this hooked model has no tokenizer")
        if isinstance(tokens, Tensor) and tokens.dim() == 2:
            return self.tokenizer.batch_decode(tokens)
        return self.tokenizer.decode(tokens)

    def forward(self, input, return_type: str | None = "logits", loss_per_token: bool = False,
                prepend_bos: bool | None = None, stop_at_layer: int | None = None,
                attention_mask: Tensor | None = None, past_key_values=None, use_cache: bool | None = None,
                padding_side: str | None = None, **hf_kwargs):
        """Run the HF model. ``input`` is a string, a list of strings or tokens ``[batch, pos]``.

        ``return_type``: ``"logits"`` ``[b,p,vocab]``, ``"loss"`` (mean next-token loss, or per token
        ``[b,p-1]`` with ``loss_per_token``), ``"both"`` (logits, loss), ``"hf"`` (the HF output object, with
        ``past_key_values``) or None. ``stop_at_layer=L`` stops before decoder layer L and returns the
        residual stream ``[b,p,d_model]`` entering it (hooks of earlier layers fire).
        """
        self._check_hooked()
        with self._token_masks(input, {"prepend_bos": prepend_bos, "padding_side": padding_side}):
            return self._forward(input, return_type, loss_per_token, prepend_bos, stop_at_layer, attention_mask,
                                 past_key_values, use_cache, padding_side, **hf_kwargs)

    def _forward(self, input, return_type, loss_per_token, prepend_bos, stop_at_layer, attention_mask,
                 past_key_values, use_cache, padding_side, **hf_kwargs):
        self._check_hf_kwargs(hf_kwargs)
        if return_type not in ("logits", "loss", "both", "hf", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both', 'hf' or None, got {return_type!r}")
        if isinstance(input, (str, list)):
            tokens, mask = self.to_tokens_and_mask(input, prepend_bos=prepend_bos, padding_side=padding_side)
            if attention_mask is None:
                attention_mask = mask
        else:
            tokens = self._as_tokens(input)
        tokens = tokens.to(self.cfg.device)
        if use_cache is None:
            use_cache = past_key_values is not None or return_type == "hf"
        if stop_at_layer is not None:
            return self._run_until(tokens, stop_at_layer, attention_mask, hf_kwargs)
        cache_kw = self.cache_kwarg
        hf_kwargs = self._continuation_positions(tokens, past_key_values, hf_kwargs)
        out = self.hf_model(input_ids=tokens, attention_mask=attention_mask, use_cache=use_cache,
                            **{cache_kw: past_key_values}, **hf_kwargs)
        if return_type == "hf":
            return out
        if return_type is None:
            return None
        logits = out.logits
        if return_type == "logits":
            return logits
        loss = lm_cross_entropy(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _as_tokens(self, input) -> Tensor:
        """A token tensor ``[batch, pos]`` (``[pos]`` gets a batch axis), validated (see ``_check_token_ids``)."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a string, a list of strings or a token tensor [batch, pos], got "
                            f"{type(input).__name__}")
        tokens = input[None] if input.dim() == 1 else input
        self._check_token_ids(tokens)
        return tokens

    def _run_until(self, tokens, stop_at_layer, attention_mask, hf_kwargs):
        layers = self.family.decoder_layers(self.hf_model)
        if not -len(layers) <= stop_at_layer <= len(layers):
            raise ValueError(f"stop_at_layer must be in [-{len(layers)}, {len(layers)}], got {stop_at_layer}")
        if stop_at_layer < 0:
            stop_at_layer += len(layers)
        captured = {}
        stream_in = getattr(self.family, "stream_entering", None)
        if stream_in is not None:  # families whose blocks carry the residual stream in two parts (mamba-ssm)
            target, hook_kind, read = stream_in(self.hf_model, stop_at_layer)
        else:
            target = self.family.final_norm(self.hf_model) if stop_at_layer == len(layers) else layers[stop_at_layer]
            hook_kind, read = "pre", lambda args, kwargs: args[0] if args else kwargs["hidden_states"]

        def stop(module, args, *rest):
            captured["resid"] = read(args, rest[0]) if hook_kind == "pre" else read(rest[-1])
            raise _StopForward

        handle = (target.register_forward_pre_hook(stop, with_kwargs=True) if hook_kind == "pre"
                  else target.register_forward_hook(stop))
        try:
            self.hf_model(input_ids=tokens, attention_mask=attention_mask, use_cache=False, **hf_kwargs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["resid"]

    def residual_before(self, tokens: Tensor, layer: int, attention_mask: Tensor | None = None) -> Tensor:
        """The residual stream ``[b, T, d_model]`` entering decoder layer ``layer`` (hooks of earlier layers
        fire)."""
        return self.forward(tokens, stop_at_layer=layer, attention_mask=attention_mask)

    def resume_state(self, tokens: Tensor, layer: int, attention_mask: Tensor | None = None,
                     check: bool = True) -> "ResumeState":
        """What :meth:`run_from_layer` needs to rerun decoder layers ``>= layer`` on ``tokens`` ``[b, T]``
        without rerunning the layers before it: the clean output of decoder layer ``layer - 1`` (in whatever
        form the model's decoder loop threads it: a tensor, a tuple, a hyper-connection stream). One forward of
        layers ``< layer`` (their hooks fire).

        With ``check`` (default) the resumed clean logits of the first row are compared with the full forward;
        if they differ (a decoder loop this resume cannot reproduce) the state falls back to the full forward
        (``state.full``, reason in ``state.fallback_reason``; logged), so results stay exact, only slower.
        """
        self._check_hooked()
        if isinstance(tokens, Tensor) and tokens.dim() == 1:
            tokens = tokens[None]
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError(f"resume_state takes token ids [batch, pos], got {type(tokens).__name__}")
        layers = self.family.decoder_layers(self.hf_model)
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer must be in [0, {len(layers)}), got {layer}")
        tokens = tokens.to(self.cfg.device)
        carried = None
        if layer > 0:
            captured = {}

            def stop(module, args, output):
                captured["out"] = output
                raise _StopForward

            handle = layers[layer - 1].register_forward_hook(stop)
            try:
                self.hf_model(input_ids=tokens, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
            finally:
                handle.remove()
            carried = captured["out"]
        state = ResumeState(layer=layer, tokens=tokens, attention_mask=attention_mask, carried=carried,
                            keep_states=bool(getattr(self.family, "layers_return_states", False)))
        reason = state.unsliceable_reason()
        if reason is None and check and layer > 0:
            one = state.select([0])
            with torch.no_grad():
                full = self.hf_model(input_ids=one.tokens, attention_mask=one.attention_mask, use_cache=False).logits
                resumed = self.run_from_layer(one)
            err = (full - resumed).abs().max().item()
            if not err <= 1e-5 * max(1.0, full.abs().max().item()):
                reason = f"resumed logits differ from the full forward by {err:.2e}"
        if reason is not None:
            state = dataclasses.replace(state, carried=None, full=True, fallback_reason=reason)
            _log.warning("%s model: resuming at layer %d is not exact (%s); using the full forward instead",
                         self.cfg.family, layer, reason)
        return state

    def run_from_layer(self, state: "ResumeState", past_key_values=None, return_hf: bool = False):
        """Logits ``[b, T, vocab]`` of the model rerun from decoder layer ``state.layer`` on (see
        :meth:`resume_state`): the model's own forward runs on ``state.tokens`` with each earlier decoder layer
        replaced, for the call, by a replay of the recorded output of layer ``state.layer - 1``. Embeddings,
        masks, position ids, hyper-connection streams, shared blocks fed by the embeddings and every other part
        of the decoder loop are the model's own, so this equals the full forward. Hooks and edits of layers
        ``>= state.layer`` apply; edits of earlier layers cannot (they would change the replayed output).
        With ``past_key_values`` the call continues a cached sequence (``state`` then holds the new positions
        only: ``state.select(rows, start)``); only the caches of layers ``>= state.layer`` are advanced (those of the
        layers before it are stale afterwards; where the decoder layers return their recurrent state, as xLSTM's, the
        replay hands back layer ``state.layer - 1``'s recorded state, which the model copies into them)."""
        self._check_hooked()
        if not isinstance(state, ResumeState):
            raise TypeError(f"run_from_layer takes a ResumeState from model.resume_state(tokens, layer), got "
                            f"{type(state).__name__}")
        if self._pending_edits:
            early = [e for e in self._pending_edits if e.layer < state.layer and not state.full]
            if early:
                raise ValueError(f"an edit at layer {early[0].layer} cannot apply in a forward resumed at layer "
                                 f"{state.layer}; resume at layer <= {early[0].layer} or run the full forward")
        layers = self.family.decoder_layers(self.hf_model)
        adjust = getattr(self.family, "replay_output", None)
        replays = [] if state.full else [_Replay(state.carried, state.keep_states, adjust) for _ in range(state.layer)]
        saved = []
        try:
            for i, replay in enumerate(replays):
                saved.append(layers[i].__dict__.get("forward", _MISSING))
                layers[i].forward = replay
            cache_kw = self.cache_kwarg
            extra = self._continuation_positions(state.tokens, past_key_values, {})
            out = self.hf_model(input_ids=state.tokens, attention_mask=state.attention_mask,
                                use_cache=past_key_values is not None, **{cache_kw: past_key_values}, **extra)
        finally:
            for i, prev in enumerate(saved):
                if prev is _MISSING:
                    del layers[i].forward
                else:
                    layers[i].forward = prev
        T = state.tokens.shape[1]
        for i, replay in enumerate(replays):
            if replay.cursor != T:
                raise RuntimeError(f"the resumed forward ran decoder layer {i} over {replay.cursor} of the state's "
                                   f"{T} positions; run_from_layer expects one call over all of them")
        return out if return_hf else out.logits

    def _continuation_positions(self, tokens: Tensor, cache, hf_kwargs: dict) -> dict:
        """``hf_kwargs`` plus ``position_ids = offset + arange(p)`` when a cache holding ``offset > 0`` tokens is
        continued and the caller gave none: what most HF models compute by themselves, and what Bamba does not
        (its default positions restart at 0 on every call, so a continued attention layer would get wrong RoPE
        positions)."""
        if cache is None or "position_ids" in hf_kwargs or not self._takes_position_ids:
            return hf_kwargs
        try:
            offset = int(cache.get_seq_length())
        except (AttributeError, TypeError, ValueError):
            return hf_kwargs
        if offset <= 0:
            return hf_kwargs
        pos = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)[None].expand(tokens.shape[0], -1)
        return {**hf_kwargs, "position_ids": pos}

    def _check_hf_kwargs(self, hf_kwargs: dict) -> None:
        """Raise ``TypeError`` for keyword arguments the HF forward does not take (HF models accept ``**kwargs``
        and drop unknown ones, so e.g. ``use_error_term`` passed to ``run_with_hooks_with_saes`` would silently
        do nothing; TransformerLens' ``HookedSAETransformer`` raises here too)."""
        unknown = sorted(set(hf_kwargs) - self._hf_forward_kwargs)
        if unknown:
            raise TypeError(f"forward() got unexpected keyword argument(s) {unknown}: neither this hooked model nor "
                            f"the {type(self.hf_model).__name__} forward takes them (SAE options such as "
                            "use_error_term belong to add_sae / saes())")

    @functools.cached_property
    def _hf_forward_kwargs(self) -> frozenset:
        """Keyword names the HF forward takes: its named parameters plus transformers' ``TransformersKwargs``."""
        params = inspect.signature(self.hf_model.forward).parameters
        names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            try:
                from transformers.utils.generic import TransformersKwargs

                names |= set(TransformersKwargs.__annotations__)
            except ImportError:  # pragma: no cover - older transformers
                pass
        return frozenset(names)

    @functools.cached_property
    def _takes_position_ids(self) -> bool:
        return "position_ids" in inspect.signature(self.hf_model.forward).parameters

    @functools.cached_property
    def cache_kwarg(self) -> str:
        """The name the HF model's ``forward`` takes its cache by (``past_key_values``; Mamba-2 models:
        ``cache`` from transformers 5.24, ``cache_params`` before); read once, off the signature."""
        params = inspect.signature(self.hf_model.forward).parameters
        return next((n for n in CACHE_NAMES if n in params), "past_key_values")

    @staticmethod
    def cache_of(output):
        """The cache of an HF output (whichever of ``past_key_values``, ``cache``, ``cache_params`` it has)."""
        for name in CACHE_NAMES:
            cache = getattr(output, name, None)
            if cache is not None:
                return cache
        return None

    def check_resumable(self, tokens: Tensor, layer: int) -> None:
        """Raise unless resuming at ``layer`` reproduces the full forward on ``tokens`` without falling back."""
        state = self.resume_state(tokens, layer)
        if state.full:
            raise RuntimeError(f"this {self.cfg.family} model cannot be resumed exactly at layer {layer}: "
                               f"{state.fallback_reason}")

    def generate(self, input, max_new_tokens: int = 20, do_sample: bool = False, **kwargs) -> Tensor:
        """Greedy (default) generation through the HF ``generate`` with every hook and edit active.

        ``input``: a string, a list of strings (tokenized with left padding and the tokenizer's mask, so each
        row continues as it would alone) or tokens ``[batch, pos]`` (with ``attention_mask=`` if padded).
        Returns ``[batch, pos + new]`` token ids (the left-padded prompts, then the continuations)."""
        self._check_hooked()
        if isinstance(input, (str, list)):
            tokens, mask = self.to_tokens_and_mask(input, padding_side="left")
            if mask is not None and kwargs.get("attention_mask") is None:
                kwargs["attention_mask"] = mask
        else:
            tokens = self._as_tokens(input)
        if kwargs.get("pad_token_id") is None and self.tokenizer is not None \
                and self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        return self.hf_model.generate(input_ids=tokens.to(self.cfg.device), max_new_tokens=max_new_tokens,
                                      do_sample=do_sample, **kwargs)

    # ------------------------------------------------------------------ hook names
    def setup(self):
        """TransformerLens' ``setup`` (rebuilds ``hook_dict`` / ``mod_dict``, e.g. after splicing an SAE),
        then the layer-level aliases."""
        super().setup()
        self._add_layer_aliases()

    def _add_layer_aliases(self) -> None:
        """Layer-level aliases ``blocks.{l}.hook_X`` of ``blocks.{l}.{mixer}.hook_X``: the names
        ``transformer_lens.utils.get_act_name("X", layer)`` builds, so TransformerLens' patching utilities
        (``generic_activation_patch(..., activation_name="write_value")``) find the write hooks. Aliases
        resolve in ``run_with_hooks``, ``run_with_cache`` filters and the returned cache; they are not
        extra hook points (``hook_dict`` lists each hook once, so filters never fire a hook twice)."""
        self.hook_aliases: dict[str, str] = {}
        for name, hp in self.hook_dict.items():
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "blocks" and parts[2] == self.family.block_attr:
                alias = f"blocks.{parts[1]}.{parts[3]}"
                if alias not in self.mod_dict:
                    self.hook_aliases[alias] = name
                    self.mod_dict[alias] = hp

    def canonical_hook_name(self, name: str) -> str:
        """``blocks.{l}.{mixer}.hook_X`` for an alias ``blocks.{l}.hook_X``; other names unchanged."""
        return self.hook_aliases.get(name, name)

    def check_hook_names(self, names: Iterable[str]) -> None:
        """Raise :class:`HookNameError` listing the valid names if any name is unknown (aliases allowed)."""
        bad = [n for n in names if n not in self.hook_dict and n not in self.hook_aliases]
        if bad:
            raise HookNameError(f"unknown hook name(s) {bad}; valid names are {sorted(self.hook_dict)} "
                                "(and their layer-level aliases blocks.{l}.hook_X)")

    def _names_filter_list(self, names_filter):
        if isinstance(names_filter, str):
            self.check_hook_names([names_filter])
            return self.canonical_hook_name(names_filter)
        if isinstance(names_filter, (list, tuple)):
            self.check_hook_names(names_filter)
            return [self.canonical_hook_name(n) for n in names_filter]
        return names_filter

    def run_with_cache(self, *model_args, names_filter=None, pos_slice=None, return_cache_object: bool = True,
                       remove_batch_dim: bool = False, **kwargs):
        """TransformerLens ``run_with_cache``: ``(output, ActivationCache)`` (a dict with
        ``return_cache_object=False``). Exact-name filters are validated; ``pos_slice`` slices the position
        axis, which is axis 1 of every hook here (``[b, p, ...]``), not the axis TransformerLens guesses.
        The opt-in hooks (``hook_write``, ``hook_write_flat``, ``hook_state``) are cached when named in a
        list / string filter (they then fire for this run) or while switched on (``options``); a callable or
        no filter leaves them out otherwise, so a plain cache never materialises ``[b,p,H,d_k,d_v]`` tensors."""
        if names_filter is None:  # everything, except the opt-in dense / state hooks unless switched on
            names_filter = self._default_cache_filter
        elif callable(names_filter):  # a pattern selects the opt-in hooks only while they are switched on;
            user_filter = names_filter  # name them explicitly to turn them on for this run
            names_filter = lambda name: bool(user_filter(name)) and self._default_cache_filter(name)  # noqa: E731
        names_filter = self._names_filter_list(names_filter)
        out, cache = super().run_with_cache(*model_args, names_filter=names_filter,
                                            remove_batch_dim=remove_batch_dim, **kwargs)
        if pos_slice is not None:
            cache = _slice_positions(cache, pos_slice, axis=0 if remove_batch_dim else 1)
        if return_cache_object:
            cache = WriteActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def _default_cache_filter(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("hook_write", "hook_write_flat"):
            return self.materialize_writes
        if leaf == "hook_state":
            return self.state_capture is not None
        return True

    def run_with_hooks(self, *model_args, fwd_hooks=(), bwd_hooks=(), **kwargs):
        self.check_hook_names([n for n, _ in fwd_hooks if isinstance(n, str)])
        self.check_hook_names([n for n, _ in bwd_hooks if isinstance(n, str)])
        return super().run_with_hooks(*model_args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, **kwargs)

    def hook_inventory(self) -> list[tuple[str, str]]:
        """``(name, shape and semantics)`` for every hook point, from the family's inventory."""
        return [(name, self.family.describe_hook(self, name)) for name in self.hook_dict]


def find_decoder_layers(hf_model: nn.Module, mixer: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder layers that holds ``mixer`` (found by structure, not by path)."""
    for m in hf_model.modules():
        if isinstance(m, nn.ModuleList) and any(mixer in list(layer.children()) for layer in m):
            return m
    raise RuntimeError("could not find the decoder layer list")


def find_final_norm(hf_model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The final norm of the module that owns ``layers`` (``norm``, ``norm_f`` or ``final_layernorm``)."""
    for m in hf_model.modules():
        if any(c is layers for c in m.children()):
            for attr in ("norm", "norm_f", "final_layernorm"):
                if isinstance(getattr(m, attr, None), nn.Module):
                    return getattr(m, attr)
    raise RuntimeError("could not find the final norm")


def _cached_length(cache, ids, mask) -> int | None:
    """How many tokens ``cache`` holds before this call: its record from this hooked model, its own length, 0
    for a cache none of whose layers is filled yet, else the attention mask's length minus the call's (HF
    masks cover cached + new tokens); None when nothing tells it."""
    if cache is None:
        return 0
    seen = getattr(cache, "_writesae_seen", None)
    if seen:
        return max(seen.values())
    if not hasattr(cache, "get_seq_length"):  # mamba-ssm InferenceParams (anything else: the model refuses it)
        offset = getattr(cache, "seqlen_offset", None)  # (and xLSTMCache, whose offset is a 1-element tensor)
        if isinstance(offset, Tensor) and offset.numel() == 1 and not offset.dtype.is_floating_point:
            return int(offset)
        return int(offset) if isinstance(offset, numbers.Integral) else None
    try:
        return int(cache.get_seq_length())
    except (ValueError, AttributeError, TypeError):  # e.g. a cache of linear-attention layers only
        pass
    layers = getattr(cache, "layers", None)
    flags = ("is_recurrent_states_initialized", "is_conv_states_initialized")
    if layers is not None and all(isinstance(getattr(layer, f, None), dict) for layer in layers for f in flags) \
            and not any(any(getattr(layer, f).values()) for layer in layers for f in flags):
        return 0  # nothing cached yet (e.g. the first call of generate)
    if isinstance(ids, Tensor) and isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] > ids.shape[1]:
        return mask.shape[1] - ids.shape[1]
    return None


OPT_IN_HOOKS = ("hook_write", "hook_write_flat", "hook_state")


def _live(point: nn.Module) -> bool:
    """A hook point that something reads: an SAE (or other module) spliced in its place, or a HookPoint with
    TransformerLens hooks attached."""
    if not isinstance(point, HookPoint):
        return True
    return bool(point._forward_hooks or point._forward_pre_hooks or point._backward_hooks)


class _StopForward(Exception):
    pass


_LIVE_WRAPPERS: "weakref.WeakValueDictionary[int, HookedRecurrentModel]" = weakref.WeakValueDictionary()


def _wrapper_key(hf_model: nn.Module) -> int:
    """Identity of the model a wrapper hooks (a mamba-ssm adapter's inner ``MambaLMHeadModel``)."""
    inner = getattr(hf_model, "model", None)
    return id(inner if type(hf_model).__name__ == "MambaSSMCausalLM" else hf_model)


def existing_wrapper(hf_model: nn.Module) -> "HookedRecurrentModel | None":
    """The live wrapper that hooks ``hf_model`` (or the mamba-ssm model inside it), if any."""
    w = _LIVE_WRAPPERS.get(_wrapper_key(hf_model))
    return w if w is not None and not w._unhooked else None


def reuse_wrapper(wrapper: "HookedRecurrentModel", tokenizer=None) -> "HookedRecurrentModel":
    """``hook_model`` on an already hooked model: the existing wrapper (given the tokenizer if it had none)."""
    wrapper._check_hooked()
    if tokenizer is not None and wrapper.tokenizer is not None and tokenizer is not wrapper.tokenizer:
        raise ValueError("this model is already hooked with another tokenizer; set wrapper.tokenizer, or call "
                         "wrapper.unhook() and hook it again")
    if tokenizer is not None:
        wrapper.tokenizer = tokenizer
    _log.info("hook_model: the model is already hooked; returning its existing wrapper")
    return wrapper


def _hook_dicts(module: nn.Module) -> list[dict]:
    """The non-empty hook dictionaries of a module (hooks and their with-kwargs / always-call flags)."""
    names = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    return [d for d in (getattr(module, n, None) for n in names) if d]


_MISSING = object()


def _map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor in it (tensors, tuples, lists, dicts; other leaves kept)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    return obj


def _tensors(obj) -> list[Tensor]:
    found: list[Tensor] = []
    _map_tensors(obj, lambda t: found.append(t) or t)
    return found


class _Replay:
    """Stands in for a skipped decoder layer's ``forward``: returns the recorded output of the layer before the
    resume point, for the positions of this call (a cursor advances by each call's length, so wrappers that run
    a continuation one token at a time get one position per call). ``adjust(output, call_kwargs)``, a family's
    ``replay_output``, puts what the call itself must hand on into the output (fla's decoder loop takes the cache
    back from each block's output)."""

    def __init__(self, carried, keep_states: bool = False, adjust=None):
        self.carried, self.cursor, self.keep_states, self.adjust = carried, 0, keep_states, adjust

    def __call__(self, *args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.dim() >= 2), None)
        if first is None:
            raise RuntimeError("a replayed decoder layer was called without a [batch, pos, ...] tensor input")
        n = first.shape[1]
        start, self.cursor = self.cursor, self.cursor + n

        if self.keep_states:  # (hidden [b, T, ...], the layer's recurrent state): the state is returned whole
            out = (self.carried[0][:, start:start + n], *self.carried[1:])
        else:
            out = _map_tensors(self.carried, lambda t: t[:, start:start + n])
        return out if self.adjust is None else self.adjust(out, kwargs)


@dataclass(frozen=True)
class ResumeState:
    """The clean run of a batch up to a decoder layer, from :meth:`HookedRecurrentModel.resume_state`.

    ``tokens`` ``[b, T]`` (the embeddings are recomputed from them: cheap, and exact for models that feed the
    embeddings to later layers); ``carried``: the output of decoder layer ``layer - 1`` as the model returns it
    (every tensor in it ``[b, T, ...]``), None at layer 0; ``full``: no exact resume, the full forward runs.
    """

    layer: int
    tokens: Tensor
    attention_mask: Tensor | None = None
    carried: Any = None
    full: bool = False
    fallback_reason: str | None = None
    keep_states: bool = False  # the decoder layers also return their recurrent state ``[b, ...]`` (xLSTM)

    def unsliceable_reason(self) -> str | None:
        b, T = self.tokens.shape
        carried = self.carried
        if self.keep_states and carried is not None:
            if not (isinstance(carried, tuple) and isinstance(carried[0], Tensor)):
                return f"decoder layer {self.layer - 1} returns {type(carried).__name__}, not (hidden, state)"
            bad = [t for t in _tensors(carried[1:]) if t.dim() < 1 or t.shape[0] != b]
            if bad:
                return (f"decoder layer {self.layer - 1} returns a state of shape {list(bad[0].shape)}, not "
                        f"[batch={b}, ...]")
            carried = carried[0]
        for t in _tensors(carried):
            if t.dim() < 2 or tuple(t.shape[:2]) != (b, T):
                return (f"decoder layer {self.layer - 1} returns a tensor of shape {list(t.shape)}, not "
                        f"[batch={b}, pos={T}, ...]")
        return None

    def _rows_cols(self, rows, start: int) -> "ResumeState":
        b, T = self.tokens.shape
        if not 0 <= start < T:
            raise ValueError(f"start must be in [0, {T}), got {start}")
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.tokens.device)
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < b):
            raise ValueError(f"rows must index the state's {b} rows, got {idx.tolist()}")
        mask = None if self.attention_mask is None else self.attention_mask.index_select(0, idx.to(
            self.attention_mask.device))
        rows = lambda t: t.index_select(0, idx.to(t.device))  # noqa: E731
        if self.keep_states and self.carried is not None:  # (hidden, state): the state has no position axis
            carried = (rows(self.carried[0])[:, start:], *_map_tensors(self.carried[1:], rows))
        else:
            carried = _map_tensors(self.carried, lambda t: rows(t)[:, start:])
        return dataclasses.replace(self, tokens=self.tokens.index_select(0, idx)[:, start:], attention_mask=mask,
                                   carried=carried)

    def select(self, rows: Sequence[int] | Tensor | None = None, start: int = 0) -> "ResumeState":
        """The state of rows ``rows`` (default all, in that order, repeats allowed) from position ``start`` on
        (to continue a cache that holds the first ``start`` tokens; the attention mask keeps all positions, as
        HF expects with a cache)."""
        rows = range(self.tokens.shape[0]) if rows is None else rows
        return self._rows_cols(rows, start)

    def repeat(self, n: int) -> "ResumeState":
        """``n`` copies of the batch stacked as rows (row ``j * b + r`` is row ``r``), like ``Tensor.repeat``."""
        b = self.tokens.shape[0]
        return self._rows_cols([r for _ in range(n) for r in range(b)], 0)


def _slice_positions(cache, pos_slice, axis: int):
    from transformer_lens.utilities.slice import Slice

    if isinstance(pos_slice, int):  # as TransformerLens' caching hooks: an int keeps the axis
        pos_slice = [pos_slice]
    sl = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
    store = cache
    for name in list(store):
        if name.endswith("hook_state"):
            raise ValueError("pos_slice cannot be applied to hook_state (its axis 1 holds the captured "
                             "positions, not the call's); choose positions with StateCapture instead")
        store[name] = sl.apply(store[name], dim=axis)
    return cache


def lm_cross_entropy(logits: Tensor, tokens: Tensor, attention_mask: Tensor | None = None,
                     per_token: bool = False) -> Tensor:
    """Next-token cross-entropy: ``[b, p-1]`` per token, or the mean over unmasked predictions."""
    logp = logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    if per_token:
        return nll
    if attention_mask is None:
        return nll.mean()
    m = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.dtype)
    return (nll * m).sum() / m.sum()

"""SAE host mixin: ``HookedSAETransformer``'s splicing API for any adapter (``HookedRootModule``).

``add_sae``, ``run_with_saes``, ``run_with_cache_with_saes``, ``run_with_hooks_with_saes``, ``reset_saes``,
``saes()`` behave as in SAELens (same cache names ``{hook}.hook_sae_acts_post`` ...), plus:

* a WriteSAE is checked against the hook it is spliced into (d_k, d_v, value heads, family, site): a
  mismatch is an error, never a silent broadcast; an unknown hook name is an error (SAELens only logs);
* several per-head WriteSAEs can sit on one hook: each changes only its own head; their hooks are then
  named ``{hook}.head{h}.hook_sae_*``;
* ``identity_grad=True`` splices so that gradients flowing upstream of the hook are those of the clean
  model (the forward value is the error-term splice's), while features still receive gradients.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.analysis.hooked_sae_transformer import (HookedSAETransformer, _SAEWrapper, get_deep_attr,
                                                       set_deep_attr)
from sae_lens.saes.sae import _disable_hooks
from torch import nn
from transformer_lens.hook_points import HookPoint

_HST = HookedSAETransformer


class SpliceWrapper(_SAEWrapper):
    """SAELens' splice wrapper with an identity-gradient option."""

    def __init__(self, sae, use_error_term=False, exclude_special_tokens=False, identity_grad=False):
        super().__init__(sae, use_error_term=use_error_term, exclude_special_tokens=exclude_special_tokens)
        self.identity_grad = identity_grad

    def forward(self, original_output: torch.Tensor) -> torch.Tensor:
        """Splice. With the error term (or ``identity_grad``) the output is ``x + (recon - clean)``, so an
        unedited splice returns ``x`` bit for bit. Gradients to ``x``: through the reconstruction (``J_recon``,
        the SAE-linearised gradient) for an untouched error node; ``I`` (the model's own) once the error node
        is edited or perturbed (``recon + e`` with ``e = x - clean(x)``: the error node's own path to ``x`` is
        ``I - J_recon``, as feature circuits need); with ``identity_grad``, always ``I``."""
        x = original_output
        x_in = x.detach() if self.identity_grad else x
        acts = self.sae.encode(x_in)
        recon = self.sae.decode(acts)
        if self.use_error_term or self.identity_grad:
            with _disable_hooks(self.sae):
                clean = self.sae.decode(self.sae.encode(x_in))  # the unedited reconstruction, as a function of x
            err = x - clean  # the error node; its gradient path to x is I - J_recon
            v0 = err._version if not torch.is_inference(err) else None
            err_h = self.hook_sae_error(err)
            if err_h is err and v0 is not None and err._version == v0:
                out = (x if self.identity_grad else x.detach()) + (recon - clean.detach())
            else:  # an edited error node (or one carrying a perturbation under autograd): recon + error
                out = recon + err_h
        else:
            out = recon
        mask = self._token_mask
        if mask is not None:
            for _ in range(x.dim() - mask.dim()):
                mask = mask.unsqueeze(-1)
            out = torch.where(mask, x, out)
        return self.hook_sae_output(out)


class MultiHeadSplice(nn.Module):
    """Several per-head WriteSAEs on one hook, applied in turn (each touches only its head)."""

    def __init__(self, wrappers: list[SpliceWrapper]):
        super().__init__()
        for w in wrappers:
            self.add_module(f"head{w.sae.cfg.head}", w)
        self.hook_sae_output = HookPoint()

    @property
    def wrappers(self) -> list[SpliceWrapper]:
        return [m for name, m in self.named_children() if name.startswith("head")]

    @property
    def sae(self):
        return [w.sae for w in self.wrappers]

    @property
    def exclude_special_tokens(self):
        flags = [w.exclude_special_tokens for w in self.wrappers]
        return next((f for f in flags if f is not False), False)

    def set_token_mask(self, mask):
        for w in self.wrappers:
            if w.exclude_special_tokens is not False:
                w.set_token_mask(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.wrappers:
            x = w(x)
        return self.hook_sae_output(x)


def _family_key(name: str) -> str:
    """Families whose writes are the same: ``qwen3_5_text`` is ``qwen3_5``; a mamba-ssm model's Mamba2 layers
    are ``mamba2`` layers (the same checkpoint loads in either library)."""
    if name == "mamba_ssm":
        return "mamba2"
    return name[: -len("_text")] if name.endswith("_text") else name


class SAEHostMixin:
    """Mix into a ``HookedRootModule`` adapter to make it a full SAELens SAE host."""

    def _init_sae_host(self) -> None:
        self._acts_to_saes: dict[str, Any] = {}
        self._transcoder_output_hooks: dict[str, str] = {}

    # borrowed unchanged from HookedSAETransformer (they only use the attributes above)
    reset_saes = _HST.reset_saes
    _compute_exclusion_mask = _HST._compute_exclusion_mask
    _token_masks = _HST._token_masks
    run_with_saes = _HST.run_with_saes
    run_with_cache_with_saes = _HST.run_with_cache_with_saes
    run_with_hooks_with_saes = _HST.run_with_hooks_with_saes

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """Hook name -> attached SAE (a list for several per-head SAEs on one hook)."""
        return {name: w.sae for name, w in self._acts_to_saes.items()}

    @contextlib.contextmanager
    def saes(self, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None,
             exclude_special_tokens: bool | list[int] = False, identity_grad: bool = False):
        """Temporarily attach SAEs (restoring whatever was attached before)."""
        if isinstance(saes, SAE):
            saes = [saes]
        restore = []
        try:
            for sae in saes:
                name = sae.cfg.metadata.hook_name
                restore.append((name, self._acts_to_saes.get(name)))
                self.add_sae(sae, use_error_term=use_error_term, exclude_special_tokens=exclude_special_tokens,
                             identity_grad=identity_grad)
            yield self
        finally:
            if reset_saes_end:
                for name, prev in reversed(restore):
                    self._reset_sae(name, prev)
                self.setup()

    def check_sae_fits(self, sae, hook_name: str, allow_site_mismatch: bool = False) -> None:
        """Raise a clear error if a WriteSAE does not fit the hook (dims, heads, family, site)."""
        from .sae import WriteSAE, TrainingWriteSAE

        if not isinstance(sae, (WriteSAE, TrainingWriteSAE)):
            return
        cfg, mcfg = sae.cfg, self.cfg
        leaf = hook_name.rsplit(".", 1)[-1]
        if leaf not in ("hook_write", "hook_write_flat", "hook_state"):
            raise ValueError(f"a WriteSAE splices into hook_write, hook_write_flat or hook_state, not {hook_name!r}")
        if (cfg.d_k, cfg.d_v) != (mcfg.d_k, mcfg.d_v):
            raise ValueError(f"WriteSAE has d_k x d_v = {cfg.d_k} x {cfg.d_v}, but {hook_name} holds "
                             f"{mcfg.d_k} x {mcfg.d_v} matrices")
        if cfg.n_heads != mcfg.n_heads:
            raise ValueError(f"WriteSAE was made for {cfg.n_heads} value heads, {hook_name} has {mcfg.n_heads}")
        if cfg.family and _family_key(cfg.family) != _family_key(mcfg.family):
            raise ValueError(f"WriteSAE was trained on a {cfg.family!r} model, this model is {mcfg.family!r}")
        site = "state" if leaf == "hook_state" else "write"
        if cfg.site != site and not allow_site_mismatch:
            raise ValueError(f"WriteSAE was trained on the {cfg.site} site but {hook_name} is a {site} hook; "
                             "pass allow_site_mismatch=True to splice it anyway")
        if site == "state" and cfg.head is not None and self.state_capture is not None \
                and self.state_capture.heads is not None:
            raise ValueError("a per-head WriteSAE on hook_state needs StateCapture(heads=None)")

    def add_sae(self, sae, use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                identity_grad: bool = False, allow_site_mismatch: bool = False):
        """Attach ``sae`` at ``sae.cfg.metadata.hook_name`` until ``reset_saes``."""
        name = sae.cfg.metadata.hook_name
        if name is None:
            raise ValueError("the SAE has no cfg.metadata.hook_name; set it to the hook to splice into")
        if name not in self._acts_to_saes:
            self.check_hook_names([name])
        self.check_sae_fits(sae, name, allow_site_mismatch)
        err = sae.use_error_term if use_error_term is None else use_error_term
        wrapper = SpliceWrapper(sae, use_error_term=err, exclude_special_tokens=exclude_special_tokens,
                                identity_grad=identity_grad)
        head = getattr(sae.cfg, "head", None)
        prev = self._acts_to_saes.get(name)
        if prev is not None and head is not None:
            prev_list = prev.wrappers if isinstance(prev, MultiHeadSplice) else [prev]
            if all(getattr(p.sae.cfg, "head", None) is not None for p in prev_list):
                kept = [p for p in prev_list if p.sae.cfg.head != head]
                if kept:
                    wrapper = MultiHeadSplice(sorted(kept + [wrapper], key=lambda w: w.sae.cfg.head))
        self._install(name, wrapper)

    def _install(self, name: str, wrapper) -> None:
        self._acts_to_saes[name] = wrapper
        set_deep_attr(self, name, wrapper)
        self.setup()

    def _reset_sae(self, act_name: str, prev_wrapper=None) -> None:
        if act_name not in self._acts_to_saes:
            return
        set_deep_attr(self, act_name, HookPoint())
        del self._acts_to_saes[act_name]
        if prev_wrapper is not None:
            self._install(act_name, prev_wrapper)
        else:
            self.setup()



__all__ = ["SAEHostMixin", "SpliceWrapper", "MultiHeadSplice", "get_deep_attr"]

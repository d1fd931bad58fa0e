"""Write hooks for mamba-ssm models: ``MambaLMHeadModel`` with ``Mamba2`` layers (``mamba_ssm`` on a GPU).

The hook points, shapes and edit semantics are those of the transformers Mamba-2 family
(:mod:`writesae_plugin.adapters.mamba2`, under ``blocks.{l}.mixer.``), and so is the mechanism: the
module-level ``mamba_chunk_scan_combined`` (prefill) and ``selective_state_update`` (decode) of the mixer's
module are swapped for a dispatcher, so mamba-ssm's own triton kernels compute the hooked forward and the
zero-value propagation of edits. While hooked, the fused ``mamba_split_conv1d_scan_combined`` path (which
would hide the write) is turned off for each call (``use_mem_eff_path``; the module's own setting is
restored after the call).

mamba-ssm's model has no HF-style forward, so :class:`MambaSSMCausalLM` wraps it (same modules, same
weights): ``forward(input_ids, attention_mask=None, use_cache=None, past_key_values=None, inputs_embeds=None)``
returns ``.logits`` and ``.past_key_values``; the cache is mamba-ssm's ``InferenceParams`` (or the
equivalent :class:`InferenceCache`), and, like an HF cache, it is advanced by each call
(``seqlen_offset += T``). mamba-ssm's chunk scan always starts from a zero state, so a call of several
tokens on a cache that already holds some runs one decode step per token (exact, slower than a prefill).
No padding masks and no packed sequences (``seq_idx`` / ``cu_seqlens``) while hooked.

The mixers' gated RMSNorm and the fused add-norms are mamba-ssm's triton functions, which forward-mode
autodiff (``torch.func.jvp``) cannot go through: the closed-form logit-shift experiment needs the
transformers class. Everything that needs only hooks and edits (captures, SAE splicing, substitution,
installs, patching) runs on the wrapped model as on the transformers one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import AdapterConfig, HookedRecurrentModel, UnsupportedModelError
from .gated_deltanet import _enter
from .mamba2 import MAMBA_SSM_KERNELS, Mamba2FamilyBase, Mamba2Hooks, _clear, _install, _leave

_MIXER_ATTRS = ("A_log", "dt_bias", "D", "d_state", "ngroups", "headdim", "nheads", "use_mem_eff_path", "in_proj",
                "out_proj", "layer_idx")


def is_mamba_ssm_model(model: nn.Module) -> bool:
    """A mamba-ssm ``MambaLMHeadModel`` (found by structure: ``backbone.layers`` of blocks with ``.mixer``
    and an ``lm_head``), or the wrapper around one."""
    if isinstance(model, MambaSSMCausalLM):
        return True
    backbone = getattr(model, "backbone", None)
    return (type(model).__name__ == "MambaLMHeadModel" and isinstance(getattr(backbone, "layers", None),
                                                                     nn.ModuleList)
            and hasattr(model, "lm_head"))


@dataclass
class InferenceCache:
    """The decode cache of a mamba-ssm model, field for field mamba-ssm's ``InferenceParams``
    (``key_value_memory_dict[layer] = (conv_state [b, conv_dim, d_conv], ssm_state [b, H, P, N])``, value-first
    ``ssm_state``). ``seqlen_offset`` counts the tokens already in the cache."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Tensor | None = None

    def get_seq_length(self) -> int:
        return self.seqlen_offset

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Keep the cached rows ``beam_idx`` (in that order), as an HF cache's ``reorder_cache``."""
        def pick(v):
            if isinstance(v, Tensor):
                return v.index_select(0, beam_idx.to(v.device))
            return type(v)(pick(u) for u in v) if isinstance(v, (tuple, list)) else v

        for k, v in self.key_value_memory_dict.items():
            self.key_value_memory_dict[k] = pick(v)
        self.max_batch_size = len(beam_idx)

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        self.max_seqlen, self.max_batch_size, self.seqlen_offset = max_seqlen, max_batch_size, 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


@dataclass
class MambaSSMOutput:
    """What :class:`MambaSSMCausalLM` returns: ``logits [b, p, vocab]`` and the (advanced) cache."""

    logits: Tensor
    past_key_values: object | None = None


@dataclass
class GenerateOutput:
    """``sequences [b, T + n]`` and, with ``output_logits``, the raw logits of each new token ``n x [b, vocab]``."""

    sequences: Tensor
    logits: tuple[Tensor, ...] | None = None


class MambaSSMCausalLM(nn.Module):
    """An HF-style causal-LM interface around a mamba-ssm ``MambaLMHeadModel`` (the same modules: the wrapped
    model is ``.model``). See the module docstring for the semantics."""

    main_input_name = "input_ids"

    def __init__(self, model: nn.Module, extra_cache_len: int = 2048):
        super().__init__()
        if not is_mamba_ssm_model(model) or isinstance(model, MambaSSMCausalLM):
            raise TypeError(f"MambaSSMCausalLM wraps a mamba-ssm MambaLMHeadModel, got {type(model).__name__}")
        self.model = model
        self.config = model.config
        self.extra_cache_len = extra_cache_len

    def get_input_embeddings(self) -> nn.Module:
        return self.model.backbone.embedding

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def new_cache(self, batch_size: int, max_seqlen: int) -> InferenceCache:
        """An empty cache for ``batch_size`` rows and up to ``max_seqlen`` tokens (attention layers of hybrid
        checkpoints allocate their key/value cache to that length)."""
        return InferenceCache(max_seqlen=max_seqlen, max_batch_size=batch_size)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                use_cache: bool | None = None, past_key_values=None, inputs_embeds: Tensor | None = None,
                num_last_tokens: int = 0) -> MambaSSMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids [b, p] and inputs_embeds [b, p, d_model]")
        b, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if attention_mask is not None and not bool((attention_mask != 0).all()):
            raise ValueError("mamba-ssm models take no padding mask (their scan has none): run unpadded rows "
                             "of equal length, or one sequence at a time")
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(b, T + self.extra_cache_len)
        if cache is not None:
            for attr in ("seqlen_offset", "key_value_memory_dict"):
                if not hasattr(cache, attr):
                    raise TypeError(f"past_key_values must be a mamba-ssm InferenceParams or an InferenceCache "
                                    f"(it has no {attr}), got {type(cache).__name__}")
            if cache.seqlen_offset > 0 and T > 1:  # mamba-ssm's chunk scan starts from a zero state
                steps = [self(input_ids=None if input_ids is None else input_ids[:, t:t + 1], past_key_values=cache,
                              inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, t:t + 1]).logits
                         for t in range(T)]
                logits = torch.cat(steps, 1)
                return MambaSSMOutput(logits=logits[:, -num_last_tokens:] if num_last_tokens else logits,
                                      past_key_values=cache)
        with self._embeddings(inputs_embeds):
            ids = input_ids if input_ids is not None else torch.zeros(b, T, dtype=torch.long,
                                                                      device=inputs_embeds.device)
            out = self.model(ids, inference_params=cache, num_last_tokens=num_last_tokens)
        if cache is not None:
            cache.seqlen_offset += T
        return MambaSSMOutput(logits=out.logits, past_key_values=cache)

    @contextlib.contextmanager
    def _embeddings(self, inputs_embeds: Tensor | None):
        """With ``inputs_embeds``, the embedding returns them for the call (mamba-ssm takes token ids only)."""
        if inputs_embeds is None:
            yield
            return
        backbone = self.model.backbone
        saved = backbone.embedding
        backbone.embedding = _Given(inputs_embeds)
        try:
            yield
        finally:
            backbone.embedding = saved

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 attention_mask: Tensor | None = None, min_new_tokens: int | None = None, pad_token_id=None,
                 output_logits: bool = False, return_dict_in_generate: bool = False, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None):
        """Prefill, then one token per step through the cache (every hook and edit active). Greedy by default;
        ``do_sample`` samples at ``temperature`` from the ``top_k`` most likely tokens (0: all). Generation
        never stops early, so exactly ``max_new_tokens`` are produced (``min_new_tokens`` and
        ``pad_token_id`` are accepted for HF-style callers)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, pos], got {list(input_ids.shape)}")
        if min_new_tokens is not None and min_new_tokens > max_new_tokens:
            raise ValueError(f"min_new_tokens={min_new_tokens} exceeds max_new_tokens={max_new_tokens}")
        b, T = input_ids.shape
        cache = self.new_cache(b, T + max_new_tokens)
        seq, logits = input_ids, []
        step_in = input_ids
        for _ in range(max_new_tokens):
            out = self(step_in, attention_mask=attention_mask if step_in is input_ids else None,
                       past_key_values=cache, use_cache=True)
            last = out.logits[:, -1].float()
            logits.append(last)
            if do_sample:
                scaled = last / max(temperature, 1e-8)
                if top_k:
                    kth = scaled.topk(top_k, dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = torch.multinomial(scaled.softmax(-1), 1, generator=generator)
            else:
                nxt = last.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt.to(seq.dtype)], 1)
            step_in = nxt.to(seq.dtype)
        if return_dict_in_generate:
            return GenerateOutput(seq, tuple(logits) if output_logits else None)
        return seq


class _Given(nn.Module):
    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value

    def forward(self, input_ids):
        return self.value


def _stream(out) -> Tensor:
    """The residual stream after a mamba-ssm block, ``hidden_states + residual`` (the add is deferred to the
    next block's fused add-norm)."""
    h, r = out
    return h if r is None else r + h


class MambaSSMFamily(Mamba2FamilyBase):
    """Finds the ``Mamba2`` mixers of a mamba-ssm model (``backbone.layers[i].mixer``) and builds their hooks."""

    name = "mamba_ssm"

    @staticmethod
    def dims(mixer: nn.Module) -> tuple[int, int, int, int]:
        return mixer.nheads, mixer.ngroups, mixer.d_state, mixer.headdim

    def __init__(self, wrapper: MambaSSMCausalLM):
        model = wrapper.model
        layers = model.backbone.layers
        self.mixers = {}
        for i, block in enumerate(layers):
            m = getattr(block, "mixer", None)
            if m is None or not all(hasattr(m, a) for a in _MIXER_ATTRS):
                continue  # attention (MHA) layers of hybrid checkpoints, or Mamba-1 layers: no Mamba-2 write
            if getattr(m, "process_group", None) is not None:
                raise UnsupportedModelError(f"layer {i}: tensor-parallel Mamba2 (process_group) is not supported")
            if int(m.layer_idx) != i:
                raise UnsupportedModelError(f"layer {i}: its Mamba2 mixer has layer_idx {m.layer_idx}")
            self.mixers[i] = m
        if not self.mixers:
            kinds = sorted({type(getattr(b, "mixer", None)).__name__ for b in layers})
            raise UnsupportedModelError(f"{type(model).__name__} has no Mamba2 mixer (its mixers: {kinds}); "
                                        "Mamba-1 layers have no rank-1 write of this form")
        mixer = next(iter(self.mixers.values()))
        self.module_name = type(mixer).__module__
        for m in self.mixers.values():
            if "forward" in m.__dict__ or "step" in m.__dict__:
                raise UnsupportedModelError("a Mamba2 mixer's forward or step was replaced; the write hooks need "
                                            "mamba-ssm's own")
        self.kernels = _install(self.module_name, MAMBA_SSM_KERNELS)

    def decoder_layers(self, hf_model) -> nn.ModuleList:
        return hf_model.model.backbone.layers

    def final_norm(self, hf_model) -> nn.Module:
        return hf_model.model.backbone.norm_f

    def stream_entering(self, hf_model, layer: int):
        """Where the residual stream entering decoder layer ``layer`` is read: the output of the embedding, or
        ``hidden_states + residual`` after the block before it (for ``layer == n_layers``: the stream the
        final norm receives)."""
        if layer == 0:
            return hf_model.model.backbone.embedding, "post", lambda out: out
        return self.decoder_layers(hf_model)[layer - 1], "post", _stream

    def build_blocks(self, owner: HookedRecurrentModel) -> nn.ModuleList:
        blocks = nn.ModuleList()
        for i in range(len(self.decoder_layers(owner.hf_model))):
            block = nn.Module()
            if i in self.mixers:
                m = self.mixers[i]
                hooks = Mamba2Hooks(owner, m, i, MAMBA_SSM_KERNELS, self.dims(m))
                block.mixer = hooks
                owner.track(m.register_forward_pre_hook(_enter(hooks), with_kwargs=True))
                owner.track(m.register_forward_pre_hook(_unfused))
                owner.track(m.register_forward_hook(_leave(hooks)))
                owner.track(m.register_forward_hook(_restore_fused, always_call=True))
                owner.track(m.register_forward_hook(_clear, always_call=True))
            blocks.append(block)
        return blocks

    def make_config(self, owner: HookedRecurrentModel) -> AdapterConfig:
        model, cfg = owner.hf_model.model, owner.hf_model.config
        H, G, N, P = self.dims(next(iter(self.mixers.values())))
        param = next(model.parameters())
        name = getattr(cfg, "_name_or_path", "") or type(model).__name__
        return AdapterConfig(
            model_name=name, family="mamba_ssm", n_layers=len(model.backbone.layers),
            d_model=model.lm_head.weight.shape[1], d_vocab=model.lm_head.weight.shape[0], n_ctx=2048,
            device=torch.device(param.device), dtype=param.dtype, recurrent_layers=tuple(sorted(self.mixers)),
            d_k=N, d_v=P, n_heads=H, n_key_heads=G,
            normalization_type="RMS" if getattr(cfg, "rms_norm", True) else "LN", positional_embedding_type="none")


def _unfused(module, args):
    """Take the unfused path for this call: the fused kernel would hide the write."""
    module._writesae_fused = module.use_mem_eff_path
    module.use_mem_eff_path = False


def _restore_fused(module, args, output):
    if hasattr(module, "_writesae_fused"):
        module.use_mem_eff_path = module.__dict__.pop("_writesae_fused")


def hook_mamba_ssm(model: nn.Module, tokenizer=None) -> HookedRecurrentModel:
    """Wrap a mamba-ssm ``MambaLMHeadModel`` (or a :class:`MambaSSMCausalLM`) into a hooked model."""
    from .base import existing_wrapper, reuse_wrapper

    existing = existing_wrapper(model)
    if existing is not None:
        return reuse_wrapper(existing, tokenizer)
    wrapper = model if isinstance(model, MambaSSMCausalLM) else MambaSSMCausalLM(model)
    return HookedRecurrentModel(wrapper, MambaSSMFamily(wrapper), tokenizer=tokenizer)

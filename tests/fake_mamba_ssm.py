"""A CPU stand-in for mamba-ssm 2.3's ``MambaLMHeadModel`` with ``Mamba2`` layers, for the adapter tests.

mamba-ssm cannot be imported on a machine without CUDA (its package import loads a compiled extension, and
its kernels and norms are triton), so the CPU tests run the adapter on this module instead: the same class
names, module structure, parameter names (a real checkpoint's ``state_dict`` loads into it), forward and
``step`` control flow, cache layout (``InferenceParams.key_value_memory_dict[layer] = (conv_state,
ssm_state [b, H, P, N])``) and module-level kernel names and signatures (``mamba_chunk_scan_combined``,
``selective_state_update``, ``mamba_split_conv1d_scan_combined``). The kernels are plain per-token torch
loops. ``scripts/gpu_check_mamba_ssm.py`` checks the adapter on the real package against this module on a
GPU.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------- kernels
def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """``x [b,T,H,P]``, ``dt [b,T,H]``, ``A [H]``, ``B``/``C [b,T,G,N]``, ``initial_states [b,H,P,N]``."""
    assert seq_idx is None and cu_seqlens is None and not return_varlen_states
    b, T, H, P = x.shape
    rep = H // B.shape[2]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = torch.clamp(F.softplus(dt) if dt_softplus else dt, min=dt_limit[0], max=dt_limit[1])
    Bh, Ch = B.float().repeat_interleave(rep, 2), C.float().repeat_interleave(rep, 2)
    S = torch.zeros(b, H, P, B.shape[-1]) if initial_states is None else initial_states.float().clone()
    y = torch.empty(b, T, H, P)
    for t in range(T):
        S = (dt[:, t] * A.float()).exp()[..., None, None] * S + (dt[:, t, :, None] * x[:, t].float())[..., None] \
            * Bh[:, t, :, None, :]
        y[:, t] = torch.einsum("bhpn,bhn->bhp", S, Ch[:, t])
    if D is not None:
        y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, S) if return_final_states else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One step, in place on ``state [b,H,P,N]``: ``x``/``dt``/``z [b,H,P]``, ``A [H,P,N]``, ``B``/``C [b,G,N]``."""
    assert state_batch_indices is None
    rep = x.shape[1] // B.shape[1]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = F.softplus(dt) if dt_softplus else dt
    Bh, Ch = B.float().repeat_interleave(rep, 1), C.float().repeat_interleave(rep, 1)
    new = (dt[..., None] * A.float()).exp() * state.float() + (dt * x.float())[..., None] * Bh[:, :, None, :]
    state.copy_(new.to(state.dtype))
    out = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        out = out + D.float() * x.float()
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(x.dtype)


def rms_norm_gated(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    dtype = x.dtype
    x = x.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    g = x.unflatten(-1, (-1, group_size or x.shape[-1]))
    out = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(dtype)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                                     seq_idx=None, dt_limit=(0.0, float("inf")), return_final_states=False,
                                     activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                                     outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True):
    """The fused training path: the whole mixer in one call (it hides the write)."""
    H = dt_bias.shape[0]
    P = headdim if headdim is not None else D.shape[-1]
    d_ssm = H * P
    N = (conv1d_weight.shape[0] - d_ssm) // (2 * ngroups)
    d_mlp = (zxbcdt.shape[-1] - 2 * d_ssm - 2 * ngroups * N - H) // 2
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, d_ssm, d_ssm + 2 * ngroups * N, H], dim=-1)
    T = xBC.shape[1]
    xBC = F.silu(F.conv1d(xBC.transpose(1, 2), conv1d_weight[:, None], conv1d_bias, padding=conv1d_weight.shape[-1] - 1,
                          groups=xBC.shape[-1])[..., :T].transpose(1, 2))
    x, B, C = torch.split(xBC, [d_ssm, ngroups * N, ngroups * N], dim=-1)
    y = mamba_chunk_scan_combined(x.unflatten(-1, (H, P)), dt, A, B.unflatten(-1, (ngroups, N)),
                                  C.unflatten(-1, (ngroups, N)), chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                                  dt_limit=dt_limit).flatten(-2)
    if rmsnorm_weight is not None:
        y = rms_norm_gated(y, rmsnorm_weight, z, rmsnorm_eps, d_ssm // ngroups, norm_before_gate)
    else:
        y = y * F.silu(z)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, outproj_weight, outproj_bias)


# ----------------------------------------------------------------------------------------------- modules
class RMSNormGated(nn.Module):  # mamba_ssm.ops.triton.layernorm_gated.RMSNorm
    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        return rms_norm_gated(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)


class RMSNorm(nn.Module):  # mamba_ssm.ops.triton.layer_norm.RMSNorm
    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x):
        return rms_norm_gated(x, self.weight, None, self.eps)


class Mamba2(nn.Module):
    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None, ngroups=1, A_init_range=(1, 16),
                 D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 dt_limit=(0.0, float("inf")), bias=False, conv_bias=True, chunk_size=256, use_mem_eff_path=True,
                 layer_idx=None, device=None, dtype=None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.ngroups = ngroups
        self.nheads = self.d_ssm // headdim
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit, self.activation, self.chunk_size = dt_limit, "silu", chunk_size
        self.use_mem_eff_path, self.layer_idx = use_mem_eff_path, layer_idx
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias)
        self.act = nn.SiLU()
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads))
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _D(self):
        return self.D.unflatten(0, (-1, self.headdim)) if self.D_has_hdim else self.D

    def forward(self, u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None):
        batch, seqlen, dim = u.shape
        conv_state, ssm_state = None, None
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(u, conv_state, ssm_state)
                return out
        zxbcdt = self.in_proj(u)
        A = -torch.exp(self.A_log.float())
        dt_limit_kwargs = {} if self.dt_limit == (0.0, float("inf")) else dict(dt_limit=self.dt_limit)
        if self.use_mem_eff_path and inference_params is None:
            return mamba_split_conv1d_scan_combined(
                zxbcdt, self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias, A, D=self._D(),
                chunk_size=self.chunk_size, seq_idx=seq_idx, activation=self.activation,
                rmsnorm_weight=self.norm.weight if self.rmsnorm else None, rmsnorm_eps=self.norm.eps if self.rmsnorm
                else 1e-6, outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias,
                headdim=None if self.D_has_hdim else self.headdim, ngroups=self.ngroups,
                norm_before_gate=self.norm_before_gate, **dt_limit_kwargs)
        d_mlp = (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * self.ngroups * self.d_state - self.nheads) // 2
        z0, x0, z, xBC, dt = torch.split(
            zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads], dim=-1)
        if conv_state is not None:
            xBC_t = xBC.transpose(1, 2)
            conv_state.copy_(F.pad(xBC_t, (self.d_conv - xBC_t.shape[-1], 0)))
        xBC = self.act(self.conv1d(xBC.transpose(1, 2)).transpose(1, 2)[:, :-(self.d_conv - 1)])
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = mamba_chunk_scan_combined(
            x.unflatten(-1, (-1, self.headdim)), dt, A, B.unflatten(-1, (self.ngroups, -1)),
            C.unflatten(-1, (self.ngroups, -1)), chunk_size=self.chunk_size, D=self._D(),
            z=z.unflatten(-1, (-1, self.headdim)) if not self.rmsnorm else None, dt_bias=self.dt_bias,
            dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu_seqlens, **dt_limit_kwargs,
            return_final_states=ssm_state is not None,
            return_varlen_states=cu_seqlens is not None and inference_params is not None)
        if ssm_state is not None:
            y, last_state, *rest = y
            ssm_state.copy_(last_state)
        y = y.flatten(-2)
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def step(self, hidden_states, conv_state, ssm_state):
        dtype = hidden_states.dtype
        zxbcdt = self.in_proj(hidden_states.squeeze(1))
        d_mlp = (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * self.ngroups * self.d_state - self.nheads) // 2
        z0, x0, z, xBC, dt = torch.split(
            zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads], dim=-1)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = xBC
        xBC = torch.sum(conv_state * self.conv1d.weight[:, 0], dim=-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xBC = self.act(xBC).to(dtype=dtype)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        P, N = self.headdim, self.d_state
        y = selective_state_update(
            ssm_state, x.unflatten(-1, (-1, P)), dt[..., None].expand(-1, -1, P), A[:, None, None].expand(-1, P, N),
            B.unflatten(-1, (self.ngroups, N)), C.unflatten(-1, (self.ngroups, N)),
            self._D() if self.D_has_hdim else self.D[:, None].expand(-1, P),
            z=z.unflatten(-1, (-1, P)) if not self.rmsnorm else None, dt_bias=self.dt_bias[:, None].expand(-1, P),
            dt_softplus=True).flatten(-2)
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size):
        if self.layer_idx not in inference_params.key_value_memory_dict:
            conv_state = torch.zeros(batch_size, self.d_conv, self.conv1d.weight.shape[0],
                                     dtype=self.conv1d.weight.dtype).transpose(1, 2)
            ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, dtype=self.in_proj.weight.dtype)
            inference_params.key_value_memory_dict[self.layer_idx] = (conv_state, ssm_state)
        return inference_params.key_value_memory_dict[self.layer_idx]


class GatedMLP(nn.Module):
    def __init__(self, in_features, hidden_features, bias=False):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x):
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


class Block(nn.Module):
    def __init__(self, dim, mixer_cls, mlp_cls, norm_cls, fused_add_norm=False, residual_in_fp32=False):
        super().__init__()
        self.residual_in_fp32, self.fused_add_norm = residual_in_fp32, fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not nn.Identity:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.mlp = None

    def _add_norm(self, norm, hidden_states, residual):
        residual = (hidden_states + residual) if residual is not None else hidden_states
        hidden_states = norm(residual.to(dtype=norm.weight.dtype))
        return hidden_states, residual.to(torch.float32) if self.residual_in_fp32 else residual

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None, inference_params=None, **mixer_kwargs):
        hidden_states, residual = self._add_norm(self.norm, hidden_states, residual)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        if self.mlp is not None:
            hidden_states, residual = self._add_norm(self.norm2, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


@dataclass
class MambaConfig:
    d_model: int = 64
    d_intermediate: int = 0
    n_layer: int = 2
    vocab_size: int = 100
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True


class MixerModel(nn.Module):
    def __init__(self, config: MambaConfig, vocab_size: int):
        super().__init__()
        d = config.d_model
        self.residual_in_fp32 = config.residual_in_fp32
        self.embedding = nn.Embedding(vocab_size, d)
        norm_cls = partial(RMSNorm, eps=1e-5) if config.rms_norm else partial(nn.LayerNorm, eps=1e-5)
        mlp_cls = nn.Identity if config.d_intermediate == 0 else partial(GatedMLP, hidden_features=config.d_intermediate)
        self.layers = nn.ModuleList([
            Block(d, partial(Mamba2, layer_idx=i, **{k: v for k, v in config.ssm_cfg.items() if k != "layer"}), mlp_cls,
                  norm_cls, config.fused_add_norm, config.residual_in_fp32) for i in range(config.n_layer)])
        for i, layer in enumerate(self.layers):
            layer.layer_idx = i
        self.norm_f = norm_cls(d)

    def forward(self, input_ids, inference_params=None, **mixer_kwargs):
        hidden_states = self.embedding(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
        residual = (hidden_states + residual) if residual is not None else hidden_states
        return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))


CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])


class MambaLMHeadModel(nn.Module):
    def __init__(self, config: MambaConfig, initializer_cfg=None, device=None, dtype=None):
        super().__init__()
        self.config = config
        vocab = config.vocab_size + (-config.vocab_size) % config.pad_vocab_size_multiple
        self.backbone = MixerModel(config, vocab)
        self.lm_head = nn.Linear(config.d_model, vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.to(device=device, dtype=dtype)

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, **mixer_kwargs):
        hidden_states = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        return CausalLMOutput(logits=self.lm_head(hidden_states))


@dataclass
class InferenceParams:  # mamba_ssm.utils.generation.InferenceParams
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Tensor | None = None


def unfused_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose Mamba2 mixers take the unfused path (the reference a hooked model must equal bitwise).
    Copy before hooking: a copy of a hooked model carries its hooks."""
    import copy

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "use_mem_eff_path"):
            m.use_mem_eff_path = False
    return ref


def tiny_mamba_ssm(seed: int = 0, **overrides) -> MambaLMHeadModel:
    """A tiny random model: 2 layers, d_model 64, 4 heads of head_dim 16 in 2 groups, d_state 8."""
    ssm = dict(layer="Mamba2", d_state=8, headdim=16, ngroups=2, chunk_size=8, expand=1)
    ssm.update(overrides.pop("ssm_cfg", {}))
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=97, ssm_cfg=ssm, **overrides)
    torch.manual_seed(seed)
    model = MambaLMHeadModel(cfg).eval()
    with torch.no_grad():  # larger than the init's so that every head carries signal
        for m in model.modules():
            if isinstance(m, Mamba2):
                m.D.normal_()
                m.conv1d.weight.mul_(2.0)
    return model

"""Pure-torch routing of flash-linear-attention's (``fla``) triton kernels for CPU tensors.

fla 0.6 imports on a CPU machine once ``triton`` is installed, but every fla kernel is a triton kernel, and triton
has no CPU driver ("0 active drivers"). Two things then break on a CPU:

* fla's own models (DeltaNet, GLA, ...): the block norms (``RMSNorm``), the MLP (``swiglu_linear``), the short
  convolutions (``ShortConvolution``), the gated output norms and the recurrences are all triton.
* transformers' Gated DeltaNet and Kimi Linear models: with fla importable, transformers binds fla's
  ``chunk_gated_delta_rule`` / ``chunk_kda`` (and their recurrent forms) at import, so a plain CPU forward of those
  models fails the same way.

:func:`route_cpu_to_torch` (idempotent, process-wide) puts a device router on each of those entry points, at the
name the caller looks up at call time: for CPU tensors the router runs the pure-torch function below (for
transformers' kernels: transformers' own torch fallback, the function it runs when fla is absent); for any other
device it calls the original, so fla's kernels run on a GPU untouched. Nothing that produced numbers before
changes: the routed calls could only raise on a CPU. ``hook_model`` calls it for fla models; a plain
(unhooked) CPU model of those families needs an explicit call (the test suite's ``conftest.py`` makes it once).

The torch functions follow the triton kernels' formulas (fp32 inside, the input's dtype out); they are not bit
for bit fla's kernels, only the same maths. Routed entry points (module: names):

* ``fla.modules.norm.layernorm``: ``rms_norm``, ``layer_norm``, ``group_norm`` (``RMSNorm``, ``LayerNorm``,
  ``GroupNorm`` modules), residual / prenorm forms included;
* ``fla.modules.norm.fused_norm_gate``: ``rms_norm_gated``, ``layer_norm_gated`` (``FusedRMSNormGated`` ...);
* ``fla.modules.mlp``: ``swiglu``, ``swiglu_linear`` (``GatedMLP``);
* ``fla.modules.causal_conv1d.ops``: ``causal_conv1d``, ``causal_conv1d_update`` (``ShortConvolution``, prefill and
  the in-place single-token step);
* ``fla.layers.delta_net``: ``chunk_delta_rule``, ``fused_recurrent_delta_rule`` (through the DeltaNet adapter's
  dispatcher, :mod:`.delta_net`);
* ``fla.layers.gla``: ``chunk_gla``, ``fused_recurrent_gla``, ``fused_chunk_gla`` (through the GLA adapter's
  dispatcher, :mod:`.gla`);
* ``fla.layers.rwkv7``: ``token_shift``, ``fused_addcmul_rwkv7``, ``fused_k_rwkv7``, ``gate_output_correction``,
  ``l2_norm``, and ``chunk_rwkv7``, ``fused_mul_recurrent_rwkv7`` (the DPLR recurrence, through the RWKV-7
  adapter's dispatcher, :mod:`.rwkv7`); ``fla.models.rwkv7.modeling_rwkv7``: ``token_shift`` (the FFN's);
* ``fla.modules.activations.ops``: ``sqrelu_fwd``, ``sqrelu_bwd`` (``torch.compile`` functions, not triton: they
  run on a CPU, but recompile for every new sequence length; the eager form is the same formula), and ``ACT2FN``'s
  ``sqrelu`` (an autograd function that ``torch.func.jvp`` cannot pass; :func:`route_sqrelu`, which the RWKV-7
  adapter also applies to a model's existing FFNs);
* transformers' GDN / KDA kernels (through :mod:`.gated_deltanet`'s dispatchers).

Other fla layers (RWKV-6, Gated DeltaProduct, ...) are not routed: they still fail on a CPU, and ``hook_model``
refuses those models with the supported families.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

_LOCK = threading.Lock()
_DONE = False


def fla_available() -> bool:
    """Whether ``fla`` (flash-linear-attention) and ``triton`` are importable."""
    return importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None


#: fla's import-time warning where triton has no GPU driver (``fla.utils.hardware``, fla 0.6.0): expected on every CPU
#: machine, where :func:`route_cpu_to_torch` takes over its kernels (``writesae_plugin.cli`` mirrors it; a test keeps
#: them equal)
FLA_CPU_WARNING = r"Triton is not supported on current platform, roll back to CPU\.$"


@contextlib.contextmanager
def fla_cpu_warning_silenced():
    """Within it, fla's CPU-platform warning (:data:`FLA_CPU_WARNING`, raised from fla's modules) is not shown; every
    other warning is shown as before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FLA_CPU_WARNING, category=UserWarning, module=r"fla\.")
        yield


def first_device(args, kwargs) -> torch.device | None:
    """The device of a call's first tensor argument (None when it has none)."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor):
            return v.device
    return None


def on_cpu(args, kwargs) -> bool:
    dev = first_device(args, kwargs)
    return dev is not None and dev.type == "cpu"


def cpu_router(original, impl):
    """``original`` with CPU calls sent to ``impl`` (``__wrapped__`` is ``original``)."""

    @functools.wraps(original)
    def route(*args, **kwargs):
        if on_cpu(args, kwargs):
            return impl(*args, **kwargs)
        return original(*args, **kwargs)

    route.__writesae_cpu_route__ = original
    return route


def _patch(module_name: str, name: str, impl) -> None:
    module = importlib.import_module(module_name)
    current = getattr(module, name, None)
    if current is None or getattr(current, "__writesae_cpu_route__", None) is not None:
        return
    setattr(module, name, cpu_router(current, impl))


# ---------------------------------------------------------------------------------------- torch functions
def torch_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None = None,
                     eps: float = 1e-5, prenorm: bool = False, residual_in_fp32: bool = False,
                     is_rms_norm: bool = False, num_groups: int = 1):
    """fla's ``LayerNormFunction`` forward: ``y = norm(x + residual) * weight + bias`` over groups of the last
    axis (``1 / sqrt(mean + eps)``, fp32 inside); with ``prenorm`` also the summed residual (in the residual's dtype,
    or fp32 with ``residual_in_fp32``)."""
    shape = x.shape
    h = x.float()
    if residual is not None:
        h = h + residual.float()
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else None)
    hg = h.reshape(*shape[:-1], num_groups, shape[-1] // num_groups)
    if not is_rms_norm:
        hg = hg - hg.mean(-1, keepdim=True)
    y = (hg * (1.0 / torch.sqrt((hg * hg).mean(-1, keepdim=True) + eps))).reshape(shape)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if not prenorm:
        return y
    return y, (h.to(res_dtype) if res_dtype is not None else h.to(x.dtype))


def _rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    return torch_layer_norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, True)


def _layer_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False, is_rms_norm=False):
    return torch_layer_norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm)


def _group_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                num_groups=1):
    return torch_layer_norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, num_groups)


def torch_norm_gated(x: Tensor, g: Tensor, weight, bias, activation: str = "swish", residual=None, prenorm=False,
                     residual_in_fp32=False, eps=1e-6, is_rms_norm=True):
    """fla's gated norm: ``norm(x) * weight + bias``, times ``silu(g)`` (``swish`` / ``silu``) or ``sigmoid(g)``."""
    out = torch_layer_norm(x, weight, bias, residual, eps, True, residual_in_fp32, is_rms_norm)
    y, res = out
    g32 = g.float()
    if activation in ("swish", "silu"):
        gate = g32 * torch.sigmoid(g32)
    elif activation == "sigmoid":
        gate = torch.sigmoid(g32)
    else:
        raise ValueError(f"unsupported gate activation {activation!r}")
    y = (y.float() * gate).to(x.dtype)
    return (y, res) if prenorm else y


def _rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False, residual_in_fp32=False,
                    eps=1e-6):
    return torch_norm_gated(x, g, weight, bias, activation, residual, prenorm, residual_in_fp32, eps, True)


def _layer_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False, residual_in_fp32=False,
                      eps=1e-6):
    return torch_norm_gated(x, g, weight, bias, activation, residual, prenorm, residual_in_fp32, eps, False)


def torch_swiglu(x: Tensor, y: Tensor) -> Tensor:
    """``silu(x) * y`` in fp32, in the input's dtype."""
    x32 = x.float()
    return (x32 * torch.sigmoid(x32) * y.float()).to(x.dtype)


def torch_swiglu_linear(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(torch_swiglu(x, y), weight, bias)


def _segments(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    c = cu_seqlens.tolist()
    return list(zip(c[:-1], c[1:]))


def torch_causal_conv1d(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                        residual: Tensor | None = None, initial_state: Tensor | None = None,
                        output_final_state: bool | None = False, activation: str | None = None,
                        backend: str | None = None, cu_seqlens: Tensor | None = None, **kwargs):
    """fla's short causal conv (``ShortConvolution``): ``y_t = act(sum_j w[:, j] x_{t-W+1+j} + b) (+ residual)``
    per channel; ``x [B, T, D]``, ``weight [D, W]``, state ``[N, D, W]`` (the last W inputs; the conv reads its last
    ``W - 1``). Packed sequences (``cu_seqlens``, batch 1) run one sequence at a time."""
    if weight is None:
        raise NotImplementedError("fla's causal_conv1d without a weight has no CPU route")
    if cu_seqlens is not None:
        ys, states = [], []
        for i, (s, e) in enumerate(_segments(cu_seqlens)):
            init = None if initial_state is None else initial_state[i:i + 1]
            res = None if residual is None else residual[:, s:e]
            y, st = torch_causal_conv1d(x[:, s:e], weight, bias, res, init, output_final_state, activation)
            ys.append(y)
            states.append(st)
        return torch.cat(ys, 1), (torch.cat(states, 0) if output_final_state else None)
    B, T, D = x.shape
    W = weight.shape[1]
    xt = x.transpose(1, 2).float()  # [B, D, T]
    state = initial_state.float() if initial_state is not None else xt.new_zeros(B, D, W)
    full = torch.cat([state[..., 1:], xt], -1)  # [B, D, W - 1 + T]
    y = F.conv1d(full, weight.float()[:, None, :], None if bias is None else bias.float(), groups=D)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported conv activation {activation!r}")
    y = y.transpose(1, 2)
    if residual is not None:
        y = y + residual.float()
    final = torch.cat([state, xt], -1)[..., -W:].to(x.dtype) if output_final_state else None
    return y.to(x.dtype), final


def torch_causal_conv1d_update(x: Tensor, cache: Tensor, residual: Tensor | None = None,
                               weight: Tensor | None = None, bias: Tensor | None = None,
                               activation: str | None = None):
    """One token per sequence (``x [N, 1, D]``, ``[1, N, D]`` or ``[N, D]``): shift the cache ``[N, D, W]`` left by
    one, put ``x`` last (in place, as fla's kernel does), ``y = act(sum(cache * w) + b) (+ residual)``."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1])  # [N, D]
    new = torch.cat([cache[..., 1:], xf[..., None].to(cache.dtype)], -1)
    y = (new.float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    if activation in ("silu", "swish"):
        y = F.silu(y)
    y = y.reshape(shape)
    if residual is not None:
        y = y + residual.float()
    with torch.no_grad():
        cache.copy_(new)
    return y.to(x.dtype), cache


def torch_token_shift(x: Tensor, cu_seqlens: Tensor | None = None, cache: Tensor | None = None,
                      output_cache: bool = False, chunk_indices=None):
    """fla's ``token_shift`` (RWKV-6/7): ``delta_t = x_{t-1} - x_t`` over ``x [B, T, D]`` with ``x_{-1}`` the ``cache``
    ``[N, D]`` (the last token of the previous call) or 0; with ``output_cache`` also the new cache ``x_{T-1}``
    ``[N, D]``. Packed sequences (``cu_seqlens``, batch 1) one sequence at a time."""
    if cu_seqlens is not None:
        ys, caches = [], []
        for i, (s, e) in enumerate(_segments(cu_seqlens)):
            y, c = torch_token_shift(x[:, s:e], None, None if cache is None else cache[i:i + 1], True)
            ys.append(y)
            caches.append(c)
        y, c = torch.cat(ys, 1), torch.cat(caches, 0)
        return (y, c) if output_cache else y
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if cache is None else cache.reshape(x.shape[0], 1, -1).to(x.dtype)
    y = torch.cat([first, x[:, :-1]], 1) - x
    return (y, x[:, -1].clone()) if output_cache else y


def torch_addcmul_rwkv7(hidden_states: Tensor, delta: Tensor, xr, xw, xk, xv, xa, xg=None):
    """fla's ``fused_addcmul_rwkv7``: ``hidden + delta . x_*`` for the six (five without ``xg``) RWKV-7 mixes."""
    outs = [torch.addcmul(hidden_states, delta, m) for m in (xr, xw, xk, xv, xa)]
    return (*outs, None if xg is None else torch.addcmul(hidden_states, delta, xg))


def torch_k_rwkv7(k: Tensor, a: Tensor, ka: Tensor, cu_seqlens=None, cu_seqlens_cpu=None) -> Tensor:
    """fla's ``fused_k_rwkv7``: ``k~ = k . (1 + (a - 1) . k_a)``, as ``k + (k . (a - 1)) . k_a``."""
    return k.addcmul(k * (a - 1), ka)


def torch_gate_output_correction(o: Tensor, r: Tensor, k: Tensor, r_k: Tensor, v: Tensor, g: Tensor) -> Tensor:
    """fla's ``gate_output_correction`` (RWKV-7): ``(o + ((r . k . r_k).sum(-1) v).view_as(o)) . g``; ``o``, ``g``
    ``[B, T, H*D]``, ``r``, ``k``, ``v`` ``[B, T, H, D]``, ``r_k`` ``[H, D]``."""
    bonus = ((r * k * r_k).sum(-1, keepdim=True) * v).reshape(o.shape)
    return (o + bonus) * g


def torch_l2_norm(x: Tensor, eps: float = 1e-6, output_dtype: torch.dtype | None = None) -> Tensor:
    """fla's ``l2_norm``: :func:`fla_l2norm` in ``output_dtype`` (default: the input's)."""
    return fla_l2norm(x, eps).to(output_dtype or x.dtype)


def torch_sqrelu_fwd(x: Tensor) -> Tensor:
    """fla's squared ReLU (RWKV-7's FFN, ``sqrelu``): ``relu(x)^2`` in fp32, in the input's dtype (eager: fla's is a
    ``torch.compile`` function, recompiled for every new sequence length on a CPU)."""
    r = F.relu(x.float())
    return (r * r).to(x.dtype)


def torch_sqrelu_bwd(g: Tensor, x: Tensor) -> Tensor:
    return (2.0 * g * F.relu(x.float())).to(x.dtype)


def route_sqrelu(model=None) -> None:
    """Route fla's ``sqrelu`` activation (``SquaredReLUFunction.apply``, an autograd function without
    ``setup_context``, so ``torch.func.jvp`` cannot pass through it) to :func:`torch_sqrelu_fwd` for CPU tensors: in
    fla's ``ACT2FN`` (models built afterwards) and, given ``model``, on its modules that already hold it as
    ``act_fn`` (RWKV-7's FFN). Other devices keep fla's function."""
    ops = importlib.import_module("fla.modules.activations.ops")
    current = ops.ACT2FN.get("sqrelu")
    if current is None:
        return
    original = getattr(current, "__writesae_cpu_route__", current)
    if current is original:
        ops.ACT2FN["sqrelu"] = cpu_router(original, torch_sqrelu_fwd)
    if model is not None:
        for m in model.modules():
            if getattr(m, "act_fn", None) == original:
                m.act_fn = ops.ACT2FN["sqrelu"]


def fla_l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """fla's L2 norm: ``x * (1 / sqrt(sum(x^2) + eps))`` over the last axis, fp32."""
    x = x.float()
    return x * (1.0 / torch.sqrt((x * x).sum(-1, keepdim=True) + eps))


# ---------------------------------------------------------------------------------------- installation
def keep_transformers_model_types() -> list[str]:
    """Undo fla's takeover of transformers' own model types. ``import fla`` registers its classes with
    transformers' Auto classes with ``exist_ok=True``, also under model types transformers already has (fla 0.6.0:
    ``mamba``, ``mamba2``, ``bitnet``), so that afterwards ``AutoModelForCausalLM.from_pretrained`` of a
    transformers Mamba-2 checkpoint silently builds fla's ``Mamba2ForCausalLM`` (and transformers imports fla
    whenever a Gated DeltaNet or Kimi Linear modeling module is imported). Dropping those registrations makes
    transformers' types load transformers' classes again; fla's new types (``delta_net``, ``gla``, ...) stay.
    Returns the model types restored."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    extra = CONFIG_MAPPING._extra_content
    taken = [t for t, cls in list(extra.items())
             if t in CONFIG_MAPPING._mapping and getattr(cls, "__module__", "").startswith("fla.")]
    for t in taken:
        del extra[t]
    return taken


_FLA_ROUTES = {
    "fla.modules.norm.layernorm": {"rms_norm": _rms_norm, "layer_norm": _layer_norm, "group_norm": _group_norm},
    "fla.modules.norm.fused_norm_gate": {"rms_norm_gated": _rms_norm_gated, "layer_norm_gated": _layer_norm_gated},
    "fla.modules.mlp": {"swiglu": torch_swiglu, "swiglu_linear": torch_swiglu_linear},
    "fla.modules.causal_conv1d.ops": {"causal_conv1d": torch_causal_conv1d,
                                      "causal_conv1d_update": torch_causal_conv1d_update},
    "fla.layers.rwkv7": {"token_shift": torch_token_shift, "fused_addcmul_rwkv7": torch_addcmul_rwkv7,
                         "fused_k_rwkv7": torch_k_rwkv7, "gate_output_correction": torch_gate_output_correction,
                         "l2_norm": torch_l2_norm},
    "fla.models.rwkv7.modeling_rwkv7": {"token_shift": torch_token_shift},
    "fla.modules.activations.ops": {"sqrelu_fwd": torch_sqrelu_fwd, "sqrelu_bwd": torch_sqrelu_bwd},
}


def route_cpu_to_torch() -> bool:
    """Route fla's triton kernels (the entry points listed in the module docstring) and transformers' fla-bound
    GDN / KDA kernels to pure torch for CPU tensors; other devices keep the original kernels; and give transformers'
    own model types back their transformers classes (:func:`keep_transformers_model_types`). Idempotent and
    process-wide. Returns False (and does nothing) when fla or triton is not importable: then transformers uses
    its own torch kernels and fla models cannot be built."""
    global _DONE
    if not fla_available():
        return False
    with _LOCK, fla_cpu_warning_silenced():  # fla is imported here (the expected CPU warning is not shown)
        if _DONE:
            return True
        for module_name, routes in _FLA_ROUTES.items():
            for name, impl in routes.items():
                _patch(module_name, name, impl)
        route_sqrelu()
        importlib.import_module("fla.models")  # (its Auto registrations happen here, once)
        keep_transformers_model_types()
        from . import delta_net, gated_deltanet, gla, kimi_linear, rwkv7

        delta_net.install()
        gla.install()
        rwkv7.install()
        gated_deltanet.route_cpu_calls()
        for model_type, module_name in {**gated_deltanet.GDN_MODEL_TYPES, **kimi_linear.KIMI_MODEL_TYPES}.items():
            if importlib.util.find_spec(module_name) is None:
                continue
            importlib.import_module(module_name)
            names = ((kimi_linear.KDA_CHUNK, kimi_linear.KDA_RECURRENT) if model_type in kimi_linear.KIMI_MODEL_TYPES
                     else (gated_deltanet.CHUNK, gated_deltanet.RECURRENT))
            gated_deltanet._install(module_name, names)
        _DONE = True
    return True

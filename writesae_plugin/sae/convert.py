"""Load the paper's released WriteSAE checkpoints (arXiv 2605.12770, github.com/JackYoung27/writesae).

Layouts read (the reference code's ``core/train.py`` and ``core/sae.py`` and its model card):

* the training checkpoint ``{"model_state_dict": sd, "config": {...}, "val_mse": .., "epoch": .., ...}``
  (``best.pt`` / ``checkpoint.pt``; ``optimizer_state_dict`` is ignored); a bare state dict; ``{"state_dict": sd}``;
  a safetensors file. A config missing from the file is read from a ``config.json`` beside it.
* factor tensors ``[n, rank, d]`` (the reference code's layout, rank r >= 1) or the older 2-D ``[n, d]`` / ``[d, n]``.
* ``sae_type`` (from the config, else inferred from the keys as the reference code does):

  ==================  ===================================================  ============================
  paper ``sae_type``  keys                                                 plugin axes
  ==================  ===================================================  ============================
  ``bilinear``        ``V_enc W_enc b_enc V_dec W_dec bias``               bilinear + rank-r
  ``bilinear_tied``   ``b_enc V_dec W_dec bias`` (encoder = decoder)       bilinear + rank-r
  ``rank1``           ``encoder.weight encoder.bias V W bias``             dense + rank-r
  ``flat``            ``encoder.weight encoder.bias decoder.weight/bias``  FlatSAE (needs d_k, d_v)
  ``bilinear_flat``   ``V_enc W_enc b_enc decoder.weight decoder.bias``    bilinear + dense decoder
  ``bilinear_jumprelu``  bilinear keys + ``log_threshold``                 bilinear + rank-r, JumpReLU
  ``bilinear_gated``  refused: its soft sigmoid gate has no plugin equivalent
  ==================  ===================================================  ============================

Semantics (paper code): ``pre = sum_j V_enc[i,j]^T X W_enc[i,j] + b_enc`` with no input centring, TopK keeps
the k largest pre-activations per row and applies ReLU to them (as SAELens' TopK), the decoder is
``sum_i a_i sum_j V_dec[i,j] W_dec[i,j]^T + bias``. ``V`` is the key side (``d_k``), ``W`` the value side
(``d_v``) of the canonical key-first frame; pass ``value_first=True`` for a checkpoint of value-first matrices.

BatchTopK (``config["use_batchtopk"]``): the paper's code selects the ``k * batch`` largest ReLU'd
pre-activations of the whole batch, at inference too, and stores no threshold, so per-row TopK would give
other codes. The plugin's ``batchtopk`` activation is the exported form (``a = pre * (pre > threshold)``, as
SAELens exports BatchTopK). Pass ``batchtopk_threshold`` (a float or ``[n]`` tensor), or ``calibration``
(site samples ``[N, d_k, d_v]``) to estimate it as the plugin's training does (the mean over batches of the
smallest selected activation); without either the loader refuses.

The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.
``allow_pickle=True`` is an explicit opt-in for a trusted file that needs full unpickling.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import Tensor

from .config import WriteSAEConfig
from .write_sae import WriteSAE

PAPER_TYPES = ("bilinear", "bilinear_tied", "rank1", "flat", "bilinear_flat", "bilinear_jumprelu",
               "bilinear_gated")
_IGNORED_KEYS = {"steps_since_active"}  # dead-atom bookkeeping of the paper's training


def _read(path: Path, allow_pickle: bool) -> tuple[dict[str, Tensor], dict]:
    """``(state dict, config)`` from any of the layouts in the module docstring."""
    if not path.is_file():
        raise FileNotFoundError(f"paper checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            sd = {key: f.get_tensor(key) for key in f.keys()}
            meta = f.metadata() or {}
        config = json.loads(meta["config"]) if "config" in meta else {}
        return sd, config or _sibling_config(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "global" in ln.lower()), None)
        if why is None:  # not a refused global: a corrupt or foreign file
            raise ValueError(f"{path}: not a readable torch checkpoint ({(lines or [''])[0][:200]})") from None
        why = why.split(" Please")[0].split(" was not an allowed global")[0]
        raise ValueError(f"{path}: refused to unpickle: torch.load(weights_only=True) reads tensors and plain "
                         f"containers only and stopped ({why[:200]}); re-save it as a state dict, or pass "
                         "allow_pickle=True only for a file you trust") from None
    except Exception as err:  # a truncated or foreign file: torch raises RuntimeError, EOFError, KeyError, ...
        msg = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    config: dict = {}
    for key in ("model_state_dict", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            config = obj.get("config") or {}
            obj = obj[key]
            break
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its 'config' is a {type(config).__name__}, expected a dict")
    sd = {_strip_prefix(key): v for key, v in obj.items()}
    bad = [key for key, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: not a paper WriteSAE checkpoint, non-tensor entries {bad[:5]} in its state dict")
    return sd, config or _sibling_config(path)


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _sibling_config(path: Path) -> dict:
    side = path.with_name("config.json")
    return json.loads(side.read_text()) if side.is_file() else {}


def infer_paper_type(sd: dict[str, Tensor], config: dict) -> str:
    """The paper's ``sae_type`` from its config, else from the keys (as the reference code infers it)."""
    t = config.get("sae_type")
    if t:
        if t not in PAPER_TYPES:
            raise ValueError(f"paper checkpoint has sae_type={t!r}; known types: {list(PAPER_TYPES)}")
        return t
    if "V_enc" in sd and "decoder.weight" in sd and "V_dec" not in sd:
        return "bilinear_flat"
    if "log_threshold" in sd and "V_dec" in sd:
        return "bilinear_jumprelu"
    if "b_gate" in sd and "r_mag" in sd:
        return "bilinear_gated"
    if "V_dec" in sd or "W_dec" in sd:
        return "bilinear" if "V_enc" in sd else "bilinear_tied"
    if "V" in sd or "W" in sd:
        return "rank1"
    if "encoder.weight" in sd and "decoder.weight" in sd:
        return "flat"
    raise ValueError(f"not a paper WriteSAE checkpoint: missing its factor keys (V_dec/W_dec, V/W or "
                     f"encoder/decoder weights); it has {sorted(sd)}")


def _factors(t: Tensor, n: int, name: str) -> Tensor:
    """``[n, r, d]`` from ``[n, r, d]``, ``[n, d]`` or ``[d, n]`` (ambiguous square 2-D: rows are atoms)."""
    if t.dim() == 3:
        if t.shape[0] != n:
            raise ValueError(f"{name} has shape {list(t.shape)}, expected [n={n}, rank, d]")
        return t
    if t.dim() == 2:
        if t.shape[0] == n:
            return t[:, None, :]
        if t.shape[1] == n:
            return t.T[:, None, :]
    raise ValueError(f"{name} has shape {list(t.shape)}, expected [n={n}, rank, d], [n, d] or [d, n]")


def _need(sd: dict[str, Tensor], keys: tuple[str, ...], kind: str, path) -> None:
    missing = [key for key in keys if key not in sd]
    if missing:
        raise ValueError(f"{path}: paper {kind} checkpoint is missing {missing} (has {sorted(sd)})")


def _dims(cfg_val, inferred, name: str) -> int:
    if cfg_val is not None and inferred is not None and int(cfg_val) != inferred:
        raise ValueError(f"paper checkpoint config says {name}={cfg_val} but its tensors have {name}={inferred}")
    d = cfg_val if cfg_val is not None else inferred
    if d is None:
        raise ValueError(f"cannot tell {name} of this paper checkpoint (flat layout without a config); "
                         f"pass d_k= and d_v=")
    return int(d)


def load_paper_checkpoint(path: str | Path, *, k: int | None = None, hook_name: str = "", family: str = "",
                          layer: int | None = None, head: int | None = None, n_heads: int = 1,
                          site: str = "state", value_first: bool = False, allow_pickle: bool = False,
                          d_k: int | None = None, d_v: int | None = None,
                          batchtopk_threshold: float | Tensor | None = None,
                          calibration: Tensor | None = None, calibration_batch_size: int | None = None) -> WriteSAE:
    """Build a :class:`WriteSAE` from a paper checkpoint (any layout of the module docstring).

    ``k``, ``layer``, ``d_k``, ``d_v`` default to the checkpoint's config; an explicit ``k`` overrides it
    (TopK), ``d_k``/``d_v`` must agree with the tensors. ``head`` (the value head in a hook with ``n_heads``
    heads) is not taken from the config, whose head indexes the paper's own extraction. BatchTopK
    checkpoints need ``batchtopk_threshold`` or ``calibration`` (see the module docstring).
    """
    path = Path(path)
    sd, config = _read(path, allow_pickle)
    kind = infer_paper_type(sd, config)
    if kind == "bilinear_gated":
        raise ValueError(f"{path}: paper sae_type 'bilinear_gated' (soft sigmoid gate x magnitude path) has no "
                         "WriteSAE equivalent; convert a bilinear, tied, rank1, flat, bilinear_flat or jumprelu "
                         "checkpoint")
    batchtopk = bool(config.get("use_batchtopk", False)) and kind != "bilinear_jumprelu"
    k = int(k if k is not None else config.get("k", 0) or 0)
    if k <= 0:
        raise ValueError(f"{path}: the checkpoint's config gives no k; pass k=")

    enc_dense = kind in ("rank1", "flat")
    dec_dense = kind in ("flat", "bilinear_flat")
    needs = {"bilinear": ("V_enc", "W_enc", "b_enc", "V_dec", "W_dec"), "bilinear_tied": ("b_enc", "V_dec", "W_dec"),
             "bilinear_jumprelu": ("V_enc", "W_enc", "b_enc", "V_dec", "W_dec", "log_threshold"),
             "rank1": ("encoder.weight", "encoder.bias", "V", "W"),
             "flat": ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"),
             "bilinear_flat": ("V_enc", "W_enc", "b_enc", "decoder.weight", "decoder.bias")}[kind]
    _need(sd, needs, kind, path)
    b_enc = sd["encoder.bias"] if enc_dense else sd["b_enc"]
    n = int(b_enc.shape[0])
    key_s, val_s = ("W", "V") if value_first else ("V", "W")  # which paper letter is the canonical key side
    dec_names = (key_s, val_s) if kind == "rank1" else (f"{key_s}_dec", f"{val_s}_dec")
    enc_names = (dec_names if kind == "bilinear_tied" else (f"{key_s}_enc", f"{val_s}_enc"))
    fac: dict[str, Tensor] = {}
    for name in set(() if dec_dense else dec_names) | set(() if enc_dense else enc_names):
        fac[name] = _factors(sd[name], n, name)
    any_key = next((fac[nm] for nm in (dec_names[0], enc_names[0]) if nm in fac), None)
    any_val = next((fac[nm] for nm in (dec_names[1], enc_names[1]) if nm in fac), None)
    cfg_dk, cfg_dv = config.get("d_k"), config.get("d_v")
    if value_first:
        cfg_dk, cfg_dv = cfg_dv, cfg_dk
    d_k = _dims(d_k if d_k is not None else cfg_dk, None if any_key is None else int(any_key.shape[-1]), "d_k")
    d_v = _dims(d_v if d_v is not None else cfg_dv, None if any_val is None else int(any_val.shape[-1]), "d_v")
    d_in = d_k * d_v
    rank_of = {nm: int(t.shape[1]) for nm, t in fac.items()}
    for a, b in (dec_names, enc_names):
        if a in rank_of and b in rank_of and rank_of[a] != rank_of[b]:
            raise ValueError(f"{path}: {a} has rank {rank_of[a]} but {b} has rank {rank_of[b]}")

    def canon_flat(W: Tensor) -> Tensor:
        """``[.., d_in]`` in the checkpoint's matrix order -> canonical key-first order."""
        if not value_first:
            return W
        return W.reshape(*W.shape[:-1], d_v, d_k).transpose(-1, -2).reshape(*W.shape[:-1], d_in)

    used = set(needs) | {"bias"}
    state: dict[str, Tensor] = {"b_enc": b_enc}
    if enc_dense:
        W = sd["encoder.weight"]
        if tuple(W.shape) != (n, d_in):
            raise ValueError(f"{path}: encoder.weight has shape {list(W.shape)}, expected [{n}, {d_in}]")
        state["W_enc"] = canon_flat(W).T
    else:
        state["enc_key"], state["enc_value"] = fac[enc_names[0]], fac[enc_names[1]]
    if dec_dense:
        D = sd["decoder.weight"]
        if tuple(D.shape) != (d_in, n):
            raise ValueError(f"{path}: decoder.weight has shape {list(D.shape)}, expected [{d_in}, {n}]")
        state["dec_dense"] = canon_flat(D.T)
        bias = canon_flat(sd["decoder.bias"])
    else:
        state["dec_key"], state["dec_value"] = fac[dec_names[0]], fac[dec_names[1]]
        bias = sd.get("bias", torch.zeros(d_k, d_v) if not value_first else torch.zeros(d_v, d_k))
        if bias.dim() == 2 and value_first:
            bias = bias.T
    if bias.numel() != d_in:
        raise ValueError(f"{path}: decoder bias has {bias.numel()} entries, expected d_k*d_v = {d_in}")
    state["b_dec"] = bias.reshape(-1)
    unused = sorted(set(sd) - used - _IGNORED_KEYS)
    if unused:
        raise ValueError(f"{path}: paper {kind} checkpoint has keys this converter does not understand: {unused}")

    activation = "jumprelu" if kind == "bilinear_jumprelu" else ("batchtopk" if batchtopk else "topk")
    if activation == "jumprelu":
        state["threshold"] = sd["log_threshold"].float().exp()
    enc_rank = rank_of.get(enc_names[0], 1)
    cfg = WriteSAEConfig(d_in=d_in, d_sae=n, d_k=d_k, d_v=d_v, k=min(k, n),
                         encoder="dense" if enc_dense else "bilinear", encoder_rank=enc_rank, decoder_rank=None if dec_dense else rank_of[dec_names[0]],
                         activation=activation, site=site, head=head,
                         n_heads=n_heads, family=family,
                         layer=layer if layer is not None else int(config.get("layer", -1)),
                         apply_b_dec_to_input=False)
    cfg.metadata.hook_name = hook_name or None
    sae = WriteSAE(cfg)
    if activation == "batchtopk":
        state["threshold"] = torch.zeros(n)
    elif batchtopk_threshold is not None or calibration is not None:
        raise ValueError(f"{path}: batchtopk_threshold/calibration given, but the checkpoint is not BatchTopK "
                         f"(its config has use_batchtopk={config.get('use_batchtopk', False)})")
    sae.load_state_dict({key: v.float().contiguous() for key, v in state.items()})
    if activation == "batchtopk":
        thr = _batchtopk_threshold(sae, path, batchtopk_threshold, calibration,
                                   calibration_batch_size or int(config.get("batch_size", 256)), k)
        with torch.no_grad():
            sae.threshold.copy_(thr)
    return sae


def _batchtopk_threshold(sae: WriteSAE, path, threshold, calibration, batch_size: int, k: int) -> Tensor:
    """The exported BatchTopK threshold: given, or the mean over calibration batches of the smallest
    activation the paper's batch-level selection (``k * batch`` largest ReLU'd pre-activations) keeps."""
    n = sae.cfg.d_sae
    if threshold is not None and calibration is not None:
        raise ValueError("give batchtopk_threshold or calibration, not both")
    if threshold is not None:
        t = torch.as_tensor(threshold, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(n)
        if tuple(t.shape) != (n,) or not torch.isfinite(t).all():
            raise ValueError(f"batchtopk_threshold must be a finite float or a [{n}] tensor, got {list(t.shape)}")
        return t
    if calibration is None:
        raise ValueError(f"{path}: the checkpoint was trained with BatchTopK (config use_batchtopk=True): its codes "
                         "depend on the batch and it stores no threshold, so per-row TopK would give other codes; "
                         "pass batchtopk_threshold=<float> or calibration=<site samples [N, d_k, d_v]>")
    X = calibration.reshape(-1, sae.cfg.d_k, sae.cfg.d_v).float()
    mins = []
    with torch.no_grad():
        for i in range(0, X.shape[0], batch_size):
            pre = sae._pre(X[i:i + batch_size]).relu().flatten()
            top = pre.topk(min(k * (pre.numel() // n), pre.numel())).values
            top = top[top > 0]
            if top.numel():
                mins.append(top.min())
    if not mins:
        raise ValueError("calibration samples gave no positive BatchTopK activation; cannot estimate a threshold")
    return torch.stack(mins).mean().expand(n)

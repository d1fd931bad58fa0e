"""Load the paper's released WriteSAE checkpoints (state dicts ``V_dec, W_dec, V_enc, W_enc, b_enc, bias``).

The paper's checkpoints are torch pickles. They are read with ``torch.load(weights_only=True)`` (tensors
only, no arbitrary code); ``allow_pickle=True`` is an explicit opt-in for files that need full unpickling.
Safetensors files are read directly. Orientation: ``V_*`` is the key side (``d_k``), ``W_*`` the value side
(``d_v``) of the canonical key-first frame; pass ``value_first=True`` for a checkpoint stored the other way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import WriteSAEConfig
from .write_sae import WriteSAE


def _read(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def _orient(t: torch.Tensor, n: int, d: int, name: str) -> torch.Tensor:
    if tuple(t.shape) == (n, d):
        return t
    if tuple(t.shape) == (d, n):
        return t.T
    raise ValueError(f"{name} has shape {list(t.shape)}, expected [{n}, {d}] or [{d}, {n}]")


def load_paper_checkpoint(path: str | Path, *, k: int, hook_name: str = "", family: str = "", layer: int = -1,
                          head: int | None = None, n_heads: int = 1, site: str = "state",
                          value_first: bool = False, allow_pickle: bool = False) -> WriteSAE:
    """Build a bilinear+rank-1 TopK :class:`WriteSAE` from a paper checkpoint."""
    sd = _read(Path(path), allow_pickle)
    missing = [key for key in ("V_dec", "W_dec", "V_enc", "W_enc", "b_enc") if key not in sd]
    if missing:
        raise ValueError(f"{path}: not a paper WriteSAE checkpoint, missing {missing} (has {sorted(sd)})")
    n = sd["b_enc"].shape[0]
    key_name, val_name = ("W", "V") if value_first else ("V", "W")
    d_k = min(sd[f"{key_name}_dec"].shape, key=lambda s: s if s != n else 10 ** 9)
    d_v = min(sd[f"{val_name}_dec"].shape, key=lambda s: s if s != n else 10 ** 9)
    cfg = WriteSAEConfig(d_in=d_k * d_v, d_sae=n, d_k=d_k, d_v=d_v, k=k, encoder="bilinear", encoder_rank=1,
                         decoder_rank=1, activation="topk", site=site, head=head, n_heads=n_heads, family=family,
                         layer=layer, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = hook_name or None
    sae = WriteSAE(cfg)
    bias = sd.get("bias", torch.zeros(d_k, d_v))
    if bias.dim() == 2 and value_first:
        bias = bias.T
    state = {
        "dec_key": _orient(sd[f"{key_name}_dec"], n, d_k, f"{key_name}_dec")[:, None, :],
        "dec_value": _orient(sd[f"{val_name}_dec"], n, d_v, f"{val_name}_dec")[:, None, :],
        "enc_key": _orient(sd[f"{key_name}_enc"], n, d_k, f"{key_name}_enc")[:, None, :],
        "enc_value": _orient(sd[f"{val_name}_enc"], n, d_v, f"{val_name}_enc")[:, None, :],
        "b_enc": sd["b_enc"], "b_dec": bias.reshape(-1),
    }
    sae.load_state_dict({key: v.float().contiguous() for key, v in state.items()})
    return sae

"""Offline SAELens releases: package data and local directories, loaded with no network.

A release is a directory with one sub-directory per SAE id (``cfg.json`` + ``sae_weights.safetensors``,
optionally ``sparsity.safetensors``) and an optional ``release.json`` (``{"model": ..., "saes": {id: subdir}}``).
Registering adds a ``PretrainedSAELookup`` to SAELens' pretrained directory (a plain cached dict) with
the loader ``"writesae_local"``, so ``SAE.from_pretrained(release, sae_id)`` works as for any release;
unknown releases and ids give SAELens' own errors.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any


LOADER_NAME = "writesae_local"
ASSETS = "assets/releases"


def _local_loader(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                  cfg_overrides: dict[str, Any] | None = None):
    """SAELens pretrained-loader protocol for a release stored on local disk (``repo_id`` is its path)."""
    from safetensors.torch import load_file
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    path = Path(repo_id) / folder_name
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(f"no cfg.json in {path}: the release directory is incomplete")
    cfg_dict, state_dict = sae_lens_disk_loader(path, device=device, cfg_overrides=cfg_overrides)
    sparsity = path / "sparsity.safetensors"
    log_sparsity = load_file(str(sparsity), device=device)["sparsity"] if sparsity.is_file() else None
    return cfg_dict, state_dict, log_sparsity


def _ensure_loader() -> None:
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS

    NAMED_PRETRAINED_SAE_LOADERS.setdefault(LOADER_NAME, _local_loader)


def register_local_release(release: str, directory: str | Path, model: str | None = None,
                           overwrite: bool = True) -> list[str]:
    """Register ``directory`` as SAELens release ``release``; returns its SAE ids.

    Raises if the directory has no SAE, or if ``release`` names a foreign (non-local) SAELens release.
    """
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory

    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"release directory {directory} does not exist")
    meta_file = directory / "release.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    saes_map = meta.get("saes") or {p.name: p.name for p in sorted(directory.iterdir())
                                    if (p / "cfg.json").is_file()}
    if not saes_map:
        raise ValueError(f"{directory} holds no SAE (no sub-directory with cfg.json)")
    table = get_pretrained_saes_directory()
    existing = table.get(release)
    if existing is not None and existing.conversion_func != LOADER_NAME:
        raise ValueError(f"release {release!r} is already a SAELens release from {existing.repo_id}; "
                         "choose another name")
    if existing is not None and not overwrite:
        return list(existing.saes_map)
    _ensure_loader()
    table[release] = PretrainedSAELookup(
        release=release, repo_id=str(directory), model=model or meta.get("model", ""),
        conversion_func=LOADER_NAME, saes_map=dict(saes_map),
        expected_var_explained=meta.get("expected_var_explained", {}), expected_l0=meta.get("expected_l0", {}),
        neuronpedia_id={}, norm_scaling_factor={}, config_overrides=None)
    return list(saes_map)


def packaged_release_dirs() -> dict[str, Path]:
    """Releases shipped as package data (``writesae_plugin/assets/releases/<release>``)."""
    root = Path(str(files("writesae_plugin").joinpath(ASSETS)))
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir()}


def register_packaged_releases() -> list[str]:
    """Register every shipped release (idempotent)."""
    return [name for name, path in packaged_release_dirs().items() if register_local_release(name, path)]


def load_release_sae(release: str, sae_id: str, device: str = "cpu", dtype: str = "float32"):
    """``SAE.from_pretrained(release, sae_id)`` (registers packaged releases first)."""
    from sae_lens import SAE

    register_packaged_releases()
    return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)


__all__ = ["register_local_release", "register_packaged_releases", "load_release_sae", "LOADER_NAME",
           "packaged_release_dirs"]

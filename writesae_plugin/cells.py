"""Many (layer, head) cells from one activation store: one WriteSAE per cell, saved as a release.

The model runs once per batch for every cell (``writesae extract`` / :func:`writesae_plugin.store.extract`);
each cell is then trained from the store with the single-cell trainer (same checkpoints, resume, validation and
exactness as ``writesae train --store``). Output directory::

    cells/L{l}.H{h}.{site}/      the cell's SAE (cfg.json + sae_weights.safetensors): SAE.load_from_disk
    cells/release.json           release index: saes, expected_var_explained, expected_l0 and each cell's
                                 validation FVU / L0 / dead fraction; register_local_release(name, OUT/cells)
    runs/L{l}.H{h}.{site}/       the cell's training run (checkpoints/, validation.jsonl, final/)

Rerunning the same call skips finished cells and (with ``resume="latest"``) continues an interrupted one from its
last checkpoint. ``head=None`` is one dictionary shared by every stored head of the layer (``H{all}``).

Not done here (issue 13): the SAE steps of different cells are separate GEMMs run one cell after another, not
batched along a cell axis; the model forward, which dominates on real models, is shared.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoints import atomic_dir, atomic_write_text
from .data import SiteSpec
from .store import ActivationStore, StoreError, StoreProvider


@dataclass(frozen=True)
class Cell:
    """One dictionary: ``layer``, value ``head`` (None: shared by the stored heads) and ``site``."""

    layer: int
    head: int | None
    site: str

    @property
    def id(self) -> str:
        return f"L{self.layer}.H{'all' if self.head is None else self.head}.{self.site}"


@dataclass
class CellTraining:
    """The SAE and schedule settings shared by every cell (``writesae train``'s flags)."""

    d_sae: int = 2048
    k: int = 32
    encoder: str = "bilinear"
    decoder_rank: int | None = 1
    activation: str = "topk"
    aux_k: int = 256
    resample_every: int = 100  # as writesae train (benchmarks/RESULTS.md: resampling)
    write_mode: str = "raw"
    layout: str = "auto"
    total_samples: int = 256 * 2000
    batch_size: int = 256
    lr: float = 3e-4
    val_contexts: int = 16
    val_every: int = 100
    n_checkpoints: int = 2
    normalize: bool = True
    seed: int = 0

    def layout_for(self, site: str) -> str:
        if self.layout != "auto":
            return self.layout
        return "factors" if site == "write" and self.encoder == "bilinear" else "dense"


def cell_config(store: ActivationStore, cell: Cell, t: CellTraining):
    """The ``WriteSAETrainingConfig`` of ``cell`` (dimensions, hook names and family from the store)."""
    from .sae import WriteSAETrainingConfig

    info, key = store.model, str(cell.layer)
    cfg = WriteSAETrainingConfig(
        d_in=info["d_k"] * info["d_v"], d_sae=t.d_sae, d_k=info["d_k"], d_v=info["d_v"], k=t.k, encoder=t.encoder,
        decoder_rank=t.decoder_rank, activation=t.activation, site=cell.site, head=cell.head,
        n_heads=info["n_heads"], family=info["family"], layer=cell.layer, hook_name_hf=info["hf_module_names"][key],
        write_mode=t.write_mode, input_layout=t.layout_for(cell.site), aux_k=min(t.aux_k, t.d_sae),
        resample_every=t.resample_every)
    cfg.metadata.hook_name = info["hook_prefixes"][key] + f"hook_{cell.site}"
    cfg.metadata.model_name = info["path"]
    cfg.metadata.context_size = store.config["data"].get("context_length")
    cfg.metadata.prepend_bos = False
    return cfg


def cell_providers(store: ActivationStore, cell: Cell, t: CellTraining, val_store: ActivationStore | None = None):
    """``(training provider, validation batches)`` of ``cell``: validation is the first ``val_contexts`` of
    ``val_store`` (another split) or, without one, of ``store`` (training then starts after them)."""
    heads = None if cell.head is None else [cell.head]
    store.check_cell(cell.layer, heads, cell.site, t.write_mode)
    source = store if val_store is None else val_store
    if val_store is not None:
        val_store.check_cell(cell.layer, heads, cell.site, t.write_mode)
    if source.n_contexts < t.val_contexts or (val_store is None and store.n_contexts <= t.val_contexts):
        raise StoreError(f"{source.path}: {source.n_contexts} contexts, too few for {t.val_contexts} validation "
                         "contexts" + ("" if val_store is not None else " and training"))
    spec = SiteSpec(layer=cell.layer, site=cell.site, heads=heads,
                    positions=store.positions,
                    write_mode=t.write_mode, layout=t.layout_for(cell.site), skip_first=store.config["skip_first"])
    provider = StoreProvider(store, spec, batch_size=t.batch_size, seed=t.seed, normalize=t.normalize,
                             first_context=0 if val_store is not None else t.val_contexts)
    val = list(StoreProvider(source, spec, batch_size=t.batch_size, buffer_batches=2, seed=t.seed + 1,
                             n_contexts=t.val_contexts))
    return provider, val


def train_cell(store: ActivationStore, cell: Cell, out: str | Path, t: CellTraining,
               val_store: ActivationStore | None = None, resume_from=None):
    """Train one cell from the store into ``out`` (``final/``, ``checkpoints/``, ``validation.jsonl``); returns
    ``(sae, validation history)``. The SAE's initialisation depends on ``t.seed`` only."""
    from .train import train_write_sae

    provider, val = cell_providers(store, cell, t, val_store)
    cfg = cell_config(store, cell, t)
    torch.manual_seed(t.seed)
    return train_write_sae(cfg, provider, out, total_samples=t.total_samples, batch_size=t.batch_size, lr=t.lr,
                           val_batches=val, val_every=t.val_every, n_checkpoints=t.n_checkpoints,
                           resume_from=resume_from)


def store_cells(store: ActivationStore, layers: list[int] | None, heads: list[int] | None, site: str,
                shared_heads: bool = False) -> list[Cell]:
    """The cells ``layers`` x ``heads`` (None: every stored one) of ``site``, or one shared cell per layer."""
    layers = list(store.config["layers"]) if layers is None else list(layers)
    missing = [layer for layer in layers if layer not in store.config["layers"]]
    if missing:
        raise StoreError(f"{store.path} holds layers {store.config['layers']}, not {missing}")
    if shared_heads:
        if heads is not None:
            raise StoreError("--shared-heads trains one dictionary on every stored head; do not also give --heads")
        return [Cell(layer, None, site) for layer in layers]
    heads = store.heads if heads is None else list(heads)
    store.check_cell(layers[0], heads, site)
    return [Cell(layer, head, site) for layer in layers for head in heads]


def train_cells(store: ActivationStore | str | Path, cells: list[Cell], out: str | Path, t: CellTraining,
                val_store: ActivationStore | str | Path | None = None, resume: bool = False,
                release: str | None = None, progress: bool = True) -> dict:
    """Train every cell (see the module docstring); returns the release index written to
    ``out/cells/release.json``. Finished cells are skipped; with ``resume`` an interrupted cell continues from
    its last complete checkpoint, without it a cell with checkpoints but no result is refused."""
    from tqdm.auto import tqdm

    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    if val_store is not None and not isinstance(val_store, ActivationStore):
        val_store = ActivationStore(val_store)
    if not cells:
        raise ValueError("no cells to train")
    for cell in cells:  # every cell checked before any training
        store.check_cell(cell.layer, None if cell.head is None else [cell.head], cell.site, t.write_mode)
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    index_path = out / "cells" / "release.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index.update({"release": release or out.name, "model": store.model["path"], "store": str(store.path),
                  "training": asdict(t)})
    for key in ("saes", "expected_var_explained", "expected_l0", "cells"):
        index.setdefault(key, {})
    bar = tqdm(cells, desc="cells", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.id)
        if cell.id in index["cells"] and (out / "cells" / cell.id / "cfg.json").is_file():
            continue  # finished in an earlier run
        run_dir = out / "runs" / cell.id
        has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
        _, history = train_cell(store, cell, run_dir, t, val_store, resume_from="latest" if resume and has_ckpt
                                else None)
        with atomic_dir(out / "cells" / cell.id) as tmp:
            for f in (run_dir / "final").iterdir():
                shutil.copy2(f, tmp / f.name)
        last = history[-1] if history else {}
        index["saes"][cell.id] = cell.id
        index["cells"][cell.id] = {"layer": cell.layer, "head": cell.head, "site": cell.site, **last}
        if last:
            index["expected_var_explained"][cell.id] = 1.0 - float(last["fvu"])
            index["expected_l0"][cell.id] = float(last["l0"])
        atomic_write_text(index_path, json.dumps(index, indent=1))
    return index


__all__ = ["Cell", "CellTraining", "train_cell", "train_cells", "store_cells", "cell_config", "cell_providers"]

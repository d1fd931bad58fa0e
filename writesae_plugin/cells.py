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

Cells whose settings stack (``sae.stacked.stackable``: bilinear encoder, rank-r decoder, TopK / BatchTopK) train
together, their dictionaries batched along a cell axis (:func:`train_cells_stacked`): one step of every cell is a
few batched GEMMs, and each cell ends as the run it would be alone (same batches, initialisation, per-cell gradient
clipping, dead counters, resampling and validation; tested). Other settings train one cell after another.
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
    dead_feature_window: int = 100  # steps without firing before an atom counts as dead (aux-k, resampling)

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
                             n_contexts=t.val_contexts, drop_last=False))
    return provider, val


def train_cell(store: ActivationStore, cell: Cell, out: str | Path, t: CellTraining,
               val_store: ActivationStore | None = None, resume_from=None, device: str = "cpu",
               progress: bool = True, rank_progress=None):
    """Train one cell from the store into ``out`` (``final/``, ``checkpoints/``, ``validation.jsonl``) on ``device``;
    returns ``(sae, validation history)``. The SAE's initialisation depends on ``t.seed`` only."""
    from .train import train_write_sae

    provider, val = cell_providers(store, cell, t, val_store)
    cfg = cell_config(store, cell, t)
    torch.manual_seed(t.seed)
    return train_write_sae(cfg, provider, out, total_samples=t.total_samples, batch_size=t.batch_size, lr=t.lr,
                           val_batches=val, val_every=t.val_every, n_checkpoints=t.n_checkpoints,
                           dead_feature_window=t.dead_feature_window, resume_from=resume_from, device=device,
                           progress=progress, progress_desc=f"train {cell.id}", rank_progress=rank_progress)


class _StackedBatches:
    """Row ``i`` of every cell's provider, ``[N, C, d]``: the providers read the same contexts with the same seed
    and batch size, so they run in lockstep and each cell sees exactly the batches it would see alone."""

    def __init__(self, providers):
        self.providers = list(providers)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return torch.stack([next(p) for p in self.providers], 1)

    @property
    def normalize(self) -> bool:
        return bool(self.providers[0].normalize)


def _stacked_trainer_class():
    from sae_lens.saes.sae import TrainStepInput
    from safetensors.torch import load_file, save_file

    from .checkpoints import checkpoint_dir, load_stream_state, save_stream_state, write_manifest
    from .train import WriteSAETrainer, evaluate_sae, save_portable

    class StackedTrainer(WriteSAETrainer):
        """``WriteSAETrainer`` over a ``StackedTrainingWriteSAE``: SAELens' step with gradients clipped per cell
        (``clip_grad_norm_(cell, 1.0)``, as each cell's own trainer), per-cell input scales, validation, progress,
        and checkpoints holding every cell's stream position."""

        def __init__(self, *args, cell_ids: list[str], cell_vals: list[list[torch.Tensor]], run_dirs: list[Path],
                     place=None, **kwargs):
            from .distributed import Place

            super().__init__(*args, **kwargs)
            self.cell_ids, self.cell_vals, self.run_dirs = cell_ids, cell_vals, run_dirs
            self.place = place or Place()  # data parallel when distributed: every rank holds every cell
            self.scales = [1.0] * len(cell_ids)
            self.histories: list[list[dict]] = [[] for _ in cell_ids]

        def _train_step(self, sae, sae_in):
            sae.train()
            out = sae.training_forward_pass(step_input=TrainStepInput(
                sae_in=sae_in, dead_neuron_mask=self.dead_neurons, coefficients=self.get_coefficients(),
                n_training_steps=self.n_training_steps, is_logging_step=False))
            with torch.no_grad():
                firing = out.feature_acts.bool().float()
                fired, counts = firing.sum(-2), firing.sum(0)
                if self.place.distributed:  # over the global batch (this rank saw its share of the rows)
                    import torch.distributed as dist

                    dist.all_reduce(fired)
                    dist.all_reduce(counts)
                self.n_forward_passes_since_fired += 1
                self.n_forward_passes_since_fired[fired.bool()] = 0
                self.act_freq_scores += counts
                self.n_frac_active_samples += self.cfg.train_batch_size_samples
            out.loss.backward()
            if self.place.distributed:  # each rank's loss is its share of the global one: the sum is its gradient
                import torch.distributed as dist

                for param in sae.parameters():
                    if param.grad is not None:
                        dist.all_reduce(param.grad)
            self._clip_per_cell(sae, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.lr_scheduler.step()
            for scheduler in self.coefficient_schedulers.values():
                scheduler.step()
            return out

        @torch.no_grad()
        def _clip_per_cell(self, sae, max_norm: float) -> None:
            """``torch.nn.utils.clip_grad_norm_`` of each cell's parameters on their own (every parameter's leading
            axis is the cells' atoms or the cells)."""
            C = sae.n_cells
            grads = [p.grad.view(C, -1) for p in sae.parameters() if p.grad is not None]
            norms = torch.stack([g.norm(dim=1) for g in grads]).norm(dim=0)
            coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef[:, None].to(g.dtype))

        @torch.no_grad()
        def _track(self, batch, out) -> None:
            mse = out.metrics.get("mse_per_cell")
            if mse is None:
                return
            x = batch.to(device=mse.device, dtype=torch.float32)  # [N, C, d] (on the SAE's device already)
            n, C = x.shape[:2]
            if self.layout == "factors":
                dk = self.sae.cfg.d_k
                k, v = x[..., :dk], x[..., dk:]
                mean = torch.einsum("Nck,Ncv->ckv", k, v) / n
                var = ((k * k).sum(-1) * (v * v).sum(-1)).sum(0) - n * (mean * mean).sum((1, 2))
            else:
                var = (x - x.mean(0)).pow(2).sum((0, 2))
            fvu = (mse.float() * n / var.clamp(min=1e-30)).mean().item()
            l0 = float((out.feature_acts != 0).sum()) / (n * C)
            a = 0.1 if self._ema else 1.0
            for key, value in (("fvu", fvu), ("l0", l0)):
                self._ema[key] = (1 - a) * self._ema.get(key, value) + a * value

        def progress_postfix(self) -> dict[str, str]:
            """The running training FVU and L0 (EMA, means over the cells) and the number of cells;
            ``validation_postfix`` adds the last validation's ``val_fvu`` and ``dead_fraction`` (means)."""
            post = {}
            if self._ema:
                post["fvu"] = f"{self._ema['fvu']:.3f}"
                post["L0"] = f"{self._ema['l0']:.1f}"
            post["cells"] = str(len(self.cell_ids))
            return post

        def validate(self, completed_steps: int | None = None, final: bool = False) -> dict:
            steps = self.n_training_steps if completed_steps is None else completed_steps
            for c in range(len(self.cell_ids)):
                sae = self.sae.cell(c).eval()
                m = evaluate_sae(sae, self.cell_vals[c], self.layout, self.scales[c])
                self.histories[c].append({"step": steps, "samples": self.n_training_samples, **asdict(m)})
            self._write_log()
            return {}

        def _write_log(self) -> None:
            if not self.place.main:
                return
            for run_dir, rows in zip(self.run_dirs, self.histories):
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run_dir / "validation.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

        def export_cell(self, c: int):
            """Cell ``c`` as it would be saved now: unit-norm atoms, its input scale folded."""
            sae = self.sae.cell(c)
            sae.normalize_decoder()
            if self.normalized:
                sae.fold_activation_norm_scaling_factor(self.scales[c])
                sae.cfg.metadata.input_scale_folded = self.scales[c]
            return sae

        @torch.no_grad()
        def save_checkpoint(self, checkpoint_name: str, base_path=None, wandb_aliases=None,
                            completed_steps: int | None = None) -> None:
            if not self.place.main:  # every rank holds the same state; one writes it
                return
            base = Path(base_path if base_path is not None else self.cfg.checkpoint_path)
            final = base / checkpoint_name
            with checkpoint_dir(final, "resume from the last complete checkpoint") as tmp:
                save_file({k: v.contiguous().clone() for k, v in self.sae.state_dict().items()},
                          tmp / "stacked_sae.safetensors")
                save_file({"sparsity": self.log_feature_sparsity.contiguous()}, tmp / "sparsity.safetensors")
                self.save_trainer_state(tmp)
                streams = [save_stream_state(provider, tmp, f"data_state_{c}")
                           for c, provider in enumerate(self.stream.providers)]
                (tmp / "run.json").write_text(json.dumps({
                    **self.run_record(completed_steps), "validation": self.histories, "scales": self.scales,
                    "streams": streams}, indent=1, default=str))
                for c, cell_id in enumerate(self.cell_ids):  # each cell as it would be saved now (loadable)
                    save_portable(self.export_cell(c), tmp / "cells" / cell_id)
                write_manifest(tmp, kind="stacked", n_training_samples=self.n_training_samples)

        def resume(self, ckpt: Path, run: dict) -> None:
            ckpt = Path(ckpt)
            state = load_file(ckpt / "stacked_sae.safetensors")
            with torch.no_grad():
                for name, tensor in self.sae.state_dict().items():
                    tensor.copy_(state[name])
            self.load_trainer_state(ckpt)
            self.n_training_steps = int(run["completed_steps"])
            self.checkpoint_thresholds = list(run["checkpoint_thresholds"])
            for c, (provider, saved) in enumerate(zip(self.stream.providers, run["streams"])):
                load_stream_state(provider, ckpt, f"data_state_{c}", saved)
            self.scales = [float(x) for x in run["scales"]]
            self.histories = [[dict(r) for r in rows] for rows in run["validation"]]
            self._write_log()

    return StackedTrainer


def _stack_name(cells: list[Cell]) -> str:
    """The run directory of a stacked set of cells (the same set resumes; another set is another run)."""
    import hashlib

    return "stacked-" + hashlib.sha1(",".join(c.id for c in cells).encode()).hexdigest()[:10]


def train_cells_stacked(store: ActivationStore, cells: list[Cell], out: str | Path, t: CellTraining,
                        val_store: ActivationStore | None = None, resume: bool = False, progress: bool = True,
                        warmup_steps: int = 50, place=None, device: str = "cpu",
                        rank_progress=None) -> dict[str, list[dict]]:
    """Train ``cells`` together, their dictionaries stacked along a cell axis; each ends in
    ``out/runs/<id>/final`` (+ ``validation.jsonl``), exactly as :func:`train_cell` would leave it. Checkpoints
    (``out/runs/stacked-<hash of the cell ids>/checkpoints``) hold every cell; ``resume`` continues the latest. Returns each cell's
    validation history. Raises ``ValueError`` when the settings do not stack (``sae.stacked.stackable``).

    ``place`` (``distributed.Place``, under torchrun): data parallel. Every rank trains every cell on its share of
    each global batch (``t.batch_size`` rows, split evenly), gradients all-reduced; rank 0 writes checkpoints and
    results. The same SAEs as one process, to rounding.

    ``device``: where the stacked SAE, Adam's state, the batches, counters and thresholds live (``cuda:LOCAL_RANK``
    for a GPU rank: the collectives then run over NCCL); the cells are initialised on the CPU, as alone."""
    from .checkpoints import check_identity, prepare_output
    from .sae import TrainingWriteSAE
    from .sae.stacked import StackedTrainingWriteSAE, stackable
    from .train import _Prepend, evaluate_sae, run_identity, save_portable, trainer_config

    out = Path(out)
    cfgs = [cell_config(store, cell, t) for cell in cells]
    why = stackable(cfgs[0])
    if why is not None:
        raise ValueError(f"cells with {why} do not stack; train them one after another")
    if t.total_samples < t.batch_size:
        raise ValueError(f"total_samples ({t.total_samples}) must be at least one batch ({t.batch_size})")
    run_root = out / "runs" / _stack_name(cells)
    from .distributed import barrier

    has_ckpt = (run_root / "checkpoints").is_dir() and any((run_root / "checkpoints").iterdir())
    if place is not None and not place.main:
        barrier(place)  # rank 0 prepares the run directory (stale temporaries) first
    ckpt, run = prepare_output(run_root, "latest" if resume and has_ckpt else None, checkpoints=t.n_checkpoints > 0)
    if place is not None and place.main:
        barrier(place)
    providers, vals = zip(*(cell_providers(store, cell, t, val_store) for cell in cells))
    for provider in providers:
        provider.check_enough(t.total_samples)
    modules = []
    for cfg in cfgs:
        torch.manual_seed(t.seed)  # each cell initialised as its own run would be
        modules.append(TrainingWriteSAE(cfg))
    sae = StackedTrainingWriteSAE(modules).to(device)
    if place is not None and place.distributed:
        if t.batch_size % place.world_size:
            raise ValueError(f"--parallel data splits each batch over the ranks: batch size {t.batch_size} is not a "
                             f"multiple of {place.world_size}")
        sae.data_parallel(place)
    stream = _StackedBatches(providers)
    lr_end, dead_feature_window = t.lr / 10, t.dead_feature_window
    identity = run_identity(cfgs[0], providers[0], total_samples=t.total_samples, batch_size=t.batch_size, lr=t.lr,
                            lr_end=lr_end, warmup_steps=warmup_steps, dead_feature_window=dead_feature_window)
    identity["cells"] = [cell.id for cell in cells]
    identity = json.loads(json.dumps(identity, default=str))
    if ckpt is not None:
        check_identity(ckpt, identity, run)
    trainer_cfg = trainer_config(t.total_samples, t.batch_size, t.lr, lr_end, warmup_steps, dead_feature_window,
                                 t.n_checkpoints, run_root / "checkpoints", device)
    trainer = _stacked_trainer_class()(
        cfg=trainer_cfg, sae=sae, data_provider=stream, val_every=t.val_every, layout=cfgs[0].input_layout,
        identity=identity, stream=stream, val_batches=list(vals[0]), cell_ids=[c.id for c in cells],
        cell_vals=[list(v) for v in vals], run_dirs=[out / "runs" / c.id for c in cells], place=place)
    if ckpt is not None:
        trainer.resume(ckpt, run)
    if ckpt is None:
        if stream.normalize:
            first = next(stream)  # each provider estimates its scale; the batch is the first step's
            trainer.data_provider = _Prepend(first, stream)
            trainer.scales = [float(p.scale) for p in providers]
        trainer.validate()
    trainer.show_progress = progress and trainer.place.main  # one bar, rank 0's (every rank steps alike)
    trainer.rank_progress, trainer.progress_cells = rank_progress, len(cells)
    trainer.progress_desc = f"train {len(cells)} cells"
    try:
        trainer.fit()
    except StopIteration:
        raise RuntimeError(f"the store ran out after {trainer.n_training_samples} samples per cell, before "
                           f"total_samples={t.total_samples}") from None
    sae.normalize_decoder()
    for c, cell in enumerate(cells):
        final = trainer.export_cell(c)
        trainer.scales[c] = 1.0
        m = evaluate_sae(final.eval(), trainer.cell_vals[c], final.cfg.input_layout, 1.0)
        trainer.histories[c].append({"step": trainer.n_training_steps, "samples": trainer.n_training_samples,
                                     **asdict(m), "final": True})
        if trainer.place.main:
            with atomic_dir(out / "runs" / cell.id / "final") as tmp:
                save_portable(final, tmp)
    trainer._write_log()
    if place is not None:
        barrier(place)  # the results are on disk before any rank goes on
    return dict(zip([c.id for c in cells], trainer.histories))


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
                release: str | None = None, progress: bool = True, stack: bool = True, place=None,
                parallel: str = "cells", device: str = "cpu") -> dict:
    """Train every cell (see the module docstring); returns the release index written to
    ``out/cells/release.json``. Finished cells are skipped; with ``resume`` an interrupted run continues from
    its last complete checkpoint, without it a run with checkpoints but no result is refused. ``stack``: train
    the unfinished cells together along a cell axis when their settings allow it (``sae.stacked.stackable``),
    else one after another. ``place`` (``distributed.Place``, under torchrun): this rank trains the cells ``j``
    with ``j mod world_size = rank`` and records them in ``cells/release.rank{r}.json``; after a barrier rank 0
    merges those into ``release.json``; with ``parallel="data"`` every rank trains every cell on its share of each
    batch (:func:`train_cells_stacked`) and rank 0 writes the results. Every rank returns the merged index.
    ``device``: where the SAEs train (this rank's: ``cuda:LOCAL_RANK`` on a GPU node)."""
    from tqdm.auto import tqdm

    from .distributed import Place, barrier

    place = place or Place()
    if parallel not in ("cells", "data"):
        raise ValueError(f"parallel must be 'cells' or 'data', got {parallel!r}")
    data_parallel = place.distributed and parallel == "data"

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
    index = _merged_index(out, json.loads(index_path.read_text()) if index_path.is_file() else {})
    index.update({"release": release or out.name, "model": store.model["path"], "store": str(store.path),
                  "training": asdict(t)})
    all_cells = cells
    if place.distributed and not data_parallel:
        cells = cells[place.rank::place.world_size]
    per_rank = place.distributed and not data_parallel
    my_path = out / "cells" / f"release.rank{place.rank}.json" if per_rank else index_path
    writer = place.main or per_rank
    from .sae.stacked import stackable

    def done(cell):
        return cell.id in index["cells"] and (out / "cells" / cell.id / "cfg.json").is_file()

    pending = [cell for cell in cells if not done(cell)]
    stacked: dict[str, list[dict]] = {}
    why = stackable(cell_config(store, cells[0], t)) if cells else None  # (a rank may get no cell: more ranks)
    rank_progress = None
    if per_rank:  # the job's progress over all ranks, on rank 0's bar
        from .distributed import RankProgress

        rank_progress = RankProgress(out / "cells", place, total=len(all_cells) * t.total_samples)
        rank_progress.base = (len(cells) - len(pending)) * t.total_samples
        rank_progress.publish(0, force=True)
    if data_parallel and pending:
        if why is not None:
            raise ValueError(f"--parallel data trains the cells stacked; cells with {why} do not stack (use "
                             "--parallel cells)")
        stacked = train_cells_stacked(store, pending, out, t, val_store, resume=resume, progress=progress,
                                      place=place, device=device)
    elif stack and len(pending) > 1 and why is None:
        stacked = train_cells_stacked(store, pending, out, t, val_store, resume=resume, progress=progress,
                                      device=device, rank_progress=rank_progress)
        if rank_progress is not None:
            rank_progress.base += len(pending) * t.total_samples
            rank_progress.publish(0, force=True)
    bar = tqdm(cells, desc="cells", unit="cell", disable=not progress or bool(stacked), dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.id)
        if done(cell):
            continue  # finished in an earlier run
        run_dir = out / "runs" / cell.id
        if cell.id in stacked:
            history = stacked[cell.id]
            if not writer:
                continue
        else:
            has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
            _, history = train_cell(store, cell, run_dir, t, val_store,
                                    resume_from="latest" if resume and has_ckpt else None, device=device,
                                    progress=progress, rank_progress=rank_progress)
            if rank_progress is not None:
                rank_progress.base += t.total_samples
                rank_progress.publish(0, force=True)
        with atomic_dir(out / "cells" / cell.id) as tmp:
            for f in (run_dir / "final").iterdir():
                shutil.copy2(f, tmp / f.name)
        last = history[-1] if history else {}
        index["saes"][cell.id] = cell.id
        index["cells"][cell.id] = {"layer": cell.layer, "head": cell.head, "site": cell.site,
                                   **{k: v for k, v in last.items() if k != "final"}}
        if last:
            index["expected_var_explained"][cell.id] = 1.0 - float(last["fvu"])
            index["expected_l0"][cell.id] = float(last["l0"])
        atomic_write_text(my_path, json.dumps(index, indent=1))
    if data_parallel:
        barrier(place)
        index = json.loads(index_path.read_text())
    elif place.distributed:
        barrier(place)
        if place.main:
            merged = _merged_index(out, index)
            atomic_write_text(index_path, json.dumps(merged, indent=1))
            for path in (out / "cells").glob("release.rank*.json"):
                path.unlink()
            if rank_progress is not None:
                from .distributed import log

                log(place, f"all ranks trained {rank_progress.global_count(fresh=True)} of {rank_progress.total} "
                           f"cell-samples ({len(all_cells)} cells x {t.total_samples})")
                rank_progress.remove_files()
        barrier(place)
        index = json.loads(index_path.read_text())
    missing = [c.id for c in all_cells if c.id not in index["cells"]]
    if missing:
        raise RuntimeError(f"cells {missing} have no result in {index_path}")
    return index


_INDEX_KEYS = ("saes", "expected_var_explained", "expected_l0", "cells")


def _merged_index(out: Path, index: dict) -> dict:
    """``index`` with the per-rank indexes (``cells/release.rank*.json``) of a distributed run merged in."""
    index = {**index, **{key: dict(index.get(key, {})) for key in _INDEX_KEYS}}
    for path in sorted((out / "cells").glob("release.rank*.json")):
        part = json.loads(path.read_text())
        for key in _INDEX_KEYS:
            index[key].update(part.get(key, {}))
    return index


__all__ = ["Cell", "CellTraining", "train_cell", "train_cells", "train_cells_stacked", "store_cells", "cell_config", "cell_providers"]

"""Train a WriteSAE on a hooked model with SAELens' ``SAETrainer``: validation, checkpoints, resume.

Output directory: ``final/`` (the inference SAE: ``SAE.load_from_disk(out/"final")``), ``checkpoints/<samples>/``
(each one an SAE in real units that ``SAE.load_from_disk`` loads, plus everything ``resume_from`` needs; layout
in ``checkpoints.py``), ``validation.jsonl`` (FVU, L0, dead fraction per validation) and ``train_config.json``.

Exactly ``total_samples`` matrices are trained: the last batch is cut to what remains when ``total_samples`` is not a
multiple of ``batch_size`` (before it, the data stream may end in a partial batch instead of stopping), so the
progress bar ends at its total. The bar shows samples/s, the ETA, the running (EMA) training FVU and L0 of the batches,
and the last validation's ``val_fvu`` and ``dead_fraction``: the fraction of atoms that never fired on the validation
set, the quantity ``validation.jsonl`` records under the same name (the mean over cells for stacked cells). A
validation runs every ``val_every`` steps and after the last step.

Every file is written through a temporary file or directory and renamed into place, so a kill or a full disk
leaves the previous complete state. A resumed run continues the data stream where the checkpoint left it, with
the checkpoint's input scale, and refuses a checkpoint of another run (model, site, SAE, schedule, data).

Devices: ``device`` (``"cpu"``, ``"cuda:N"``) holds the SAE's parameters, Adam's state, the batches, the dead-atom
counters and BatchTopK's threshold; the SAE is initialised on the CPU (the same initialisation on any device) and
moved there before the trainer exists. Everything saved is device-independent: checkpoint tensors (weights, Adam
state, counters) are written from the CPU, and the saved SAEs' ``cfg.json`` says ``"device": "cpu"``, so a run
resumes on another device and a shipped SAE loads on a machine without the training device.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.sae_trainer import SAETrainer

from .checkpoints import (CheckpointError, OutputDirError, atomic_dir, atomic_write_text, check_identity,
                          checkpoint_dir, load_stream_state, prepare_output, save_stream_state, write_manifest)
from .sae import TrainingWriteSAE, WriteSAETrainingConfig


@dataclass
class SAEMetrics:
    fvu: float  # fraction of variance unexplained: sum ||x - x^||^2 / sum ||x - mean||^2
    l0: float  # mean number of active atoms per sample
    dead_fraction: float  # atoms that never fired on the validation set
    n: int  # validation samples


@torch.no_grad()
def evaluate_sae(sae, batches: list[torch.Tensor], layout: str = "dense", input_scale: float = 1.0) -> SAEMetrics:
    """FVU, L0 and dead fraction of ``sae`` on validation batches (dense ``[N, d_in]`` or factors ``[N, d_k + d_v]``),
    each matrix multiplied by ``input_scale`` first (FVU is scale-free; L0 and dead atoms depend on it). The batches
    are moved to the SAE's device.

    Factors are evaluated without forming ``k v^T`` when the SAE has ``encode_factors`` /
    ``reconstruction_sq_error_factors`` (a WriteSAE); the total variance is accumulated in float64 as
    ``sum ||x||^2 - ||sum x||^2 / n`` (for factors ``||k||^2 ||v||^2`` and ``K^T V``), so no batch is kept."""
    sq_err, sum_sq, l0, n = 0.0, 0.0, 0, 0
    fired, first = None, None
    device = next(sae.parameters()).device
    factored = layout == "factors" and hasattr(sae, "reconstruction_sq_error_factors")
    for x in batches:
        x = x.to(device)
        if factored:
            s = input_scale ** 0.5
            k, v = x[:, : sae.cfg.d_k] * s, x[:, sae.cfg.d_k:] * s
            acts = sae.encode_factors(k, v)
            sq_err += sae.reconstruction_sq_error_factors(k, v).double().sum().item()
            sum_sq += ((k * k).sum(-1) * (v * v).sum(-1)).double().sum().item()
            part = k.double().T @ v.double()  # sum of the batch's k v^T
        else:
            if layout == "factors":
                k, v = x[:, : sae.cfg.d_k], x[:, sae.cfg.d_k:]
                x = (k[:, :, None] * v[:, None, :]).reshape(x.shape[0], -1)
            X = x * input_scale
            acts = sae.encode(X)
            recon = sae.decode(acts)
            sq_err += (recon - X).double().pow(2).sum().item()
            sum_sq += X.double().pow(2).sum().item()
            part = X.double().sum(0)
        first = part if first is None else first + part
        l0 += int((acts != 0).sum())
        n += x.shape[0]
        f = (acts != 0).any(0)
        fired = f if fired is None else fired | f
    if n == 0:
        raise ValueError("evaluate_sae got no batches: the held-out set is empty (give its provider drop_last=False "
                         "when it holds fewer samples than one batch)")
    total = sum_sq - float((first * first).sum()) / n
    return SAEMetrics(fvu=sq_err / max(total, 1e-30), l0=l0 / n,
                      dead_fraction=1.0 - fired.float().mean().item(), n=n)


class WriteSAETrainer(SAETrainer):
    """``SAETrainer`` plus periodic validation (``validation.jsonl``), atomic self-contained checkpoints and an
    exact resume (weights, optimizer, schedule, dead-atom counters, input scale and data stream)."""

    progress_desc = "train"  # the progress bar's stage name
    show_progress = True  # False: no bar (progress off, or a rank other than 0 of a distributed job)

    def __init__(self, *args, val_batches: list[torch.Tensor] | None = None, val_every: int = 0,
                 log_path: Path | None = None, layout: str = "dense", identity: dict | None = None,
                 stream=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_batches, self.val_every, self.log_path, self.layout = val_batches or [], val_every, log_path, layout
        self.history: list[dict[str, Any]] = []
        self.input_scale = 1.0  # the provider's normalisation while the SAE works in scaled units
        self.identity = identity or {}
        self.stream = self.data_provider if stream is None else stream  # the provider whose position is saved
        self.progress: dict[str, str] = {}  # the progress bar's postfix (running FVU, L0, dead fraction, ...)
        self._ema: dict[str, float] = {}
        self._batch_rows = 0  # rows of the last step's batch (the last one may be partial)

    # ------------------------------------------------------------------ progress
    def fit(self):
        """SAELens' ``fit``, its progress bar named for the stage (``progress_desc``, not "Training SAE") and shown
        only when ``show_progress`` (SAELens has no switch for either: its module's ``tqdm`` is wrapped meanwhile)."""
        from sae_lens.training import sae_trainer

        make = sae_trainer.tqdm

        def bar(*args, **kwargs):
            kwargs.update(desc=self.progress_desc, disable=not self.show_progress, dynamic_ncols=True,
                          unit=" samples", unit_scale=True)
            return make(*args, **kwargs)

        sae_trainer.tqdm = bar
        place = getattr(self, "place", None)  # data parallel (stacked cells): every rank takes rows of each batch
        last = self.cfg.total_training_samples % self.cfg.train_batch_size_samples
        if place is not None and place.distributed and last % place.world_size:
            raise ValueError(f"the last batch ({last} rows: total samples {self.cfg.total_training_samples} is not a "
                             f"multiple of the batch size) does not split over {place.world_size} ranks; give a "
                             f"total that is a multiple of {place.world_size}")
        provider, self.data_provider = self.data_provider, _Exactly(self.data_provider, self)
        try:
            return super().fit()
        finally:
            sae_trainer.tqdm = make
            self.data_provider = provider

    @torch.no_grad()
    def _track(self, batch: torch.Tensor, out) -> None:
        """Running (EMA) FVU and L0 of the training batches: FVU = squared error / variance of the batch about its
        mean, as ``validation.jsonl`` reports it (scale-free; SAELens' bar shows the raw summed MSE)."""
        mse = out.losses.get("mse_loss") if isinstance(out.losses, dict) else None
        if mse is None:
            return
        x = batch.to(torch.float32)
        n = x.shape[0]
        if self.layout == "factors":  # variance of the dense k v^T, from the factors
            dk = self.sae.cfg.d_k
            k, v = x[:, :dk], x[:, dk:]
            mean = k.T @ v / n
            var = ((k * k).sum(1) * (v * v).sum(1)).sum() - n * (mean * mean).sum()
        else:
            x = x.reshape(n, -1)
            var = (x - x.mean(0)).pow(2).sum()
        err = float(mse.detach()) * n
        l0 = float((out.feature_acts != 0).sum()) / n
        a = 0.1 if self._ema else 1.0
        for key, value in (("err", err), ("var", float(var)), ("l0", l0)):
            self._ema[key] = (1 - a) * self._ema.get(key, value) + a * value

    def progress_postfix(self) -> dict[str, str]:
        """What the progress bar shows beside samples/s and the ETA: the running training FVU and L0 (EMA over the
        batches); :meth:`validation_postfix` adds the last validation's."""
        post = {}
        if self._ema:
            post["fvu"] = f"{self._ema['err'] / max(self._ema['var'], 1e-30):.3f}"
            post["L0"] = f"{self._ema['l0']:.1f}"
        return post

    def validation_postfix(self) -> dict[str, str]:
        """The last validation's FVU (``val_fvu``) and ``dead_fraction`` (atoms that never fired on the validation
        set), as ``validation.jsonl`` records them; for stacked cells (``histories``) the means over the cells."""
        rows = [h[-1] for h in (getattr(self, "histories", None) or [self.history]) if h]
        if not rows:
            return {}
        return {"val_fvu": f"{sum(r['fvu'] for r in rows) / len(rows):.3f}",
                "dead_fraction": f"{sum(r['dead_fraction'] for r in rows) / len(rows):.4f}"}

    #: ``--parallel cells``: the job's progress over all ranks (``distributed.RankProgress``), and the number of
    #: cells this trainer trains (its samples count once per cell)
    rank_progress = None
    progress_cells = 1

    @torch.no_grad()
    def _update_pbar(self, step_output, pbar, update_interval: int = 100):
        """Every step (SAELens' bar moves every 100): samples/s, ETA, FVU, L0, dead fraction; under
        ``--parallel cells`` every rank publishes its count and rank 0's bar adds the job's (``all ranks``)."""
        if self.rank_progress is not None:
            self.rank_progress.publish(self.n_training_samples * self.progress_cells)
        if not self.show_progress:
            return
        self.progress = self.progress_postfix()
        # one dead fraction, the validation's: a trainer's own postfix may still count atoms silent for
        # dead_feature_window steps (the aux-k / resampling criterion) as "dead"; that is not what the records say
        self.progress.pop("dead", None)
        self.progress.update(self.validation_postfix())
        if self.rank_progress is not None:
            self.progress["all ranks"] = self.rank_progress.postfix()
        pbar.set_postfix(self.progress, refresh=False)
        pbar.update(self._batch_rows)  # the rows this step trained (the last batch may be partial)

    @property
    def normalized(self) -> bool:
        return bool(getattr(self.stream, "normalize", False))

    def _write_log(self) -> None:
        if self.log_path is not None:
            atomic_write_text(self.log_path, "".join(json.dumps(row) + "\n" for row in self.history))

    def validate(self, completed_steps: int | None = None, final: bool = False) -> dict[str, Any]:
        """Evaluate on the validation batches and append a record to ``validation.jsonl``: ``step`` = training
        steps completed (``completed_steps``: inside a step, before SAELens counts it), ``samples``, the metrics;
        ``final``: the record of the saved SAE (unit-norm atoms, input scale folded), after the last step's."""
        was_training = self.sae.training
        self.sae.eval()
        m = evaluate_sae(self.sae, self.val_batches, self.layout, self.input_scale)
        self.sae.train(was_training)
        steps = self.n_training_steps if completed_steps is None else completed_steps
        row = {"step": steps, "samples": self.n_training_samples, **asdict(m), **({"final": True} if final else {})}
        self.history.append(row)
        self._write_log()
        return row

    def step(self, batch):
        batch = batch.to(self.sae.device)  # once: SAELens' step and the running FVU both read it there
        self._batch_rows = batch.shape[0]
        out = super().step(batch)
        # SAELens counts a full batch into the sparsity statistics' sample count; the last batch may be partial
        self.n_frac_active_samples -= self.cfg.train_batch_size_samples - batch.shape[0]
        self._track(batch, out)
        last = self.n_training_samples >= self.cfg.total_training_samples
        if self.val_every and self.val_batches and ((self.n_training_steps + 1) % self.val_every == 0 or last):
            self.validate(completed_steps=self.n_training_steps + 1)  # SAELens counts this step after it returns
        return out

    # ------------------------------------------------------------------ checkpoints
    def save_trainer_state(self, checkpoint_path: Path) -> None:
        """SAELens' ``trainer_state.pt`` (and its scaler file) with every tensor on the CPU, so the checkpoint loads
        on a machine without the training device (``load_trainer_state`` maps it to this run's device, and Adam's
        state follows the parameters')."""
        from sae_lens.training.sae_trainer import ACTIVATION_SCALER_CFG_FILENAME, TRAINER_STATE_FILENAME

        checkpoint_path = Path(checkpoint_path)
        checkpoint_path.mkdir(exist_ok=True, parents=True)
        state = {
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
            "n_training_samples": self.n_training_samples, "n_training_steps": self.n_training_steps,
            "act_freq_scores": self.act_freq_scores, "n_forward_passes_since_fired": self.n_forward_passes_since_fired,
            "n_frac_active_samples": self.n_frac_active_samples, "started_fine_tuning": self.started_fine_tuning,
            "coefficient_schedulers": {name: s.state_dict() for name, s in self.coefficient_schedulers.items()},
        }
        torch.save(on_cpu(state), str(checkpoint_path / TRAINER_STATE_FILENAME))
        self.activation_scaler.save(str(checkpoint_path / ACTIVATION_SCALER_CFG_FILENAME))

    @torch.no_grad()
    def _checkpoint_if_needed(self):
        # called inside fit's loop after a step and before n_training_steps counts it
        if self.checkpoint_thresholds and self.n_training_samples > self.checkpoint_thresholds[0]:
            self.checkpoint_thresholds.pop(0)
            self.save_checkpoint(str(self.n_training_samples), completed_steps=self.n_training_steps + 1)

    def export_inference_sae(self) -> TrainingWriteSAE:
        """A copy of the SAE as the final one would be saved now: unit-norm atoms, input scale folded (it reads
        and reconstructs the site's real units)."""
        export = copy.deepcopy(self.sae)
        export.normalize_decoder()
        if self.normalized:
            export.fold_activation_norm_scaling_factor(self.input_scale)
            export.cfg.metadata.input_scale_folded = self.input_scale
        return export

    @torch.no_grad()
    def save_checkpoint(self, checkpoint_name: str, base_path: Path | str | None = None,
                        wandb_aliases: list[str] | None = None, completed_steps: int | None = None) -> None:
        base = Path(base_path if base_path is not None else self.cfg.checkpoint_path)
        final = base / checkpoint_name
        with checkpoint_dir(final, "resume with --resume latest from the last complete checkpoint") as tmp:
            save_portable(self.export_inference_sae(), tmp)
            with cfg_device_cpu(self.sae):
                self.sae.save_model(tmp / "training_sae")
            save_file({"sparsity": self.log_feature_sparsity.contiguous()}, tmp / "sparsity.safetensors")
            self.save_trainer_state(tmp)  # SAELens' trainer_state.pt (+ its own, unused, scaler file)
            ActivationScaler(scaling_factor=self.input_scale if self.normalized else None).save(
                str(tmp / "activation_scaler.json"))
            self._save_stream(tmp)
            (tmp / "run.json").write_text(json.dumps({**self.run_record(completed_steps),
                                                      "validation": self.history}, indent=1, default=str))
            write_manifest(tmp, n_training_samples=self.n_training_samples)
        if self.save_checkpoint_fn is not None:
            self.save_checkpoint_fn(checkpoint_path=final)

    def run_record(self, completed_steps: int | None = None) -> dict:
        """What a checkpoint's ``run.json`` holds besides the validation history: the run's identity, samples and
        steps done, the checkpoint thresholds still ahead."""
        return {"identity": self.identity, "n_training_samples": self.n_training_samples,
                "completed_steps": self.n_training_steps if completed_steps is None else completed_steps,
                "checkpoint_thresholds": list(self.checkpoint_thresholds)}

    def _save_stream(self, tmp: Path) -> None:
        if not hasattr(self.stream, "state_dict"):
            (tmp / "data_state.json").write_text(json.dumps({"stateful": False,
                                                             "samples": self.n_training_samples}))
            return
        state = save_stream_state(self.stream, tmp, "data_state")
        (tmp / "data_state.json").write_text(json.dumps({"stateful": True, **state}, default=str))

    def resume(self, ckpt: Path, run: dict) -> None:
        """Restore weights, trainer state, input scale, data stream position and validation history."""
        ckpt = Path(ckpt)
        self.sae.load_weights_from_checkpoint(ckpt / "training_sae")
        self.load_trainer_state(ckpt)
        self.activation_scaler = ActivationScaler()  # the provider applies the scale, the trainer must not again
        self.n_training_steps = int(run["completed_steps"])
        self.checkpoint_thresholds = list(run["checkpoint_thresholds"])
        scale = json.loads((ckpt / "activation_scaler.json").read_text())["scaling_factor"]
        data = json.loads((ckpt / "data_state.json").read_text())
        if data.get("stateful"):
            if not hasattr(self.stream, "load_state_dict"):
                raise CheckpointError(f"{ckpt} saved a data stream position that this provider cannot restore "
                                      f"({type(self.stream).__name__} has no load_state_dict)")
            def same_scale(state):
                if self.normalized and (scale is None or abs(float(state["scale"]) - scale) > 1e-12 * abs(scale)):
                    raise CheckpointError(f"{ckpt}: data_state.json and activation_scaler.json disagree on the scale")

            load_stream_state(self.stream, ckpt, "data_state", data, check=same_scale)
        else:  # a stream without a saved position: skip the samples the checkpoint consumed
            if self.normalized:
                raise CheckpointError(f"{ckpt}: a normalised stream needs a provider with load_state_dict to restore "
                                      "its scale")
            seen = 0
            while seen < int(data["samples"]):
                seen += next(self.data_provider).shape[0]
        self.input_scale = float(scale) if self.normalized else 1.0
        self.history = [dict(row) for row in run.get("validation", [])]
        self._write_log()  # the log as it was at the checkpoint: rows of a killed run past it are gone


def model_fingerprint(hf_model) -> str:
    """A hash of a model's config and a strided sample of every parameter (cheap; tells models apart)."""
    h = hashlib.sha256()
    conf = {k: v for k, v in hf_model.config.to_dict().items()
            if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
    h.update(json.dumps(conf, sort_keys=True, default=str).encode())
    for name, p in sorted(hf_model.named_parameters(), key=lambda t: t[0]):
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run_identity(cfg: WriteSAETrainingConfig, provider, **schedule) -> dict:
    """What a run is, for refusing to resume a checkpoint into another one (JSON values)."""
    ident = {name: getattr(cfg, name) for name in (
        "d_in", "d_sae", "d_k", "d_v", "k", "encoder", "encoder_rank", "decoder_rank", "activation", "site", "head",
        "n_heads", "family", "layer", "write_mode", "input_layout", "aux_k", "aux_loss_coefficient",
        "resample_every", "topk_threshold_lr", "jumprelu_bandwidth", "jumprelu_init_threshold", "l0_coefficient",
        "normalize_activations")}
    ident["architecture"] = cfg.architecture()
    ident["hook_name"] = cfg.metadata.hook_name
    ident["normalize"] = bool(getattr(provider, "normalize", False))
    spec = getattr(provider, "spec", None)
    if spec is not None:
        ident.update(positions=spec.positions, layers=spec.layer, heads=spec.heads, skip_first=spec.skip_first)
    hf = getattr(getattr(provider, "model", None), "hf_model", None)
    store = getattr(provider, "store", None)
    if hf is not None:
        ident["model"] = model_fingerprint(hf)
    elif store is not None:
        ident["model"] = store.model["weights_sha256"][:16]
        ident["store"] = str(store.path)
    ident.update(schedule)
    return json.loads(json.dumps(ident, default=str))


def _check_free_space(out: Path, sae: TrainingWriteSAE, provider, n_checkpoints: int) -> None:
    weights = sum(p.numel() * p.element_size() for p in sae.parameters())
    row = sae.cfg.d_k + sae.cfg.d_v if sae.cfg.input_layout == "factors" else sae.cfg.d_in
    buffer = getattr(provider, "capacity", 0) * row * 4  # the saved shuffle buffer (fp32)
    need = n_checkpoints * (4 * weights + buffer) + weights  # checkpoints (inference + training + Adam) + final
    free = shutil.disk_usage(out).free
    if free < need:
        raise OutputDirError(f"{out}: about {need / 1e6:.0f} MB are needed for {n_checkpoints} checkpoint(s) and the "
                             f"final SAE, {free / 1e6:.0f} MB are free")


def trainer_config(total_samples: int, batch_size: int, lr: float, lr_end: float, warmup_steps: int,
                   dead_feature_window: int, n_checkpoints: int, checkpoint_dir: Path,
                   device: str = "cpu") -> SAETrainerConfig:
    """SAELens' trainer config of the paper's schedule (Adam, warm-up, cosine decay to ``lr_end``), shared by the
    single-cell and the stacked trainers so a stacked cell trains on exactly its own run's schedule."""
    steps = total_samples // batch_size
    return SAETrainerConfig(
        total_training_samples=total_samples, train_batch_size_samples=batch_size, device=device, lr=lr,
        lr_end=lr_end, lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(warmup_steps, max(steps - 1, 0)),
        lr_decay_steps=max(steps - min(warmup_steps, steps - 1) - 1, 1),
        dead_feature_window=dead_feature_window, feature_sampling_window=max(steps, 1),
        n_checkpoints=n_checkpoints, checkpoint_path=str(checkpoint_dir), save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False), autocast=False, adam_beta1=0.9, adam_beta2=0.999,
        n_restart_cycles=1,
    )


def train_write_sae(cfg: WriteSAETrainingConfig, provider, out_dir: str | Path, *, total_samples: int,
                    batch_size: int, lr: float = 3e-4, lr_end: float | None = None, warmup_steps: int = 50,
                    val_batches: list[torch.Tensor] | None = None, val_every: int = 100,
                    n_checkpoints: int = 2, dead_feature_window: int = 100,
                    resume_from: str | Path | None = None, device: str = "cpu",
                    progress: bool = True, progress_desc: str = "train",
                    rank_progress=None) -> tuple[TrainingWriteSAE, list]:
    """Train, validate and save; returns the training SAE and the validation history.

    The schedule follows the paper (Adam, warm-up, cosine decay to ``lr_end``, default ``lr / 10``).
    ``resume_from``: a checkpoint directory, or ``"latest"`` (the newest complete one under ``out/checkpoints``).
    A resumed run continues ``provider`` where the checkpoint left it: pass a fresh provider over the same
    contexts (it skips those the checkpoint consumed), and the run ends with the SAE an uninterrupted run gives.
    ``device``: where the SAE trains (see the module docstring); ``progress``: show the progress bar, named
    ``progress_desc``; ``rank_progress``: a ``distributed.RankProgress`` this run reports to (``--parallel cells``).
    """
    out = Path(out_dir)
    if total_samples < batch_size:
        raise ValueError(f"total_samples ({total_samples}) must be at least one batch ({batch_size})")
    if hasattr(provider, "check_enough"):  # a store: its size is known before training
        provider.check_enough(total_samples)
    ckpt, run = prepare_output(out, resume_from, checkpoints=n_checkpoints > 0)
    sae = TrainingWriteSAE(cfg)  # initialised on the CPU (cfg.device): the same SAE whatever the device
    sae.to(device)  # before the trainer: its counters, Adam's state and a resumed state follow the parameters
    lr_end = lr / 10 if lr_end is None else lr_end
    identity = run_identity(cfg, provider, total_samples=total_samples, batch_size=batch_size, lr=lr, lr_end=lr_end,
                            warmup_steps=warmup_steps, dead_feature_window=dead_feature_window)
    if ckpt is not None:
        check_identity(ckpt, identity, run)
    _check_free_space(out, sae, provider, n_checkpoints)
    trainer_cfg = trainer_config(total_samples, batch_size, lr, lr_end, warmup_steps, dead_feature_window,
                                 n_checkpoints, out / "checkpoints", device)
    trainer = WriteSAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider, val_batches=val_batches,
                              val_every=val_every, log_path=out / "validation.jsonl", layout=cfg.input_layout,
                              identity=identity, stream=provider)
    trainer.show_progress, trainer.progress_desc = progress, progress_desc
    trainer.rank_progress = rank_progress
    if ckpt is not None:
        trainer.resume(ckpt, run)
    atomic_write_text(out / "train_config.json", json.dumps({
        "sae": cfg.to_dict(), "total_samples": total_samples, "batch_size": batch_size, "lr": lr,
        "lr_end": trainer_cfg.lr_end, "warmup_steps": trainer_cfg.lr_warm_up_steps,
        "dead_feature_window": dead_feature_window, "resumed_from": None if ckpt is None else str(ckpt),
    }, indent=2, default=str))
    if ckpt is None:
        if trainer.normalized:
            next_batch = next(provider)  # estimates the scale; the batch is used as the first step's
            trainer.data_provider = _Prepend(next_batch, provider)
            trainer.input_scale = provider.scale
        if val_batches:
            trainer.validate()
    try:
        trainer.fit()
    except StopIteration:
        raise RuntimeError(f"the activation provider ran out after {trainer.n_training_samples} samples, before "
                           f"total_samples={total_samples}; give more text or lower total_samples") from None
    sae.normalize_decoder()  # the next step would have done it; saves unit-norm atoms
    if trainer.normalized:
        sae.fold_activation_norm_scaling_factor(trainer.input_scale)  # the SAE now reads unscaled activations
        sae.cfg.metadata.input_scale_folded = trainer.input_scale
        trainer.input_scale = 1.0
    if val_batches:
        trainer.validate(final=True)
    try:
        with atomic_dir(out / "final") as tmp:
            save_portable(sae, tmp)
    except OSError as e:
        raise OutputDirError(f"writing the final SAE to {out / 'final'} failed ({e.strerror or e}); the checkpoints "
                             "are intact") from e
    return sae, trainer.history


def on_cpu(obj):
    """``obj`` (nested dicts, lists, tuples) with every tensor copied to the CPU (saving device-independently)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, obj)


class cfg_device_cpu:
    """Within it ``sae.cfg.device`` reads ``"cpu"``: what a saved ``cfg.json`` should say (safetensors writes the
    weights from the CPU whatever their device), so a saved SAE loads on a CPU-only machine."""

    def __init__(self, sae):
        self.sae = sae

    def __enter__(self):
        self.device, self.sae.cfg.device = self.sae.cfg.device, "cpu"
        return self.sae

    def __exit__(self, *exc):
        self.sae.cfg.device = self.device
        return False


def save_portable(sae, path: Path | str) -> None:
    """``sae.save_inference_model(path)`` with ``cfg.json`` saying ``"device": "cpu"`` (weights from the CPU), so the
    SAE loads where it was not trained. (SAELens' ``load_from_disk`` / ``from_pretrained`` put an SAE on their own
    ``device`` argument, ``"cpu"`` by default; the saved device is what other readers of ``cfg.json`` see.)"""
    with cfg_device_cpu(sae):
        sae.save_inference_model(path)


class _Exactly:
    """The trainer's data stream ending at exactly ``total_training_samples``: the batch of the last step is cut to the
    samples that remain. Before that step the providers (and those they wrap) may yield a partial batch at the end
    of their data instead of stopping (``drop_last`` off), so a stream holding exactly the total suffices."""

    def __init__(self, inner, trainer):
        self.inner, self.trainer = inner, trainer

    def __iter__(self):
        return self

    def __next__(self):
        left = self.trainer.cfg.total_training_samples - self.trainer.n_training_samples
        if left < self.trainer.cfg.train_batch_size_samples:
            _allow_partial_batches(self.inner)
        batch = next(self.inner)
        return batch[:left] if batch.shape[0] > left else batch


def _allow_partial_batches(provider) -> None:
    """``drop_last = False`` on ``provider`` and the providers it wraps (``inner``, ``providers``)."""
    if hasattr(provider, "drop_last"):
        provider.drop_last = False
    for inner in [getattr(provider, "inner", None), *getattr(provider, "providers", [])]:
        if inner is not None:
            _allow_partial_batches(inner)


class _Prepend:
    def __init__(self, first, inner):
        self.first, self.inner = first, inner

    def __iter__(self):
        return self

    def __next__(self):
        if self.first is not None:
            out, self.first = self.first, None
            return out
        return next(self.inner)


__all__ = ["train_write_sae", "evaluate_sae", "SAEMetrics", "WriteSAETrainer", "run_identity",
           "model_fingerprint", "save_portable", "on_cpu"]

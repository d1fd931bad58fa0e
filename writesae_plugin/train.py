"""Train a WriteSAE on a hooked model with SAELens' ``SAETrainer``: validation, checkpoints, resume.

Output directory: ``final/`` (the inference SAE: ``SAE.load_from_disk(out/"final")``), ``checkpoints/``
(SAELens training checkpoints, usable with ``resume_from``), ``validation.jsonl`` (FVU, L0, dead fraction
per validation) and ``train_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

from .sae import TrainingWriteSAE, WriteSAETrainingConfig


@dataclass
class SAEMetrics:
    fvu: float  # fraction of variance unexplained: sum ||x - x^||^2 / sum ||x - mean||^2
    l0: float  # mean number of active atoms per sample
    dead_fraction: float  # atoms that never fired on the validation set
    n: int  # validation samples


@torch.no_grad()
def evaluate_sae(sae, batches: list[torch.Tensor], layout: str = "dense", input_scale: float = 1.0) -> SAEMetrics:
    """FVU, L0 and dead fraction of ``sae`` on validation batches (dense ``[N, d_in]`` or factors), each
    matrix multiplied by ``input_scale`` first (FVU is scale-free; L0 and dead atoms depend on it)."""
    sq_err, total, l0, n = 0.0, 0.0, 0.0, 0
    fired = None
    xs = []
    for x in batches:
        if layout == "factors":
            k, v = x[:, : sae.cfg.d_k], x[:, sae.cfg.d_k:]
            X = (k[:, :, None] * v[:, None, :]).reshape(x.shape[0], -1)
        else:
            X = x
        X = X * input_scale
        acts = sae.encode(X)
        recon = sae.decode(acts)
        sq_err += (recon - X).pow(2).sum().item()
        l0 += (acts != 0).sum().item()
        n += X.shape[0]
        f = (acts != 0).any(0)
        fired = f if fired is None else fired | f
        xs.append(X)
    X = torch.cat(xs)
    total = (X - X.mean(0)).pow(2).sum().item()
    return SAEMetrics(fvu=sq_err / max(total, 1e-30), l0=l0 / max(n, 1),
                      dead_fraction=1.0 - fired.float().mean().item(), n=n)


class WriteSAETrainer(SAETrainer):
    """``SAETrainer`` plus periodic validation written to ``validation.jsonl`` and the progress bar."""

    def __init__(self, *args, val_batches: list[torch.Tensor] | None = None, val_every: int = 0,
                 log_path: Path | None = None, layout: str = "dense", **kwargs):
        super().__init__(*args, **kwargs)
        self.val_batches, self.val_every, self.log_path, self.layout = val_batches or [], val_every, log_path, layout
        self.history: list[dict[str, Any]] = []
        self.input_scale = 1.0  # the provider's normalisation while the SAE works in scaled units

    def validate(self) -> dict[str, Any]:
        was_training = self.sae.training
        self.sae.eval()
        m = evaluate_sae(self.sae, self.val_batches, self.layout, self.input_scale)
        self.sae.train(was_training)
        row = {"step": self.n_training_steps, "samples": self.n_training_samples, **asdict(m)}
        self.history.append(row)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def step(self, batch):
        out = super().step(batch)
        if self.val_every and self.val_batches and (self.n_training_steps + 1) % self.val_every == 0:
            self.validate()
        return out


def train_write_sae(cfg: WriteSAETrainingConfig, provider, out_dir: str | Path, *, total_samples: int,
                    batch_size: int, lr: float = 3e-4, lr_end: float | None = None, warmup_steps: int = 50,
                    val_batches: list[torch.Tensor] | None = None, val_every: int = 100,
                    n_checkpoints: int = 2, dead_feature_window: int = 100,
                    resume_from: str | Path | None = None, device: str = "cpu") -> tuple[TrainingWriteSAE, list]:
    """Train, validate and save; returns the training SAE and the validation history.

    The schedule follows the paper (Adam, warm-up, cosine decay to ``lr_end``, default ``lr / 10``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if total_samples < batch_size:
        raise ValueError(f"total_samples ({total_samples}) must be at least one batch ({batch_size})")
    sae = TrainingWriteSAE(cfg)
    steps = total_samples // batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_samples, train_batch_size_samples=batch_size, device=device, lr=lr,
        lr_end=lr / 10 if lr_end is None else lr_end, lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(warmup_steps, max(steps - 1, 0)),
        lr_decay_steps=max(steps - min(warmup_steps, steps - 1) - 1, 1),
        dead_feature_window=dead_feature_window, feature_sampling_window=max(steps, 1),
        n_checkpoints=n_checkpoints, checkpoint_path=str(out / "checkpoints"), save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False), autocast=False, adam_beta1=0.9, adam_beta2=0.999,
        n_restart_cycles=1,
    )
    log_path = out / "validation.jsonl"
    if resume_from is None and log_path.exists():
        log_path.unlink()
    trainer = WriteSAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider, val_batches=val_batches,
                              val_every=val_every, log_path=log_path, layout=cfg.input_layout)
    if resume_from is not None:
        ckpt = Path(resume_from)
        if not (ckpt / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"{ckpt} is not a training checkpoint (no trainer_state.pt)")
        sae.load_weights_from_checkpoint(ckpt)
        trainer.load_trainer_state(ckpt)
    (out / "train_config.json").write_text(json.dumps({
        "sae": cfg.to_dict(), "total_samples": total_samples, "batch_size": batch_size, "lr": lr,
        "lr_end": trainer_cfg.lr_end, "warmup_steps": trainer_cfg.lr_warm_up_steps,
        "dead_feature_window": dead_feature_window, "resumed_from": None if resume_from is None else str(resume_from),
    }, indent=2, default=str))
    if getattr(provider, "normalize", False):
        next_batch = next(provider)  # estimates the scale; the batch is used as the first step's
        provider = _Prepend(next_batch, provider)
        trainer.data_provider = provider
        trainer.input_scale = provider.inner.scale
    if val_batches:
        trainer.validate()
    try:
        trainer.fit()
    except StopIteration:
        raise RuntimeError(f"the activation provider ran out after {trainer.n_training_samples} samples, before "
                           f"total_samples={total_samples}; give more text or lower total_samples") from None
    sae.normalize_decoder()  # the next step would have done it; saves unit-norm atoms
    scale = getattr(getattr(provider, "inner", provider), "scale", 1.0)
    if scale != 1.0:
        sae.fold_activation_norm_scaling_factor(scale)  # the SAE now reads unscaled activations
        sae.cfg.metadata.input_scale_folded = scale
        trainer.input_scale = 1.0
    if val_batches:
        trainer.validate()
    sae.save_inference_model(out / "final")
    return sae, trainer.history


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


__all__ = ["train_write_sae", "evaluate_sae", "SAEMetrics", "WriteSAETrainer"]

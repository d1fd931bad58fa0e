"""WriteSAE configs: orthogonal axes (encoder x decoder x activation x site x head) plus write metadata.

The paper's names collide; the plugin names its baselines by axes (docs/method.md section 5):

=======================  ===========  ============  =======================================
variant                  encoder      decoder_rank  what it is
=======================  ===========  ============  =======================================
``FlatSAE``              ``dense``    ``None``      a vector SAE on ``vec(X)`` (baseline)
``dense+rank-1``         ``dense``    ``1``         dense encoder, rank-1 matrix atoms
``bilinear+rank-1``      ``bilinear`` ``1``         bilinear encoder and atoms (write-aligned)
``bilinear+rank-r``      ``bilinear`` ``r``         rank-r atoms
=======================  ===========  ============  =======================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae_lens.saes.sae import SAEConfig, TrainingSAEConfig

ARCHITECTURE = "write_sae"
ENCODERS = ("bilinear", "dense")
ACTIVATIONS = ("topk", "batchtopk", "jumprelu")
SITES = ("state", "write")


def variant_name(encoder: str, decoder_rank: int | None) -> str:
    if decoder_rank is None:
        return "FlatSAE" if encoder == "dense" else "bilinear+dense"
    return f"{encoder}+rank-{decoder_rank}"


@dataclass
class _WriteAxes:
    """Fields shared by the inference and training configs (all round-trip through ``cfg.json``)."""

    d_k: int = 0
    d_v: int = 0
    encoder: Literal["bilinear", "dense"] = "bilinear"
    encoder_rank: int = 1
    decoder_rank: int | None = 1  # None: dense decoder (FlatSAE)
    activation: Literal["topk", "batchtopk", "jumprelu"] = "topk"
    k: int = 32
    site: Literal["state", "write"] = "state"
    head: int | None = None  # a value-head index, or None: one dictionary shared by all heads
    n_heads: int = 1  # value heads at the hook (for head selection and checks)
    family: str = ""
    layer: int = -1
    hook_name_hf: str = ""
    orientation: Literal["key_first"] = "key_first"
    write_mode: Literal["raw", "delta"] = "raw"

    def _check_axes(self) -> None:
        if self.d_k <= 0 or self.d_v <= 0:
            raise ValueError(f"WriteSAE config needs positive d_k and d_v, got d_k={self.d_k}, d_v={self.d_v}")
        if self.d_in != self.d_k * self.d_v:
            raise ValueError(f"WriteSAE d_in must be d_k * d_v = {self.d_k * self.d_v} (one head), got {self.d_in}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {self.site!r}")
        if self.encoder_rank < 1 or (self.decoder_rank is not None and self.decoder_rank < 1):
            raise ValueError("encoder_rank and decoder_rank must be >= 1 (decoder_rank None = dense decoder)")
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.head is not None and not 0 <= self.head < self.n_heads:
            raise ValueError(f"head={self.head} out of range for n_heads={self.n_heads}")
        if self.orientation != "key_first":
            raise ValueError("only the canonical key-first orientation is supported")
        if self.write_mode not in ("raw", "delta"):
            raise ValueError(f"write_mode must be 'raw' or 'delta', got {self.write_mode!r}")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise ValueError(f"normalize_activations={self.normalize_activations!r} is not supported by "
                             "WriteSAE (whitening or layer norm would break the matrix structure); use 'none'")

    @property
    def variant(self) -> str:
        return variant_name(self.encoder, self.decoder_rank)


@dataclass
class WriteSAEConfig(_WriteAxes, SAEConfig):
    """Inference config of a WriteSAE (``architecture = "write_sae"``)."""

    def __post_init__(self):
        SAEConfig.__post_init__(self)
        self._check_axes()

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


@dataclass
class WriteSAETrainingConfig(_WriteAxes, TrainingSAEConfig):
    """Training config: the inference axes plus loss and dead-atom settings.

    ``input_layout="factors"`` makes the training SAE read batches ``[N, d_k + d_v]`` of concatenated
    write factors ``(k, v)`` and compute encoder and loss without forming ``k v^T``.
    """

    aux_k: int = 256
    aux_loss_coefficient: float = 1 / 32
    resample_every: int = 0  # steps; 0 disables resampling of dead atoms
    input_layout: Literal["dense", "factors"] = "dense"
    topk_threshold_lr: float = 0.01  # BatchTopK: EMA rate of the exported threshold
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    l0_coefficient: float = 1.0  # JumpReLU sparsity penalty

    def __post_init__(self):
        TrainingSAEConfig.__post_init__(self)
        self._check_axes()
        if self.input_layout not in ("dense", "factors"):
            raise ValueError(f"input_layout must be 'dense' or 'factors', got {self.input_layout!r}")
        if self.input_layout == "factors" and self.site != "write":
            raise ValueError("input_layout='factors' is only meaningful for the write site")

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def get_inference_sae_cfg_dict(self) -> dict:
        d = super().get_inference_sae_cfg_dict()
        if self.activation == "batchtopk":
            d["activation"] = "jumprelu"  # exported with its learned threshold, as SAELens does
        return d

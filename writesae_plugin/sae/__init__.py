"""The WriteSAE as a SAELens architecture (``"write_sae"``): configs, inference and training classes."""

from . import kernels
from .config import ARCHITECTURE, WriteSAEConfig, WriteSAETrainingConfig, variant_name
from .training import TrainingWriteSAE
from .write_sae import WriteSAE, describe

__all__ = ["ARCHITECTURE", "WriteSAE", "WriteSAEConfig", "TrainingWriteSAE", "WriteSAETrainingConfig",
           "variant_name", "describe", "register"]


def register() -> None:
    """Register the architecture with SAELens. Idempotent: importing twice, or after a reload of this
    module, never raises; a *foreign* class already registered under ``"write_sae"`` is left in place
    with a warning (SAELens' registry has room for one)."""
    import warnings

    from sae_lens import registry

    for table, cls, cfg_cls in ((registry.SAE_CLASS_REGISTRY, WriteSAE, WriteSAEConfig),
                                (registry.SAE_TRAINING_CLASS_REGISTRY, TrainingWriteSAE, WriteSAETrainingConfig)):
        current = table.get(ARCHITECTURE)
        if current is None or f"{current[0].__module__}.{current[0].__qualname__}" == \
                f"{cls.__module__}.{cls.__qualname__}":
            table[ARCHITECTURE] = (cls, cfg_cls)
        else:
            warnings.warn(f"SAELens architecture {ARCHITECTURE!r} is already registered by "
                          f"{current[0].__module__}.{current[0].__qualname__}; writesae-plugin's WriteSAE was "
                          "not registered", stacklevel=2)

"""writesae-plugin: WriteSAE (rank-1 matrix-atom SAEs) for the cache writes of recurrent and hybrid LMs.

Importing the package registers the ``"write_sae"`` architecture and the plugin's offline releases with
SAELens (idempotent).
"""

__version__ = "0.1.0"

from .sae import TrainingWriteSAE, WriteSAE, WriteSAEConfig, WriteSAETrainingConfig, register as _register_sae

_register_sae()

from .registry import register_local_release, register_packaged_releases  # noqa: E402

register_packaged_releases()

__all__ = ["WriteSAE", "WriteSAEConfig", "TrainingWriteSAE", "WriteSAETrainingConfig", "register_local_release",
           "__version__"]

"""writesae-plugin: WriteSAE (rank-1 matrix-atom SAEs) for the cache writes of recurrent and hybrid LMs."""

__version__ = "0.1.0"

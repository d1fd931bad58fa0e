"""The shipped demo: a small Qwen3.5 model trained on the Python standard library, its WriteSAE release,
and ``writesae demo``."""

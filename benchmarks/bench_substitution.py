"""Substitution test throughput: firings per second of the batched exact path vs the naive path that
re-runs the full forward per (firing, condition), as a ratio in one run.

Usage: python benchmarks/bench_substitution.py [--length 512] [--contexts 4] [--firings 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import writesae_plugin  # noqa: F401
from writesae_plugin.adapters import hook_model
from writesae_plugin.experiments.substitution import (SubstitutionConfig, run_substitution,
                                                      run_substitution_naive)
from writesae_plugin.sae import WriteSAE, WriteSAEConfig
from writesae_plugin.tiny import build_tiny_qwen35


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--firings", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layer", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = hook_model(build_tiny_qwen35(tempfile.mkdtemp(), n_layers=args.layers))
    cfg_m = model.cfg
    sae = WriteSAE(WriteSAEConfig(d_in=cfg_m.d_k * cfg_m.d_v, d_sae=64, d_k=cfg_m.d_k, d_v=cfg_m.d_v, k=4,
                                  n_heads=cfg_m.n_heads, head=1, site="write", layer=args.layer,
                                  family=cfg_m.family))
    with torch.no_grad():
        sae.enc_key.mul_(50.0)
    tokens = torch.randint(0, cfg_m.d_vocab, (args.contexts, args.length))
    cfg = SubstitutionConfig(max_firings=args.firings, max_per_context=max(1, args.firings // args.contexts))
    t0 = time.perf_counter()
    fast = run_substitution(model, sae, tokens, cfg, progress=False)
    t1 = time.perf_counter()
    naive = run_substitution_naive(model, sae, tokens, cfg)
    t2 = time.perf_counter()
    n = fast.summary["n_firings"]
    err = max(abs(a[k] - b[k]) for a, b in zip(fast.records, naive.records) for k in a if k.startswith("kl"))
    print(f"{args.layers}-layer tiny Qwen3.5, SAE at layer {args.layer}, T={args.length}, {n} firings x "
          f"{len(cfg.conditions)} conditions, {torch.get_num_threads()} threads")
    print(f"  fast: {n / (t1 - t0):7.2f} firings/s   naive: {n / (t2 - t1):7.2f} firings/s   "
          f"ratio {(t2 - t1) / (t1 - t0):.2f}x   max |KL diff| {err:.1e}")


if __name__ == "__main__":
    main()

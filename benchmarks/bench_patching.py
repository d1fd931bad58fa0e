"""Activation patching of writes: the batched, resumed ``patch_writes`` vs the naive loop of one full forward
per patch (``run_with_edits``), and attribution patching (one forward + backward) vs both, as ratios in one
run on the shipped demo model (copy-task pairs from held-out text). Agreement is checked, not assumed.

Usage: python benchmarks/bench_patching.py [--n 4] [--length 32] [--layer 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import writesae_plugin  # noqa: F401
from writesae_plugin.adapters import WriteEdit
from writesae_plugin.circuits import attribute_writes, compare_with_patching, patch_writes
from writesae_plugin.circuits.tasks import copy_task
from writesae_plugin.demo import corpus
from writesae_plugin.demo.run import load_demo_model


def naive(model, pairs, metric, layer):
    p = model.hook_prefix(layer)
    with torch.no_grad():
        _, c = model.run_with_cache(pairs.clean, names_filter=[p + "hook_write_key", p + "hook_write_value"])
        out = torch.zeros(pairs.clean.shape[1], model.cfg.n_heads)
        for t in range(pairs.clean.shape[1]):
            for h in range(model.cfg.n_heads):
                edits = [WriteEdit(layer=layer, pos=t, head=h, key=c[p + "hook_write_key"][b, t, h],
                                   value=c[p + "hook_write_value"][b, t, h], batch=b) for b in range(len(pairs))]
                out[t, h] = float(metric(model.run_with_edits(pairs.corrupted, edits)))
    return out


def timed(fn, repeats):
    times, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_demo_model()
    pairs = copy_task(model.tokenizer, corpus.texts("test"), args.n, args.length, source_pos=8)
    metric = pairs.metric()
    t_fast, fast = timed(lambda: patch_writes(model, pairs.clean, pairs.corrupted, metric, layers=[args.layer],
                                              progress=False), args.repeats)
    t_naive, slow = timed(lambda: naive(model, pairs, metric, args.layer), args.repeats)
    t_atp, est = timed(lambda: attribute_writes(model, pairs.clean, pairs.corrupted, metric, layers=[args.layer]),
                       args.repeats)
    diff = float((fast.scores[0] - slow).abs().max())
    cmp = compare_with_patching(est, fast)
    print(f"demo GDN model, layer {args.layer}, {args.n} pairs x {args.length} tokens, "
          f"{args.length * model.cfg.n_heads} patches, median of {args.repeats}")
    print(f"patch_writes (batched, resumed, no-op patches skipped): {t_fast:.2f} s")
    print(f"naive loop of full forwards: {t_naive:.2f} s  -> speed-up {t_naive / t_fast:.2f}x, max |diff| {diff:.2e}")
    print(f"attribution patching: {t_atp:.2f} s  -> {t_fast / t_atp:.1f}x faster than patch_writes; "
          f"pearson {cmp.get('pearson', float('nan')):.3f} with actual patching (n = {cmp['n']})")


if __name__ == "__main__":
    main()

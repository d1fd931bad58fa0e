"""The dashboard's streaming pass vs a plain forward over the same tokens, as a ratio in one run (issue 16).

The pass (``writesae_plugin.dashboard.compute.streaming_pass``) runs the model up to the SAE's layer, encodes
the head's site with the SAE and updates every atom's statistics; the plain forward is ``model(tokens)`` (all
layers, logits), in the same batches. Repeats alternate the two; medians are reported, with the pass split
into its forward+encode part and its statistics update. The per-atom work after the pass (value sides through
the norms, measured substitution effects) is timed once, for every atom that fired.

Usage: python benchmarks/bench_dashboard.py [--arch qwen3_5|mamba2] [--sae L4.H0.write] [--contexts 32]
       [--length 128] [--repeats 3] [--threads N] [--post]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import writesae_plugin  # noqa: F401
from writesae_plugin.dashboard.compute import (DashboardConfig, atom_factors, compute_dashboard, encode_batch)
from writesae_plugin.dashboard.stats import AtomStats
from writesae_plugin.demo.run import demo_release_dir, held_out_contexts, load_demo_model
from writesae_plugin.registry import register_local_release


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen3_5", choices=["qwen3_5", "mamba2"])
    ap.add_argument("--sae", default=None, help="SAE id in the demo release (default L4.H0.write / L3.H1.write)")
    ap.add_argument("--contexts", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--post", action="store_true", help="also time the per-atom work for every atom that fires")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sae_lens import SAE

    from writesae_plugin.demo.release import RELEASES

    model = load_demo_model(arch=args.arch)
    release = RELEASES[args.arch]
    register_local_release(release, demo_release_dir(arch=args.arch))
    sae_id = args.sae or ("L4.H0.write" if args.arch == "qwen3_5" else "L3.H1.write")
    sae = SAE.from_pretrained(release, sae_id)
    tokens = held_out_contexts(model.tokenizer, args.contexts, args.length)
    cfg = DashboardConfig(batch=args.batch)
    U, _ = atom_factors(sae)
    plain, encode, update = [], [], []
    with torch.no_grad():
        model(tokens[: args.batch])  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for s in range(0, len(tokens), args.batch):
                model(tokens[s:s + args.batch])
            plain.append(time.perf_counter() - t0)
            acc = AtomStats(sae.cfg.d_sae, cfg.stats, state_site=sae.cfg.site == "state")
            enc = upd = 0.0
            for s in range(0, len(tokens), args.batch):
                chunk = tokens[s:s + args.batch]
                t1 = time.perf_counter()
                out = encode_batch(model, sae, chunk, U)
                t2 = time.perf_counter()
                acc.update(out["codes"], chunk, out["key_dot"], out["log_decay"], context_offset=s)
                upd += time.perf_counter() - t2
                enc += t2 - t1
            encode.append(enc)
            update.append(upd)
    p, e, u = statistics.median(plain), statistics.median(encode), statistics.median(update)
    print(f"{args.arch} demo model, SAE {sae_id} ({sae.cfg.d_sae} atoms), {args.contexts} x {args.length} tokens, "
          f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  plain forward {p:.3f} s | pass {e + u:.3f} s (forward to the layer + encode {e:.3f} s, statistics "
          f"update {u:.3f} s) | pass / plain forward = {(e + u) / p:.2f}x")
    if args.post:
        t = time.perf_counter()
        data = compute_dashboard(model, sae, tokens, cfg, progress=False)
        print(f"  full compute_dashboard for the {len(data.atoms)} atoms that fire: {time.perf_counter() - t:.1f} s "
              f"({', '.join(f'{k} {v:.1f}' for k, v in data.timings.items())})")


if __name__ == "__main__":
    main()

"""WriteSAE benchmarks as ratios measured in one run (not timed tests).

1. Bilinear encode of factored writes ``(k, v)`` vs the same encode on materialised ``k v^T`` matrices.
2. One training step (forward + backward + Adam) of the rank-1 WriteSAE on factors vs SAELens' TopK SAE
   with the same d_in = d_k * d_v, d_sae and k on dense inputs: samples per second, and peak memory (max
   RSS of a fresh subprocess per configuration, minus an import-only baseline).

Usage: python benchmarks/bench_sae.py [--d 64] [--d-sae 2048] [--k 32] [--batch 256] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def timeit(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def make(kind, d, d_sae, k):
    import writesae_plugin  # noqa: F401
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    from writesae_plugin.sae import TrainingWriteSAE, WriteSAETrainingConfig

    if kind == "writesae":
        return TrainingWriteSAE(WriteSAETrainingConfig(d_in=d * d, d_sae=d_sae, d_k=d, d_v=d, k=k, site="write",
                                                       input_layout="factors"))
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d * d, d_sae=d_sae, k=k))


def train_step_fn(kind, d, d_sae, k, batch):
    from sae_lens.saes.sae import TrainStepInput

    sae = make(kind, d, d_sae, k)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    kv = torch.randn(batch, 2 * d)
    x = kv if kind == "writesae" else (kv[:, :d, None] * kv[:, None, d:]).reshape(batch, -1)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 10] = True

    def step():
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=1, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def child(kind, d, d_sae, k, batch, steps):
    """Run in a subprocess: peak RSS of `steps` training steps (or of imports only for 'baseline')."""
    if kind != "baseline":
        step = train_step_fn(kind, d, d_sae, k, batch)
        for _ in range(steps):
            step()
    else:
        import writesae_plugin  # noqa: F401
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.d, args.d_sae, args.k, args.batch, 3)
        return
    d, n = args.d, args.d_sae
    # memory first, while this process is still small: a forked child's ru_maxrss starts at the parent's RSS
    mem = {}
    for kind in ("baseline", "writesae", "topk"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--d", str(d), "--d-sae", str(n),
                              "--k", str(args.k), "--batch", str(args.batch)], capture_output=True, text=True,
                             check=True)
        mem[kind] = json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mb"]
    import writesae_plugin  # noqa: F401
    from writesae_plugin.sae import atoms

    torch.manual_seed(0)
    enc_k, enc_v = torch.randn(n, 1, d), torch.randn(n, 1, d)
    k, v = torch.randn(args.batch, d), torch.randn(args.batch, d)
    with torch.no_grad():
        t_fact = timeit(lambda: atoms.bilinear_pre_factored(k, v, enc_k, enc_v), args.repeats)
        t_dense = timeit(lambda: atoms.bilinear_pre(k[:, :, None] * v[:, None, :], enc_k, enc_v), args.repeats)
        err = (atoms.bilinear_pre_factored(k, v, enc_k, enc_v)
               - atoms.bilinear_pre(k[:, :, None] * v[:, None, :], enc_k, enc_v)).abs().max().item()
    t_w = timeit(train_step_fn("writesae", d, n, args.k, args.batch), args.repeats)
    t_t = timeit(train_step_fn("topk", d, n, args.k, args.batch), args.repeats)
    print(f"d_k = d_v = {d}, d_sae = {n}, k = {args.k}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"  bilinear encode: materialised / factored time        {t_dense / t_fact:8.1f}x "
          f"(max |diff| {err:.1e})")
    print(f"  train step samples/s: WriteSAE (factors) {args.batch / t_w:9.0f}, SAELens TopK {args.batch / t_t:9.0f}"
          f"  -> ratio {t_t / t_w:.2f}x")
    print(f"  peak RSS above import baseline: WriteSAE {mem['writesae'] - mem['baseline']:.0f} MB, "
          f"SAELens TopK {mem['topk'] - mem['baseline']:.0f} MB")


if __name__ == "__main__":
    main()

"""WriteSAE training-step benchmark as ratios measured in one run (not timed tests; issue 13).

For each d_k = d_v = d, one training step (``training_forward_pass`` + backward + Adam step + zero_grad) of every
variant is timed as a ratio to

* the **3-GEMM floor**: ``X @ W``, ``G @ W^T``, ``X^T @ G`` with ``X [B, d_in]``, ``W [d_in, n_f]`` (the forward
  encoder and its two backward products of a dense SAE: what any SAE on ``d_in``-dimensional input must pay), and
* **SAELens' TopK SAE** (``TopKTrainingSAE``, its default config, same ``d_in``, ``n_f``, ``k``, dead atoms) on
  the same flattened input.

The floor is re-measured next to every configuration (floor, config, floor, config, ...; median over rounds) and
each ratio is a ratio of those adjacent medians, so slow drifts of the machine's load cancel; ratios to SAELens
are ``(config / floor) / (SAELens / floor)``.

Variants: encoder (bilinear, dense) x decoder (rank-1, rank-2, dense) x activation (TopK, BatchTopK, JumpReLU) on
the state site (dense ``[B, d_in]`` inputs, random matrices); the write site on factors (``[B, d_k + d_v]``);
the write site in the dense layout (``k v^T`` flattened; the same kernels as the state site); and the readable
reference step (``kernels="reference"``) of bilinear+rank-1 for comparison. ``--dead`` of the atoms are marked
dead so aux-k runs (default 10%, as SAELens would after ``dead_feature_window`` steps). JumpReLU thresholds are
set to each atom's ``1 - k / n_f`` quantile on the batch so that about ``k`` codes fire per row, as in a trained
SAE (at its 0.01 initial threshold almost every code fires and the step falls back to the dense GEMMs).

Usage: python benchmarks/bench_sae.py [--d 64 128] [--d-sae 2048] [--k 32] [--batch 256] [--rounds 5]
       [--threads 2] [--also-threads 1] [--dead 0.1] [--quick] [--only TEXT]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

ENCODERS_DECODERS = [("bilinear", 1), ("bilinear", 2), ("bilinear", None), ("dense", 1), ("dense", None)]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def floor_fn(d_in, n, batch):
    X, W, G = torch.randn(batch, d_in), torch.randn(d_in, n), torch.randn(batch, n)

    def run():
        X @ W
        G @ W.T
        X.T @ G

    return run


def write_sae_step(d, n, k, batch, dead, encoder="bilinear", decoder_rank=1, activation="topk", site="state",
                   layout="dense", kernels="fast"):
    from sae_lens.saes.sae import TrainStepInput

    from writesae_plugin.sae import TrainingWriteSAE, WriteSAETrainingConfig

    cfg = WriteSAETrainingConfig(d_in=d * d, d_sae=n, d_k=d, d_v=d, k=k, encoder=encoder, decoder_rank=decoder_rank,
                                 encoder_rank=2 if decoder_rank == 2 else 1, activation=activation, site=site,
                                 input_layout=layout)
    sae = TrainingWriteSAE(cfg)
    sae.kernels = kernels
    if layout == "factors":
        x = torch.randn(batch, 2 * d)
    elif site == "write":
        kv = torch.randn(batch, 2 * d)
        x = (kv[:, :d, None] * kv[:, None, d:]).reshape(batch, -1)
    else:
        x = torch.randn(batch, d * d)
    if activation == "jumprelu":
        with torch.no_grad():
            dense_x = x if layout == "dense" else (x[:, :d, None] * x[:, None, d:]).reshape(batch, -1)
            pre = sae._pre(dense_x.view(batch, d, d))
            sae.log_threshold.copy_(pre.quantile(1 - k / n, dim=0).clamp(min=1e-4).log())
    return _step(sae, x, n, dead, TrainStepInput)


def saelens_topk_step(d, n, k, batch, dead):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d * d, d_sae=n, k=k))
    return _step(sae, torch.randn(batch, d * d), n, dead, TrainStepInput)


def _step(sae, x, n, dead, TrainStepInput):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[: int(round(dead * n))] = True

    def step():
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask,
                                                       n_training_steps=1, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def measure(make, floor, rounds):
    """Median config time and median of the floor times measured between its rounds (seconds)."""
    step = make()
    step()
    step()  # warm-up: Adam state, allocator
    fl, st = [], []
    for _ in range(rounds):
        fl.append(_timed(floor))
        st.append(_timed(step))
    fl.append(_timed(floor))
    del step
    gc.collect()
    return statistics.median(st), statistics.median(fl)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dead", type=float, default=0.1, help="fraction of atoms marked dead (aux-k)")
    ap.add_argument("--quick", action="store_true", help="only bilinear+rank-1 TopK (state), the floor and SAELens")
    ap.add_argument("--only", default=None,
                    help="run only the variants whose label contains this text (SAELens TopK always runs: the "
                         "ratios to it need it), e.g. 'write/factors'")
    ap.add_argument("--also-threads", type=int, nargs="*", default=[1],
                    help="thread counts at which the quick set is repeated after the main run")
    args = ap.parse_args()
    import writesae_plugin  # noqa: F401

    n, k, B, R = args.d_sae, args.k, args.batch, args.rounds
    print(f"n_f = {n}, k = {k}, batch {B}, fp32, {args.dead:.0%} of atoms dead, median of {R} rounds; ratios to "
          f"the adjacent 3-GEMM floor")
    for threads, quick in [(args.threads, args.quick)] + [(t, True) for t in args.also_threads]:
        torch.set_num_threads(threads)
        for d in args.d:
            table(d, n, k, B, R, args.dead, quick, args.only)


def table(d, n, k, B, R, dead, quick, only=None):
    """Time every configuration at d_k = d_v = d and print its ratios."""
    floor = floor_fn(d * d, n, B)
    rows = []

    def run(label, make, rounds=R):
        if only is not None and rows and only not in label:
            return
        t, f = measure(make, floor, rounds)
        rows.append((label, t, f))
        print(f"  [{label:<46}] {t * 1e3:9.1f} ms (floor {f * 1e3:7.1f} ms) {t / f:6.2f}x", flush=True)

    print(f"\nd_k = d_v = {d} (d_in = {d * d}), {torch.get_num_threads()} threads", flush=True)
    run("SAELens TopK (dense, flattened)", lambda: saelens_topk_step(d, n, k, B, dead))
    run("state bilinear+rank-1 topk", lambda: write_sae_step(d, n, k, B, dead))
    run("state bilinear+rank-1 topk, no dead atoms", lambda: write_sae_step(d, n, k, B, 0.0))
    if not quick:
        for act in ("topk", "batchtopk", "jumprelu"):
            for enc, rank in ENCODERS_DECODERS:
                if (enc, rank, act) == ("bilinear", 1, "topk"):
                    continue
                run(f"state {enc}+{'dense' if rank is None else f'rank-{rank}'} {act}",
                    lambda e=enc, r=rank, a=act: write_sae_step(d, n, k, B, dead, e, r, a))
        for enc, rank in ENCODERS_DECODERS:
            run(f"write/factors {enc}+{'dense' if rank is None else f'rank-{rank}'} topk",
                lambda e=enc, r=rank: write_sae_step(d, n, k, B, dead, e, r, "topk", "write", "factors"))
        run("write/dense k v^T bilinear+rank-1 topk",
            lambda: write_sae_step(d, n, k, B, dead, site="write"))
        run("state bilinear+rank-1 topk, reference kernels",
            lambda: write_sae_step(d, n, k, B, dead, kernels="reference"), rounds=max(2, R // 2))
    topk_ratio = rows[0][1] / rows[0][2]
    print(f"\n  summary d = {d}, {torch.get_num_threads()} threads: step / floor, step / SAELens TopK "
          "(lower is faster)")
    for label, t, f in rows:
        r = t / f
        print(f"    {label:<48} {r:6.2f}x floor   {r / topk_ratio:6.2f}x SAELens  "
              f"({topk_ratio / r:5.1f}x faster than SAELens)")


if __name__ == "__main__":
    main()

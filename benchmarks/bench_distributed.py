"""Extraction and many-cell training on 1 and N ranks under torchrun (issue 14), as ratios measured in one run.

Both are launched the same way (``torchrun --standalone --nproc-per-node R``, one thread per rank) on the shipped
demo model (Gated DeltaNet) and a text file cut from the stdlib corpus:

* **extract**: ``writesae extract`` of the write site of ``--layers`` (all heads) for ``--contexts`` contexts;
* **train**: ``writesae train --store ... --parallel cells`` of every cell of those layers from that store.

Reported: wall seconds (median of ``--rounds``, the order of 1 and N alternated), contexts/s and cell-samples/s,
and the speed-up of N ranks over 1. Process start-up (torch + transformers imports, about 5 s a rank) is included:
it is what a user waits for. On the 2-core development box, 2 ranks share 2 cores with everything else running,
so the speed-up there is bounded by the cores, not by the code; on a GPU node each rank has its own device.

Usage: python benchmarks/bench_distributed.py [--ranks 2] [--layers 1,2] [--contexts 64] [--samples 4096]
       [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--layers", default="1,2")
    p.add_argument("--contexts", type=int, default=64)
    p.add_argument("--samples", type=int, default=4096, help="training samples per cell")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    from writesae_plugin.demo import corpus
    from writesae_plugin.demo.run import demo_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    (tmp / "corpus.txt").write_text("\n\n".join(itertools.islice(corpus.texts("train"), 300)))
    model = str(demo_model_dir())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(ranks: int, argv: list[str]) -> float:
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(ranks), "-m", "writesae_plugin.cli", *argv], env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"torchrun failed:\n{r.stderr[-2000:]}")
        return time.perf_counter() - start

    def extract(ranks: int) -> float:
        out = tmp / f"store{ranks}"
        shutil.rmtree(out, ignore_errors=True)
        return torchrun(ranks, ["extract", "--model", model, "--dataset", str(tmp / "corpus.txt"), "--layers",
                                args.layers, "--site", "write", "--contexts", str(args.contexts),
                                "--contexts-per-shard", "8", "--out", str(out)])

    def train(ranks: int) -> float:
        out = tmp / f"cells{ranks}"
        shutil.rmtree(out, ignore_errors=True)
        return torchrun(ranks, ["train", "--store", str(tmp / "store1"), "--layers", args.layers, "--site", "write",
                                "--parallel", "cells", "--d-sae", "256", "--k", "16", "--total-samples",
                                str(args.samples), "--val-contexts", "4", "--out", str(out)])

    times = {(job, r): [] for job in ("extract", "train") for r in (1, args.ranks)}
    for i in range(args.rounds):
        for job, fn in (("extract", extract), ("train", train)):
            order = (1, args.ranks) if i % 2 == 0 else (args.ranks, 1)
            for r in order:
                if job == "train" and not (tmp / "store1" / "manifest.json").exists():
                    extract(1)
                times[(job, r)].append(fn(r))
    n_cells = len(args.layers.split(",")) * 4  # the demo model has 4 value heads
    print(f"demo model, write site of layers {args.layers} (x 4 heads = {n_cells} cells), {args.contexts} contexts "
          f"of 128, {args.samples} samples per cell, 1 thread per rank, {os.cpu_count()} cores, "
          f"{args.rounds} rounds (median)")
    for job, unit, amount in (("extract", "contexts/s", args.contexts),
                              ("train", "cell-samples/s", n_cells * args.samples)):
        one, many = (statistics.median(times[(job, r)]) for r in (1, args.ranks))
        print(f"  {job:8s} 1 rank {one:6.1f} s ({amount / one:8.0f} {unit})   {args.ranks} ranks {many:6.1f} s "
              f"({amount / many:8.0f} {unit})   speed-up {one / many:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

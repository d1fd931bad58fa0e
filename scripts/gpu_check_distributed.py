"""GPU check of distributed extraction and SAE training (issue 14), and the SAE training step at d = 128 on the GPU.
Run on a CUDA machine (about 2-4 minutes on one H200); not part of the CPU test suite (which checks the device
plumbing on the CPU: tests/test_device.py, tests/test_distributed.py). It needs writesae-plugin installed with its
adapters (``pip install -e . --no-deps`` in an environment with this project's torch / sae-lens / transformers):
the torchrun ranks run ``-m writesae_plugin.cli``.

    python scripts/gpu_check_distributed.py --out benchmarks/gpu            # on a GPU machine
    pip install -e . --no-deps -q && python scripts/gpu_check_distributed.py --out "$OUT"  # the device tool
    python scripts/gpu_check_distributed.py --device cpu --quick --out DIR  # dry run on a CPU box (gloo)

Each check prints one line; the record goes to ``OUT/gpu_check_distributed.json`` and a summary to
``OUT/gpu_check_distributed.md``. On the shipped demo model (Gated DeltaNet) and a text file cut from the stdlib
corpus, with R = min(2, GPUs) ranks (2 gloo ranks in the CPU dry run):

* ``extract``: ``torchrun -m writesae_plugin.cli extract --device cuda`` (NCCL; each rank its GPU) vs one CPU
  process: the same shards and token contexts (hashes equal) and the same samples to fp32 rounding;
* ``train_data`` / ``train_cells``: ``torchrun ... train --parallel data|cells --device cuda`` from that store vs
  one CPU process on the same store: every cell trained, the same validation FVU to rounding, saved SAEs'
  cfg.json say ``"device": "cpu"`` and load with ``SAE.load_from_disk`` on the CPU, checkpoints hold CPU tensors;
* ``collectives``: under ``torchrun --nproc-per-node 1`` (one GPU suffices) the process group is joined with
  NCCL and the data-parallel trainer's collectives (gradient and counter all-reduce, BatchTopK all-gather and MIN
  all-reduce of float64 thresholds, barriers) run on the GPU tensors (a one-rank group forced "distributed"),
  giving the plain run's SAEs; every trainer tensor (parameters, Adam, counters, thresholds) is on the GPU;
* ``resume``: a run checkpointed on the GPU continues on the CPU (and one from the CPU on the GPU) to the
  uninterrupted run's SAE, to rounding;
* ``bench_train_d128``: one training step (``training_forward_pass`` + backward + Adam + zero_grad) at
  d_k = d_v = 128 (d_in = 16384), 2048 atoms, k = 32, on the GPU: samples/s and the ratio to the GPU 3-GEMM floor
  (``X @ W``, ``G @ W^T``, ``X^T @ G`` with ``X [B, d_in]``, ``W [d_in, n_f]``: benchmarks/bench_sae.py's floor),
  for batches 256 and 4096, fp32 (TF32 off, torch's default for matmuls); SAELens' TopK SAE alongside; and the
  whole trainer (``train_write_sae`` on the write site's factors, batches from the CPU) in samples/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpu_checks import CheckRecord  # noqa: E402  (scripts/, the script's own folder)

RECORD = CheckRecord()
RESULTS = RECORD.results
RECORD.stub_wandb()
check = RECORD.check


class Run:
    """Settings of one check run (GPU or the CPU dry run)."""

    def __init__(self, args):
        self.device = args.device  # "cuda" or "cpu"
        self.quick = args.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-dist-"))
        self.ranks = min(2, torch.cuda.device_count()) if self.device == "cuda" else 2
        from writesae_plugin.demo import corpus
        from writesae_plugin.demo.run import demo_model_dir

        self.model = str(demo_model_dir())
        self.corpus = self.tmp / "corpus.txt"
        self.corpus.write_text("\n\n".join(itertools.islice(corpus.texts("train"), 200)))
        paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
        if "note_wandb" in RESULTS:  # the ranks import sae_lens too: the same empty stand-in, as a package
            (self.tmp / "stubs" / "wandb").mkdir(parents=True)
            (self.tmp / "stubs" / "wandb" / "__init__.py").write_text("")
            paths.insert(0, str(self.tmp / "stubs"))
        self.env = {**os.environ, "OMP_NUM_THREADS": "1" if self.device == "cpu" else "4",
                    "PYTHONPATH": os.pathsep.join(paths)}
        self.contexts = 48 if self.quick else 320  # ~31 samples a context and head: > --total-samples
        self.train = ["--site", "write", "--d-sae", "64" if self.quick else "256", "--k", "8", "--aux-k", "32",
                      "--total-samples", "1024" if self.quick else "8192", "--batch-size", "128",
                      "--val-contexts", "4", "--val-every", "4", "--context-length", "32", "--lr", "3e-3"]

    def torchrun(self, nproc: int, argv: list[str], script: str | None = None):
        target = ["-m", "writesae_plugin.cli"] if script is None else [script]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(nproc), *target, *argv], cwd=ROOT, env=self.env, capture_output=True, text=True,
                           timeout=480)
        if r.returncode:
            raise RuntimeError(f"torchrun {' '.join(argv[:1])} failed ({r.returncode}):\n{r.stderr[-2500:]}")
        return r


def _shards(store: Path) -> list[tuple]:
    m = json.loads((store / "manifest.json").read_text())
    assert m["complete"], f"{store}: incomplete"
    return m["shards"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


@check("env")
def env_check(run: Run):
    import torch.distributed as dist

    rec = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": run.device, "ranks": run.ranks,
           "gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available()}
    if torch.cuda.is_available():
        rec.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                   nccl_version=str(torch.cuda.nccl.version()))
    import sae_lens
    import transformers

    rec.update(sae_lens=sae_lens.__version__, transformers=transformers.__version__,
               fla_importable=importlib.util.find_spec("fla") is not None,  # HF's GDN then runs fla's kernels
               tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    rec["ok"] = run.device == "cpu" or (torch.cuda.is_available() and dist.is_nccl_available())
    return rec


@check("extract")
def extract_check(run: Run):
    """R ranks on the device vs one CPU process: same shards and contexts, samples equal to fp32 rounding."""
    from safetensors.torch import load_file

    from writesae_plugin.cli import main

    base = ["extract", "--model", run.model, "--dataset", str(run.corpus), "--layers", "1,2",
            "--contexts", str(run.contexts), "--contexts-per-shard", "8", "--forward-batch", "4",
            "--context-length", "32"]
    r = run.torchrun(run.ranks, [*base, "--device", run.device, "--out", str(run.tmp / "store")])
    assert main([*base, "--device", "cpu", "--out", str(run.tmp / "store_cpu")]) == 0
    a, b = _shards(run.tmp / "store"), _shards(run.tmp / "store_cpu")
    assert [s["tokens_sha256"] for s in a] == [s["tokens_sha256"] for s in b], "the ranks read other contexts"
    worst = 0.0
    for sa, sb in zip(a, b):
        ta, tb = load_file(run.tmp / "store" / sa["file"]), load_file(run.tmp / "store_cpu" / sb["file"])
        assert sorted(ta) == sorted(tb)
        for key in ta:
            worst = max(worst, _rel(ta[key].float(), tb[key].float()) if ta[key].is_floating_point()
                        else float(not torch.equal(ta[key], tb[key])))
    ranks = sorted({int(x) for x in re.findall(r"\[rank (\d+)/", r.stderr)})
    bitwise = [s["sha256"] for s in a] == [s["sha256"] for s in b]
    # the GPU's kernels round differently (cuDNN convolutions use TF32 by default): equal to 1e-2 of the largest
    return {"shards": len(a), "ranks_logged": ranks, "bitwise_equal_to_cpu": bitwise, "max_rel_diff": worst,
            "ok": len(a) == len(b) and worst < 1e-2}


def _saved_ok(out: Path) -> dict:
    """Every saved cfg.json says cpu; every SAE loads on the CPU; every trainer_state.pt holds CPU tensors."""
    from sae_lens import SAE

    import writesae_plugin  # noqa: F401

    cfgs = list(out.rglob("cfg.json"))
    devices = {json.loads(p.read_text()).get("device") for p in cfgs}
    for cell in (out / "cells").iterdir():
        if cell.is_dir():
            sae = SAE.load_from_disk(cell, device="cpu")
            assert next(sae.parameters()).device.type == "cpu"
    states = list(out.rglob("trainer_state.pt"))
    leaves = [t for p in states for t in torch.utils._pytree.tree_leaves(torch.load(p, weights_only=True))
              if isinstance(t, torch.Tensor)]
    return {"cfg_json_devices": sorted(map(str, devices)), "checkpoints": len(states),
            "checkpoint_tensor_devices": sorted({t.device.type for t in leaves}),
            "saved_ok": devices == {"cpu"} and all(t.device.type == "cpu" for t in leaves)}


def _train_check(run: Run, mode: str):
    from writesae_plugin.cli import main

    store = run.tmp / "store"
    argv = ["train", "--store", str(store), "--layers", "1,2", "--heads", "0,1", *run.train]
    r = run.torchrun(run.ranks, [*argv, "--parallel", mode, "--device", run.device, "--out",
                                 str(run.tmp / f"train_{mode}")])
    ref = run.tmp / f"train_{mode}_cpu"
    assert main([*argv, "--device", "cpu", "--out", str(ref)]) == 0
    a = json.loads((run.tmp / f"train_{mode}" / "cells" / "release.json").read_text())["cells"]
    b = json.loads((ref / "cells" / "release.json").read_text())["cells"]
    assert sorted(a) == sorted(b) and len(a) == 4, (sorted(a), sorted(b))
    fvu = {c: (round(a[c]["fvu"], 5), round(b[c]["fvu"], 5)) for c in a}
    close = all(abs(x - y) <= 0.05 * y + 0.01 for x, y in fvu.values())
    saved = _saved_ok(run.tmp / f"train_{mode}")
    bars = r.stderr.count("train 4 cells:   0%") if mode == "data" else None
    logged = sorted(set(re.findall(r"\[rank (\d+)/\d+\] training [^\n\r]* on ([\w:]+)", r.stderr)))
    rec = {"fvu_device_vs_cpu": fvu, **saved, "progress_bars": bars, "training_SAE_bar": "Training SAE" in r.stderr,
           "rank_devices_logged": logged}  # only with 2+ ranks (one rank is a plain process)
    rec["ok"] = close and saved["saved_ok"] and not rec["training_SAE_bar"] and bars in (None, 1)
    return rec


@check("train_data")
def train_data_check(run: Run):
    return _train_check(run, "data")


@check("train_cells")
def train_cells_check(run: Run):
    return _train_check(run, "cells")


@check("collectives")
def collectives_check(run: Run):
    out = run.tmp / "collectives"
    run.torchrun(1, ["--worker", "collectives", "--device", run.device, "--store", str(run.tmp / "store"),
                     "--out", str(out), *(["--quick"] if run.quick else [])], script=str(Path(__file__).resolve()))
    return json.loads((out / "result.json").read_text())


def collectives_worker(args) -> None:
    """Under torchrun (one rank): join the group with NCCL (gloo on the CPU), run the data-parallel stacked
    trainer with the collectives on (a one-rank group forced 'distributed') and without, and compare."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from writesae_plugin.cells import CellTraining, store_cells, train_cells_stacked
    from writesae_plugin.distributed import Place
    from writesae_plugin.store import ActivationStore
    from writesae_plugin.train import WriteSAETrainer

    class Forced(Place):
        @property
        def distributed(self) -> bool:  # collectives on, over a group of one
            return True

    device = "cuda:0" if args.device == "cuda" else "cpu"
    if device != "cpu":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device != "cpu" else "gloo")
    trainers = []
    fit = WriteSAETrainer.fit
    WriteSAETrainer.fit = lambda self: trainers.append(self) or fit(self)
    store = ActivationStore(args.store)
    cells = store_cells(store, [1], [0, 1], "write")
    rec = {"backend": dist.get_backend(), "runs": {}}
    off_device: dict = {}
    for activation in ("topk", "batchtopk"):
        t = CellTraining(d_sae=128, k=8, aux_k=32, activation=activation,
                         total_samples=1024 if args.quick else 4096, batch_size=128,
                         val_contexts=4, val_every=4, n_checkpoints=1, resample_every=4, dead_feature_window=2)
        outs = {}
        for name, place in (("forced", Forced(0, 1, 0)), ("plain", None)):
            outs[name] = Path(args.out) / f"{activation}-{name}"
            train_cells_stacked(store, cells, outs[name], t, place=place, device=device, progress=False)
            tr = trainers[-1]
            want = tr.sae.b_enc.device
            tensors = {f"param {n}": p for n, p in tr.sae.named_parameters()}
            tensors.update({f"buffer {n}": b for n, b in tr.sae.named_buffers()})
            for i, st in enumerate(tr.optimizer.state.values()):
                tensors.update({f"adam {i} {k}": v for k, v in st.items() if k != "step"})
            tensors.update(act_freq_scores=tr.act_freq_scores, since_fired=tr.n_forward_passes_since_fired)
            bad = {k: str(v.device) for k, v in tensors.items() if v.device != want}
            if bad or want.type != torch.device(device).type:
                off_device[f"{activation}-{name}"] = {"want": str(want), "bad": bad}
        worst = 0.0
        for cell in cells:
            fa = load_file(outs["forced"] / "runs" / cell.id / "final" / "sae_weights.safetensors")
            fb = load_file(outs["plain"] / "runs" / cell.id / "final" / "sae_weights.safetensors")
            worst = max(worst, *(_rel(fa[k], fb[k]) for k in fa))
        rec["runs"][activation] = {"max_rel_diff_forced_vs_plain": worst}
    rec["off_device"] = off_device
    rec["ok"] = rec["backend"] == ("nccl" if device != "cpu" else "gloo") and not off_device and all(
        r["max_rel_diff_forced_vs_plain"] < 1e-3 for r in rec["runs"].values())
    dist.barrier()
    dist.destroy_process_group()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "result.json").write_text(json.dumps(rec, indent=1))


@check("resume")
def resume_check(run: Run):
    """A run checkpointed on one device resumed on the other ends as the uninterrupted run (to rounding)."""
    from safetensors.torch import load_file

    from writesae_plugin.checkpoints import complete_checkpoints
    from writesae_plugin.cli import main

    argv = ["train", "--store", str(run.tmp / "store"), "--layer", "1", "--head", "0", *run.train]
    other = {"cuda": "cpu", "cpu": "cuda" if run.device == "cuda" else "cpu"}
    rec = {}
    for first in ("cuda", "cpu") if run.device == "cuda" else ("cpu",):
        whole, cut = run.tmp / f"resume_{first}_whole", run.tmp / f"resume_{first}_cut"
        assert main([*argv, "--device", first, "--out", str(whole)]) == 0
        ckpts = complete_checkpoints(whole)
        assert len(ckpts) >= 2, ckpts
        shutil.copytree(whole, cut)
        shutil.rmtree(cut / "final")
        for c in complete_checkpoints(cut)[:-1]:  # newest first: keep the oldest and resume from it
            shutil.rmtree(c)
        then = other[first]
        assert main([*argv, "--device", then, "--resume", "latest", "--out", str(cut)]) == 0
        wa = load_file(whole / "final" / "sae_weights.safetensors")
        wb = load_file(cut / "final" / "sae_weights.safetensors")
        va = json.loads((whole / "validation.jsonl").read_text().splitlines()[-1])["fvu"]
        vb = json.loads((cut / "validation.jsonl").read_text().splitlines()[-1])["fvu"]
        rec[f"{first}->{then}"] = {"max_rel_diff": max(_rel(wb[k], wa[k]) for k in wa), "fvu": [va, vb],
                                   "cfg_device": json.loads((cut / "final" / "cfg.json").read_text())["device"]}
    rec["ok"] = all(r["cfg_device"] == "cpu" and abs(r["fvu"][0] - r["fvu"][1]) <= 0.05 * r["fvu"][0] + 0.01
                    for r in rec.values())
    return rec


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, inner: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / inner


@check("bench_train_d128")
def bench_check(run: Run):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    from writesae_plugin.sae import TrainingWriteSAE, WriteSAETrainingConfig

    device = torch.device("cuda:0" if run.device == "cuda" else "cpu")
    d = 32 if run.quick else 128
    n, k, dead = 2048, 32, 0.1
    batches = (256,) if run.quick else (256, 4096)
    rounds, inner = (3, 2) if run.quick else (7, 10)
    rec = {"d": d, "d_in": d * d, "d_sae": n, "k": k, "dead_fraction": dead, "device": str(device),
           "tf32": bool(torch.backends.cuda.matmul.allow_tf32), "rounds": rounds, "inner": inner, "results": []}

    def make(variant, B):
        torch.manual_seed(0)
        if variant == "saelens_topk":
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d * d, d_sae=n, k=k)).to(device)
            x = torch.randn(B, d * d, device=device)
        else:
            site, layout, act = variant.split("/")
            sae = TrainingWriteSAE(WriteSAETrainingConfig(d_in=d * d, d_sae=n, d_k=d, d_v=d, k=k, activation=act,
                                                          site=site, input_layout=layout)).to(device)
            x = torch.randn(B, 2 * d if layout == "factors" else d * d, device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[: int(round(dead * n))] = True

        def step():
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask,
                                                           n_training_steps=1, is_logging_step=False))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        return step

    def floor(B):
        X, W, G = (torch.randn(B, d * d, device=device), torch.randn(d * d, n, device=device),
                   torch.randn(B, n, device=device))

        def run_floor():
            X @ W
            G @ W.T
            X.T @ G
        return run_floor

    variants = ["state/dense/topk", "state/dense/batchtopk", "write/factors/topk", "write/factors/batchtopk",
                "saelens_topk"]
    for B in batches:
        fl = floor(B)
        for variant in variants:
            step = make(variant, B)
            for _ in range(3):
                step()  # warm-up: Adam state, allocator, cuBLAS handles
            fl()
            st, ft = [], []
            for _ in range(rounds):
                ft.append(_time(fl, device, inner))
                st.append(_time(step, device, inner))
            s, f = statistics.median(st), statistics.median(ft)
            rec["results"].append({"batch": B, "variant": variant, "step_ms": round(s * 1e3, 4),
                                   "floor_ms": round(f * 1e3, 4), "ratio_to_floor": round(s / f, 3),
                                   "samples_per_s": round(B / s)})
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # the whole trainer (SAELens' loop, counters, Adam, scheduler) on the write site's factors, batches from the CPU
    from writesae_plugin.train import train_write_sae

    B = 4096 if not run.quick else 256
    steps = 60 if not run.quick else 6

    class Factors:
        def __init__(self):
            self.g = torch.Generator().manual_seed(0)

        def __iter__(self):
            return self

        def __next__(self):
            return torch.randn(B, 2 * d, generator=self.g)

    cfg = WriteSAETrainingConfig(d_in=d * d, d_sae=n, d_k=d, d_v=d, k=k, site="write", input_layout="factors")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    train_write_sae(cfg, Factors(), run.tmp / "bench_trainer", total_samples=B * steps, batch_size=B,
                    n_checkpoints=0, warmup_steps=2, device=str(device), progress=False)
    _sync(device)
    wall = time.perf_counter() - t0
    rec["trainer"] = {"batch": B, "steps": steps, "seconds": round(wall, 3),
                      "samples_per_s": round(B * steps / wall),
                      "note": "includes SAE construction, the first steps' warm-up and saving final/"}
    return rec


def write_markdown(path: Path) -> None:
    lines = ["# gpu_check_distributed", ""]
    for name, rec in RESULTS.items():
        if isinstance(rec, dict) and "ok" in rec:
            lines.append(f"* **{name}**: {'PASS' if rec['ok'] else 'FAIL'} ({rec.get('seconds', '?')} s)"
                         + (f": {rec['error']}" if "error" in rec else ""))
    bench = RESULTS.get("bench_train_d128", {})
    if bench.get("results"):
        lines += ["", f"Training step at d = {bench['d']} (d_in = {bench['d_in']}), {bench['d_sae']} atoms, "
                      f"k = {bench['k']}, {bench['device']}, TF32 {'on' if bench['tf32'] else 'off'}:", "",
                  "| batch | variant | step ms | 3-GEMM floor ms | ratio | samples/s |", "|---|---|---|---|---|---|"]
        for r in bench["results"]:
            lines.append(f"| {r['batch']} | {r['variant']} | {r['step_ms']} | {r['floor_ms']} | "
                         f"{r['ratio_to_floor']} | {r['samples_per_s']} |")
        if "trainer" in bench:
            t = bench["trainer"]
            lines += ["", f"Whole trainer (write factors, batch {t['batch']}, {t['steps']} steps): "
                          f"{t['samples_per_s']} samples/s ({t['note']})."]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: the check (NCCL); cpu: a dry run of the same steps with gloo")
    p.add_argument("--quick", action="store_true", help="smaller sizes (the CPU dry run)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu"), help="where the JSON and markdown go")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only these checks (env extract train_data train_cells collectives resume "
                        "bench_train_d128; the training checks bring extract)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "collectives":
        collectives_worker(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check_distributed: no CUDA device here; run it on a GPU machine, or --device cpu for a dry run",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    RESULTS["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    checks = {"env": env_check, "extract": extract_check, "train_data": train_data_check,
              "train_cells": train_cells_check, "collectives": collectives_check, "resume": resume_check,
              "bench_train_d128": bench_check}
    only = None if args.only is None else set(args.only)
    if only is not None and only & {"train_data", "train_cells", "collectives", "resume"}:
        only.add("extract")  # they train from its store
    for name, fn in checks.items():
        if only is None or name in only:
            fn(run)
            stem = "gpu_check_distributed" + ("" if args.device == "cuda" else "_cpu_dry_run")
            RECORD.write_json(out / f"{stem}.json")  # after every check
            write_markdown(out / f"{stem}.md")
    shutil.rmtree(run.tmp, ignore_errors=True)
    failed = RECORD.failed()
    print("all checks passed" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""torchrun on CPU with gloo and 2 processes (issue 14): a distributed extraction is the single-process store,
``train --parallel cells`` gives the single process's SAEs, and a rank killed mid-extraction fails the job (the
launcher names the rank) while a resume, with another number of ranks, completes the same store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
EXTRACT = ["--layers", "0,1", "--site", "write", "--contexts", "24", "--contexts-per-shard", "4",
           "--forward-batch", "2", "--context-length", "16"]
TRAIN = ["--site", "write", "--d-sae", "16", "--k", "4", "--aux-k", "8", "--total-samples", "96",
         "--batch-size", "32", "--val-contexts", "2", "--val-every", "2", "--context-length", "16"]


@pytest.fixture(scope="module")
def data(model_and_corpus, tmp_path_factory):
    """The shared tiny model and corpus, and a directory of this module's own for outputs."""
    root = tmp_path_factory.mktemp("dist")
    (root / "model").symlink_to(model_and_corpus / "model")
    (root / "corpus.txt").symlink_to(model_and_corpus / "corpus.txt")
    return root


def torchrun(nproc: int, args: list[str], script: str | None = None, env: dict | None = None):
    """``torchrun --standalone --nproc-per-node nproc`` of ``writesae`` (or ``script``), 1 thread per rank."""
    target = ["-m", "writesae_plugin.cli"] if script is None else [script]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), *target, *args], cwd=ROOT, env=run_env, capture_output=True, text=True,
                          timeout=600)


def shards(store: Path) -> list[tuple]:
    m = json.loads((store / "manifest.json").read_text())
    assert m["complete"] and not list(store.glob("rank-*.json"))
    return [(s["index"], s["first_context"], s["n_contexts"], s["sha256"], s["tokens_sha256"]) for s in m["shards"]]


@pytest.fixture(scope="module")
def single_store(data):
    from writesae_plugin.cli import main

    out = data / "store1"
    assert main(["extract", "--model", str(data / "model"), "--dataset", str(data / "corpus.txt"), *EXTRACT,
                 "--out", str(out)]) == 0
    return out


def test_two_ranks_extract_the_single_process_store(data, single_store):
    out = data / "store2"
    r = torchrun(2, ["extract", "--model", str(data / "model"), "--dataset", str(data / "corpus.txt"), *EXTRACT,
                     "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rank 1/2]" in r.stderr  # logs name the rank
    assert shards(out) == shards(single_store)  # same shards, bit for bit (hashes of the files)
    assert len(shards(out)) == 6


def test_killed_rank_fails_the_job_and_a_resume_with_one_rank_completes_it(data, single_store):
    from writesae_plugin.cli import main

    out = data / "store_killed"
    args = ["extract", "--model", str(data / "model"), "--dataset", str(data / "corpus.txt"), *EXTRACT,
            "--out", str(out)]
    r = torchrun(2, args, script=str(ROOT / "tests" / "dist_fault.py"), env={"WRITESAE_KILL_RANK": "1"})
    assert r.returncode != 0
    # torchrun's failure summary names the rank that died and its exit code
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*3", r.stderr), r.stderr[-3000:]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert main(args) == 0  # resume: one rank this time; complete shards of both ranks are kept
    assert shards(out) == shards(single_store)


def test_parallel_cells_give_the_single_process_saes(data, single_store):
    from writesae_plugin.cli import main

    one, two = data / "cells1", data / "cells2"
    train = ["train", "--store", str(single_store), "--layers", "0,1", *TRAIN]
    assert main([*train, "--out", str(one)]) == 0
    r = torchrun(2, [*train, "--parallel", "cells", "--out", str(two)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training cells ['L0.H1.write', 'L0.H3.write', 'L1.H1.write', 'L1.H3.write']" in r.stderr
    a, b = (json.loads((d / "cells" / "release.json").read_text()) for d in (one, two))
    assert sorted(a["saes"]) == sorted(b["saes"]) and len(a["saes"]) == 8
    assert not list((two / "cells").glob("release.rank*.json")) and not list((two / "cells").glob("*progress*"))
    # one bar (rank 0's) with the job's count over both ranks, and the job's total at the end
    assert "all ranks" in r.stderr and "[rank 0/2] all ranks trained 768 of 768 cell-samples (8 cells x 96)" in r.stderr
    for cell in a["saes"]:
        wa = load_file(one / "cells" / cell / "sae_weights.safetensors")
        wb = load_file(two / "cells" / cell / "sae_weights.safetensors")
        for key in wa:  # the stacked sets differ (8 cells vs 4 per rank): equal up to rounding
            torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-4 * float(wa[key].abs().max()) + 1e-7)
        assert b["cells"][cell]["fvu"] == pytest.approx(a["cells"][cell]["fvu"], rel=1e-4)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_data_parallel_training_gives_the_single_process_saes(data, single_store, activation, monkeypatch):
    """DDP with 2 ranks (each its half of every batch, gradients all-reduced; BatchTopK's selection and threshold
    over both ranks; dead-atom counters and resampling on the global batch) = one process on the same batches."""
    from writesae_plugin.cli import main

    one, two = data / f"dp1-{activation}", data / f"dp2-{activation}"
    train = ["train", "--store", str(single_store), "--layers", "1", "--heads", "0,2", *TRAIN, "--activation",
             activation, "--resample-every", "2", "--dead-feature-window", "1", "--d-sae", "32", "--k", "2"]
    from writesae_plugin.sae import TrainingWriteSAE

    resampled = []
    orig = TrainingWriteSAE.resample_dead_atoms
    monkeypatch.setattr(TrainingWriteSAE, "resample_dead_atoms",
                        lambda self, x, mask: resampled.append(orig(self, x, mask)) or resampled[-1])
    assert main([*train, "--out", str(one)]) == 0
    assert sum(resampled) > 0  # these settings kill and resample atoms (the 2-rank run does the same steps)
    r = torchrun(2, [*train, "--parallel", "data", "--out", str(two)])
    assert r.returncode == 0, r.stderr[-3000:]
    # one progress bar (rank 0's), named for the stage; SAELens' idle "Training SAE" bar on no rank
    assert r.stderr.count("train 2 cells:   0%") == 1 and "Training SAE" not in r.stderr
    a, b = (json.loads((d / "cells" / "release.json").read_text()) for d in (one, two))
    assert sorted(a["saes"]) == sorted(b["saes"]) == ["L1.H0.write", "L1.H2.write"]
    for cell in a["saes"]:
        wa = load_file(one / "cells" / cell / "sae_weights.safetensors")
        wb = load_file(two / "cells" / cell / "sae_weights.safetensors")
        for key in wa:
            off = ~torch.isclose(wb[key], wa[key], rtol=1e-4, atol=1e-4 * float(wa[key].abs().max()) + 1e-7)
            # as in test_cells: BatchTopK's batch-wide selection lets rounding move a few entries
            assert int(off.sum()) <= (0 if activation == "topk" else off.numel() // 8), (cell, key)
        assert b["cells"][cell]["fvu"] == pytest.approx(a["cells"][cell]["fvu"], rel=1e-4)


def test_killed_data_parallel_run_resumes_on_one_rank_to_the_uninterrupted_result(data, single_store):
    """Rank 1 dies after the first checkpoint (written by rank 0 alone, atomically); the job fails, and the run
    continues from that checkpoint in a single process to the SAEs an uninterrupted single process gives."""
    from writesae_plugin.cli import main

    whole, cut = data / "dp-whole", data / "dp-cut"
    train = ["train", "--store", str(single_store), "--layers", "1", "--heads", "1,3", *TRAIN,
             "--total-samples", "192"]
    assert main([*train, "--out", str(whole)]) == 0
    r = torchrun(2, [*train, "--parallel", "data", "--out", str(cut)], script=str(ROOT / "tests" / "dist_fault.py"),
                 env={"WRITESAE_KILL_RANK": "1", "WRITESAE_KILL_AT_SAMPLES": "128"})
    assert r.returncode != 0
    from writesae_plugin.checkpoints import complete_checkpoints

    run_dir = next((cut / "runs").glob("stacked-*"))
    assert [c.name for c in complete_checkpoints(run_dir)] == ["96"]  # after step 3; step 5 never finished
    assert main([*train, "--out", str(cut), "--resume", "latest"]) == 0
    a, b = (json.loads((d / "cells" / "release.json").read_text()) for d in (whole, cut))
    for cell in a["saes"]:
        wa = load_file(whole / "cells" / cell / "sae_weights.safetensors")
        wb = load_file(cut / "cells" / cell / "sae_weights.safetensors")
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-4 * float(wa[key].abs().max()) + 1e-7)
        assert b["cells"][cell]["fvu"] == pytest.approx(a["cells"][cell]["fvu"], rel=1e-4)


def test_parallel_flags_are_checked_before_loading(data, capsys, monkeypatch):
    from writesae_plugin.cli import main

    train = ["train", "--store", str(data), "--layers", "0", *TRAIN, "--out", str(data / "x")]
    assert main([*train, "--parallel", "data"]) == 2  # not under torchrun: nothing would be shared
    assert "launch with torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(train) == 2
    assert "--parallel cells or --parallel data" in capsys.readouterr().err
    assert main([*train[:-2], "--batch-size", "33", "--out", str(data / "x"), "--parallel", "data"]) == 2
    assert "--batch-size 33 is not a multiple of 2" in capsys.readouterr().err
    argv = [*train[:-2], "--out", str(data / "x"), "--parallel", "data"]
    argv[argv.index("--total-samples") + 1] = "97"  # the last, partial batch (1 row) would not split over 2 ranks
    assert main(argv) == 2
    assert "--total-samples 97 is not a multiple of 2" in capsys.readouterr().err


def test_a_store_too_small_for_the_run_is_refused_before_training(single_store, data, capsys):
    from writesae_plugin.cli import main

    args = ["train", "--store", str(single_store), *TRAIN[:-2], "--out", str(data / "small")]
    args[args.index("--total-samples") + 1] = "100000"
    assert main([*args, "--layer", "1", "--head", "0"]) == 2
    assert "fewer than --total-samples 100000" in capsys.readouterr().err
    assert main([*args, "--layers", "1", "--out", str(data / "small2")]) == 2
    assert "fewer than --total-samples 100000" in capsys.readouterr().err
    assert not (data / "small" / "final").exists()


def test_device_flag(data, capsys):
    """``--device``: checked before any loading; ``cuda`` without CUDA is a one-line error; ``cpu`` works."""
    from writesae_plugin.cli import main

    base = ["extract", "--model", str(data / "model"), "--dataset", str(data / "corpus.txt"), *EXTRACT]
    assert main([*base, "--device", "tpu", "--out", str(data / "dev0")]) == 2
    assert "expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda:0", "--out", str(data / "dev1")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main([*base, "--device", "cpu", "--contexts", "4", "--out", str(data / "dev2")]) == 0


def test_rank_progress_sums_every_ranks_published_count(tmp_path):
    """--parallel cells' cross-rank progress: each rank publishes (throttled, atomically) and rank 0 sums what the
    others last published; a rank that has not published counts 0; the files go at the end."""
    from writesae_plugin.distributed import Place, RankProgress

    ranks = [RankProgress(tmp_path, Place(rank=r, world_size=3), total=300, every=3600.0) for r in range(3)]
    assert ranks[0].global_count(fresh=True) == 0
    ranks[0].publish(10)
    ranks[1].base = 100
    ranks[1].publish(5)
    ranks[1].publish(50)  # within the throttle interval: not written
    assert ranks[0].global_count(fresh=True) == 10 + 105
    ranks[1].publish(50, force=True)
    assert ranks[0].global_count() == 115  # cached until the interval passes
    assert ranks[0].global_count(fresh=True) == 160 and ranks[0].postfix() == "160/300"
    ranks[0].remove_files()
    assert list(tmp_path.iterdir()) == []


def test_a_log_line_is_one_write_with_the_rank_on_every_line(monkeypatch):
    """The ranks share torchrun's stderr (unbuffered on a pipe: `print` wrote the text and its newline separately, so
    another rank's line could land between them): a log call, or a command's error line under torchrun, is one
    write of whole lines, each naming its rank; on a terminal it first clears the line a progress bar is on."""
    import io

    from writesae_plugin import cli
    from writesae_plugin.distributed import Place, log

    class Stream(io.StringIO):
        tty = False

        def __init__(self):
            super().__init__()
            self.writes = []

        def write(self, s):
            self.writes.append(s)
            return super().write(s)

        def isatty(self):
            return self.tty

    err = Stream()
    monkeypatch.setattr(sys, "stderr", err)
    log(Place(rank=1, world_size=2), "extracting shards\nsecond line")
    assert err.writes == ["[rank 1/2] extracting shards\n[rank 1/2] second line\n"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cli._err("writesae train: something went wrong")
    assert err.writes[-1] == "[rank 1/2] writesae train: something went wrong\n"
    err.tty = True
    log(Place(rank=0, world_size=2), "done")
    assert err.writes[-1] == "\r\x1b[2K[rank 0/2] done\n"


LOGGER = """
import sys
from writesae_plugin.distributed import Place, log
rank = int(sys.argv[1])
for i in range(1500):
    log(Place(rank=rank, world_size=2), f"line {i} of rank {rank} " + "x" * 60)
"""


def test_two_ranks_logging_at_once_give_whole_lines():
    """Two processes logging to one pipe at the same time (as torchrun's ranks share its stderr): every line that
    comes out is one whole line of one rank, none lost."""
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", LOGGER, str(r)], stderr=write, cwd=ROOT) for r in range(2)]
    os.close(write)
    with os.fdopen(read, "r") as f:
        out = f.read()
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = out.splitlines()
    pattern = re.compile(r"\[rank ([01])/2\] line (\d+) of rank \1 x{60}")
    bad = [ln for ln in lines if not pattern.fullmatch(ln)]
    assert not bad, bad[:3]
    for r in (0, 1):
        assert [int(m.group(2)) for m in map(pattern.fullmatch, lines) if m.group(1) == str(r)] == list(range(1500))

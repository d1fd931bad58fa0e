"""Training checkpoints (issue 12 items 9-11, issue 13 data-stream resume): atomic, validated, self-contained,
resumed exactly (same SAE as an uninterrupted run, each sample seen once), refused when torn or of another run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

import writesae_plugin  # noqa: F401  (registers the architecture)
from conftest import SAFE_VOCAB
from writesae_plugin import checkpoints as ck
from writesae_plugin import train as train_mod
from writesae_plugin.adapters import hook_model
from writesae_plugin.checkpoints import CheckpointError, OutputDirError, resolve_resume, validate_checkpoint
from writesae_plugin.data import ActivationProvider, SiteSpec
from writesae_plugin.sae import TrainingWriteSAE, WriteSAETrainingConfig
from writesae_plugin.train import WriteSAETrainer, evaluate_sae, train_write_sae

LAYER, HEAD, BATCH, STEPS = 1, 2, 32, 24


class Killed(BaseException):
    """Stands for SIGKILL inside the process (nothing after it runs)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import load_tiny

    model = hook_model(load_tiny(tmp_path_factory.mktemp("ckpt_models"), "qwen3_5"))
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, SAFE_VOCAB, (24,), generator=g) for _ in range(48)]
    val_ctx = [torch.randint(0, SAFE_VOCAB, (24,), generator=g) for _ in range(4)]
    return model, contexts, val_ctx


def _spec(site="write", layer=LAYER, head=HEAD):
    return SiteSpec(layer=layer, site=site, heads=[head], positions="all",
                    layout="factors" if site == "write" else "dense")


def _cfg(model, site="write", layer=LAYER, head=HEAD, d_sae=32):
    c = model.cfg
    cfg = WriteSAETrainingConfig(d_in=c.d_k * c.d_v, d_sae=d_sae, d_k=c.d_k, d_v=c.d_v, k=4, site=site, head=head,
                                 n_heads=c.n_heads, family=c.family, layer=layer, aux_k=8,
                                 input_layout="factors" if site == "write" else "dense")
    cfg.metadata.hook_name = model.hook_prefix(layer) + f"hook_{site}"
    return cfg


def _run(setup, out, resume=None, normalize=True, site="write", layer=LAYER, head=HEAD, d_sae=32, n_checkpoints=3,
         total=BATCH * STEPS):
    model, contexts, val_ctx = setup
    torch.manual_seed(0)
    spec = _spec(site, layer, head)
    provider = ActivationProvider(model, iter(contexts), spec, batch_size=BATCH, buffer_batches=4, forward_batch=8,
                                  seed=0, normalize=normalize)
    val = list(ActivationProvider(model, iter(val_ctx), spec, batch_size=BATCH, buffer_batches=2, seed=1))
    sae, hist = train_write_sae(_cfg(model, site, layer, head, d_sae), provider, out, total_samples=total,
                                batch_size=BATCH, lr=3e-3, warmup_steps=2, val_batches=val, val_every=5,
                                n_checkpoints=n_checkpoints, dead_feature_window=3, resume_from=resume)
    return sae, hist, provider


class Stream:
    """Random batches with a saved position (the checkpoint-writing tests need no model)."""

    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def __iter__(self):
        return self

    def __next__(self):
        return torch.randn(BATCH, 64, generator=self.g)

    def state_dict(self):
        return {"buffer": None, "generator": self.g.get_state()}

    def load_state_dict(self, state):
        self.g.set_state(state["generator"])


def _run_synthetic(out, resume=None, total=BATCH * 16, n_checkpoints=3):
    torch.manual_seed(0)
    cfg = WriteSAETrainingConfig(d_in=64, d_sae=32, d_k=8, d_v=8, k=4, site="state", aux_k=8)
    return train_write_sae(cfg, Stream(), out, total_samples=total, batch_size=BATCH, n_checkpoints=n_checkpoints,
                           val_batches=[torch.randn(BATCH, 64)], val_every=5, resume_from=resume)


def _kill_at_step(monkeypatch, n):
    orig = WriteSAETrainer.step

    def step(self, batch):
        if self.n_training_steps == n:
            raise Killed
        return orig(self, batch)

    monkeypatch.setattr(WriteSAETrainer, "step", step)


def _ckpts(out):
    return sorted((p for p in (Path(out) / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    sae, hist, provider = _run(setup, out)
    return out, sae, hist, provider


def test_killed_and_resumed_run_sees_each_sample_once_and_ends_with_the_same_sae(setup, uninterrupted, tmp_path,
                                                                                 monkeypatch):
    out_a, sae_a, hist_a, prov_a = uninterrupted
    out = tmp_path / "b"
    with monkeypatch.context() as m:
        _kill_at_step(m, 15)  # checkpoints after steps 7 and 13 (of 24); killed two steps past the second
        with pytest.raises(Killed):
            _run(setup, out)
    rows = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    last = int(_ckpts(out)[-1].name)
    assert any(r["samples"] > last for r in rows)  # the killed run logged past its last checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae_b, hist_b, prov_b = _run(setup, out, resume="latest")
    assert not [w for w in caught if "torn" in str(w.message)]  # nothing torn to skip here
    # the resumed stream skipped what the checkpoint consumed and continued: same total, each sample once
    assert prov_b.contexts_consumed == prov_a.contexts_consumed and prov_b.samples_seen == prov_a.samples_seen
    for name, p in sae_a.state_dict().items():
        assert torch.allclose(p, sae_b.state_dict()[name], rtol=1e-5, atol=1e-6), name
    # the log was cut at the checkpoint and continued: the same rows as the uninterrupted run
    rows_b = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    rows_a = [json.loads(line) for line in (out_a / "validation.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples"]) for r in rows_b] == [(r["step"], r["samples"]) for r in rows_a]
    assert all(abs(x["fvu"] - y["fvu"]) < 1e-5 for x, y in zip(rows_a, rows_b))
    assert [int(p.name) for p in _ckpts(out)] == [int(p.name) for p in _ckpts(out_a)]


def test_every_checkpoint_is_a_correct_sae_in_real_units(setup, uninterrupted):
    out, sae_final, hist, _ = uninterrupted
    model, contexts, val_ctx = setup
    k_v = torch.cat(list(ActivationProvider(model, iter(val_ctx), _spec(), batch_size=BATCH, buffer_batches=2,
                                            seed=1)))
    dk = model.cfg.d_k
    X = (k_v[:, :dk, None] * k_v[:, None, dk:]).reshape(k_v.shape[0], -1)  # the site's real units
    for ckpt in _ckpts(out):
        sae = SAE.load_from_disk(ckpt)
        scale = json.loads((ckpt / "activation_scaler.json").read_text())["scaling_factor"]
        assert scale is not None and abs(scale - 1) > 0.1  # the test means something: inputs were rescaled
        assert sae.cfg.normalize_activations == "none" and sae.cfg.metadata.input_scale_folded == pytest.approx(scale)
        # what the final SAE would be at this step: the training SAE on scaled inputs, unit atoms, scaled back
        tsae = TrainingWriteSAE.load_from_disk(ckpt / "training_sae")
        tsae.normalize_decoder()
        with torch.no_grad():
            want = tsae.decode(tsae.encode(X * scale)) / scale
            got = sae.decode(sae.encode(X))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        fvu = ((got - X).pow(2).sum() / (X - X.mean(0)).pow(2).sum()).item()
        # the validation metric of the training SAE at this step (scaled units) is the checkpoint's real-unit FVU
        assert fvu == pytest.approx(evaluate_sae(tsae, [k_v], "factors", scale).fvu, rel=1e-3) and fvu < 1.5
    final = SAE.load_from_disk(out / "final")
    with torch.no_grad():
        assert torch.allclose(final.decode(final.encode(X)), sae_final.decode(sae_final.encode(X)), atol=1e-6)


def test_resume_restores_the_scale_and_refuses_another_run(setup, uninterrupted, tmp_path, monkeypatch):
    out_a = uninterrupted[0]
    ckpt = _ckpts(out_a)[0]
    scale = json.loads((ckpt / "activation_scaler.json").read_text())["scaling_factor"]
    for kw, key in ((dict(layer=2), "layer"), (dict(head=1), "head"), (dict(site="state"), "site"),
                    (dict(normalize=False), "normalize"), (dict(d_sae=16), "d_sae"),
                    (dict(total=BATCH * 20), "total_samples")):
        with pytest.raises(CheckpointError, match=f"different run.*{key}: checkpoint") as e:
            _run(setup, tmp_path / f"x{key}", resume=ckpt, **kw)
        assert "\n" not in str(e.value)
    # another model (same shapes, other weights) is refused too
    model, contexts, val_ctx = setup
    other = hook_model(type(model.hf_model)(model.hf_model.config).eval())
    with pytest.raises(CheckpointError, match="model: checkpoint"):
        _run((other, contexts, val_ctx), tmp_path / "other_model", resume=ckpt)
    # the scale comes from the checkpoint, never re-estimated from the data
    monkeypatch.setattr(ActivationProvider, "matrix_norms", lambda *a: pytest.fail("scale re-estimated on resume"))
    sae, hist, prov = _run(setup, tmp_path / "resumed", resume=ckpt)
    assert prov.scale == scale


def _torn_copies(out):
    """Newer torn checkpoints beside the complete ones, one per way a kill can leave them."""
    src = _ckpts(out)[-1]
    n = int(src.name)

    def copy(i):
        dst = out / "checkpoints" / str(n + i)
        shutil.copytree(src, dst)
        return dst

    (out / "checkpoints" / str(n + 1)).mkdir()  # empty dir
    (copy(2) / "trainer_state.pt").unlink()  # weights without trainer state
    (copy(3) / "activation_scaler.json").unlink()  # trainer state without the scaler
    (copy(4) / "manifest.json").unlink()  # killed before the manifest
    w = copy(5) / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])  # truncated weights (full disk)
    (copy(6) / "run.json").write_text("{")  # torn json (manifest also disagrees)
    return src, n


def test_resume_latest_falls_back_past_torn_checkpoints_and_a_torn_path_is_a_clear_error(setup, uninterrupted,
                                                                                        tmp_path):
    out = tmp_path / "torn"
    shutil.copytree(uninterrupted[0], out)
    src, n = _torn_copies(out)
    with pytest.warns(UserWarning, match="skipping 6 newer torn"):
        assert resolve_resume("latest", out) == src
    reasons = {1: "no manifest.json", 2: "trainer_state.pt", 3: "activation_scaler.json", 4: "no manifest.json",
               5: "sae_weights.safetensors does not match", 6: "run.json does not match"}
    for i, why in reasons.items():
        with pytest.raises(CheckpointError, match=why) as e:
            resolve_resume(out / "checkpoints" / str(n + i))
        assert "\n" not in str(e.value)
    # every checkpoint but the torn ones loads; the torn are never resumed into a run
    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        _run_synthetic(tmp_path / "y", resume=out / "checkpoints" / str(n + 2))
    empty = tmp_path / "empty"
    (empty / "checkpoints" / "5").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume("latest", empty)


STAGES = [
    ("inference weights", TrainingWriteSAE, "save_inference_model"),
    ("training weights", TrainingWriteSAE, "save_model"),
    ("sparsity", train_mod, "save_file"),
    ("trainer state", WriteSAETrainer, "save_trainer_state"),
    ("scaler", train_mod.ActivationScaler, "save"),
    ("manifest", train_mod, "write_manifest"),
    ("rename", ck.os, "replace"),
    ("fsync", ck.os, "fsync"),
]


@pytest.mark.parametrize("stage", [s[0] for s in STAGES])
def test_a_failed_or_killed_checkpoint_write_leaves_nothing_torn(tmp_path, monkeypatch, stage):
    """Full disk (ENOSPC) at each stage of the second checkpoint: a clear error, no torn or temporary directory,
    the first checkpoint intact; ``--resume latest`` continues from it."""
    _, owner, name = next(s for s in STAGES if s[0] == stage)
    orig = getattr(owner, name)
    calls = {"ckpt": 0}
    orig_save = WriteSAETrainer.save_checkpoint

    def counting_save(self, *a, **kw):
        calls["ckpt"] += 1
        return orig_save(self, *a, **kw)

    def failing(*a, **kw):
        if calls["ckpt"] >= 2:
            raise OSError(28, "No space left on device")
        return orig(*a, **kw)

    monkeypatch.setattr(WriteSAETrainer, "save_checkpoint", counting_save)
    monkeypatch.setattr(owner, name, failing)
    out = tmp_path / "full"
    with pytest.raises(OutputDirError, match="writing checkpoint .* failed .*No space left"):
        _run_synthetic(out)
    monkeypatch.undo()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(names) == 1 and names[0].isdigit(), names  # only the first; no .tmp-*, no torn second
    validate_checkpoint(out / "checkpoints" / names[0])
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    _run_synthetic(out, resume="latest")
    assert (out / "final" / "cfg.json").is_file() and len(ck.complete_checkpoints(out)) == 3


def test_output_dirs_are_checked_before_training(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "checkpoints").write_text("")
    with pytest.raises(OutputDirError, match="checkpoints .* not a directory"):
        _run_synthetic(tmp_path / "a")
    (tmp_path / "b" / "final").mkdir(parents=True)
    shutil.rmtree(tmp_path / "b" / "final")
    (tmp_path / "b" / "final").write_text("")
    with pytest.raises(OutputDirError, match="final .* not a directory"):
        _run_synthetic(tmp_path / "b")

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ck.tempfile, "NamedTemporaryFile", denied)
    started = []
    monkeypatch.setattr(WriteSAETrainer, "fit", lambda self: started.append(1))
    with pytest.raises(OutputDirError, match="not writable .*Permission denied"):
        _run_synthetic(tmp_path / "c")
    assert not started
    monkeypatch.undo()
    monkeypatch.setattr(train_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(OutputDirError, match="MB are needed .* MB are free"):
        _run_synthetic(tmp_path / "d")


def test_fresh_run_refuses_an_earlier_runs_checkpoints(setup, uninterrupted, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(uninterrupted[0], out)
    with pytest.raises(CheckpointError, match="already holds 3 checkpoint.*--resume latest"):
        _run_synthetic(out)


def test_cli_checkpoint_errors_are_one_line_and_come_before_loading_the_model(uninterrupted, tmp_path, monkeypatch,
                                                                               capsys):
    from writesae_plugin import cli

    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("model loaded before the output checks"))
    out = tmp_path / "torn"
    shutil.copytree(uninterrupted[0], out)
    src, n = _torn_copies(out)
    data = tmp_path / "data.txt"  # the dataset is checked first (non-empty UTF-8); it is never read here
    data.write_text("some text\n", encoding="utf-8")
    base = ["train", "--layer", "1", "--head", "2", "--site", "write", "--dataset", str(data), "--out", str(out)]
    cases = [
        (["--resume", str(out / "checkpoints" / str(n + 2))], "incomplete .*trainer_state.pt"),
        (["--resume", "latest", "--out", str(tmp_path / "none")], "no complete checkpoint"),
        (["--resume", "latest", "--layer", "2"], "different run .*layer: checkpoint 1, this run 2"),
        (["--out", str(out)], "already holds"),
    ]
    for extra, msg in cases:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("writesae train:") and "\n" not in err, err
        import re

        assert re.search(msg, err), err
    (tmp_path / "file").write_text("")
    assert cli.main(base[:-1] + [str(tmp_path / "file" / "sub")]) == 2
    assert "writesae train:" in capsys.readouterr().err


SIGKILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    import writesae_plugin
    from writesae_plugin import checkpoints as ck
    from writesae_plugin.sae import WriteSAETrainingConfig
    from writesae_plugin.train import train_write_sae, WriteSAETrainer

    out, kill_at = sys.argv[1], int(sys.argv[2])

    class Stream:  # a provider of random batches with a saved position
        def __init__(self):
            self.g, self.n = torch.Generator().manual_seed(0), 0
        def __iter__(self):
            return self
        def __next__(self):
            self.n += 1
            return torch.randn(32, 64, generator=self.g)
        def state_dict(self):
            return {"n": self.n, "buffer": None, "generator": self.g.get_state()}
        def load_state_dict(self, s):
            self.n = s["n"]; self.g.set_state(s["generator"])

    orig, calls = ck.os.fsync, [0]
    def fsync(fd):
        if WriteSAETrainer._saving >= 2:  # inside the second checkpoint's write
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return orig(fd)
    ck.os.fsync = fsync
    WriteSAETrainer._saving = 0
    save = WriteSAETrainer.save_checkpoint
    def counted(self, *a, **k):
        WriteSAETrainer._saving += 1
        return save(self, *a, **k)
    WriteSAETrainer.save_checkpoint = counted
    torch.manual_seed(0)
    cfg = WriteSAETrainingConfig(d_in=64, d_sae=32, d_k=8, d_v=8, k=4, site="state", aux_k=8)
    resume = "latest" if kill_at == 0 else None
    train_write_sae(cfg, Stream(), out, total_samples=32 * 12, batch_size=32, n_checkpoints=3, resume_from=resume)
""")


def test_sigkill_while_writing_a_checkpoint(tmp_path):
    """A real SIGKILL in the middle of the second checkpoint (at its 3rd fsync): the first checkpoint is the
    newest complete one and the run resumes from it."""
    script = tmp_path / "run.py"
    script.write_text(SIGKILL_SCRIPT)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run([sys.executable, str(script), str(out), "3"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len([n for n in left if n.isdigit()]) == 1 and any(n.startswith(".tmp-") for n in left), left
    first = out / "checkpoints" / next(n for n in left if n.isdigit())
    assert resolve_resume("latest", out) == first
    r = subprocess.run([sys.executable, str(script), str(out), "0"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "final" / "cfg.json").is_file()
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp-")]  # stale temporary removed
    assert len(ck.complete_checkpoints(out)) == 3


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    """mkstemp creates 0600 files; an atomically written checkpoint, store shard or shipped SAE must be as readable
    as a file written with open(), i.e. 0666 minus the umask (shared clusters, package data)."""
    old = os.umask(0o027)
    try:
        ck.atomic_write_bytes(tmp_path / "a.bin", b"x")
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777
    assert os.umask(old) == old  # the process's umask is left as it was

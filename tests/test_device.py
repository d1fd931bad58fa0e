"""SAE training on a chosen device (issue 14): every tensor of a training step is made on the parameters' device,
the trainers' state (parameters, Adam, dead-atom counters, BatchTopK thresholds) lives there, ``--device`` reaches
every training path, and what is saved loads on a CPU-only machine.

No GPU here, so the device checks are made so that a mistake shows on the CPU:

* a factory call (``torch.zeros``, ``arange``, ...) without ``device=`` in the training code would, on a GPU, put
  a tensor on the CPU. :func:`stray_factories` redirects such calls made from the plugin or SAELens to the ``meta``
  device and records them, so the forward and the backward (custom autograd functions included) of every step is
  checked; a test shows the guard catches one.
* the plumbing uses ``cpu:0``, a device string distinct from the default ``"cpu"``, so a path that drops the device
  (falling back to ``"cpu"``) is seen.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainStepInput

import writesae_plugin  # noqa: F401  (registers the architecture)
from writesae_plugin.sae import TrainingWriteSAE, WriteSAETrainingConfig
from writesae_plugin.sae.stacked import StackedTrainingWriteSAE

FACTORIES = ("zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "randn", "rand", "randint",
             "randperm", "eye", "linspace", "logspace", "normal")
WATCHED = tuple(str(Path(m.__file__).parent) for m in (writesae_plugin, sys.modules["sae_lens"]))
_PKG = Path(writesae_plugin.__file__).parent
# the training code (not the data providers, whose buffers live on the CPU by design)
TRAINING = (str(_PKG / "sae"), str(_PKG / "train.py"), str(_PKG / "cells.py"), WATCHED[1])


@contextlib.contextmanager
def stray_factories(watched: tuple[str, ...] = WATCHED):
    """Factory calls without ``device=`` made from files under ``watched``: recorded (``file:line name``) and
    placed on the ``meta`` device (so their use would fail too). Calls from elsewhere (torch's own Adam keeps its
    step count on the CPU by design) are left alone. Patches the ``torch`` module's functions, so it also sees
    calls inside autograd backward (which torch's device context managers do not reach)."""
    found: list[str] = []
    originals = {name: getattr(torch, name) for name in FACTORIES}

    def wrap(name, fn):
        def factory(*args, **kwargs):
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if kwargs.get("device") is None and where.startswith(watched):
                found.append(f"{where}:{frame.f_lineno} torch.{name}")
                kwargs["device"] = "meta"
            return fn(*args, **kwargs)
        return factory

    for name, fn in originals.items():
        setattr(torch, name, wrap(name, fn))
    try:
        yield found
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


class _Stray(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2 + torch.zeros(g.shape[0])  # no device: on a GPU this would be a CPU tensor


def test_the_guard_catches_a_tensor_made_without_a_device():
    x = torch.randn(3, requires_grad=True)
    here = (str(Path(__file__).parent),)
    with stray_factories(here) as found:
        y = _Stray.apply(x).sum()
        assert found == []
        with pytest.raises((RuntimeError, NotImplementedError)):  # a meta tensor meets a CPU one
            y.backward()
    assert len(found) == 1 and found[0].endswith("torch.zeros")
    with stray_factories(here) as found:
        torch.zeros(2, device=x.device)
        torch.arange(3)
    assert len(found) == 1 and found[0].endswith("torch.arange")


def _sae(layout: str, activation: str, encoder: str = "bilinear", rank: int | None = 1, head: int = 0):
    torch.manual_seed(head)
    cfg = WriteSAETrainingConfig(d_in=48, d_sae=32, d_k=8, d_v=6, k=3, activation=activation, encoder=encoder,
                                 decoder_rank=rank, site="write" if layout == "factors" else "state",
                                 input_layout=layout, aux_k=6, resample_every=5, head=head, n_heads=3)
    sae = TrainingWriteSAE(cfg)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    return sae


@pytest.mark.parametrize("layout", ["dense", "factors"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("encoder, rank", [("bilinear", 1), ("dense", None), ("bilinear", 2)])
def test_every_tensor_of_a_training_step_is_made_on_the_parameters_device(layout, activation, encoder, rank):
    """Forward, backward, aux-k on dead atoms, resampling, BatchTopK's threshold update: no factory call of the
    step lacks a device."""
    sae = _sae(layout, activation, encoder, rank)
    x = torch.randn(16, 14 if layout == "factors" else 48)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:9] = True  # more dead atoms than aux_k
    for step in (1, 5):  # step 5 resamples the dead atoms
        with stray_factories() as found:
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, dead_neuron_mask=dead, coefficients={},
                                                           n_training_steps=step, is_logging_step=step == 1))
            out.loss.backward()
        assert found == [], found
        assert "auxiliary_reconstruction_loss" in out.losses
        assert (out.metrics.get("resampled_atoms") is not None) == (step == 5)


@pytest.mark.parametrize("layout", ["dense", "factors"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_every_tensor_of_a_stacked_step_is_made_on_the_parameters_device(layout, activation):
    stacked = StackedTrainingWriteSAE([_sae(layout, activation, head=c) for c in range(3)])
    x = torch.randn(16, 3, 14 if layout == "factors" else 48)
    dead = torch.zeros(3, 32, dtype=torch.bool)
    dead[0, :5] = True
    dead[2, 3:20] = True
    for step in (1, 5):
        with stray_factories() as found:
            out = stacked.training_forward_pass(TrainStepInput(sae_in=x, dead_neuron_mask=dead.flatten(),
                                                               coefficients={}, n_training_steps=step,
                                                               is_logging_step=False))
            out.loss.backward()
            stacked.cell(1)  # a cell as its own SAE (validation, export)
        assert found == [], found
        assert (out.metrics.get("resampled_atoms") is not None) == (step == 5)


# ------------------------------------------------------------------------------------------------ the trainers
def trainer_tensors(trainer) -> dict[str, torch.Tensor]:
    """Every tensor a trainer steps with: parameters, Adam's moments, dead-atom counters, BatchTopK thresholds."""
    out = {f"param {n}": p for n, p in trainer.sae.named_parameters()}
    out.update({f"buffer {n}": b for n, b in trainer.sae.named_buffers()})
    for i, state in enumerate(trainer.optimizer.state.values()):
        out.update({f"adam {i} {k}": v for k, v in state.items() if k != "step"})  # torch keeps step on the CPU
    out["act_freq_scores"] = trainer.act_freq_scores
    out["n_forward_passes_since_fired"] = trainer.n_forward_passes_since_fired
    return out


class Batches:
    """Random factor batches ``[N, d_k + d_v]`` (a provider without a saved position)."""

    def __init__(self, n: int, d: int, seed: int = 0):
        self.g, self.n, self.d = torch.Generator().manual_seed(seed), n, d

    def __iter__(self):
        return self

    def __next__(self):
        return torch.randn(self.n, self.d, generator=self.g)


@pytest.fixture
def spy(monkeypatch):
    """The trainers that ran (``WriteSAETrainer.fit``, which the stacked trainer inherits)."""
    from writesae_plugin.train import WriteSAETrainer

    trainers = []
    fit = WriteSAETrainer.fit
    monkeypatch.setattr(WriteSAETrainer, "fit", lambda self: trainers.append(self) or fit(self))
    return trainers


def test_a_trainer_steps_on_its_device_and_saves_device_independently(tmp_path, spy):
    """``train_write_sae(device=...)``: the device (``cpu:0``, distinct from the default) reaches the trainer;
    every state tensor sits on the parameters' device; no factory call of the whole run (steps, validation,
    checkpoints) lacks a device; checkpoints hold CPU tensors and cfg.json files say ``cpu``; the checkpoint
    resumes into the run's end state."""
    from writesae_plugin.checkpoints import complete_checkpoints
    from writesae_plugin.train import train_write_sae

    cfg = WriteSAETrainingConfig(d_in=48, d_sae=32, d_k=8, d_v=6, k=3, activation="batchtopk", site="write",
                                 input_layout="factors", aux_k=6, resample_every=3)
    val = [torch.randn(16, 14, generator=torch.Generator().manual_seed(9))]
    kw = dict(total_samples=160, batch_size=16, val_batches=val, val_every=4, n_checkpoints=1,
              dead_feature_window=2, device="cpu:0")
    torch.manual_seed(0)
    with stray_factories() as found:
        sae, history = train_write_sae(copy.deepcopy(cfg), Batches(16, 14), tmp_path / "a", **kw)
    assert found == [], found
    (trainer,) = spy
    assert trainer.cfg.device == "cpu:0" and str(trainer.sae.device) == "cpu:0"
    assert trainer.sae.cfg.device == sae.cfg.device == "cpu:0"  # saving wrote "cpu" and left the SAE's own cfg
    device = trainer.sae.b_enc.device
    tensors = trainer_tensors(trainer)
    assert {"buffer topk_threshold", "adam 0 exp_avg", "act_freq_scores"} <= set(tensors)
    assert {name: t.device for name, t in tensors.items() if t.device != device} == {}
    (ckpt,) = complete_checkpoints(tmp_path / "a")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # no map_location: as saved
    leaves = [t for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]
    assert leaves and all(t.device.type == "cpu" for t in leaves)
    for d in (tmp_path / "a" / "final", ckpt, ckpt / "training_sae"):
        assert json.loads((d / "cfg.json").read_text())["device"] == "cpu", d
    assert SAE.load_from_disk(tmp_path / "a" / "final").cfg.device == "cpu"
    # resumed from the checkpoint (on the default device): the uninterrupted run's SAE
    torch.manual_seed(0)
    resumed, _ = train_write_sae(copy.deepcopy(cfg), Batches(16, 14), tmp_path / "a", resume_from="latest",
                                 **{**kw, "device": "cpu"})
    for name, p in sae.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], p, msg=name)


# ------------------------------------------------------------------------------------------------ the CLI
SMALL = ["--site", "write", "--d-sae", "16", "--k", "4", "--aux-k", "8", "--total-samples", "64",
         "--batch-size", "32", "--val-contexts", "2", "--val-every", "2", "--context-length", "16"]


@pytest.fixture(scope="module")
def store(model_and_corpus, tmp_path_factory):
    from writesae_plugin.cli import main

    out = tmp_path_factory.mktemp("device") / "store"
    assert main(["extract", "--model", str(model_and_corpus / "model"), "--dataset",
                 str(model_and_corpus / "corpus.txt"), "--layers", "1", "--site", "write", "--contexts", "12",
                 "--context-length", "16", "--device", "cpu", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("argv", [
    ["--store", "{store}", "--layer", "1", "--head", "0"],  # one cell from a store
    ["--model", "{model}", "--dataset", "{corpus}", "--layer", "1", "--head", "0"],  # one cell, streaming
    ["--store", "{store}", "--layers", "1", "--heads", "0,2"],  # cells stacked
    ["--store", "{store}", "--layers", "1", "--heads", "3"],  # a cell alone (train_cell)
], ids=["store", "streaming", "stacked", "cell"])
def test_device_reaches_every_training_path(argv, store, model_and_corpus, tmp_path, spy, monkeypatch):
    """What ``--device`` resolves to (here ``cpu:0``, which no default gives) is where every trainer steps, and
    no factory call of the training code (the SAE, the trainers, SAELens) lacks a device on any path."""
    import writesae_plugin.cli as cli

    monkeypatch.setattr(cli, "resolve_device", lambda spec: "cpu:0")
    paths = {"store": store, "model": model_and_corpus / "model", "corpus": model_and_corpus / "corpus.txt"}
    argv = [a.format(**paths) for a in argv]
    with stray_factories(TRAINING) as found:
        assert cli.main(["train", *argv, *SMALL, "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert found == [], found
    assert spy
    for trainer in spy:
        assert trainer.cfg.device == "cpu:0" and str(trainer.sae.device) == "cpu:0"
        device = trainer.sae.b_enc.device
        assert {name: t.device for name, t in trainer_tensors(trainer).items() if t.device != device} == {}
    saved = list((tmp_path / "out").rglob("cfg.json"))
    assert saved and all(json.loads(p.read_text())["device"] == "cpu" for p in saved)


def test_device_resolution(monkeypatch):
    """auto / cuda are ``cuda:LOCAL_RANK`` on a GPU node; a GPU index that does not exist, or one GPU for every
    rank of a node, is a one-line error (CUDA faked: these are the rules, not the hardware)."""
    from writesae_plugin.cli import UsageError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert [resolve_device(s) for s in ("auto", "cuda", "cuda:1", "cpu")] == ["cuda:0", "cuda:0", "cuda:1", "cpu"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_device("auto") == resolve_device("cuda") == "cuda:1"
    with pytest.raises(UsageError, match="each rank takes GPU LOCAL_RANK; use --device cuda"):
        resolve_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(UsageError, match=r"GPU 2 does not exist \(2 visible: cuda:0..cuda:1\); run at most"):
        resolve_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(UsageError, match="GPU 5 does not exist"):
        resolve_device("cuda:5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"


def test_cuda_without_a_gpu_is_refused_before_loading(store, tmp_path, capsys, monkeypatch):
    import writesae_plugin.cli as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr("writesae_plugin.store.ActivationStore.__init__", lambda *a, **k: pytest.fail("opened"))
    for argv in (["--layer", "1", "--head", "0"], ["--layers", "1"]):
        assert cli.main(["train", "--store", str(store), *argv, *SMALL, "--device", "cuda",
                         "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--device cuda: this torch has no CUDA device; use --device cpu" in err


def test_data_parallel_branches_make_every_tensor_on_the_parameters_device(store, tmp_path, monkeypatch):
    """The data-parallel step's collectives (gradient and counter all-reduce, BatchTopK's all-gather and MIN
    all-reduce of the thresholds, barriers), run in-process on a one-rank gloo group forced "distributed": no
    factory call lacks a device, and the SAEs are the plain run's, bit for bit (a one-rank reduction is the
    identity). test_distributed holds 2 ranks equal to one process."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from writesae_plugin.cells import CellTraining, store_cells, train_cells_stacked
    from writesae_plugin.distributed import Place
    from writesae_plugin.store import ActivationStore

    class OneRankGroup(Place):
        @property
        def distributed(self) -> bool:
            return True

    s = ActivationStore(store)
    cells = store_cells(s, [1], [0, 2], "write")
    t = CellTraining(d_sae=32, k=2, aux_k=8, activation="batchtopk", total_samples=128, batch_size=32,
                     val_contexts=2, val_every=2, n_checkpoints=1, resample_every=2, dead_feature_window=1)
    calls = {"all_reduce": 0, "all_gather": 0}
    for name in calls:
        fn = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _fn=fn, _name=name, **k: calls.__setitem__(
            _name, calls[_name] + 1) or _fn(*a, **k))
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with stray_factories(TRAINING) as found:
            train_cells_stacked(s, cells, tmp_path / "dp", t, place=OneRankGroup(0, 1, 0), progress=False)
    finally:
        dist.destroy_process_group()
    assert found == [], found
    assert calls["all_gather"] > 0 and calls["all_reduce"] > 0, calls  # the collectives ran
    train_cells_stacked(s, cells, tmp_path / "plain", t, progress=False)
    for cell in cells:
        a, b = (load_file(tmp_path / d / "runs" / cell.id / "final" / "sae_weights.safetensors")
                for d in ("dp", "plain"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), cell.id

"""Activation store (issue 13): `writesae extract` -> `writesae train --store` gives the SAE streaming gives;
extraction resumes after a kill with the same shards; torn shards are found and redone; a killed store-backed
training resumes seeing each sample once; mismatched stores and bad cells are refused with clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from sae_lens import SAE

import writesae_plugin  # noqa: F401  (registers the architecture)
from conftest import SAFE_VOCAB, load_tiny
from writesae_plugin import data as data_mod
from writesae_plugin.adapters import hook_model
from writesae_plugin.cli import main
from writesae_plugin.data import ActivationProvider, SiteSpec
from writesae_plugin.store import ActivationStore, ExtractConfig, StoreError, StoreProvider, extract
from writesae_plugin.train import WriteSAETrainer, train_write_sae

TRAIN = ["--layer", "1", "--head", "2", "--site", "write", "--d-sae", "32", "--k", "4", "--total-samples", "1536",
         "--batch-size", "64", "--val-contexts", "2", "--val-every", "8", "--aux-k", "8", "--context-length", "32"]


class Killed(BaseException):
    """Stands for SIGKILL inside the process."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """A tiny Qwen3.5 with a tokenizer, a corpus of 400 one-paragraph documents (about 120 contexts of 32 tokens in
    its train split), the store of its train split and the store of its validation split."""
    root = tmp_path_factory.mktemp("store")
    hf = load_tiny(root, "qwen3_5")
    hf.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    lines = ["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1", "import torch",
             "hello world, recurrent models write matrices"]
    (root / "corpus.txt").write_text("\n\n".join(f"{line} {i}" for i, line in enumerate(lines * 100)))
    argv = ["extract", "--model", str(root / "model"), "--dataset", str(root / "corpus.txt"), "--layers", "0,1",
            "--heads", "all", "--site", "write", "--context-length", "32", "--contexts", "1000",
            "--contexts-per-shard", "16", "--forward-batch", "8"]
    assert main(argv + ["--out", str(root / "store")]) == 0
    assert main(argv + ["--split", "validation", "--out", str(root / "val-store")]) == 0
    return root


def test_extract_writes_factors_per_cell_and_a_manifest(workdir):
    manifest = json.loads((workdir / "store" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["heads"] == [0, 1, 2, 3] and manifest["config"]["layers"] == [0, 1]
    assert manifest["model"]["weights_sha256"] and manifest["model"]["d_k"] == 16
    shard = load_file(workdir / "store" / manifest["shards"][0]["file"])
    n = manifest["shards"][0]["n_samples"]
    assert shard["L1.key"].shape == (n, 4, 16) and shard["L1.value"].shape == (n, 4, 16)
    assert not any(k.endswith(".state") or k.endswith(".write") for k in shard)  # factors only, never k v^T
    assert shard["tokens"].shape == (16, 32) and n == 16 * 32
    # the stored factors are the hooks' values at those positions
    model = hook_model(load_tiny(workdir, "qwen3_5"))
    with torch.no_grad():
        _, cache = model.run_with_cache(shard["tokens"][:2].long(),
                                        names_filter=["blocks.1.linear_attn.hook_write_key"])
    assert torch.equal(shard["L1.key"][:64].reshape(2, 32, 4, 16), cache["blocks.1.linear_attn.hook_write_key"])


def test_train_from_store_equals_streaming_training(workdir):
    """Streaming trains on the train split and validates on the validation split; a store of each split
    (`train --store S --val-store V`) gives the same SAE and the same validation rows."""
    common = ["--model", str(workdir / "model")]
    assert main(["train", *common, "--dataset", str(workdir / "corpus.txt"), *TRAIN,
                 "--out", str(workdir / "streamed")]) == 0
    assert main(["train", "--store", str(workdir / "store"), "--val-store", str(workdir / "val-store"), *TRAIN,
                 "--out", str(workdir / "stored")]) == 0
    a, b = SAE.load_from_disk(workdir / "streamed" / "final"), SAE.load_from_disk(workdir / "stored" / "final")
    for name, p in a.state_dict().items():
        assert torch.allclose(p, b.state_dict()[name], rtol=1e-5, atol=1e-6), name
    va = [json.loads(x) for x in (workdir / "streamed" / "validation.jsonl").read_text().splitlines()]
    vb = [json.loads(x) for x in (workdir / "stored" / "validation.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in va] == [r["samples"] for r in vb]
    assert all(abs(x["fvu"] - y["fvu"]) < 1e-5 for x, y in zip(va, vb))
    # with --model, the store must come from that model
    assert main(["train", *common, "--store", str(workdir / "store"), *TRAIN[:-2], "--context-length", "32",
                 "--out", str(workdir / "stored2"), "--total-samples", "128"]) == 0


def test_random_positions_are_the_same_streamed_or_stored(workdir):
    model = hook_model(load_tiny(workdir, "qwen3_5"))
    g = torch.Generator().manual_seed(0)
    ctx = [torch.randint(0, SAFE_VOCAB, (24,), generator=g) for _ in range(24)]
    cfg = ExtractConfig(layers=[1], site="state", positions=("random", 3), contexts_per_shard=8, forward_batch=4)
    extract(model, iter(ctx), workdir / "states", cfg, progress=False)
    store = ActivationStore(workdir / "states")
    for heads in ([1], None):
        spec = SiteSpec(layer=1, site="state", heads=heads, positions=("random", 3))
        streamed = list(ActivationProvider(model, iter(ctx[4:]), spec, batch_size=16, buffer_batches=2,
                                           forward_batch=4, seed=5, normalize=True, first_context=4, position_seed=0))
        stored = list(StoreProvider(store, spec, batch_size=16, buffer_batches=2, seed=5, normalize=True,
                                    first_context=4))
        assert len(streamed) == len(stored) > 0
        assert all(torch.equal(x, y) for x, y in zip(streamed, stored))


def test_killed_extraction_resumes_with_the_same_shards_and_torn_shards_are_redone(workdir, tmp_path, monkeypatch):
    model = hook_model(load_tiny(workdir, "qwen3_5"))
    g = torch.Generator().manual_seed(1)
    ctx = [torch.randint(0, SAFE_VOCAB, (20,), generator=g) for _ in range(40)]
    cfg = ExtractConfig(layers=[0, 1], heads=[0, 3], site="write", contexts_per_shard=8, forward_batch=4)
    whole = extract(model, iter(ctx), tmp_path / "whole", cfg, progress=False)
    calls = {"n": 0}
    orig = data_mod.collect_sites

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # in the third shard (two forwards per shard)
            raise Killed
        return orig(*args, **kwargs)

    import writesae_plugin.store as store_mod

    with monkeypatch.context() as m:
        m.setattr(store_mod, "collect_sites", dying)
        with pytest.raises(Killed):
            extract(model, iter(ctx), tmp_path / "killed", cfg, progress=False)
    killed = tmp_path / "killed"
    manifest = json.loads((killed / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(killed)
    assert main(["train", "--store", str(killed), *TRAIN, "--out", str(tmp_path / "t")]) == 2  # refused up front
    extract(model, iter(ctx), killed, cfg, progress=False)  # the same command again: continues
    names = sorted(p.name for p in whole.glob("shard-*"))
    assert names == sorted(p.name for p in killed.glob("shard-*")) and len(names) == 5
    assert all((whole / n).read_bytes() == (killed / n).read_bytes() for n in names)
    # a torn shard (truncated) is found, and the next extraction redoes it and everything after it
    data = (killed / names[1]).read_bytes()
    (killed / names[1]).write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="torn"):
        ActivationStore(killed)
    extract(model, iter(ctx), killed, cfg, progress=False)
    assert all((whole / n).read_bytes() == (killed / n).read_bytes() for n in names)
    ActivationStore(killed)
    # a flipped byte with the right size is caught by the hash when read
    flipped = bytearray((killed / names[4]).read_bytes())
    flipped[-1] ^= 0xFF
    (killed / names[4]).write_bytes(bytes(flipped))
    with pytest.raises(StoreError, match="hash"):
        ActivationStore(killed).shard(4)
    # another model, or other settings, in the same directory are refused
    with pytest.raises(StoreError, match="other settings"):
        extract(model, iter(ctx), killed, ExtractConfig(layers=[1], site="write", contexts_per_shard=8,
                                                        forward_batch=4), progress=False)
    other = hook_model(_perturbed(workdir))
    with pytest.raises(StoreError, match="another model"):
        extract(other, iter(ctx), killed, cfg, progress=False)


def _perturbed(workdir):
    hf = load_tiny(workdir, "qwen3_5")
    with torch.no_grad():
        next(hf.parameters()).add_(0.01)
    return hf


def test_killed_store_training_resumes_seeing_each_sample_once(workdir, tmp_path, monkeypatch):
    store = ActivationStore(workdir / "store")
    spec = SiteSpec(layer=1, site="write", heads=[2], positions="all", layout="factors")

    def run(out, resume=None):
        from writesae_plugin.sae import WriteSAETrainingConfig

        torch.manual_seed(0)
        cfg = WriteSAETrainingConfig(d_in=256, d_sae=32, d_k=16, d_v=16, k=4, site="write", head=2, n_heads=4,
                                     family="qwen3_5_text", layer=1, aux_k=8, input_layout="factors")
        cfg.metadata.hook_name = "blocks.1.linear_attn.hook_write"
        provider = StoreProvider(store, spec, batch_size=32, buffer_batches=4, normalize=True, first_context=2)
        val = list(StoreProvider(store, spec, batch_size=32, buffer_batches=2, seed=1, n_contexts=2))
        sae, _ = train_write_sae(cfg, provider, out, total_samples=32 * 24, batch_size=32, lr=3e-3, warmup_steps=2,
                                 val_batches=val, val_every=5, n_checkpoints=3, dead_feature_window=3,
                                 resume_from=resume)
        return sae, provider

    sae_a, prov_a = run(tmp_path / "a")
    orig = WriteSAETrainer.step

    def step(self, batch):
        if self.n_training_steps == 15:
            raise Killed
        return orig(self, batch)

    with monkeypatch.context() as m:
        m.setattr(WriteSAETrainer, "step", step)
        with pytest.raises(Killed):
            run(tmp_path / "b")
    sae_b, prov_b = run(tmp_path / "b", resume="latest")
    assert prov_b.contexts_consumed == prov_a.contexts_consumed and prov_b.samples_seen == prov_a.samples_seen
    for name, p in sae_a.state_dict().items():
        assert torch.allclose(p, sae_b.state_dict()[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("extra, match", [
    (["--site", "state"], "holds the write site"),
    (["--layer", "3"], "not a recurrent layer"),
    (["--layer", "2"], "holds layers [0, 1], not layer 2"),
    (["--head", "9"], "out of range"),
    (["--write-mode", "delta"], "raw writes"),
])
def test_store_training_refuses_cells_the_store_does_not_hold(workdir, tmp_path, capsys, extra, match):
    argv = ["train", "--store", str(workdir / "store"), *TRAIN, *extra, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "traceback" not in err and len(err.splitlines()) == 1


def test_store_of_another_model_and_bad_sources_are_refused(workdir, tmp_path, capsys):
    other = tmp_path / "other"
    _perturbed(workdir).save_pretrained(other)
    assert main(["train", "--model", str(other), "--store", str(workdir / "store"), *TRAIN,
                 "--out", str(tmp_path / "o")]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["train", "--store", str(tmp_path), *TRAIN, "--out", str(tmp_path / "o")]) == 2
    assert "not an activation store" in capsys.readouterr().err
    assert main(["train", "--store", str(workdir / "store"), "--dataset", str(workdir / "corpus.txt"), *TRAIN,
                 "--out", str(tmp_path / "o")]) == 2
    assert "exactly one data source" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["extract", "--dataset", str(workdir / "corpus.txt"), "--layers", "1,x", "--out", str(tmp_path / "s")])
    assert exit_.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
    assert main(["extract", "--model", str(workdir / "model"), "--dataset", str(workdir / "corpus.txt"),
                 "--layers", "3", "--out", str(tmp_path / "s")]) == 2
    assert "not recurrent layers" in capsys.readouterr().err
    assert main(["extract", "--model", str(workdir / "model"), "--dataset", str(workdir / "corpus.txt"),
                 "--contexts-per-shard", "10", "--forward-batch", "4", "--out", str(tmp_path / "s")]) == 2
    assert "multiple of --forward-batch" in capsys.readouterr().err


def test_store_records_its_split_and_the_validation_store_is_checked(workdir, tmp_path, capsys):
    """A store knows which document split it holds; `train --store S --val-store V` needs V to be another split
    of the same data, model and cells."""
    train_m = json.loads((workdir / "store" / "manifest.json").read_text())
    val_m = json.loads((workdir / "val-store" / "manifest.json").read_text())
    assert train_m["config"]["data"]["split"] == "train" and val_m["config"]["data"]["split"] == "validation"
    assert train_m["config"]["data"]["splits"] == [0.9, 0.05, 0.05] and train_m["config"]["data"]["data_seed"] == 0

    assert ActivationStore(workdir / "val-store").n_contexts < ActivationStore(workdir / "store").n_contexts
    out = ["--out", str(tmp_path / "o")]
    assert main(["train", "--store", str(workdir / "store"), "--val-store", str(workdir / "store"), *TRAIN, *out]) == 2
    assert "holds the train split" in capsys.readouterr().err
    assert main(["train", "--dataset", str(workdir / "corpus.txt"), "--val-store", str(workdir / "val-store"),
                 *TRAIN, *out]) == 2
    assert "--val-store goes with --store" in capsys.readouterr().err
    assert main(["train", "--store", str(workdir / "store"), "--val-store", str(workdir / "val-store"), *TRAIN,
                 "--val-contexts", "500", *out]) == 2
    assert "fewer than --val-contexts 500" in capsys.readouterr().err


def test_validation_keeps_the_last_partial_batch_and_training_drops_it(workdir):
    """A held-out set smaller than a batch (or not a multiple of one) is evaluated whole with drop_last=False;
    training batches are always full (drop_last, the default). Was: validation silently lost the remainder, and a
    held-out set under one batch gave an empty list and a bare torch.cat error."""
    store = ActivationStore(workdir / "store")
    spec = SiteSpec(layer=1, site="write", heads=[2], positions="all", layout="factors")
    every = torch.cat(list(StoreProvider(store, spec, batch_size=1, buffer_batches=2, n_contexts=2)))
    n = every.shape[0]
    big = n + 7
    assert list(StoreProvider(store, spec, batch_size=big, buffer_batches=2, n_contexts=2)) == []
    whole = list(StoreProvider(store, spec, batch_size=big, buffer_batches=2, n_contexts=2, drop_last=False))
    assert [b.shape[0] for b in whole] == [n]
    parts = list(StoreProvider(store, spec, batch_size=n // 3 + 1, buffer_batches=2, n_contexts=2, drop_last=False))
    assert sum(b.shape[0] for b in parts) == n and all(b.shape[0] == n // 3 + 1 for b in parts[:-1])
    assert torch.equal(torch.cat(parts).sort(0).values, every.sort(0).values)
    from writesae_plugin.sae import TrainingWriteSAE, WriteSAETrainingConfig
    from writesae_plugin.train import evaluate_sae

    sae = TrainingWriteSAE(WriteSAETrainingConfig(d_in=256, d_sae=32, d_k=16, d_v=16, k=4, site="write",
                                                  input_layout="factors"))
    assert evaluate_sae(sae, whole, "factors").n == n
    with pytest.raises(ValueError, match="no batches"):
        evaluate_sae(sae, [], "factors")

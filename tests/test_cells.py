"""Many cells from one activation store (issue 13): every head of two layers from one extraction, each cell a
SAELens-loadable SAE that reproduces its recorded FVU, a release index, skip / resume on rerun."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE

import writesae_plugin  # noqa: F401  (registers the architecture)
from conftest import SAFE_VOCAB, load_tiny
from writesae_plugin.adapters import hook_model
from writesae_plugin.cells import Cell, CellTraining, cell_providers, store_cells, train_cells
from writesae_plugin.registry import register_local_release
from writesae_plugin.store import ActivationStore, ExtractConfig, StoreError, extract
from writesae_plugin.train import evaluate_sae

T = CellTraining(d_sae=16, k=4, aux_k=8, total_samples=128, batch_size=32, lr=3e-3, val_contexts=2, val_every=2,
                 n_checkpoints=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    model = hook_model(load_tiny(root, "qwen3_5"))
    g = torch.Generator().manual_seed(0)
    ctx = [torch.randint(0, SAFE_VOCAB, (16,), generator=g) for _ in range(16)]
    calls = {"n": 0}
    model.hf_model.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    cfg = ExtractConfig(layers=[0, 1], site="write", contexts_per_shard=8, forward_batch=8)
    path = extract(model, iter(ctx), root / "store", cfg, progress=False)
    assert calls["n"] == 2  # one forward per batch of 8 contexts, for all 8 cells
    return ActivationStore(path)


def test_all_heads_of_two_layers_load_alone_and_reproduce_their_fvu(store, tmp_path):
    cells = store_cells(store, [0, 1], None, "write")
    assert [c.id for c in cells] == [f"L{layer}.H{h}.write" for layer in (0, 1) for h in range(4)]
    index = train_cells(store, cells, tmp_path / "out", T, release="tiny-cells", progress=False)
    assert sorted(index["saes"]) == sorted(c.id for c in cells)
    for cell in cells:
        sae = SAE.load_from_disk(tmp_path / "out" / "cells" / cell.id)
        assert sae.cfg.metadata.hook_name == f"blocks.{cell.layer}.linear_attn.hook_write" and sae.cfg.head == cell.head
        _, val = cell_providers(store, cell, T)
        fvu = evaluate_sae(sae, val, layout="factors").fvu
        assert fvu == pytest.approx(index["cells"][cell.id]["fvu"], rel=1e-4, abs=1e-6), cell.id
        assert index["expected_var_explained"][cell.id] == pytest.approx(1 - fvu, rel=1e-4, abs=1e-6)
    assert json.loads((tmp_path / "out" / "cells" / "release.json").read_text()) == index
    ids = register_local_release("tiny-cells", tmp_path / "out" / "cells")
    assert sorted(ids) == sorted(index["saes"])
    assert SAE.from_pretrained("tiny-cells", "L1.H2.write").cfg.head == 2
    # the same call again: every cell is finished, nothing is retrained
    stamp = {c.id: (tmp_path / "out" / "cells" / c.id / "sae_weights.safetensors").stat().st_mtime_ns
             for c in cells}
    train_cells(store, cells, tmp_path / "out", T, progress=False)
    assert stamp == {c.id: (tmp_path / "out" / "cells" / c.id / "sae_weights.safetensors").stat().st_mtime_ns
                     for c in cells}


def test_shared_heads_and_interrupted_runs(store, tmp_path, monkeypatch):
    cells = store_cells(store, [1], None, "write", shared_heads=True)
    assert [c.id for c in cells] == ["L1.Hall.write"]
    import writesae_plugin.cells as cells_mod

    orig = cells_mod.train_cell
    n = {"calls": 0}

    def die_on_second(*args, **kwargs):
        n["calls"] += 1
        if n["calls"] == 2:
            raise KeyboardInterrupt
        return orig(*args, **kwargs)

    two = [Cell(0, 1, "write"), Cell(1, 3, "write")]
    with monkeypatch.context() as m:
        m.setattr(cells_mod, "train_cell", die_on_second)
        with pytest.raises(KeyboardInterrupt):
            train_cells(store, two, tmp_path / "out", T, progress=False)
    index = json.loads((tmp_path / "out" / "cells" / "release.json").read_text())
    assert list(index["saes"]) == ["L0.H1.write"]  # the finished cell is kept
    index = train_cells(store, two + cells, tmp_path / "out", T, progress=False)
    assert sorted(index["saes"]) == ["L0.H1.write", "L1.H3.write", "L1.Hall.write"]
    assert SAE.load_from_disk(tmp_path / "out" / "cells" / "L1.Hall.write").cfg.head is None


def test_cells_the_store_lacks_are_refused_before_training(store, tmp_path):
    with pytest.raises(StoreError, match="not \\[2\\]"):
        store_cells(store, [1, 2], None, "write")
    with pytest.raises(StoreError, match="write site, not state"):
        train_cells(store, [Cell(0, 0, "write"), Cell(1, 0, "state")], tmp_path / "o", T, progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(StoreError, match="heads"):
        store_cells(store, [0], [7], "write")


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("cells_cli")
    load_tiny(root, "qwen3_5").save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    paragraphs = [f"paragraph {i}: the quick brown fox jumps over the lazy dog; def f(x): return x + {i}"
                  for i in range(120)]
    (root / "corpus.txt").write_text("\n\n".join(paragraphs))
    return root


SMALL = ["--site", "write", "--d-sae", "16", "--k", "4", "--aux-k", "8", "--total-samples", "96",
         "--batch-size", "32", "--val-contexts", "2", "--val-every", "2", "--context-length", "16"]


def test_cli_trains_every_cell_of_two_layers_from_one_extraction(model_dir, tmp_path):
    from writesae_plugin.cli import main

    out = tmp_path / "out"
    assert main(["train", "--model", str(model_dir / "model"), "--dataset", str(model_dir / "corpus.txt"),
                 "--layers", "0,1", *SMALL, "--out", str(out)]) == 0
    index = json.loads((out / "cells" / "release.json").read_text())
    assert sorted(index["saes"]) == sorted(f"L{layer}.H{h}.write" for layer in (0, 1) for h in range(4))
    store = ActivationStore(out / "store")
    assert store.config["data"]["split"] == "train" and ActivationStore(out / "val_store").config["data"][
        "split"] == "validation"
    sae = SAE.load_from_disk(out / "cells" / "L1.H2.write")
    assert sae.cfg.head == 2 and sae.cfg.metadata.hook_name == "blocks.1.linear_attn.hook_write"
    # from the store, a subset of heads, and one shared dictionary per layer
    assert main(["train", "--store", str(out / "store"), "--val-store", str(out / "val_store"), "--layers", "1",
                 "--heads", "2,3", *SMALL, "--out", str(tmp_path / "sub")]) == 0
    assert sorted(json.loads((tmp_path / "sub" / "cells" / "release.json").read_text())["saes"]) == [
        "L1.H2.write", "L1.H3.write"]
    assert main(["train", "--store", str(out / "store"), "--layers", "0", "--shared-heads", *SMALL,
                 "--out", str(tmp_path / "shared")]) == 0
    assert SAE.load_from_disk(tmp_path / "shared" / "cells" / "L0.Hall.write").cfg.head is None


@pytest.mark.parametrize("argv, match", [
    (["--layer", "1", "--layers", "1"], "--layer L"),
    ([], "--layer L"),
    (["--layer", "1", "--heads", "1"], "go with --layers"),
    (["--layers", "1", "--head", "1"], "--head goes with --layer"),
    (["--layers", "1", "--heads", "1", "--shared-heads"], "do not also give --heads"),
    (["--layers", "1", "--resume", "some/dir"], "'latest'"),
])
def test_cli_cell_flags_are_checked_before_loading(model_dir, tmp_path, capsys, argv, match):
    from writesae_plugin.cli import main

    assert main(["train", "--dataset", str(model_dir / "corpus.txt"), *argv, *SMALL, "--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err

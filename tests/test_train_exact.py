"""`writesae train` trains exactly --total-samples (the last batch partial), its progress bar ends at its total, and
the bar's dead fraction is the one the validation records: single cell from a stream or a store, stacked cells,
and a resumed run."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens.training import sae_trainer
from tqdm import tqdm

import writesae_plugin  # noqa: F401  (registers the architecture)
from writesae_plugin.cli import main
from writesae_plugin.sae import WriteSAETrainingConfig
from writesae_plugin.train import WriteSAETrainer, train_write_sae

BATCH = 32
TOTAL = 5 * BATCH + 7  # not a multiple of the batch size


class Bar(tqdm):
    """tqdm that keeps what the trainer showed (its last postfix dict) and registers itself."""

    made: list = []

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = False  # counting needs an enabled bar
        super().__init__(*args, **kwargs)
        self.shown: dict = {}
        Bar.made.append(self)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        self.shown = dict(ordered_dict or {}, **kwargs)
        return super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


@pytest.fixture
def bars(monkeypatch):
    Bar.made = []
    monkeypatch.setattr(sae_trainer, "tqdm", Bar)  # the trainer's fit makes its bar through this name
    return Bar.made


class Stream:
    """Random batches with a saved position (no model needed)."""

    def __init__(self, d=64):
        self.g, self.d = torch.Generator().manual_seed(0), d

    def __iter__(self):
        return self

    def __next__(self):
        return torch.randn(BATCH, self.d, generator=self.g)

    def state_dict(self):
        return {"buffer": None, "generator": self.g.get_state()}

    def load_state_dict(self, state):
        self.g.set_state(state["generator"])


def _train(out, resume=None, n_checkpoints=0):
    torch.manual_seed(0)
    # many atoms, few validation rows: atoms that never fire on the validation set, while none is silent for
    # dead_feature_window steps (the training-side count the bar used to show as "dead")
    cfg = WriteSAETrainingConfig(d_in=64, d_sae=256, d_k=8, d_v=8, k=2, site="state", aux_k=8)
    val = [torch.randn(8, 64, generator=torch.Generator().manual_seed(1))]
    return train_write_sae(cfg, Stream(), out, total_samples=TOTAL, batch_size=BATCH, n_checkpoints=n_checkpoints,
                           val_batches=val, val_every=2, dead_feature_window=1000, resume_from=resume)


def _check_bar(bar, history, initial=0):
    assert bar.total == TOTAL and bar.n == TOTAL and bar.initial == initial
    # the bar's dead fraction is the validation's (the final record's: one more validation of the saved SAE)
    assert 0 < history[-1]["dead_fraction"] < 1
    assert float(bar.shown["dead_fraction"]) == pytest.approx(history[-1]["dead_fraction"], abs=1e-4)
    assert "dead" not in bar.shown


def test_exact_total_and_the_bar_ends_at_its_total(tmp_path, bars):
    _, history = _train(tmp_path / "a")
    assert history[-1]["samples"] == TOTAL
    assert history[-2]["samples"] == TOTAL  # validated after the last step, what the bar shows at the end
    assert len(bars) == 1
    _check_bar(bars[0], history)


def test_a_resumed_run_also_ends_at_exactly_the_total(tmp_path, bars, monkeypatch):
    class Killed(Exception):
        pass

    orig = WriteSAETrainer.step

    def step(self, batch):
        if self.n_training_steps == 4:  # after the checkpoint at 2 steps' samples
            raise Killed
        return orig(self, batch)

    with monkeypatch.context() as m:
        m.setattr(WriteSAETrainer, "step", step)
        with pytest.raises(Killed):
            _train(tmp_path / "r", n_checkpoints=2)
    _, history = _train(tmp_path / "r", resume="latest", n_checkpoints=2)
    assert history[-1]["samples"] == TOTAL
    start = bars[-1].initial
    assert 0 < start < TOTAL
    _check_bar(bars[-1], history, initial=start)
    _, whole = _train(tmp_path / "w", n_checkpoints=2)
    assert [r["samples"] for r in history] == [r["samples"] for r in whole]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


SMALL = ["--site", "write", "--d-sae", "32", "--k", "4", "--aux-k", "8", "--batch-size", str(BATCH),
         "--val-contexts", "2", "--val-every", "2", "--context-length", "16"]


def test_streaming_store_and_stacked_cells_train_exactly_the_total(model_and_corpus, tmp_path, bars):
    model, corpus = str(model_and_corpus / "model"), str(model_and_corpus / "corpus.txt")
    # a single cell, streamed through the model
    assert main(["train", "--model", model, "--dataset", corpus, "--layer", "1", "--head", "0", *SMALL,
                 "--total-samples", str(TOTAL), "--out", str(tmp_path / "stream")]) == 0
    assert _rows(tmp_path / "stream" / "validation.jsonl")[-1]["samples"] == TOTAL
    assert bars[-1].n == bars[-1].total == TOTAL
    # a store holding exactly the total for the cell (after its validation contexts): the last batch is the
    # stream's partial one (it used to stop short and fail)
    store = tmp_path / "store"
    assert main(["extract", "--model", model, "--dataset", corpus, "--layers", "0,1", "--heads", "0,1", "--site",
                 "write", "--contexts", "9", "--context-length", "16", "--contexts-per-shard", "4",
                 "--forward-batch", "4", "--out", str(store)]) == 0
    from writesae_plugin.data import SiteSpec
    from writesae_plugin.store import ActivationStore, StoreProvider

    st = ActivationStore(store)
    spec = SiteSpec(layer=1, site="write", heads=[0], positions=st.positions, layout="factors",
                    skip_first=st.config["skip_first"])
    available = StoreProvider(st, spec, batch_size=BATCH, first_context=2).available
    assert available % BATCH
    assert main(["train", "--store", str(store), "--layer", "1", "--head", "0", *SMALL,
                 "--total-samples", str(available), "--out", str(tmp_path / "from-store")]) == 0
    assert _rows(tmp_path / "from-store" / "validation.jsonl")[-1]["samples"] == available
    assert bars[-1].n == bars[-1].total == available
    # stacked cells (every head of two layers trained together): each cell trains exactly the total
    assert main(["train", "--store", str(store), "--layers", "0,1", "--heads", "0,1", *SMALL,
                 "--total-samples", str(available), "--out", str(tmp_path / "cells")]) == 0
    index = json.loads((tmp_path / "cells" / "cells" / "release.json").read_text())
    assert len(index["cells"]) == 4
    for cell_id in index["cells"]:
        assert _rows(tmp_path / "cells" / "runs" / cell_id / "validation.jsonl")[-1]["samples"] == available
    stacked = bars[-1]
    assert stacked.n == stacked.total == available
    assert "dead" not in stacked.shown and "dead_fraction" in stacked.shown


def test_validation_records_count_completed_steps_and_mark_the_saved_sae(tmp_path):
    """validation.jsonl: ``step`` is the number of training steps done (a validation inside the last step counts
    it, as the record after fit does), and the last record, of the saved SAE (unit-norm atoms, scale folded), is
    marked ``final``: the newcomer saw steps 7, 15, 16 for validations after 8, 16 and 16 steps."""
    _, history = _train(tmp_path / "v")  # 6 steps (5 full batches and a partial one), validation every 2
    assert [r["step"] for r in history] == [0, 2, 4, 6, 6]
    assert [r["samples"] for r in history] == [0, 2 * BATCH, 4 * BATCH, TOTAL, TOTAL]
    assert [r.get("final", False) for r in history] == [False, False, False, False, True]
    rows = [json.loads(line) for line in (tmp_path / "v" / "validation.jsonl").read_text().splitlines()]
    assert rows == history

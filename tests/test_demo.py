"""The shipped demo model and SAE release, `writesae demo`, and the notebooks (executed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import writesae_plugin  # noqa: F401
from writesae_plugin.demo.run import demo_model_dir, demo_release_dir, demo_release_info

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_shipped_model_reproduces_its_recorded_validation_loss():
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from writesae_plugin.demo.build import mean_loss

    path = demo_model_dir()
    recipe = json.loads((path / "recipe.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen3_5ForCausalLM" and len(tok) == model.config.vocab_size
    evals = load_file(str(path / "eval_tokens.safetensors"))["input_ids"]
    loss = mean_loss(model, evals)
    assert loss == pytest.approx(recipe["validation_loss_nats"], rel=1e-4)
    assert recipe["validation_loss_nats"] < recipe["unigram_baseline_nats"] - 1.0  # clearly below unigram
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 40e6


def test_shipped_saes_load_through_the_registry_and_reproduce_fvu_and_l0():
    from safetensors.torch import load_file
    from sae_lens import SAE

    from writesae_plugin.adapters import hook_model
    from writesae_plugin.data import ActivationProvider, SiteSpec
    from writesae_plugin.demo.run import load_demo_model
    from writesae_plugin.train import evaluate_sae

    info = demo_release_info()
    model = load_demo_model()
    evals = load_file(str(demo_release_dir() / "eval_tokens.safetensors"))["input_ids"]
    layer, head = info["recipe"]["layer"], info["recipe"]["head"]
    for sid in info["saes"]:
        sae = SAE.from_pretrained("writesae-demo", sid)
        site = sae.cfg.site
        layout = "factors" if site == "write" else "dense"
        spec = SiteSpec(layer=layer, site=site, heads=[head], positions="all", layout=layout)
        val = list(ActivationProvider(model, iter(evals), spec, batch_size=512, buffer_batches=2,
                                      seed=info["recipe"]["seed"] + 1))
        m = evaluate_sae(sae, val, layout)
        assert m.fvu == pytest.approx(info["expected_fvu"][sid], rel=1e-3), sid
        assert m.l0 == pytest.approx(info["expected_l0"][sid], rel=1e-3), sid
        assert m.fvu < 0.9
    assert isinstance(model, type(hook_model(model.hf_model)))


def test_demo_command_end_to_end(tmp_path):
    from writesae_plugin.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    for f in ("index.html", "results.json", "substitution/index.html", "substitution/results.json",
              "substitution/records.jsonl", "substitution/substitution_kl.png", "substitution/substitution_win_rates.png",
              "closed_form/index.html", "closed_form/closed_form_scatter.png", "closed_form/closed_form_horizon.png",
              "install/index.html", "install/install_curve.png", "install/records.jsonl"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["substitution"]["atom_act_vs_delete"]["n"] > 0 and set(res["closed_form"]) == {"jvp", "direct",
                                                                                                "fitted_g"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_notebook_count():
    assert len(NOTEBOOKS) == 5

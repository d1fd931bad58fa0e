"""The shipped demo model and SAE release, `writesae demo`, and the notebooks (executed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import writesae_plugin  # noqa: F401
from writesae_plugin.demo.run import demo_model_dir, demo_release_dir, demo_release_info

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


ARCHS = {"qwen3_5": "Qwen3_5ForCausalLM", "mamba2": "Mamba2ForCausalLM"}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shipped_model_reproduces_its_recorded_validation_loss(arch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from writesae_plugin.demo.build import mean_loss

    path = demo_model_dir(arch=arch)
    recipe = json.loads((path / "recipe.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == ARCHS[arch] and len(tok) == model.config.vocab_size
    evals = load_file(str(path / "eval_tokens.safetensors"))["input_ids"]
    loss = mean_loss(model, evals)
    assert loss == pytest.approx(recipe["validation_loss_nats"], rel=1e-4)
    assert recipe["validation_loss_nats"] < recipe["unigram_baseline_nats"] - 1.0  # clearly below unigram
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 40e6


def test_demo_models_share_one_tokenizer():
    """Identical token ids for both architectures: the cross-architecture comparison runs on the same text."""
    gdn, mamba = ((demo_model_dir(arch=a) / "tokenizer.json").read_bytes() for a in ARCHS)
    assert gdn == mamba
    recorded = json.loads((demo_model_dir(arch="mamba2") / "recipe.json").read_text())["tokenizer"]
    import hashlib

    assert recorded["tokenizer_json_sha256"] == hashlib.sha256(mamba).hexdigest()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shipped_saes_load_through_the_registry_and_reproduce_fvu_and_l0(arch):
    from safetensors.torch import load_file
    from sae_lens import SAE

    from writesae_plugin.adapters import hook_model
    from writesae_plugin.data import ActivationProvider, SiteSpec
    from writesae_plugin.demo.run import load_demo_model
    from writesae_plugin.train import evaluate_sae

    from writesae_plugin.data import site_activations

    info = demo_release_info(arch=arch)
    model = load_demo_model(arch=arch)
    evals = load_file(str(demo_release_dir(arch=arch) / "eval_tokens.safetensors"))["input_ids"]
    H = model.cfg.n_heads
    if "demo_saes" in info:  # a release of the per-layer builder: every (layer, head) and both sites
        assert set(info["saes"]) == {f"L{l}.H{h}.{s}" for l in model.cfg.recurrent_layers for h in range(H)
                                     for s in ("state", "write")}
        assert set(info["demo_saes"]) <= set(info["saes"])
    samples = {}  # one forward per (layer, site) for all its heads; rows in (row, position, head) order
    for sid in info["saes"]:
        sae = SAE.from_pretrained(info["release"], sid)
        site, layer, head = sae.cfg.site, sae.cfg.layer, sae.cfg.head
        layout = "factors" if site == "write" else "dense"
        if (layer, site) not in samples:
            spec = SiteSpec(layer=layer, site=site, heads=None, positions="all", layout=layout)
            samples[(layer, site)] = site_activations(model, evals, spec)
        m = evaluate_sae(sae, list(samples[(layer, site)][head::H].split(512)), layout)
        assert m.n == evals.numel(), sid
        assert m.fvu == pytest.approx(info["expected_fvu"][sid], rel=1e-3), sid
        assert m.l0 == pytest.approx(info["expected_l0"][sid], rel=1e-3), sid
        assert m.fvu < 0.9
    # the same numbers the release builder measured with a shuffled per-head provider (FVU, L0: order-free)
    sid = info["demo_saes"][0] if "demo_saes" in info else sorted(info["saes"])[0]
    sae = SAE.from_pretrained(info["release"], sid)
    layout = "factors" if sae.cfg.site == "write" else "dense"
    spec = SiteSpec(layer=sae.cfg.layer, site=sae.cfg.site, heads=[sae.cfg.head], positions="all", layout=layout)
    val = list(ActivationProvider(model, iter(evals), spec, batch_size=512, buffer_batches=2,
                                  seed=info["recipe"]["seed"] + 1, drop_last=False))
    assert evaluate_sae(sae, val, layout).fvu == pytest.approx(info["expected_fvu"][sid], rel=1e-3)
    assert isinstance(model, type(hook_model(model.hf_model)))


def test_demo_command_end_to_end(tmp_path):
    from writesae_plugin.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert (out / "index.html").is_file() and (out / "cross_architecture.png").is_file()
    for arch in ARCHS:
        for f in ("index.html", "results.json", "substitution/index.html", "substitution/results.json",
                  "substitution/records.jsonl", "substitution/substitution_kl.png",
                  "substitution/substitution_win_rates.png", "substitution_write/results.json", "closed_form/index.html",
                  "closed_form/closed_form_scatter.png", "closed_form/closed_form_horizon.png",
                  "install/index.html", "install/install_curve.png", "install/records.jsonl"):
            assert (out / arch / f).is_file(), f"{arch}/{f}"
    # the dashboards of every shipped SAE, precomputed and linked from the demo's pages
    top = (out / "index.html").read_text()
    from writesae_plugin.demo.run import QUICK, dashboard_saes

    for arch in ARCHS:
        info = demo_release_info(arch=arch)
        page = (out / arch / "index.html").read_text()
        assert 'href="substitution/index.html"' in page and 'href="install/index.html"' in page
        expected = dashboard_saes(info, QUICK, info["recipe"]["layer"], info["recipe"]["head"])
        if len(info["saes"]) <= QUICK.dashboard_max_saes:
            assert expected == sorted(info["saes"])  # the shipped releases: every SAE
        for sid in expected:
            href = f"dashboards/{sid}/index.html"
            assert (out / arch / href).is_file() and f'href="{href}"' in page and f'href="{arch}/{href}"' in top
            meta = json.loads((out / arch / "dashboards" / sid / "data" / "index.json").read_text())
            assert len(meta["atoms"]) == info["recipe"].get("d_sae", len(meta["atoms"]))
            assert 0 < sum(r["page"] is not None for r in meta["atoms"]) <= 2
    res = json.loads((out / "results.json").read_text())
    for arch in ARCHS:
        r = res["by_arch"][arch]
        assert r["arch"] == arch and r["substitution"]["atom_act_vs_delete"]["n"] > 0
        assert r["substitution_write"]["atom_act_vs_delete"]["n"] > 0
        assert set(r["closed_form"]) == {"jvp", "direct", "fitted_g"}
    d = res["comparison"]["win_rate_difference"]
    a, b = (res["by_arch"][x]["substitution"]["atom_act_vs_delete"]["rate"] for x in ARCHS)
    assert d["difference"] == pytest.approx(a - b) and d["lo"] <= d["difference"] <= d["hi"]


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
    assert len(NOTEBOOKS) == 10


def test_make_demo_release_trains_every_head_and_ships_half_precision_weights(tmp_path):
    """`writesae make-demo-release` on the shipped GDN model with a tiny recipe: every (layer, head, site) is trained
    (one extraction per layer and site, the heads stacked), stored as float16 package data under the demo model's
    name (not the builder's path) with ordinary file permissions, its recorded FVU reproduced by loading it; a
    `layers=` rebuild changes just that layer's entries."""
    import os

    from safetensors import safe_open
    from safetensors.torch import load_file
    from sae_lens import SAE

    from writesae_plugin.data import ActivationProvider, SiteSpec
    from writesae_plugin.demo.release import MODEL_NAMES, ReleaseRecipe, make_demo_release
    from writesae_plugin.demo.run import load_demo_model
    from writesae_plugin.train import evaluate_sae

    recipe = ReleaseRecipe(d_sae=32, k=4, context_length=32, state_samples=192, write_samples=384, batch_state=32,
                           batch_write=64, state_stride=4, aux_k=8, resample_every=0, eval_contexts=2,
                           val_contexts=2)
    out = tmp_path / "release"
    meta = make_demo_release(demo_model_dir(), out, recipe, progress=False)
    model = load_demo_model()
    layers, heads = model.cfg.recurrent_layers, range(model.cfg.n_heads)
    expected = {f"L{l}.H{h}.{s}" for l in layers for h in heads for s in ("state", "write")}
    assert set(meta["saes"]) == expected and meta["weights_dtype"] == "float16"
    assert json.loads((out / "release.json").read_text()) == meta
    assert meta["demo_saes"] == ["L2.H1.state", "L2.H1.write"]
    umask = os.umask(0o022)
    os.umask(umask)
    for sid in expected:
        with safe_open(str(out / sid / "sae_weights.safetensors"), "pt") as f:
            assert {str(f.get_slice(name).get_dtype()) for name in f.keys()} == {"F16"}, sid
        cfg = json.loads((out / sid / "cfg.json").read_text())
        assert cfg["metadata"]["model_name"] == MODEL_NAMES["qwen3_5"] and cfg["dtype"] == "float32"
        assert (out / sid / "sae_weights.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
        assert 0 < meta["expected_fvu"][sid] < 2 and 0 < meta["expected_l0"][sid] <= recipe.k  # (6 steps)
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp", "release-"))]  # no leftovers
    evals = load_file(str(out / "eval_tokens.safetensors"))["input_ids"]
    sid = "L4.H3.write"
    sae = SAE.load_from_disk(out / sid)
    assert sae.W_enc.dtype == torch.float32 if hasattr(sae, "W_enc") else True
    spec = SiteSpec(layer=4, site="write", heads=[3], positions="all", layout="factors")
    val = list(ActivationProvider(model, iter(evals), spec, batch_size=512, buffer_batches=2, seed=recipe.seed + 1,
                                  drop_last=False))
    assert evaluate_sae(sae, val, "factors").fvu == pytest.approx(meta["expected_fvu"][sid], rel=1e-4)

    before = {sid: (out / sid / "sae_weights.safetensors").read_bytes() for sid in expected}
    from dataclasses import replace

    again = make_demo_release(demo_model_dir(), out, replace(recipe, seed=1), layers=[1], progress=False)
    assert set(again["saes"]) == expected
    for sid in expected:
        same = (out / sid / "sae_weights.safetensors").read_bytes() == before[sid]
        assert same == (not sid.startswith("L1.")), sid
    with pytest.raises(ValueError, match="not recurrent layers"):
        make_demo_release(demo_model_dir(), out, recipe, layers=[3], progress=False)


def test_notebooks_are_what_make_notebooks_generates():
    """notebooks/make_notebooks.py is the notebooks' source: the committed .ipynb files hold exactly its cells
    (a fix made in an .ipynb alone would be lost at the next regeneration, as happened once)."""
    import importlib.util

    import nbformat

    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS[0].parent / "make_notebooks.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)  # builds the books; writes nothing (that is its __main__)
    assert sorted(gen.BOOKS) == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        committed = nbformat.read(path, as_version=4)
        want = gen.BOOKS[path.name]
        assert [(c.cell_type, c.source, c.get("id")) for c in committed.cells] == \
            [(c.cell_type, c.source, c.get("id")) for c in want.cells], f"{path.name}: run notebooks/make_notebooks.py"

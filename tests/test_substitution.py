"""Substitution test: statistics on fixed inputs, KL directions, firing selection, fast == naive == brute force."""

from __future__ import annotations

import math

import pytest
import torch

import writesae_plugin  # noqa: F401
from conftest import SAFE_VOCAB, load_tiny
from writesae_plugin.adapters import WriteEdit, hook_model
from writesae_plugin.experiments import stats
from writesae_plugin.experiments.substitution import (CONDITIONS, Firing, SubstitutionConfig, _cap, kl_metrics,
                                                      replacement, run_substitution, run_substitution_naive,
                                                      select_firings)
from writesae_plugin.sae import WriteSAE, WriteSAEConfig


# ------------------------------------------------------------------------------------------ statistics
def test_rate_difference_matches_newcombes_worked_example():
    # Newcombe (1998), Stat. Med. 17:873, example (a): 56/70 vs 48/80, method 10 interval 0.0524 to 0.3339
    d = stats.rate_difference(stats.wilson(56, 70), stats.wilson(48, 80))
    assert d["difference"] == pytest.approx(0.2) and d["lo"] == pytest.approx(0.0524, abs=5e-4)
    assert d["hi"] == pytest.approx(0.3339, abs=5e-4) and d["n_a"] == 70
    assert math.isnan(stats.rate_difference(stats.wilson(0, 0), stats.wilson(1, 2))["difference"])


def test_wilson_matches_the_formula():
    k, n, z = 8, 10, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    w = stats.wilson(k, n)
    assert w["rate"] == 0.8 and w["n"] == 10
    assert w["lo"] == pytest.approx(centre - half, abs=1e-9) and w["hi"] == pytest.approx(centre + half, abs=1e-9)
    assert math.isnan(stats.wilson(0, 0)["rate"])


def test_wilcoxon_and_rank_biserial_by_hand():
    x, y = [1.0, 2, 3, 4, 5], [2.0, 4, 6, 8, 10]  # y - x = 1..5, all positive
    res = stats.paired_wilcoxon(x, y)
    assert res["rank_biserial"] == 1.0 and res["p"] == pytest.approx(0.0625) and res["median_diff"] == 3.0
    res = stats.paired_wilcoxon([3.0, 1, 2, 5], [1.0, 2, 4, 9])  # d = -2, 1, 2, 4 -> ranks 2.5, 1, 2.5, 4
    assert res["rank_biserial"] == pytest.approx((1 + 2.5 + 4 - 2.5) / 10)


def test_cluster_statistics():
    wins = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0]
    atoms = ["a"] * 5 + ["b"] * 5 + ["c"] * 3
    m = stats.per_cluster_mean(wins, atoms, min_count=5)
    assert m["n_clusters"] == 2 and m["mean"] == 0.5
    b = stats.cluster_bootstrap(wins, atoms, n_resamples=500)
    assert b["rate"] == pytest.approx(7 / 13) and b["n_clusters"] == 3 and b["lo"] <= b["rate"] <= b["hi"]
    assert math.isnan(stats.cluster_bootstrap([1, 0], ["a", "a"])["lo"])


def test_kl_directions():
    p = torch.tensor([[0.7, 0.2, 0.1]] * 4)
    q = torch.tensor([[0.5, 0.25, 0.25]] * 3 + [[0.1, 0.1, 0.8]])
    m = kl_metrics(p.log(), q.log(), t=1)
    kl = lambda a, b: float((a * (a / b).log()).sum())  # noqa: E731
    assert m["kl_final"] == pytest.approx(kl(p[3], q[3])) and m["kl_final_rev"] == pytest.approx(kl(q[3], p[3]))
    assert m["kl_next"] == pytest.approx(kl(p[2], q[2]))
    assert m["kl_mean"] == pytest.approx((kl(p[2], q[2]) + kl(p[3], q[3])) / 2)


# ------------------------------------------------------------------------------------------ selection
def test_firing_selection_and_caps():
    codes = torch.zeros(3, 10, 6)
    codes[0, 2, 1], codes[0, 2, 4] = 0.5, 0.9  # dominant of the pool {1, 4} is 4
    codes[0, 9, 1] = 1.0  # last position: never a firing (no t+1)
    codes[1, 3:9, 1] = 0.3
    codes[2, 0, 1] = 1.0  # before min_pos
    cfg = SubstitutionConfig(atoms=[1, 4], max_per_atom=3, max_per_context=2, max_firings=10)
    cands = select_firings(codes, cfg)
    assert any((f.context, f.pos, f.atom) == (0, 2, 4) and f.act == pytest.approx(0.9) for f in cands)
    assert all(f.pos not in (0, 9) for f in cands)
    picked = _cap(cands, cfg)
    assert sum(f.context == 1 for f in picked) == 2 and sum(f.atom == 1 for f in picked) <= 3
    with pytest.raises(ValueError, match="atoms must be"):
        select_firings(codes, SubstitutionConfig(atoms=[9]))
    with pytest.raises(ValueError, match="unknown conditions"):
        SubstitutionConfig(conditions=("atom_act", "delete", "bogus"))
    with pytest.raises(ValueError, match="delete"):
        SubstitutionConfig(conditions=("atom_act",))


def test_replacements():
    sae = WriteSAE(WriteSAEConfig(d_in=16, d_sae=8, d_k=4, d_v=4, k=2))
    W = torch.randn(4, 4)
    f = Firing(0, 3, 2, 0.7)
    A = sae.W_dec[2].view(4, 4)
    g = torch.Generator().manual_seed(0)
    codes = torch.zeros(8)
    codes[[2, 5]] = 1.0
    assert torch.allclose(replacement("atom_act", sae, f, W, codes, g), 0.7 * A)
    assert replacement("atom_norm", sae, f, W, codes, g).norm() == pytest.approx(W.norm().item(), rel=1e-5)
    assert replacement("delete", sae, f, W, codes, g) is None
    R = replacement("random_act", sae, f, W, codes, g)
    assert torch.linalg.matrix_rank(R) == 1 and R.norm() == pytest.approx(0.7 * A.norm().item(), rel=1e-5)
    assert replacement("random_norm", sae, f, W, codes, g).norm() == pytest.approx(W.norm().item(), rel=1e-5)
    resc = replacement("rescaled_native", sae, f, W, codes, g)
    assert resc.norm() == pytest.approx(0.7, rel=1e-5) and torch.allclose(resc / resc.norm(), W / W.norm())
    P = replacement("sae_projection", sae, f, W, codes, g)
    basis = torch.stack([sae.W_dec[2], sae.W_dec[5]])
    resid = (W - P).reshape(-1)
    assert torch.allclose(basis @ resid, torch.zeros(2), atol=1e-5)  # residual orthogonal to the span


# ------------------------------------------------------------------------------------------ exactness
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = load_tiny(tmp_path_factory.mktemp("subst"), "qwen3_5")
    with torch.no_grad():  # make the layer's writes matter, so KLs are well above rounding
        hf.model.layers[1].linear_attn.out_proj.weight.mul_(200.0)
        hf.lm_head.weight.mul_(30.0)
    model = hook_model(hf)
    tokens = torch.randint(0, SAFE_VOCAB, (3, 70), generator=torch.Generator().manual_seed(0))
    return model, tokens


def make_sae(site, write_mode="raw"):
    torch.manual_seed(1)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=32, d_k=16, d_v=16, k=4, n_heads=4, head=1, site=site, layer=1,
                                  family="qwen3_5_text", write_mode=write_mode))
    with torch.no_grad():
        sae.enc_key.mul_(100.0)
    return sae


@pytest.mark.parametrize("site,mode", [("write", "raw"), ("state", "raw"), ("write", "delta")])
def test_fast_equals_naive_and_brute_force(setup, site, mode):
    model, tokens = setup
    sae = make_sae(site, mode)
    cfg = SubstitutionConfig(max_firings=5, max_per_context=2, write_mode=mode, seed=3)
    fast = run_substitution(model, sae, tokens, cfg, progress=False)
    naive = run_substitution_naive(model, sae, tokens, cfg)
    assert len(fast.records) == len(naive.records) == 5 * len(CONDITIONS)
    for a, b in zip(fast.records, naive.records):
        assert (a["firing"], a["condition"]) == (b["firing"], b["condition"])
        for k in a:
            if k.startswith("kl"):
                assert a[k] == pytest.approx(b[k], rel=2e-3, abs=1e-9), (a["condition"], k)
    assert max(r["kl_final"] for r in fast.records) > 1e-6
    # brute force: the edited recurrence of the layer (reference loop) spliced into a full forward
    from writesae_plugin.adapters.reference import gated_deltanet_reference

    rec = max((r for r in fast.records if r["condition"] == "atom_norm"), key=lambda r: r["kl_final"])
    f = Firing(rec["context"], rec["pos"], rec["atom"], rec["act"])
    ctx = tokens[f.context:f.context + 1]
    p = "blocks.1.linear_attn."
    with torch.no_grad(), model.options(write_mode=mode):
        _, c = model.run_with_cache(ctx, names_filter=lambda n: n.startswith(p))
        W = torch.outer(c[p + "hook_write_key"][0, f.pos, 1], c[p + "hook_write_value"][0, f.pos, 1])
        A = replacement("atom_norm", sae, f, W, None, torch.Generator())
        ref = gated_deltanet_reference(c[p + "hook_query"], c[p + "hook_write_key"], c[p + "hook_v"],
                                       c[p + "hook_log_decay"], c[p + "hook_beta"],
                                       write_edits={(0, f.pos, 1): (A, mode)})
        brute = model.run_with_hooks(ctx, fwd_hooks=[(p + "hook_read", lambda x, hook: ref.read)])[0]
        clean = model(ctx)[0]
    # a different arithmetic path (per-token fp32 loop): agreement to fp32 rounding of the logit changes
    assert kl_metrics(clean, brute, f.pos)["kl_final"] == pytest.approx(rec["kl_final"], rel=1e-2)


def test_summary_fields(setup):
    model, tokens = setup
    res = run_substitution(model, make_sae("write"), tokens, SubstitutionConfig(max_firings=6), progress=False)
    s = res.summary
    assert s["n_firings"] == 6 and set(s["by_metric"]) >= {"kl_final", "kl_next", "kl_mean", "kl_final_rev"}
    head = s["by_metric"]["kl_final"]["atom_act"]
    wins = sum(r["kl_final"] < d["kl_final"] for r in res.records if r["condition"] == "atom_act"
               for d in res.records if d["condition"] == "delete" and d["firing"] == r["firing"])
    assert head["win"]["k"] == wins and head["win"]["n"] == 6
    assert {"bootstrap_by_atom", "bootstrap_by_context", "wilcoxon_vs_delete", "per_atom_mean"} <= set(head)
    assert "strict_chain_atom_act" in s["by_metric"]["kl_final"] and s["headline"]["n"] == 6
    with pytest.raises(ValueError, match="per-head"):
        run_substitution(model, WriteSAE(WriteSAEConfig(d_in=256, d_sae=8, d_k=16, d_v=16, k=2, n_heads=4,
                                                        site="write", layer=1)), tokens)


def test_writeedit_positions_with_cache(setup):
    """The absolute position of an edit is found from the HF cache when the call continues a sequence."""
    model, tokens = setup
    e = WriteEdit(layer=1, pos=40, head=0, op="delete")
    with torch.no_grad():
        full = model.run_with_edits(tokens[:1], [e])
        out = model(tokens[:1, :30], return_type="hf")
        with model.edits([e]):
            rest = model(tokens[:1, 30:], return_type="hf", past_key_values=out.past_key_values).logits
    assert (rest - full[:, 30:]).abs().max() <= 1e-4


@pytest.fixture
def cli_assets(tmp_path, tiny_tokenizer, setup):
    """A saved model + tokenizer, a saved per-head WriteSAE and a small text file, for the CLI tests."""
    model, _ = setup
    model.hf_model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    make_sae("write").save_model(tmp_path / "sae")
    words = ["def", "return", "import", "self", "value", "state", "print", "class"]
    g = torch.Generator().manual_seed(0)
    (tmp_path / "text.txt").write_text("\n\n".join(" ".join(words[i] for i in torch.randint(0, 8, (20,), generator=g))
                                                   for _ in range(200)))  # 200 documents, 12 in the test split
    return tmp_path


def test_substitute_cli_writes_every_promised_file(cli_assets):
    import json

    from writesae_plugin.cli import main

    tmp_path = cli_assets
    out = tmp_path / "res"
    assert main(["substitute", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"), "--dataset",
                 str(tmp_path / "text.txt"), "--contexts", "6", "--context-length", "40", "--max-firings", "6",
                 "--out", str(out)]) == 0
    for name in ("results.json", "records.jsonl", "index.html", "substitution_kl.png", "substitution_win_rates.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["summary"]["n_firings"] == len(res["firings"]) > 0
    assert len((out / "records.jsonl").read_text().splitlines()) == res["summary"]["n_firings"] * len(CONDITIONS)


def test_other_experiment_clis(cli_assets):
    from writesae_plugin.cli import main

    tmp_path = cli_assets
    common = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "text.txt"), "--contexts", "4",
              "--context-length", "24"]
    assert main(["closed-form", *common, "--sae", str(tmp_path / "sae"), "--atoms", "0", "1", "--out",
                 str(tmp_path / "cf")]) == 0
    assert (tmp_path / "cf" / "closed_form_horizon.png").is_file()
    assert main(["install", *common, "--layer", "1", "--head", "2", "--strata", "5-20", "--new-tokens", "4",
                 "--out", str(tmp_path / "inst")]) == 0
    assert (tmp_path / "inst" / "records.jsonl").is_file()
    assert main(["attribute", *common, "--sae", str(tmp_path / "sae"), "--atoms", "0", "1", "2", "--out",
                 str(tmp_path / "attr")]) == 0
    assert (tmp_path / "attr" / "effective_attention.png").is_file()


def test_mcnemar_is_the_exact_test_of_the_discordant_pairs():
    from scipy.stats import binomtest

    from writesae_plugin.experiments import stats

    before = [False] * 10 + [True] * 4 + [False] * 6
    after = [True] * 10 + [False] * 4 + [False] * 6  # 10 gained, 4 lost, 6 unchanged
    m = stats.mcnemar(after, before)
    assert (m["gained"], m["lost"], m["n"]) == (10, 4, 20) and m["difference"] == pytest.approx(0.3)
    assert m["p"] == pytest.approx(binomtest(10, 14, 0.5).pvalue) and not m["significant"]  # p = 0.18
    strong = stats.mcnemar([True] * 12 + [False] * 8, [False] * 20)
    assert strong["significant"] and strong["p"] == pytest.approx(2 * 0.5 ** 12)
    same = stats.mcnemar([True, False], [True, False])
    assert same["p"] == 1.0 and not same["significant"]
    with pytest.raises(ValueError, match="equal lengths"):
        stats.mcnemar([True], [True, False])

"""Atom dashboards: the streaming per-atom statistics against brute force, the pass and the site on tiny models,
the Neuronpedia export, and the `writesae dashboard` command's checks."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

import writesae_plugin  # noqa: F401
from writesae_plugin.adapters import WriteEdit, hook_model
from writesae_plugin.dashboard import DashboardConfig, StatsConfig, compute_dashboard, load_atom, write_dashboard
from writesae_plugin.dashboard.stats import HIST_EDGES, AtomStats
from writesae_plugin.sae import WriteSAE, WriteSAEConfig


def _random_batch(g, B, T, n, V=50, p=0.15):
    codes = torch.rand(B, T, n, generator=g) * torch.exp(torch.randn(B, T, n, generator=g) * 2)
    codes = codes * (torch.rand(B, T, n, generator=g) < p)
    tokens = torch.randint(0, V, (B, T), generator=g)
    key_dot = torch.randn(B, T, n, generator=g)
    log_decay = -torch.rand(B, T, generator=g) * 0.3
    return codes, tokens, key_dot, log_decay


def test_streaming_stats_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    n, T = 6, 23
    cfg = StatsConfig(top_k=5, reservoir=10_000, before=3, after=2, horizon=4)
    acc = AtomStats(n, cfg, state_site=True)
    batches = [_random_batch(g, B, T, n) for B in (3, 1, 4)]
    for b in batches:
        acc.update(*b)
    codes = torch.cat([b[0] for b in batches])
    tokens = torch.cat([b[1] for b in batches])
    key_dot = torch.cat([b[2] for b in batches])
    G = torch.cat([b[3] for b in batches]).double().cumsum(1)
    N = codes.shape[0]
    assert acc.positions == N * T and acc.contexts == N
    for i in range(n):
        a = codes[..., i]
        fires = (a != 0).nonzero().tolist()
        assert int(acc.fires[i]) == len(fires)
        assert float(acc.act_max[i]) == float(a.max())
        # top-k: values, places and windows
        order = sorted(fires, key=lambda ct: -float(a[ct[0], ct[1]]))[:cfg.top_k]
        top = acc.top(i)
        assert [(r["ctx"], r["pos"]) for r in top] == [tuple(x) for x in order]
        for r in top:
            c, t = r["ctx"], r["pos"]
            assert r["act"] == float(a[c, t])
            for j, off in enumerate(range(-cfg.before, cfg.after + 1)):
                inside = 0 <= t + off < T
                assert r["tokens"][j] == (int(tokens[c, t + off]) if inside else -1)
                assert r["acts"][j] == (float(a[c, t + off]) if inside else 0.0)
        # reservoir larger than the firings: it is every firing, so quantiles are exact
        vals = sorted(float(a[c, t]) for c, t in fires)
        assert [r["act"] for r in acc.sample(i)] == vals
        q = acc.quantiles(i)
        for k, v in q.items():
            assert v == pytest.approx(float(np.quantile(vals, float(k))), rel=1e-12)
        # exact histogram
        h = acc.histogram(i)
        brute = np.histogram(np.abs(vals), bins=np.asarray(h["edges"]))[0]
        assert h["counts"] == brute.tolist() and sum(h["counts"]) == len(vals)
        # key side extremes
        kd = key_dot[..., i].flatten()
        ks = acc.key_side(i)
        assert [r["value"] for r in ks["top"]] == kd.topk(cfg.top_k).values.tolist()
        assert [r["value"] for r in ks["bottom"]] == kd.topk(cfg.top_k, largest=False).values.tolist()
        assert all(r["token"] == int(tokens[r["ctx"], r["pos"]]) for r in ks["top"] + ks["bottom"])
        # curves: decay over firings, persistence after onsets
        cur = acc.curves(i)
        for d in range(cfg.horizon + 1):
            dec = [float(torch.exp(G[c, t + d] - G[c, t])) for c, t in fires if t + d < T]
            assert cur["n_decay"][d] == len(dec)
            assert cur["decay"][d] == pytest.approx(np.mean(dec) if dec else None, rel=1e-5)
            ons = [(c, t) for c, t in fires if (t == 0 or a[c, t - 1] == 0) and t + d < T]
            assert cur["n_onsets"][d] == len(ons)
            if ons:
                assert cur["persistence"][d] == pytest.approx(np.mean([float(a[c, t + d] / a[c, t]) for c, t in ons]),
                                                              rel=1e-5)
                assert cur["alive"][d] == pytest.approx(np.mean([float(a[c, t + d] != 0) for c, t in ons]))


def test_reservoir_is_a_sample_of_the_firings():
    g = torch.Generator().manual_seed(1)
    n, T = 3, 40
    acc = AtomStats(n, StatsConfig(reservoir=7, top_k=3), state_site=False)
    batches = [_random_batch(g, 2, T, n, p=0.5) for _ in range(3)]
    for b in batches:
        acc.update(b[0], b[1])
    codes = torch.cat([b[0] for b in batches])
    for i in range(n):
        s = acc.sample(i)
        assert len(s) == 7
        assert len({(r["ctx"], r["pos"]) for r in s}) == 7
        assert all(r["act"] == float(codes[r["ctx"], r["pos"], i]) != 0 for r in s)
    assert len(HIST_EDGES) == 97


def _tiny_sae(site="write", head=1, d_sae=16, seed=0):
    torch.manual_seed(seed)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=d_sae, d_k=16, d_v=16, k=3, n_heads=4, head=head, site=site,
                                  layer=1, family="qwen3_5_text"))
    with torch.no_grad():
        sae.enc_key.mul_(30.0)
    return sae


@pytest.mark.parametrize("site", ["write", "state"])
def test_dashboard_on_a_tiny_model(qwen, tokens, tmp_path, site):
    from writesae_plugin.experiments.substitution import _site_and_writes, atom_matrix

    model = hook_model(qwen)
    sae = _tiny_sae(site)
    tokens = tokens[:, :40]
    cfg = DashboardConfig(stats=StatsConfig(top_k=4, reservoir=50, before=4, after=2, horizon=6), batch=1,
                          value_firings=1, effect_firings=1, n_tokens=4, max_pages=3)
    data = compute_dashboard(model, sae, tokens, cfg, progress=False)
    codes = _site_and_writes(model, sae, tokens, sae.cfg.write_mode)[0]
    # the pass sees exactly the SAE's codes
    assert data.stats.fires.tolist() == (codes != 0).sum((0, 1)).tolist()
    live = [a for a in range(16) if data.stats.fires[a] > 0]
    most = sorted(live, key=lambda i: (-int(data.stats.fires[i]), i))[:3]
    assert data.atoms == sorted(most) and live
    a = data.atoms[0]
    best = data.stats.top(a)[0]
    assert best["act"] == pytest.approx(float(codes[..., a].max()), rel=1e-5)
    # measured effect: the record equals an independent full-context substitution at that firing
    rec = data.effect[a]["records"][0]
    c, t = rec["ctx"], rec["pos"]
    with torch.no_grad():
        clean = model(tokens[c:c + 1])[0, t].double().log_softmax(-1)
        e = WriteEdit(layer=1, pos=t, head=1, matrix=rec["act"] * atom_matrix(sae, a), mode=sae.cfg.write_mode)
        edited = model.run_with_edits(tokens[c:c + 1], [e])[0, t].double().log_softmax(-1)
    assert rec["kl_atom"] == pytest.approx(float((clean.exp() * (clean - edited)).sum()), rel=1e-4, abs=1e-9)
    index = write_dashboard(data, tmp_path / "dash", tokenizer=None, progress=False)
    assert index.is_file()
    meta = json.loads((tmp_path / "dash" / "data" / "index.json").read_text())
    assert len(meta["atoms"]) == 16 and meta["n_positions"] == tokens.numel()
    page = load_atom(tmp_path / "dash", a)
    assert set(page) >= {"top_contexts", "quantile_samples", "histogram", "key_side", "value_side", "effect",
                         "curves", "density", "dead", "label"}
    assert (tmp_path / "dash" / "atoms" / f"{a}.html").is_file()
    assert (tmp_path / "dash" / "figures" / f"atom_{a}.png").stat().st_size > 1000
    if site == "state":
        assert page["curves"]["persistence"][0] == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match="no dashboard data for atom 99"):
        load_atom(tmp_path / "dash", 99)


def _corpus(tmp_path):
    text = "\n\n".join(f"def g{i}(a, b):\n    '''doc {i}'''\n    return a * {i} + b" for i in range(60))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def test_cli_dashboard_with_neuronpedia_export(tmp_path):
    from writesae_plugin.cli import main
    from writesae_plugin.dashboard.neuronpedia import ACTIVATION_REQUIRED, FEATURE_REQUIRED
    from writesae_plugin.demo.run import demo_model_dir

    out, npd = tmp_path / "site", tmp_path / "np"
    rc = main(["dashboard", "--model", str(demo_model_dir()), "--sae", "writesae-demo:L4.H0.write", "--dataset",
               str(_corpus(tmp_path)), "--split", "train", "--context-length", "64", "--tokens", "192",
               "--max-pages", "2", "--effect-firings", "1", "--value-firings", "1", "--out", str(out),
               "--neuronpedia", str(npd), "--np-model-id", "writesae-demo"])
    assert rc == 0
    meta = json.loads((out / "data" / "index.json").read_text())
    assert meta["n_contexts"] == 3 and meta["context_length"] == 64 and len(meta["atoms"]) == 512
    src = npd / "writesae-demo" / "4-writesae-write-h0-512"

    def rows(name):
        with gzip.open(src / name, "rt") as f:
            return [json.loads(line) for line in f]

    for name in ("release.jsonl.gz", "model.jsonl.gz", "sourceset.jsonl.gz", "source.jsonl.gz"):
        assert len(rows(name)) == 1
    assert rows("source.jsonl.gz")[0]["id"] == "4-writesae-write-h0-512"
    feats = rows("features/batch-0.jsonl.gz")
    paged = [r["atom"] for r in meta["atoms"] if r["page"]]
    assert sorted(int(f["index"]) for f in feats) == sorted(paged) and paged
    for f in feats:
        assert all(f[k] not in (None, "") for k in FEATURE_REQUIRED)
        assert f["layer"] == "4-writesae-write-h0-512" and f["hookName"] == "blocks.4.linear_attn.hook_write"
        assert len(f["pos_str"]) == len(f["pos_values"]) > 0 and 0 < f["frac_nonzero"] <= 1
        assert sum(f["freq_hist_data_bar_heights"]) == load_atom(out, int(f["index"]))["fires"]
    acts = rows("activations/batch-0.jsonl.gz")
    assert acts and len({a["id"] for a in acts}) == len(acts)
    for a in acts:
        assert all(k in a and a[k] is not None for k in ACTIVATION_REQUIRED)
        assert len(a["tokens"]) == len(a["values"]) and a["maxValue"] == max(a["values"])
        assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"] and a["minValue"] == min(a["values"])


def test_cli_dashboard_refuses_bad_input_before_loading(tmp_path, capsys):
    import sys

    from writesae_plugin.cli import main
    from writesae_plugin.demo.run import demo_model_dir

    base = ["dashboard", "--model", str(demo_model_dir()), "--dataset", str(_corpus(tmp_path)), "--out",
            str(tmp_path / "o")]
    had_torch = "torch" in sys.modules
    assert main(base + ["--sae", "writesae-demo:L4.H0.write", "--atoms", "512"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(base + ["--sae", "writesae-demo:L9.H9.write"]) == 2
    assert "has no SAE" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(base + ["--sae", "writesae-demo:L4.H0.write", "--neuronpedia", str(tmp_path / "file")]) == 2
    assert "--neuronpedia" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own exit, one line
        main(base + ["--sae", "writesae-demo:L4.H0.write", "--tokens", "0"])
    assert e.value.code == 2 and "--tokens: must be a positive integer" in capsys.readouterr().err
    assert had_torch or "torch" not in sys.modules


def test_reports_are_readable(tmp_path):
    """Every results.json-producing command writes index.html through write_report: a headline table of the
    numbers with n and intervals, figures, the configuration collapsed, links to raw files and sub-reports."""
    from writesae_plugin.experiments.stats import wilson
    from writesae_plugin.report import plt, write_report

    def fig():
        f, ax = plt.subplots()
        ax.plot([0, 1])
        return f

    results = {"config": {"seed": 3}, "summary": {"win": wilson(7, 10), "fit": {"r2": 0.5, "n": 40},
                                                  "diff": {"difference": 0.2, "lo": 0.1, "hi": 0.3, "n_a": 5, "n_b": 6}}}
    index = write_report(tmp_path, "t", results, [{"a": 1}], {"plot": fig}, ["a note"], links=[("sub", "sub/index.html")],
                         headline=[("seven of ten", results["summary"]["win"])])
    page = index.read_text()
    assert "<table id='headline'>" in page and "<td>seven of ten</td><td>70.0%</td>" in page
    assert "[39.7, 89.2]" in page and "R² = 0.5" in page and "[0.1, 0.3]" in page
    assert "<details><summary>Configuration</summary>" in page and '&quot;seed&quot;: 3' in page
    for href in ("results.json", "records.jsonl", "plot.png", "sub/index.html"):
        assert f'href="{href}"' in page
    assert (tmp_path / "plot.png").stat().st_size > 0 and not list(tmp_path.glob(".*tmp*"))


def test_reports_show_examples_with_text(tmp_path):
    """Substitution and install reports carry token text: firings with their context, prompts with both
    continuations."""
    from writesae_plugin.cli import main
    from writesae_plugin.demo.run import demo_model_dir

    common = ["--model", str(demo_model_dir()), "--dataset", str(_corpus(tmp_path)), "--split", "train",
              "--contexts", "2", "--context-length", "48"]
    assert main(["substitute", *common, "--sae", "writesae-demo:L4.H0.write", "--max-firings", "3",
                 "--out", str(tmp_path / "s")]) == 0
    firings = json.loads((tmp_path / "s" / "results.json").read_text())["firings"]
    assert firings and all(isinstance(f["token"], str) and isinstance(f["before"], str) for f in firings)
    assert "<table id='examples'>" in (tmp_path / "s" / "index.html").read_text()
    assert main(["install", *common[:-3], "1", "--context-length", "48", "--layer", "4", "--head", "0",
                 "--targets", "1", "--new-tokens", "4",
                 "--strata", "10-50", "--out", str(tmp_path / "i")]) == 0
    recs = [json.loads(x) for x in (tmp_path / "i" / "records.jsonl").read_text().splitlines()]
    assert recs and all({"prompt_text", "target_text", "baseline_text", "installed_text"} <= set(r) for r in recs)
    page = (tmp_path / "i" / "index.html").read_text()
    assert "installed continuation" in page


def test_head_shared_sae_is_viewed_at_a_head(qwen, tokens):
    """A head-shared SAE (--shared-heads) is viewed at one value head: its codes there are the per-head codes."""
    from writesae_plugin.dashboard.compute import at_head

    model = hook_model(qwen)
    torch.manual_seed(0)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=8, d_k=16, d_v=16, k=2, n_heads=4, head=None, site="write",
                                  layer=1, family="qwen3_5_text"))
    with pytest.raises(ValueError, match="choose the head"):
        compute_dashboard(model, sae, tokens[:, :20], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        at_head(sae, 4, 4)
    data = compute_dashboard(model, sae, tokens[:, :20], DashboardConfig(head=2, max_pages=1, value_firings=1,
                                                                        effect_firings=1), progress=False)
    assert data.sae_info["head"] == 2 and data.sae_info["shared_heads"]
    p = model.hook_prefix(1)
    with torch.no_grad():
        _, c = model.run_with_cache(tokens[:, :20], names_filter=[p + "hook_write_key", p + "hook_write_value"])
        codes = sae.encode_factors(c[p + "hook_write_key"][:, :, 2], c[p + "hook_write_value"][:, :, 2])
    assert data.stats.fires.tolist() == (codes != 0).sum((0, 1)).tolist()


class _WhitespaceTokenizer:
    """Decodes ids to tokens that are (or hold) newlines, tabs and spaces, as code tokenizers do."""

    TOKENS = ["\n", "\t", " end", "x\n    ", "  ", "ab"]

    def decode(self, ids):
        return "".join(self.TOKENS[i % len(self.TOKENS)] for i in ids)


def test_whitespace_tokens_are_shown_readably_on_pages_and_in_labels(qwen, tokens, tmp_path):
    """Newline, tab and space tokens: ↵, ⇥ and ␣ in token lists and labels (index, pages, JSON label), ↵ then a line
    break in contexts; never Python-quoted whitespace such as '\\n'."""
    from writesae_plugin.report import token_text

    assert [token_text(t) for t in _WhitespaceTokenizer.TOKENS] == ["↵", "⇥", "␣end", "x↵␣␣␣␣", "␣␣", "ab"]
    assert token_text(" a\tb\n", spaces=False) == " a⇥b↵" and token_text("\r\x00") == "\\r\\x00"
    model = hook_model(qwen)
    cfg = DashboardConfig(stats=StatsConfig(top_k=4, reservoir=50, before=4, after=2, horizon=6), batch=1,
                          value_firings=1, effect_firings=1, n_tokens=4, max_pages=3)
    data = compute_dashboard(model, _tiny_sae("write"), tokens[:, :40], cfg, progress=False)
    write_dashboard(data, tmp_path / "dash", tokenizer=_WhitespaceTokenizer(), progress=False)
    pages = [(tmp_path / "dash" / "atoms" / f"{a}.html").read_text() for a in data.atoms]
    html = (tmp_path / "dash" / "index.html").read_text() + "".join(pages)
    for quoted in ("'\\n'", '"\\n"', "'\\t'", "' end'", "&#x27;"):
        assert quoted not in html, quoted
    assert "<code>↵</code>" in html and "<code>⇥</code>" in html and "<code>␣end</code>" in html
    assert "↵\n" in "".join(pages)  # a newline token in a context: its glyph, then the line break
    index = (tmp_path / "dash" / "index.html").read_text()  # the index says which atoms have pages, how to get more
    assert f"Pages for {len(data.atoms)} atoms: the 3 most frequently firing atoms" in index and "--max-pages" in index
    labels = [load_atom(tmp_path / "dash", a)["label"] for a in data.atoms]
    assert labels and all(lab and "'" not in lab for lab in labels)
    assert all(set(lab.split(" ")) <= {token_text(t) for t in _WhitespaceTokenizer.TOKENS} for lab in labels)


def test_the_page_rule_is_said_on_the_index_and_in_help(capsys):
    from writesae_plugin.cli import main
    from writesae_plugin.dashboard.site import pages_note
    from writesae_plugin.demo.run import QUICK, DemoSize

    assert pages_note({"max_pages": 24, "atoms": [313, 97]}, 26).startswith(
        "Pages for 26 atoms: the 24 most frequently firing atoms and atoms [97, 313]")
    assert pages_note({"max_pages": None, "atoms": [5]}, 1).startswith("Pages for 1 atoms: atoms [5]")
    assert pages_note({"max_pages": None, "atoms": None}, 40).startswith("Pages for 40 atoms: every atom that fired")
    with pytest.raises(SystemExit):
        main(["dashboard", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Which atoms get pages: by default every atom that fires" in out and "the N most frequently firing" in out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DemoSize().dashboard_pages}; {QUICK.dashboard_pages} with --quick)" in out
    assert "--dashboard-pages" in out

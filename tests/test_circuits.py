"""Feature circuits and ACDC over write atoms: a planted mechanism is recovered; graphs export; GDN run."""

from __future__ import annotations

import pytest
import torch

import writesae_plugin  # noqa: F401
from conftest import SAFE_VOCAB
from writesae_plugin.adapters import hook_model
from writesae_plugin.circuits import logit_diff, patch_writes
from writesae_plugin.circuits.feature_circuits import Circuit, acdc_prune, feature_circuit
from writesae_plugin.sae import WriteSAE, WriteSAEConfig

S = 5  # the planted write position
METRIC = logit_diff(7, 3)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """One Mamba-2 layer, logits linear in the writes, and only head 1 writes (other heads' values are 0);
    dt is token-independent (constant decays) and the conv kernel is 1, so a token change at S changes
    exactly one write that reaches the last position: (layer 0, position S, head 1)."""
    from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM

    class NoGate(torch.nn.Module):
        def forward(self, hidden_states, gate=None):
            return hidden_states

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("planted")
    cfg = Mamba2Config(vocab_size=256, hidden_size=64, state_size=16, num_heads=4, head_dim=16, expand=1,
                       n_groups=2, chunk_size=16, num_hidden_layers=1, conv_kernel=1)
    Mamba2ForCausalLM(cfg).save_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    mixer = hf.backbone.layers[0].mixer
    with torch.no_grad():
        for h in (0, 2, 3):  # x channels of these heads: zero weight and bias -> silu(0) = 0
            rows = slice(64 + 16 * h, 64 + 16 * (h + 1))
            mixer.in_proj.weight[rows] = 0
            mixer.conv1d.bias[16 * h:16 * (h + 1)] = 0
        mixer.in_proj.weight[64 + mixer.conv_dim:] = 0  # dt rows: dt' = softplus(dt_bias), token-independent
        hf.lm_head.weight.mul_(20.0)
    hf.backbone.norm_f = torch.nn.Identity()
    mixer.norm = NoGate()
    return hook_model(hf)


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(4)
    clean = torch.randint(0, SAFE_VOCAB, (2, 10), generator=g)
    corrupted = clean.clone()
    corrupted[:, S] = (clean[:, S] + 11) % SAFE_VOCAB
    return clean, corrupted


def planted_sae(model, clean, corrupted):
    """A rank-1 TopK(1) SAE whose atoms 0 and 1 are the clean and corrupted writes at S (row 0), tied
    encoder; the other atoms random."""
    torch.manual_seed(2)
    sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=12, d_k=16, d_v=16, k=1, n_heads=4, head=1, site="write",
                                  layer=0, family="mamba2"))
    sae.cfg.metadata.hook_name = "blocks.0.mixer.hook_write"
    p = "blocks.0.mixer."
    with torch.no_grad():
        for j, toks in enumerate((clean, corrupted)):
            _, c = model.run_with_cache(toks, names_filter=[p + "hook_write_key", p + "hook_write_value"])
            k, v = c[p + "hook_write_key"][0, S, 1], c[p + "hook_write_value"][0, S, 1]
            sae.dec_key[j, 0], sae.dec_value[j, 0] = k / k.norm(), v / v.norm()
        sae.enc_key.copy_(sae.dec_key)
        sae.enc_value.copy_(sae.dec_value)
    return sae


def test_activation_patching_finds_the_planted_write(planted, pair):
    clean, corrupted = pair
    res = patch_writes(planted, clean, corrupted, METRIC, progress=False)
    effect = (res.scores - res.corrupted).abs()[0]  # [T, H]
    assert effect[S, 1] > 1e-3
    effect[S, 1] = 0
    assert effect.max() < 1e-5


def test_feature_circuit_and_acdc_recover_the_planted_atoms(planted, pair, tmp_path):
    clean, corrupted = pair
    sae = planted_sae(planted, clean[:1], corrupted[:1])
    c1, x1 = clean[:1], corrupted[:1]
    circ = feature_circuit(planted, [sae], c1, x1, METRIC, node_threshold=0.01, progress=False)
    ids = {n["id"] for n in circ.nodes}
    assert {"L0.H1.write.0", "L0.H1.write.1"} <= ids
    total = circ.metric["clean"] - circ.metric["corrupted"]
    # linear in the writes: attribution patching is exact and the node effects add up to the total
    assert sum(n["effect"] for n in circ.nodes) == pytest.approx(total, rel=1e-3)
    pruned = acdc_prune(planted, [sae], c1, x1, METRIC, threshold=0.01, progress=False)
    assert {n["id"] for n in pruned.nodes} == {"L0.H1.write.0", "L0.H1.write.1"}
    assert pruned.metric["faithfulness"] == pytest.approx(1.0, abs=0.02)
    path = tmp_path / "circuit.json"
    circ.to_json(path)
    again = Circuit.from_json(path)
    assert again.node_ids() == circ.node_ids() and again.metric == circ.metric
    fig = circ.figure()
    fig.savefig(tmp_path / "circuit.png")
    assert (tmp_path / "circuit.png").stat().st_size > 1000


def test_feature_circuit_on_gdn_has_edges_and_acdc_is_faithful(qwen, tokens):
    model = hook_model(qwen)
    clean = tokens[:, :12]
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 5) % SAFE_VOCAB
    saes = []
    for layer, seed in ((0, 0), (1, 1)):
        torch.manual_seed(seed)
        s = WriteSAE(WriteSAEConfig(d_in=256, d_sae=32, d_k=16, d_v=16, k=4, n_heads=4, head=2, site="write",
                                    family="qwen3_5_text", layer=layer))
        with torch.no_grad():
            s.enc_key.mul_(10.0)
        s.cfg.metadata.hook_name = f"blocks.{layer}.linear_attn.hook_write"
        saes.append(s)
    circ = feature_circuit(model, saes, clean, corrupted, METRIC, node_threshold=0.0, edge_threshold=0.0,
                           max_nodes_per_sae=4, progress=False)
    layers = {n["layer"] for n in circ.nodes}
    assert layers == {0, 1} and circ.edges
    assert all(e["src"].startswith("L0") and e["dst"].startswith("L1") for e in circ.edges)
    pruned = acdc_prune(model, saes, clean, corrupted, METRIC, threshold=0.02, circuit=circ, progress=False)
    assert set(pruned.node_ids()) <= set(circ.node_ids())
    assert abs(pruned.metric["circuit"] - pruned.metric["clean"]) <= 0.02 * len(circ.nodes) * abs(
        pruned.metric["clean"] - pruned.metric["corrupted"]) + 1e-6
    with pytest.raises(ValueError, match="distinct"):
        feature_circuit(model, [saes[0], saes[0]], clean, corrupted, METRIC)
    with pytest.raises(ValueError, match="does not distinguish"):
        feature_circuit(model, saes, clean, clean, METRIC)


def test_shift_style_editing_against_random_controls(planted, pair):
    from writesae_plugin.circuits import edit_atoms, mean_ci

    clean, corrupted = pair
    sae = planted_sae(planted, clean[:1], corrupted[:1])

    def row_diff(logits):
        return logits[:, -1, 7] - logits[:, -1, 3]

    res = edit_atoms(planted, sae, clean[:1].repeat(3, 1), row_diff, atoms=[0], mode="ablate", n_controls=5,
                     progress=False)
    # ablating the planted atom removes the clean write at S (its error node is ~0): the metric moves
    from writesae_plugin.adapters import WriteEdit

    with torch.no_grad():
        deleted = planted.run_with_edits(clean[:1], [WriteEdit(layer=0, pos=S, head=1, op="delete")])
    assert res["after"]["mean"] == pytest.approx(float(row_diff(deleted)[0]), abs=1e-3)
    assert res["effect"]["n"] == 3 and res["controls"]["n"] == 5
    assert abs(res["effect"]["mean"]) > max(abs(c) for c in res["controls"]["effects"])
    inst = edit_atoms(planted, sae, corrupted[:1], row_diff, atoms=[0], mode="install", positions=[S],
                      n_controls=2, progress=False)
    assert inst["after"]["mean"] != pytest.approx(inst["before"]["mean"], abs=1e-4)
    m = mean_ci(torch.tensor([1.0, 2.0, 3.0]))
    assert m["mean"] == 2.0 and m["lo"] < 2.0 < m["hi"] and m["n"] == 3
    with pytest.raises(ValueError, match="one value per prompt"):
        edit_atoms(planted, sae, clean[:1], lambda lo: lo[:, -1, 7].sum(), atoms=[0], n_controls=0)
    with pytest.raises(ValueError, match="atoms"):
        edit_atoms(planted, sae, clean[:1], row_diff, atoms=[99])


def test_copy_task_pairs(tiny_tokenizer):
    from writesae_plugin.circuits.tasks import copy_task
    from writesae_plugin.demo import corpus

    pairs = copy_task(tiny_tokenizer, corpus.texts("test"), n=4, length=16, source_pos=5)
    assert pairs.clean.shape == pairs.corrupted.shape == (4, 16) and len(pairs) == 4
    diff = (pairs.clean != pairs.corrupted).nonzero()
    assert set(diff[:, 1].tolist()) == {5}  # only the source position differs
    assert torch.equal(pairs.clean[:, -1], pairs.clean[:, 4])  # the repeat of A
    assert torch.equal(pairs.answer, pairs.clean[:, 5]) and torch.equal(pairs.wrong, pairs.corrupted[:, 5])
    with pytest.raises(ValueError, match="source_pos"):
        copy_task(tiny_tokenizer, corpus.texts("test"), n=1, length=8, source_pos=7)


def test_quote_task_pairs_and_their_effect_on_both_shipped_models():
    from writesae_plugin.circuits.tasks import quote_task
    from writesae_plugin.demo import corpus
    from writesae_plugin.demo.run import load_demo_model

    for arch in ("qwen3_5", "mamba2"):
        model = load_demo_model(arch=arch)
        pairs = quote_task(model.tokenizer, corpus.texts("test"), n=8, length=20)
        assert pairs.clean.shape == (8, 20) and pairs.source_pos == 17
        diff = (pairs.clean != pairs.corrupted).nonzero()
        assert set(diff[:, 1].tolist()) == {17}
        assert model.tokenizer.decode(pairs.clean[:1, 17]) == "'" and model.tokenizer.decode(pairs.wrong[:1]) == '"'
        m = pairs.metric(per_prompt=True)
        with torch.no_grad():
            gap = m(model(pairs.clean)) - m(model(pairs.corrupted))
        assert gap.min() > 1.0, arch  # the state remembers which quote is open
    with pytest.raises(ValueError, match="no room"):
        quote_task(model.tokenizer, corpus.texts("test"), n=1, length=6)


def test_circuit_cli_commands_on_the_shipped_model(tmp_path, capsys):
    import json

    from writesae_plugin.cli import main

    common = ["--n", "2", "--length", "12"]
    assert main(["patch", *common, "--task", "copy", "--source-pos", "4", "--out", str(tmp_path / "copy")]) == 0
    assert main(["patch", *common, "--out", str(tmp_path / "patch")]) == 0
    res = json.loads((tmp_path / "patch" / "results.json").read_text())
    assert res["n_prompts"] == 2 and res["writes"]["top"] and res["atoms"]["top"]
    assert (tmp_path / "patch" / "write_patching.png").is_file()
    assert main(["attribution-patch", *common, "--out", str(tmp_path / "ap")]) == 0
    res = json.loads((tmp_path / "ap" / "results.json").read_text())
    assert res["writes"]["n"] == 5 * 12 * 4 and "atoms_nnsight" in res
    assert main(["path-patch", *common, "--layer", "2", "--head", "1", "--out", str(tmp_path / "pp")]) == 0
    assert main(["circuit", *common, "--out", str(tmp_path / "circ")]) == 0
    graph = json.loads((tmp_path / "circ" / "circuit.json").read_text())
    assert set(graph) == {"nodes", "edges", "metric", "method"}
    assert (tmp_path / "circ" / "circuit.png").is_file()
    assert main(["edit-atoms", *common, "--controls", "3", "--out", str(tmp_path / "edit")]) == 0
    out = capsys.readouterr().out
    assert "ablating atoms" in out and "faithfulness" in out


def test_edit_atoms_covers_every_position_atom_pair_and_write_to_state_edges(planted, pair):
    from writesae_plugin.circuits import edit_atoms

    clean, corrupted = pair
    sae = planted_sae(planted, clean[:1], corrupted[:1])

    def row_diff(logits):
        return logits[:, -1, 7] - logits[:, -1, 3]

    res = edit_atoms(planted, sae, clean, row_diff, atoms=[0, 1, 2], positions=[2, 5, 7], n_controls=0,
                     progress=False)
    name = sae.cfg.metadata.hook_name + ".hook_sae_acts_post"

    def zero(x, hook):
        x = x.clone()
        for t in (2, 5, 7):
            x[:, t, [0, 1, 2]] = 0
        return x

    with torch.no_grad(), planted.options(materialize_writes=True), planted.saes([sae], use_error_term=True):
        manual = row_diff(planted.run_with_hooks(clean, fwd_hooks=[(name, zero)]))
    assert res["after"]["mean"] == pytest.approx(float(manual.mean()), abs=1e-6)
    # a state SAE downstream of the write SAE at the same layer: write -> state edges exist (Mamba-2)
    torch.manual_seed(3)
    state_sae = WriteSAE(WriteSAEConfig(d_in=256, d_sae=12, d_k=16, d_v=16, k=2, n_heads=4, head=1, site="state",
                                        layer=0, family="mamba2"))
    state_sae.cfg.metadata.hook_name = "blocks.0.mixer.hook_state"
    with torch.no_grad():
        state_sae.enc_key.mul_(5.0)
    circ = feature_circuit(planted, [state_sae, sae], clean[:1], corrupted[:1], METRIC, node_threshold=0.0,
                           edge_threshold=0.0, progress=False)
    assert any(e["src"].startswith("L0.H1.write") and e["dst"].startswith("L0.H1.state") for e in circ.edges)


def _gdn_write_and_state_saes() -> list:
    """A write SAE and a state SAE at layer 1, head 2 of the tiny Qwen3.5 (encoders scaled up so atoms fire)."""
    saes = []
    for site, seed in (("write", 0), ("state", 1)):
        torch.manual_seed(seed)
        s = WriteSAE(WriteSAEConfig(d_in=256, d_sae=16, d_k=16, d_v=16, k=4, n_heads=4, head=2, site=site,
                                    family="qwen3_5_text", layer=1))
        with torch.no_grad():
            s.enc_key.mul_(10.0)
        s.cfg.metadata.hook_name = f"blocks.1.linear_attn.hook_{site}"
        saes.append(s)
    return saes


def test_write_to_state_edges_on_gdn(qwen, tokens):
    """On Gated DeltaNet too, a state SAE at the write SAE's layer sees the write atoms (states carry the
    dense write change's gradient)."""
    model = hook_model(qwen)
    clean = tokens[:1, :10]
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 5) % SAFE_VOCAB
    saes = _gdn_write_and_state_saes()
    circ = feature_circuit(model, saes[::-1], clean, corrupted, METRIC, node_threshold=0.0, edge_threshold=0.0,
                           max_nodes_per_sae=3, progress=False)
    assert any(e["src"].startswith("L1.H2.write") and e["dst"].startswith("L1.H2.state") for e in circ.edges)


def test_streamed_feature_circuit_equals_the_batched_one(qwen, tokens):
    """Streaming the gradient passes prompt by prompt (bounded memory, the `writesae circuit` default) gives
    the batched circuit's nodes, per-prompt effects and edges up to rounding; per-row answers in the metric."""
    model = hook_model(qwen)
    clean = torch.cat([tokens[:, :10], tokens[:1, 20:30]])  # 3 prompts
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 5) % SAFE_VOCAB
    saes = _gdn_write_and_state_saes()
    metric = logit_diff(torch.tensor([7, 5, 9]), torch.tensor([3, 2, 1]))
    kw = dict(node_threshold=0.0, edge_threshold=0.0, max_nodes_per_sae=3, progress=False)
    full = feature_circuit(model, saes, clean, corrupted, metric, batch_size=None, **kw)
    for bs in (2,):  # chunks of 2 and 1: reference rows after and before the live ones
        part = feature_circuit(model, saes, clean, corrupted, metric, batch_size=bs, **kw)
        assert part.node_ids() == full.node_ids() and part.metric == full.metric
        for a, b in zip(part.nodes, full.nodes):
            assert a["effect"] == pytest.approx(b["effect"], rel=1e-4, abs=1e-6)
            assert a["by_prompt"]["mean"] == pytest.approx(b["by_prompt"]["mean"], rel=1e-4, abs=1e-6)
        assert [(e["src"], e["dst"]) for e in part.edges] == [(e["src"], e["dst"]) for e in full.edges]
        for a, b in zip(part.edges, full.edges):
            assert a["effect"] == pytest.approx(b["effect"], rel=1e-4, abs=1e-6)
    assert full.edges
    with pytest.raises(ValueError, match="batch_size"):
        feature_circuit(model, saes, clean, corrupted, metric, batch_size=0, **kw)

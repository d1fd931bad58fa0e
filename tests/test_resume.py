"""Resuming a forward at a decoder layer (``resume_state`` / ``run_from_layer``), the fast path behind
``writesae substitute``, ``patch_writes`` and the patching commands, equals the full forward with the same
edits (``run_with_edits``) on every claimed family, including each family's residual form: Granite's and
Falcon-H1's embedding multipliers, Zamba2's shared blocks fed by the embeddings, Falcon-H1's parallel
attention + Mamba layers, Bamba's tuple outputs, Nemotron-H's per-block masks, Qwen4-exp's hyper-connections
and per-layer embeddings. Before the replay design, six of these were wrong or crashed."""

from __future__ import annotations

import pytest
import torch

from tiny_mamba_models import MAMBA_FAMILIES, build_tiny_mamba
from tiny_models import GDN_FAMILIES, build_tiny_model
from tiny_recurrent_models import build_tiny_kimi, build_tiny_xlstm
from writesae_plugin.adapters import WriteEdit, hook_model
from writesae_plugin.circuits import logit_diff, patch_writes

FAMILIES = ([("gdn", f) for f, layout in GDN_FAMILIES if layout == "causal_lm"]
            + [("kimi", "kimi_linear"), ("xlstm", "xlstm")] + [("mamba2", f) for f in MAMBA_FAMILIES]
            + [("fla", "delta_net"), ("fla", "gla"), ("fla", "rwkv7")])


def _model(kind, family):
    if kind == "kimi":
        return hook_model(build_tiny_kimi())
    if kind == "xlstm":
        return hook_model(build_tiny_xlstm())
    if kind == "fla":  # flash-linear-attention's DeltaNet / GLA / RWKV-7 (the [fla] extra)
        from tiny_fla_models import build_tiny_deltanet, build_tiny_gla, build_tiny_rwkv7

        build = {"delta_net": build_tiny_deltanet, "gla": build_tiny_gla, "rwkv7": build_tiny_rwkv7}[family]
        return hook_model(build())
    return hook_model(build_tiny_model(family) if kind == "gdn" else build_tiny_mamba(family))


def _edit(model, layer, pos, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return WriteEdit(layer=layer, pos=pos, head=model.cfg.n_heads - 1, batch=batch,
                     key=torch.randn(model.cfg.d_k, generator=g), value=torch.randn(model.cfg.d_v, generator=g))


@pytest.mark.parametrize("kind,family", FAMILIES, ids=[f for _, f in FAMILIES])
def test_resume_equals_full_forward_with_edits_on_every_family(kind, family):
    model = _model(kind, family)
    tokens = torch.randint(0, 200, (2, 19), generator=torch.Generator().manual_seed(0))
    T, pos = tokens.shape[1], 7
    for layer in model.cfg.recurrent_layers:
        edits = [_edit(model, layer, pos, 0, 1), _edit(model, layer, pos + 2, 1, 2)]
        with torch.no_grad():
            full = model.run_with_edits(tokens, edits)
            state = model.resume_state(tokens, layer)
            assert not state.full, state.fallback_reason
            with model.edits(edits):
                resumed = model.run_from_layer(state)
            torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)

            # the substitution path: continue a clean prefix cache from `pos` with one edited row per edit
            out = model(tokens[:1, :pos], return_type="hf", past_key_values=None, use_cache=True)
            cache = model.cache_of(out)
            rows = [_edit(model, layer, pos, r, 10 + r) for r in range(2)]
            import copy

            cache2 = copy.deepcopy(cache)
            cache2.reorder_cache(torch.zeros(2, dtype=torch.long))
            with model.edits(rows):
                cont = model.run_from_layer(state.select([0, 0], start=pos), past_key_values=cache2)
            for r in range(2):
                ref = model.run_with_edits(tokens[:1], [_edit(model, layer, pos, 0, 10 + r)])
                torch.testing.assert_close(cont[r], ref[0, pos:], rtol=0, atol=2e-5)
            assert cont.shape[1] == T - pos


@pytest.mark.parametrize("kind,family", [("mamba2", f) for f in ["granitemoehybrid", "zamba2", "bamba", "falcon_h1",
                                                                   "nemotron_h"]] + [("kimi", "kimi_linear"), ("xlstm", "xlstm")]
                         + [("fla", "delta_net"), ("fla", "gla"), ("fla", "rwkv7")])
def test_patch_writes_equals_brute_force_full_forwards_on_hybrids(kind, family):
    """The issue's example: patching effects on Granite and Zamba2 were silently off; Bamba, Falcon-H1 and
    Nemotron-H crashed past the first Mamba layer. Kimi Linear: KDA layers with an MLA attention layer."""
    model = _model(kind, family)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 200, (2, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 7) % 200
    metric = logit_diff(5, 9)
    layers = list(model.cfg.recurrent_layers)
    positions, heads = [3, 5], [0, model.cfg.n_heads - 1]
    fast = patch_writes(model, clean, corrupted, metric, layers=layers, positions=positions, heads=heads,
                        progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: "hook_write_" in n)
        for i, layer in enumerate(layers):
            p = model.hook_prefix(layer)
            for j, t in enumerate(positions):
                for k, h in enumerate(heads):
                    edits = [WriteEdit(layer=layer, pos=t, head=h, batch=b, key=cache[p + "hook_write_key"][b, t, h],
                                       value=cache[p + "hook_write_value"][b, t, h]) for b in range(2)]
                    brute = float(metric(model.run_with_edits(corrupted, edits)))
                    assert abs(float(fast.scores[i, j, k]) - brute) < 1e-5, (layer, t, h)


def test_a_decoder_loop_the_replay_cannot_reproduce_falls_back_to_the_full_forward():
    """A user's forward hook on a decoder layer is applied again to the replayed output: the check in
    ``resume_state`` sees the difference and falls back to the full forward, so numbers stay exact."""
    model = _model("mamba2", "zamba2")
    layers = model.family.decoder_layers(model.hf_model)
    layer = model.cfg.recurrent_layers[-1]
    handle = layers[layer - 1].register_forward_hook(lambda m, a, out: out + 0.5)
    try:
        tokens = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(0))
        edit = _edit(model, layer, 4, 0, 5)
        with torch.no_grad():
            state = model.resume_state(tokens, layer)
            assert state.full and "differ" in state.fallback_reason
            with model.edits([edit]):
                resumed = model.run_from_layer(state)
            full = model.run_with_edits(tokens, [edit])
        torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)
        with pytest.raises(RuntimeError, match="cannot be resumed exactly"):
            model.check_resumable(tokens, layer)
    finally:
        handle.remove()


def test_resume_refuses_what_it_cannot_do():
    model = _model("gdn", "qwen3_5")
    tokens = torch.randint(0, 200, (1, 8))
    state = model.resume_state(tokens, 2)
    with pytest.raises(TypeError, match="ResumeState"):
        model.run_from_layer(torch.zeros(1, 8, 64))
    with pytest.raises(ValueError, match="cannot apply in a forward resumed at layer 2"):
        with model.edits([_edit(model, 1, 3, 0, 0)]):
            model.run_from_layer(state)
    with pytest.raises(ValueError, match="layer must be in"):
        model.resume_state(tokens, 99)
    with pytest.raises(ValueError, match="rows must index"):
        state.select([3])
    with pytest.raises(ValueError, match="start must be in"):
        state.select(start=8)


def test_selfcheck_covers_the_resumed_and_cached_paths_and_catches_a_broken_one(monkeypatch):
    """``writesae hooks`` says "all checks passed" only if the paths the commands use are exact: with Bamba's
    continuation positions broken again (its default RoPE positions restart at 0 on a continued call), the
    self-check fails on exactly those rows."""
    from writesae_plugin.selfcheck import run_selfcheck

    model = _model("mamba2", "bamba")
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    result = run_selfcheck(model, tokens, repeats=1)
    names = [r.name for r in result.results]
    for layer in model.cfg.recurrent_layers:
        assert f"layer {layer}: resumed forward + edit vs full forward" in names
        assert f"layer {layer}: cached prefix + resumed suffix + edit vs full" in names
    assert result.ok, result.table()
    monkeypatch.setattr(type(model), "_continuation_positions", lambda self, tokens, cache, kw: kw)
    broken = run_selfcheck(model, tokens, repeats=1)
    failed = {r.name for r in broken.results if not r.ok}
    assert failed and all("cached prefix" in n for n in failed), broken.table()


@pytest.mark.parametrize("kind,family", FAMILIES, ids=[f for _, f in FAMILIES])
def test_bad_tokens_and_padded_edits_are_refused_on_every_family(kind, family):
    """Issue 12 item 2 on every claimed family: the checks sit in the HF forward's pre-hook, before any layer."""
    from writesae_plugin.adapters import WriteEdit

    model = _model(kind, family)
    vocab = model.hf_model.get_input_embeddings().weight.shape[0]
    layer = model.cfg.recurrent_layers[0]
    for bad, match in [(torch.zeros(1, 0, dtype=torch.long), "at least one"),
                       (torch.full((1, 4), vocab), rf"\[0, {vocab}\)")]:
        with pytest.raises(ValueError, match=match):
            model(bad)
    tokens = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="padding position"):
        model.run_with_edits(tokens, [WriteEdit(layer=layer, pos=1, head=0, op="delete")], attention_mask=mask)

"""The contract every matrix-state family meets, one suite over all of them (issue 15's "done when" list).

Each family runs on a tiny random-init model of its real class, saved with ``save_pretrained`` and reloaded (the
real loading code and layer code; fla's kernels routed to torch on a CPU):

* prefill then single-token decode == the full forward, and the write hooks fire in decode;
* functional edits (replace by factors, delete, replace by a matrix; every write mode the family has) == the
  family's per-token reference recurrence with the edits (reads and final state, <= 1e-5), with earlier positions,
  the other batch row and the other heads unchanged exactly;
* editing the factor hooks or the dense write hook == the functional edit; replacing a write by itself is a no-op;
* an ``add`` edit == the reference with an extra write, and == editing ``hook_state`` at that position;
* an edit made in prefill or in decode == the full forward with the edit;
* nnsight reads and edits == TransformerLens';
* a WriteSAE spliced with the error term gives the clean logits, and an SAE of another family is refused;
* ``writesae hooks``' self-check passes and ``train``, ``substitute``, ``closed-form``, ``attribute`` and ``patch``
  run on the family (the trained SAE spliced with the error term gives the clean logits).

What is particular to a family (its capture against its own reference, kernels, decay / query / transition edits,
its bad-input messages) stays in ``tests/test_<family>_adapter.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import writesae_plugin  # noqa: F401  (registers the SAE architecture)
from writesae_plugin.adapters import StateCapture, WriteEdit, hook_model


def _delta_rule(c, edits, extra):
    """Gated DeltaNet, Kimi Delta Attention, DeltaNet: the (gated) delta rule on the raw value and beta."""
    from writesae_plugin.adapters.reference import gated_deltanet_reference

    r = gated_deltanet_reference(c["hook_query"], c["hook_write_key"], c["hook_v"], c["hook_log_decay"],
                                 c["hook_beta"], write_edits=edits, extra_writes=extra)
    return r.read, r.final_state


def _gla(c, edits, extra):
    from writesae_plugin.adapters.gla import gla_reference

    r = gla_reference(c["hook_query"], c["hook_write_key"], c["hook_write_value"], c["hook_log_decay"],
                      write_edits=edits, extra_writes=extra)
    return r.read, r.final_state


def _rwkv7(c, edits, extra):
    from writesae_plugin.adapters.rwkv7 import rwkv7_reference

    r = rwkv7_reference(c["hook_query"], c["hook_write_key"], c["hook_write_value"], c["hook_log_decay"],
                        c["hook_kk"], c["hook_a"], write_edits=edits, extra_writes=extra)
    return r.read, r.final_state


def _scalar_decay(c, edits, extra):
    """Mamba-2 and xLSTM (its stabilised matrix memory): the canonical scalar-decay recurrence, one write mode."""
    from writesae_plugin.adapters.mamba2 import mamba2_reference

    new = {key: W for key, (W, _) in edits.items()}
    for (b, t, h), D in extra.items():  # an added write: the clean write plus D
        new[(b, t, h)] = new.get((b, t, h), torch.outer(c["hook_write_key"][b, t, h], c["hook_write_value"][b, t, h])) + D
    return mamba2_reference(c["hook_write_key"], c["hook_write_value"], c["hook_log_decay"], c["hook_query"],
                            write_edits=new)


def _gdn(path):
    from tiny_models import make_tiny_model

    return make_tiny_model("qwen3_5", path)


def _mamba2(path):
    from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=256, hidden_size=64, state_size=16, num_heads=4, head_dim=16, expand=1,
                       n_groups=2, chunk_size=16, num_hidden_layers=2)
    Mamba2ForCausalLM(cfg).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _kimi(path):
    from tiny_recurrent_models import make_tiny_kimi

    return make_tiny_kimi(path)


def _xlstm(path):
    from tiny_recurrent_models import make_tiny_xlstm

    return make_tiny_xlstm(path)


def _fla(builder: str):
    def build(path):
        import tiny_fla_models

        return getattr(tiny_fla_models, builder)(path)

    return build


@dataclass(frozen=True)
class Family:
    """One family's tiny model and what the contract needs to know of it."""

    name: str  # the hooked model's ``cfg.family`` (and a WriteSAE's ``family``)
    build: Callable  # save dir -> the reloaded HF model
    reference: Callable  # (layer cache, write_edits {(b,t,h): (W, mode)}, extra_writes {(b,t,h): D}) -> (read, final)
    T: int  # sequence length: past one chunk of the family's prefill kernel
    modes: tuple[str, ...] = ("raw",)
    fla: bool = False  # an fla model (needs the [fla] extra, which the test set-up installs)
    layer: int = 1


FAMILIES = [
    Family("qwen3_5_text", _gdn, _delta_rule, 70, ("raw", "delta")),  # Gated DeltaNet (Qwen3.5)
    Family("mamba2", _mamba2, _scalar_decay, 37),
    Family("kimi_linear", _kimi, _delta_rule, 70, ("raw", "delta")),
    Family("xlstm", _xlstm, _scalar_decay, 40),
    Family("delta_net", _fla("make_tiny_deltanet"), _delta_rule, 70, ("raw", "delta"), fla=True),
    Family("gla", _fla("make_tiny_gla"), _gla, 70, fla=True),
    Family("rwkv7", _fla("make_tiny_rwkv7"), _rwkv7, 70, fla=True),
]


@dataclass
class Built:
    family: Family
    hf: torch.nn.Module
    model: object
    tokens: torch.Tensor

    @property
    def P(self) -> str:  # the hook prefix of the tested layer, e.g. "blocks.1.linear_attn."
        return self.model.hook_prefix(self.family.layer)

    def layer_cache(self, tokens=None, **kw) -> dict:
        tokens = self.tokens if tokens is None else tokens
        _, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n.startswith(self.P), **kw)
        return {k.rsplit(".", 1)[-1]: v for k, v in cache.items()}


_BUILT: dict[str, Built] = {}


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def fam(request, tmp_path_factory) -> Built:
    """The family's tiny model, hooked, built once per module (pytest groups the tests by family)."""
    f: Family = request.param
    if f.name not in _BUILT:
        if f.fla:
            from tiny_fla_models import require_fla

            require_fla()
        hf = f.build(tmp_path_factory.mktemp(f.name) / "m")
        model = hook_model(hf)
        assert model.cfg.family == f.name and f.layer in model.cfg.recurrent_layers
        assert model.cfg.n_heads >= 4, "the contract edits heads 1..3 and checks head 0 untouched"
        tokens = torch.randint(3, 240, (2, f.T), generator=torch.Generator().manual_seed(0))
        _BUILT[f.name] = Built(f, hf, model, tokens)
    return _BUILT[f.name]


def _refuses(b: Built, mode: str) -> None:
    """A family without an erase has one write mode: asking for another is an error, not a silent alias."""
    with pytest.raises(ValueError, match="mode"):
        with b.model.edits([WriteEdit(layer=b.family.layer, pos=3, head=0, op="delete", mode=mode)]):
            pass
    with pytest.raises(ValueError, match="mode"):
        with b.model.options(write_mode=mode):
            b.model(b.tokens[:, :4])


def _edits(b: Built, mode: str):
    """Three edits of one forward: replace by factors, delete, replace by a matrix (on the other row)."""
    cfg, L, T = b.model.cfg, b.family.layer, b.family.T
    g = torch.Generator().manual_seed(5)
    u, w = torch.randn(cfg.d_k, generator=g), torch.randn(cfg.d_v, generator=g)
    h1, h2, h3 = 1, 2, 3
    p_mid, p_early, p_last = T * 4 // 7, T // 7, T - 1
    fn = [WriteEdit(layer=L, pos=p_mid, head=h2, batch=0, key=u, value=w, mode=mode),
          WriteEdit(layer=L, pos=p_early, head=h1, batch=0, op="delete", mode=mode),
          WriteEdit(layer=L, pos=p_last, head=h3, batch=1, matrix=torch.outer(u.flip(0), w), mode=mode)]
    ref = {(0, p_mid, h2): (torch.outer(u, w), mode), (0, p_early, h1): (torch.zeros(cfg.d_k, cfg.d_v), mode),
           (1, p_last, h3): (torch.outer(u.flip(0), w), mode)}
    return fn, ref, p_early, p_last


def _prefill_then_decode(model, tokens, split: int, end: int) -> torch.Tensor:
    """Logits ``[b, end, vocab]`` of a prefill of ``tokens[:, :split]`` then single-token decode steps to ``end``."""
    out = model(tokens[:, :split], return_type="hf", use_cache=True)
    steps = [out.logits]
    for t in range(split, end):
        out = model(tokens[:, t:t + 1], return_type="hf", past_key_values=model.cache_of(out), use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, 1)


def test_prefill_then_decode_equals_full_forward_and_decode_hooks_fire(fam):
    model, tokens, P, T = fam.model, fam.tokens, fam.P, fam.family.T
    split = T - 10
    seen = []
    with torch.no_grad():
        full, full_cache = model.run_with_cache(tokens)
        with model.hooks(fwd_hooks=[(P + "hook_write_key", lambda x, hook: seen.append(x))]):
            logits = _prefill_then_decode(model, tokens, split, T)
    assert (logits - full).abs().max() <= 1e-4
    assert len(seen) == 11 and seen[1].shape[1] == 1
    assert (torch.cat(seen, 1) - full_cache[P + "hook_write_key"]).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["raw", "delta"])
def test_functional_edits_equal_the_edited_reference_and_touch_nothing_else(fam, mode):
    if mode not in fam.family.modes:
        return _refuses(fam, mode)
    model, tokens = fam.model, fam.tokens
    edits, ref_edits, p_early, p_last = _edits(fam, mode)
    with torch.no_grad(), model.options(capture_states=StateCapture([-1])):
        clean = fam.layer_cache()
        clean_logits = model(tokens)
        with model.edits(edits):
            edited = fam.layer_cache()
            logits = model(tokens)
    read, final = fam.family.reference(clean, ref_edits, {})
    assert clean["hook_read"].abs().max() > 1e-3  # reads well above the tolerance
    assert (read - edited["hook_read"]).abs().max() <= 1e-5
    assert (final - edited["hook_state"][:, -1]).abs().max() <= 1e-5 * max(1.0, final.abs().max().item())
    r, c = edited["hook_read"], clean["hook_read"]
    assert torch.equal(r[0, :p_early], c[0, :p_early])  # earlier positions
    assert torch.equal(r[1, :p_last], c[1, :p_last])  # the other row, before its edit
    assert torch.equal(r[:, :, 0], c[:, :, 0])  # an unedited head
    assert torch.equal(logits[0, :p_early], clean_logits[0, :p_early])
    assert torch.equal(logits[1, :p_last], clean_logits[1, :p_last])
    assert not torch.allclose(logits[0, p_early:], clean_logits[0, p_early:])


@pytest.mark.parametrize("mode", ["raw", "delta"])
def test_hook_edits_equal_functional_edits_and_self_replacement_is_a_no_op(fam, mode):
    if mode not in fam.family.modes:
        return _refuses(fam, mode)
    b, f = fam, fam.family
    model, tokens, P, L = b.model, b.tokens, b.P, f.layer
    cfg = model.cfg
    g = torch.Generator().manual_seed(9)
    u, w = torch.randn(cfg.d_k, generator=g), torch.randn(cfg.d_v, generator=g)
    pos = f.T * 3 // 7

    def edit_factors(x, hook):
        x[0, pos, 2] = u if hook.name.endswith("hook_write_key") else w
        return x

    def edit_dense(x, hook):
        x[0, pos, 2] = torch.outer(u, w)
        return x

    with torch.no_grad(), model.options(write_mode=mode):
        clean = model(tokens)
        functional = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=pos, head=2, batch=0, key=u, value=w,
                                                             mode=mode)])
        factors = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write_key", edit_factors),
                                                          (P + "hook_write_value", edit_factors)])
        with model.options(materialize_writes=True):
            dense = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write", edit_dense)])
        c = b.layer_cache()
        W = torch.outer(c["hook_write_key"][0, pos - 10, 1], c["hook_write_value"][0, pos - 10, 1])
        same = model.run_with_edits(tokens, [WriteEdit(layer=L, pos=pos - 10, head=1, batch=0, matrix=W, mode=mode)])
    assert (factors - functional).abs().max() <= 1e-5 and (dense - functional).abs().max() <= 1e-5
    assert (functional - clean).abs().max() > 1e-4
    assert (same - clean).abs().max() <= 1e-5


def test_add_and_state_edits_act_as_extra_writes(fam):
    model, tokens, P, L, T = fam.model, fam.tokens, fam.P, fam.family.layer, fam.family.T
    cfg = model.cfg
    D = torch.randn(cfg.d_k, cfg.d_v, generator=torch.Generator().manual_seed(11))
    pos = T * 5 // 14

    def edit_state(x, hook):
        x[1, 0, 0] += D
        return x

    with torch.no_grad():
        clean = fam.layer_cache()
        with model.options(capture_states=StateCapture([pos], heads=[3])):
            via_state = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_state", edit_state)])
        with model.edits([WriteEdit(layer=L, pos=pos, head=3, batch=1, op="add", matrix=D)]):
            via_add = model(tokens)
            edited = fam.layer_cache()
    read, _ = fam.family.reference(clean, {}, {(1, pos, 3): D})
    assert (read - edited["hook_read"]).abs().max() <= 1e-5
    assert (via_state - via_add).abs().max() <= 1e-5 and (via_add - model(tokens)).abs().max() > 1e-4


@pytest.mark.parametrize("where", ["edit-in-prefill", "edit-in-decode"])
def test_edits_across_prefill_and_decode_match_the_full_forward(fam, where):
    model, tokens, L, T = fam.model, fam.tokens, fam.family.layer, fam.family.T
    end = T - 10
    split = end - 6
    pos, head = (T // 6, 0) if where == "edit-in-prefill" else (end - 3, 2)
    edit = WriteEdit(layer=L, pos=pos, head=head, op="delete")
    with torch.no_grad():
        full = model.run_with_edits(tokens[:, :end], [edit])
        with model.edits([edit]):
            steps = _prefill_then_decode(model, tokens, split, end)
    assert (steps - full).abs().max() <= 1e-4
    assert (full - model(tokens[:, :end])).abs().max() > 1e-4


def test_nnsight_reads_and_edits_match_transformer_lens(fam):
    from nnsight import NNsight

    model, tokens, P, L = fam.model, fam.tokens, fam.P, fam.family.layer
    u = torch.randn(model.cfg.d_k, generator=torch.Generator().manual_seed(2))
    pos = fam.family.T // 2
    mixer = P.split(".")[2]  # "linear_attn", "mixer", "mlstm", "attn"

    def tl_key(x, hook):
        x[0, pos, 1] = u
        return x

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[P + "hook_write_key", P + "hook_read"])
        ref = model.run_with_hooks(tokens, fwd_hooks=[(P + "hook_write_key", tl_key)])
        nn_model = NNsight(model)
        with nn_model.trace(tokens):
            block = getattr(nn_model.blocks[L], mixer)
            key = block.hook_write_key.output.save()
            read = block.hook_read.output.save()
        with nn_model.trace(tokens):
            getattr(nn_model.blocks[L], mixer).hook_write_key.output[0, pos, 1] = u
            out = nn_model.output.save()
    assert torch.equal(key, cache[P + "hook_write_key"]) and torch.equal(read, cache[P + "hook_read"])
    assert torch.equal(out, ref) and not torch.equal(out, model(tokens))


def _sae(b: Built, family: str, head: int, hook: str | None = None):
    from writesae_plugin.sae import WriteSAE, WriteSAEConfig

    cfg = b.model.cfg
    sae = WriteSAE(WriteSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=32, d_k=cfg.d_k, d_v=cfg.d_v, k=4, n_heads=cfg.n_heads,
                                  head=head, site="write", family=family, layer=b.family.layer))
    if hook is not None:
        sae.cfg.metadata.hook_name = hook
    return sae


def test_write_sae_splice_with_error_term_is_exact_and_other_families_are_refused(fam):
    model, tokens, P = fam.model, fam.tokens, fam.P
    torch.manual_seed(0)
    sae = _sae(fam, fam.family.name, 2, P + "hook_write")
    with torch.no_grad():
        clean = model(tokens)
        assert torch.equal(model.run_with_saes(tokens, saes=[sae], use_error_term=True), clean)
        spliced = model.run_with_saes(tokens, saes=[sae])
    assert not torch.allclose(spliced, clean)
    others = [f.name for f in FAMILIES if f.name != fam.family.name]
    for other in (others[0], others[-1]):
        with pytest.raises(ValueError, match=f"trained on a '{other}' model, this model is '{fam.family.name}'"):
            model.run_with_saes(tokens, saes=[_sae(fam, other, 2, P + "hook_write")])


def test_selfcheck_and_every_experiment_command_run(fam, tmp_path, tiny_tokenizer):
    """``writesae hooks`` (the exactness self-check), ``train`` (its SAE spliced with the error term gives the clean
    logits), ``substitute``, ``closed-form``, ``attribute`` and ``patch`` on the family's tiny model."""
    from sae_lens import SAE

    from writesae_plugin.cli import main
    from writesae_plugin.selfcheck import run_selfcheck

    model, L = fam.model, fam.family.layer
    check = run_selfcheck(model, torch.randint(3, 240, (2, 20), generator=torch.Generator().manual_seed(1)),
                          repeats=1)
    assert check.ok and len(check.results) > 10, check.table()
    fam.hf.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    sae = _sae(fam, fam.family.name, 1)
    with torch.no_grad():
        sae.enc_key.mul_(100.0)  # atoms that fire on the tiny model's writes
    sae.save_model(tmp_path / "sae")
    words = ["def", "return", "import", "self", "value", "state", "print", "class"]
    g = torch.Generator().manual_seed(0)
    (tmp_path / "text.txt").write_text("\n\n".join(" ".join(words[i] for i in torch.randint(0, 8, (20,), generator=g))
                                                   for _ in range(200)))
    args, text = ["--model", str(tmp_path / "model")], ["--dataset", str(tmp_path / "text.txt")]
    small = ["--contexts", "2", "--context-length", "24", "--sae", str(tmp_path / "sae"), "--atoms", "0"]
    assert main(["hooks", *args]) == 0
    assert main(["train", *args, *text, "--layer", str(L), "--head", "1", "--d-sae", "32", "--k", "4",
                 "--total-samples", "256", "--context-length", "24", "--out", str(tmp_path / "train")]) == 0
    trained = SAE.load_from_disk(str(tmp_path / "train" / "final"))
    assert trained.cfg.family == fam.family.name
    tokens = torch.randint(3, 240, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.run_with_saes(tokens, saes=[trained], use_error_term=True), model(tokens))
    assert main(["substitute", *args, "--sae", str(tmp_path / "sae"), *text, "--contexts", "4",
                 "--context-length", "32", "--max-firings", "3", "--out", str(tmp_path / "sub")]) == 0
    assert json.loads((tmp_path / "sub" / "results.json").read_text())["summary"]["n_firings"] > 0
    assert main(["closed-form", *args, *text, *small, "--out", str(tmp_path / "cf")]) == 0
    assert json.loads((tmp_path / "cf" / "results.json").read_text())
    assert main(["attribute", *args, *text, *small, "--out", str(tmp_path / "attr")]) == 0
    assert main(["patch", *args, "--sae", str(tmp_path / "sae"), *text, "--task", "copy", "--n", "2", "--length",
                 "12", "--source-pos", "4", "--out", str(tmp_path / "patch")]) == 0
    assert json.loads((tmp_path / "patch" / "results.json").read_text())["n_prompts"] == 2

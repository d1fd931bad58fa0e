"""WriteSAEs spliced into an adapter: SAELens host API, checks, nnsight parity, attribution, evals, training."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE

import writesae_plugin  # noqa: F401  (registers the architecture)
from conftest import SAFE_VOCAB
from writesae_plugin.adapters import HookNameError, StateCapture, hook_model
from writesae_plugin.attribution import feature_attribution, feature_attribution_nnsight
from writesae_plugin.sae import WriteSAE, WriteSAEConfig

L = 1
HOOK = f"blocks.{L}.linear_attn.hook_write"


def write_sae(head=2, hook=HOOK, seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(d_in=256, d_sae=64, d_k=16, d_v=16, k=4, n_heads=4, head=head, site="write",
                family="qwen3_5_text", layer=L)
    base.update(kw)
    sae = WriteSAE(WriteSAEConfig(**base))
    with torch.no_grad():  # give the tiny random model's small writes non-trivial codes
        sae.enc_key.mul_(10.0)
    sae.cfg.metadata.hook_name = hook
    return sae


@pytest.fixture
def model(qwen):
    m = hook_model(qwen)
    m.materialize_writes = True
    return m


def test_error_term_splice_is_exact_and_per_head_splice_touches_only_its_head(model, tokens):
    with torch.no_grad():
        clean = model(tokens)
        sae = write_sae()
        spliced = model.run_with_saes(tokens, saes=[sae], use_error_term=True)
        assert torch.equal(spliced, clean)
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=False)
    x = cache[HOOK + ".hook_sae_input"]
    assert x.shape == (2, 70, 16, 16)  # the SAE sees its own head
    assert cache[HOOK + ".hook_sae_acts_post"].shape == (2, 70, 64)
    assert (cache[HOOK + ".hook_sae_acts_post"] != 0).sum(-1).le(4).all()
    with torch.no_grad():
        _, full = model.run_with_cache(tokens, names_filter=[HOOK])
        _, spl = model.run_with_cache_with_saes(tokens, saes=[sae], names_filter=[HOOK + ".hook_sae_output"])
    assert torch.equal(spl[HOOK + ".hook_sae_output"][:, :, [0, 1, 3]], full[HOOK][:, :, [0, 1, 3]])
    assert not torch.allclose(spl[HOOK + ".hook_sae_output"][:, :, 2], full[HOOK][:, :, 2])
    assert model.acts_to_saes == {} and HOOK in model.hook_dict  # reset after the run


def test_several_saes_on_heads_and_layers(model, tokens):
    s0, s2 = write_sae(head=0, seed=1), write_sae(head=2, seed=2)
    s_other = write_sae(head=1, hook="blocks.0.linear_attn.hook_write", layer=0, seed=3)
    with torch.no_grad():
        _, single = model.run_with_cache_with_saes(tokens, saes=[s2], names_filter=[HOOK + ".hook_sae_output"])
        model.add_sae(s0)
        model.add_sae(s2)
        model.add_sae(s_other)
        _, cache = model.run_with_cache(tokens)
        both = cache[HOOK + ".hook_sae_output"]
        assert HOOK + ".head0.hook_sae_acts_post" in cache and HOOK + ".head2.hook_sae_acts_post" in cache
        assert "blocks.0.linear_attn.hook_write.hook_sae_acts_post" in cache
        assert set(model.acts_to_saes) == {HOOK, "blocks.0.linear_attn.hook_write"}
        model.reset_saes()
        assert model.acts_to_saes == {}
        # layer 1's input with only the layer-0 SAE spliced: heads 1 and 3 must pass through untouched
        _, ref = model.run_with_cache_with_saes(tokens, saes=[s_other], names_filter=[HOOK])
    assert torch.equal(both[:, :, [1, 3]], ref[HOOK][:, :, [1, 3]])
    assert not torch.allclose(both[:, :, 0], ref[HOOK][:, :, 0])
    assert not torch.allclose(both[:, :, 2], ref[HOOK][:, :, 2])
    assert single[HOOK + ".hook_sae_output"].shape == both.shape


def test_mismatched_saes_are_refused(model):
    with pytest.raises(ValueError, match="d_k x d_v = 8 x 8"):
        model.add_sae(write_sae(d_in=64, d_k=8, d_v=8))
    with pytest.raises(ValueError, match="value heads"):
        model.add_sae(write_sae(head=1, n_heads=2))
    with pytest.raises(ValueError, match="mamba2"):
        model.add_sae(write_sae(family="mamba2"))
    with pytest.raises(ValueError, match="state site"):
        model.add_sae(write_sae(site="state"))
    with pytest.raises(HookNameError, match="valid names"):
        model.add_sae(write_sae(hook="blocks.1.linear_attn.hook_wirte"))
    with pytest.raises(ValueError, match="splices into"):
        model.add_sae(write_sae(hook="blocks.1.linear_attn.hook_query"))
    model.add_sae(write_sae(site="state"), allow_site_mismatch=True)
    model.reset_saes()


def test_state_site_splice(model, tokens):
    sae = write_sae(site="state", hook="blocks.1.linear_attn.hook_state")
    with torch.no_grad(), model.options(capture_states=StateCapture([10, 40])):
        clean = model(tokens)
        assert torch.equal(model.run_with_saes(tokens, saes=[sae], use_error_term=True), clean)
        edited = model.run_with_saes(tokens, saes=[sae])
    assert torch.equal(edited[:, :10], clean[:, :10]) and not torch.allclose(edited[:, 10:], clean[:, 10:])


def test_special_token_exclusion(model, tokens):
    sae = write_sae()
    excluded = tokens[0, 5].item()
    with torch.no_grad():
        _, c = model.run_with_cache_with_saes(tokens, saes=[sae], exclude_special_tokens=[excluded],
                                              names_filter=[HOOK + ".hook_sae_output"])
        _, full = model.run_with_cache(tokens, names_filter=[HOOK])
    mask = tokens == excluded
    assert torch.equal(c[HOOK + ".hook_sae_output"][mask], full[HOOK][mask])


def test_identity_gradient_splice(model, tokens):
    """Upstream of the splice (here: layer 1's own input projection) gradients equal the clean model's
    with identity_grad, and are SAE-linearised with the plain error-term splice."""
    sae = write_sae()
    weight = model.hf_model.model.layers[L].linear_attn.in_proj_qkv.weight

    def grad(**splice):
        weight.grad = None
        with model.saes([sae], **splice) if splice else torch.enable_grad():
            model(tokens)[0, -1].logsumexp(-1).backward()
        return weight.grad.clone()

    clean = grad()
    ident = grad(use_error_term=True, identity_grad=True)
    linearised = grad(use_error_term=True)
    assert torch.allclose(ident, clean, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(linearised, clean, atol=1e-6, rtol=1e-4)
    acts_grad = {}
    with model.saes([sae], use_error_term=True, identity_grad=True):
        with model.hooks(bwd_hooks=[(HOOK + ".hook_sae_acts_post", lambda g, hook: acts_grad.setdefault("g", g))]):
            model(tokens)[0, -1].logsumexp(-1).backward()
    assert acts_grad["g"].abs().sum() > 0  # features still receive gradient


def metric(logits):
    return logits[:, -1, 7].sum() - logits[:, -1, 3].sum()


def test_attribution_tl_nnsight_and_finite_differences(model, tokens):
    sae = write_sae()
    acts, attr = feature_attribution(model, tokens, sae, metric)
    acts_nn, attr_nn = feature_attribution_nnsight(model, tokens, sae, metric)
    assert torch.allclose(acts, acts_nn) and torch.allclose(attr, attr_nn, atol=1e-7)
    # finite differences: scale one active feature by (1 + eps) through an activation hook
    b, t, i = divmod(int(attr.abs().argmax()), 70 * 64)[0], *divmod(int(attr.abs().argmax()) % (70 * 64), 64)
    name = HOOK + ".hook_sae_acts_post"

    def run_scaled(eps):
        def scale(x, hook):
            x = x.clone()
            x[b, t, i] = x[b, t, i] * (1 + eps)
            return x

        with torch.no_grad(), model.saes([sae], use_error_term=True):
            return metric(model.run_with_hooks(tokens, fwd_hooks=[(name, scale)]))

    for eps in (0.05, 0.1):  # fp32 logits: a small relative step keeps the difference above rounding
        fd = (run_scaled(eps) - run_scaled(-eps)) / (2 * eps)  # d metric / d log a = a * d metric / d a
        assert torch.allclose(fd, attr[b, t, i], rtol=3e-2), (eps, fd, attr[b, t, i])


def test_nnsight_reads_edits_and_grads_on_spliced_model(model, tokens):
    from nnsight import NNsight

    sae = write_sae()
    name = HOOK + ".hook_sae_acts_post"
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True, names_filter=[name])

        def zero(x, hook):
            x = x.clone()
            x[:, 30:] = 0
            return x

        with model.saes([sae], use_error_term=True):
            ablated = model.run_with_hooks(tokens, fwd_hooks=[(name, zero)])
    with model.saes([sae], use_error_term=True):
        nn_model = NNsight(model)
        with torch.no_grad(), nn_model.trace(tokens):
            acts = nn_model.blocks[L].linear_attn.hook_write.hook_sae_acts_post.output.save()
        with torch.no_grad(), nn_model.trace(tokens):
            nn_model.blocks[L].linear_attn.hook_write.hook_sae_acts_post.output[:, 30:] = 0
            out = nn_model.output.save()
    assert torch.equal(acts, cache[name])
    assert torch.allclose(out, ablated, atol=1e-6) and not torch.allclose(out, model(tokens))


def test_saelens_run_evals_on_flat_write_hook(model, tokens):
    from writesae_plugin.evals import run_write_evals

    sae = write_sae(hook=f"blocks.{L}.linear_attn.hook_write_flat")
    toks = torch.randint(0, SAFE_VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    res = run_write_evals(model, sae, toks, batch_size_prompts=8, n_batches=2)
    sl, head = res["saelens"], res["head"]
    assert sl["sparsity"]["l0"] == pytest.approx(head["l0"], abs=1e-6) and head["l0"] <= 4
    assert "kl_div_score" in sl["model_behavior_preservation"]
    assert "ce_loss_score" in sl["model_performance_preservation"]
    # SAELens' variance counts the untouched heads; the head metric does not
    assert head["explained_variance"] < sl["reconstruction_quality"]["explained_variance"]
    assert head["n_matrices"] == 16 * 32


def test_short_training_lowers_fvu_and_cli(tmp_path, tiny_dir, tiny_tokenizer, capsys):
    """`writesae train` on a .txt of blank-line separated documents: FVU falls, the progress bar shows samples/s,
    an ETA, FVU, L0 and the dead fraction, and the saved write SAE goes into run_write_evals unedited."""
    from conftest import load_tiny
    from writesae_plugin.cli import main
    from writesae_plugin.evals import run_write_evals

    hf = load_tiny(tiny_dir, "qwen3_5")
    model_dir = tmp_path / "model"
    hf.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "state", "write", "matrix", "token", "print", "return"]
    lines = [" ".join(words[j] for j in torch.randint(0, 10, (40,), generator=g).tolist()) for _ in range(300)]
    (tmp_path / "data.txt").write_text("\n\n".join(lines))  # 300 documents: 265 train, 18 validation
    out = tmp_path / "sae"
    args = ["train", "--model", str(model_dir), "--layer", "1", "--head", "2", "--site", "write",
            "--dataset", str(tmp_path / "data.txt"), "--out", str(out), "--d-sae", "64", "--k", "4",
            "--context-length", "32", "--total-samples", str(64 * 60), "--batch-size", "64", "--lr", "3e-3",
            "--positions", "stride:2", "--val-contexts", "8", "--val-every", "30", "--aux-k", "16"]
    assert main(args) == 0
    bar = [line for line in capsys.readouterr().err.split("\r") if "samples/s" in line][-1]  # as the bar closed
    assert "100%" in bar and "samples/s" in bar and "<00:00" in bar  # samples/s and the (elapsed<remaining) ETA
    for key in ("fvu=", "L0=", "dead_fraction=", "val_fvu="):  # dead_fraction: the validation's, as recorded
        assert key in bar, (key, bar)
    assert float(bar.split("fvu=")[1].split(",")[0]) < 1.5  # the normalised loss, not a summed MSE
    hist = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert hist[-1]["fvu"] < hist[0]["fvu"] and hist[-1]["l0"] <= 4
    sae = SAE.load_from_disk(out / "final")
    assert isinstance(sae, WriteSAE)
    assert sae.cfg.site == "write" and sae.cfg.head == 2 and sae.cfg.metadata.hook_name == HOOK
    toks = torch.randint(0, SAFE_VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    ev = run_write_evals(hook_model(hf), sae, toks, batch_size_prompts=4, n_batches=1)
    assert ev["head"]["n_matrices"] == 8 * 32 and ev["head"]["l0"] <= 4 and ev["head"]["fvu"] < 1
    assert "ce_loss_score" in ev["saelens"]["model_performance_preservation"]
    assert sae.cfg.metadata.hook_name == HOOK  # unchanged by the evals
    assert sae.cfg.hook_name_hf == "model.layers.1.linear_attn" and sae.cfg.family == "qwen3_5_text"
    ckpts = sorted((out / "checkpoints").iterdir())
    assert ckpts and (ckpts[0] / "trainer_state.pt").is_file()
    # resume from a checkpoint
    assert main(args[:-2] + ["--aux-k", "16", "--resume", str(ckpts[0]), "--out", str(tmp_path / "resumed")]) == 0
    assert (tmp_path / "resumed" / "final" / "cfg.json").is_file()
    assert main(["train", "--model", str(model_dir), "--layer", "3", "--dataset", str(tmp_path / "data.txt"),
                 "--out", str(tmp_path / "x")]) == 2


def test_dataset_sources_and_provider(tmp_path, model, tiny_tokenizer):
    import pandas as pd

    from writesae_plugin.data import ActivationProvider, SiteSpec, load_text_dataset, token_contexts

    texts = [f"def f{i}(x):\n    return x + {i}" for i in range(40)]
    (tmp_path / "a.txt").write_text("\n\n".join(texts))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "c.parquet")
    for name in ("a.txt", "b.jsonl", "c.parquet"):
        ds = load_text_dataset(tmp_path / name)
        assert list(ds["text"]) == texts  # one document per paragraph / row, newlines inside kept
    assert len(load_text_dataset(texts)) == 40
    with pytest.raises(ValueError, match="expected .txt"):
        (tmp_path / "d.csv").write_text("x")
        load_text_dataset(tmp_path / "d.csv")
    ctx = list(token_contexts(texts, tiny_tokenizer, 16))
    assert ctx and all(c.shape == (16,) for c in ctx)
    spec = SiteSpec(layer=[0, 1], site="state", heads=[1], positions="last")
    prov = ActivationProvider(model, iter(ctx), spec, batch_size=4, buffer_batches=2, forward_batch=4)
    batch = next(prov)
    assert batch.shape == (4, 256)
    fact = SiteSpec(layer=1, site="write", positions=("random", 3), layout="factors")
    assert next(ActivationProvider(model, iter(ctx), fact, batch_size=8)).shape == (8, 32)
    with pytest.raises(ValueError, match="factors"):
        SiteSpec(layer=1, site="state", layout="factors")
    with pytest.raises(ValueError, match="not recurrent"):
        next(ActivationProvider(model, iter(ctx), SiteSpec(layer=3), batch_size=4))


def test_txt_documents_splits_and_shuffled_contexts(tmp_path, tiny_tokenizer):
    """.txt documents are blank-line paragraphs (one file) or files (a directory), not lines; train / validation /
    test splits are by document, disjoint, deterministic and near the asked shares; contexts are shuffled across
    documents (seeded) and join documents with EOS only between them."""
    from writesae_plugin.data import (SPLITS, load_text_dataset, split_contexts, split_documents,
                                      split_of_document)

    code = "def f(x):\n    y = x + 1\n    return y"
    (tmp_path / "one.txt").write_text(f"{code}\n\n  \n\nclass A:\n    pass\n\n\n\nprint(1)\n")
    assert list(load_text_dataset(tmp_path / "one.txt")["text"]) == [code, "class A:\n    pass", "print(1)"]
    assert list(load_text_dataset(tmp_path / "one.txt", documents="line")["text"])[:2] == ["def f(x):", "    y = x + 1"]
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text(code + "\n\nmore = 2\n")
    (tmp_path / "dir" / "b.txt").write_text("print(1)\n")
    assert list(load_text_dataset(tmp_path / "dir")["text"]) == [code + "\n\nmore = 2", "print(1)"]
    assert len(load_text_dataset(tmp_path / "dir", documents="paragraph")) == 3
    # a context of a code file holds its newlines and no EOS inside a document
    eos = tiny_tokenizer.eos_token_id
    first = next(split_contexts([code * 4], tiny_tokenizer, 16, "train", fractions=(1, 0, 0), shuffle_contexts=0))
    assert eos not in first.tolist() and tiny_tokenizer.encode("\n")[0] in first.tolist()

    docs = [f"document {i}: " + "alpha beta " * (i % 5 + 1) for i in range(2000)]
    parts = {s: split_documents(docs, s) for s in SPLITS}
    assert sorted(sum(parts.values(), [])) == sorted(docs)  # every document in exactly one split
    assert all(split_of_document(d) == s for s, ds in parts.items() for d in ds)
    shares = [len(parts[s]) / len(docs) for s in SPLITS]
    assert abs(shares[0] - 0.9) < 0.03 and abs(shares[1] - 0.05) < 0.02 and abs(shares[2] - 0.05) < 0.02
    assert split_documents(list(reversed(docs)), "test", seed=None) == list(reversed(split_documents(docs, "test",
                                                                                                     seed=None)))
    assert split_documents(docs, "test", (0.5, 0.25, 0.25)) != parts["test"]
    with pytest.raises(ValueError, match="summing to 1"):
        split_documents(docs, "test", (0.5, 0.5, 0.5))
    # contexts: deterministic per seed, shuffled across documents, EOS only between documents
    a = [c.tolist() for c in split_contexts(docs, tiny_tokenizer, 16, "validation")]
    assert a == [c.tolist() for c in split_contexts(docs, tiny_tokenizer, 16, "validation")]
    b = [c.tolist() for c in split_contexts(docs, tiny_tokenizer, 16, "validation", seed=1)]
    assert a != b and sorted(map(tuple, a)) != sorted(map(tuple, b))  # another document order too
    plain = [c.tolist() for c in split_contexts(docs, tiny_tokenizer, 16, "validation", shuffle_contexts=0)]
    assert a != plain and sorted(map(tuple, a)) == sorted(map(tuple, plain))  # the same contexts, reordered
    val_text = "".join(parts["validation"])
    for c in a[:5]:
        for piece in tiny_tokenizer.decode(c).split("<|endoftext|>"):
            assert piece in val_text  # no context mixes in text of another split

"""How people feed models (issue 12, items 1, 2, 4): batched text with the tokenizer's own mask, input
validation up front, and cache continuations whose length the cache cannot report."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import SAFE_VOCAB
from tiny_mamba_models import make_tiny_mamba
from writesae_plugin.adapters import WriteEdit, hook_model

SHORT = "the quick brown fox"
LONG = "hello world, recurrent models write matrices and the lazy dog"
EOS = "<|endoftext|>"


@pytest.fixture(params=["qwen3_5", "kimi_linear", "mamba2", "rwkv7"])  # xLSTM takes no mask: test_xlstm_adapter.py
def model(request, qwen, tmp_path, tiny_tokenizer):
    """A hooked tiny Qwen3.5, Kimi Linear, Mamba-2 or RWKV-7 (fla) with a right-padding tokenizer whose pad token is
    its eos."""
    assert tiny_tokenizer.padding_side == "right" and tiny_tokenizer.pad_token == EOS
    if request.param == "qwen3_5":
        return hook_model(qwen, tokenizer=tiny_tokenizer)
    if request.param == "kimi_linear":
        from tiny_recurrent_models import make_tiny_kimi

        return hook_model(make_tiny_kimi(tmp_path / "kimi"), tokenizer=tiny_tokenizer)
    if request.param == "rwkv7":
        from tiny_fla_models import make_tiny_rwkv7

        return hook_model(make_tiny_rwkv7(tmp_path / "rwkv7"), tokenizer=tiny_tokenizer)
    torch.manual_seed(0)
    return hook_model(make_tiny_mamba("mamba2", tmp_path / "m2"), tokenizer=tiny_tokenizer)


def real(tokens, mask, row):
    return tokens[row][mask[row].bool()]


# ----------------------------------------------------------------------------------------------- item 1
def test_generate_on_a_text_list_equals_each_prompt_alone(model):
    with torch.no_grad():
        batch = model.generate([SHORT, LONG], max_new_tokens=8)
        prompts, mask = model.to_tokens_and_mask([SHORT, LONG], padding_side="left")
        for row, text in enumerate([SHORT, LONG]):
            alone = model.generate(text, max_new_tokens=8)[0]
            assert torch.equal(batch[row, prompts.shape[1]:], alone[-8:]), text
            assert torch.equal(real(prompts, mask, row), alone[:-8])


def test_forward_loss_and_cache_on_a_text_list_use_the_tokenizer_mask(model):
    texts = [SHORT + EOS + " again", LONG]  # eos (= the pad token) inside real text
    tokens, mask = model.to_tokens_and_mask(texts)
    eos = model.tokenizer.eos_token_id
    assert bool((tokens[0][mask[0].bool()] == eos).any()) and mask.sum(1).tolist() != [tokens.shape[1]] * 2
    with torch.no_grad():
        logits, loss = model(texts, return_type="both")
        _, cache = model.run_with_cache(texts, names_filter=[model.hook_prefix(1) + "hook_write_value"])
        nll_sum, n = 0.0, 0
        for row, text in enumerate(texts):
            k = int(mask[row].sum())
            alone = model(text)
            assert torch.allclose(logits[row, :k], alone[0], atol=1e-5), text
            _, c1 = model.run_with_cache(text, names_filter=[model.hook_prefix(1) + "hook_write_value"])
            name = model.hook_prefix(1) + "hook_write_value"
            assert torch.allclose(cache[name][row, :k], c1[name][0], atol=1e-6)
            nll = model(text, return_type="loss", loss_per_token=True)
            nll_sum, n = nll_sum + float(nll.sum()), n + nll.numel()
    assert loss.item() == pytest.approx(nll_sum / n, rel=1e-5)


def test_a_batch_without_pad_token_is_refused(qwen, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    model = hook_model(qwen, tokenizer=tok)
    with pytest.raises(ValueError, match="no pad token"):
        model([SHORT, LONG])
    assert model(SHORT).shape[0] == 1


# ----------------------------------------------------------------------------------------------- item 2
def test_bad_token_tensors_get_clear_errors(model):
    vocab = model.hf_model.get_input_embeddings().weight.shape[0]
    for bad, match in [(torch.zeros(1, 0, dtype=torch.long), "at least one"),
                       (torch.zeros(0, 5, dtype=torch.long), "at least one"),
                       (torch.full((1, 4), vocab), rf"\[0, {vocab}\)"),
                       (torch.full((1, 4), -1), rf"\[0, {vocab}\)"),
                       (torch.zeros(1, 4), "integer")]:
        with pytest.raises(ValueError, match=match):
            model(bad)
        with pytest.raises(ValueError, match=match):
            model.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one"):
        model.resume_state(torch.zeros(1, 0, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="token tensor"):
        model(np.zeros((1, 3), dtype=np.int64))


def test_write_edit_fields_must_be_integers():
    for field in ("layer", "pos", "head", "batch"):
        for bad in (3.5, 3.0, True, "3"):
            with pytest.raises(TypeError, match=f"WriteEdit.{field} must be an integer"):
                WriteEdit(**{"layer": 1, "pos": 2, "head": 0, "op": "delete", field: bad})
    e = WriteEdit(layer=np.int64(1), pos=torch.tensor(2), head=np.int32(0), batch=np.int64(1), op="delete")
    assert (e.layer, e.pos, e.head, e.batch) == (1, 2, 0, 1) and all(
        type(x) is int for x in (e.layer, e.pos, e.head, e.batch))
    with pytest.raises(ValueError, match="batch"):
        WriteEdit(layer=1, pos=2, head=0, op="delete", batch=-1)


def test_edits_at_padding_positions_or_missing_rows_are_refused(model):
    tokens, mask = model.to_tokens_and_mask([SHORT, LONG], padding_side="left")
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0
    with torch.no_grad():
        with pytest.raises(ValueError, match="padding position"):
            model.run_with_edits(tokens, [WriteEdit(layer=1, pos=0, head=0, op="delete")], attention_mask=mask)
        with pytest.raises(ValueError, match="padding position"), model.edits(
                [WriteEdit(layer=1, pos=1, head=0, op="delete", batch=0)]):
            model.generate([SHORT, LONG], max_new_tokens=2)
        with pytest.raises(ValueError, match="2 rows"):
            model.run_with_edits(tokens, [WriteEdit(layer=1, pos=3, head=0, op="delete", batch=2)])
        # the real tokens of a left-padded row, and the long row at any position, can be edited
        ok = model.run_with_edits(tokens, [WriteEdit(layer=1, pos=n_pad, head=0, op="delete", batch=0),
                                           WriteEdit(layer=1, pos=0, head=0, op="delete", batch=1)],
                                  attention_mask=mask)
        assert torch.isfinite(ok).all()


# ----------------------------------------------------------------------------------------------- item 4
def test_continuing_a_cache_made_by_an_unhooked_twin(tmp_path):
    torch.manual_seed(0)
    hf = make_tiny_mamba("mamba2", tmp_path / "m2")
    twin = copy.deepcopy(hf)  # unhooked: its caches carry no record of their length
    seq = torch.randint(0, SAFE_VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    model = hook_model(hf)
    edit = WriteEdit(layer=1, pos=26, head=1, op="delete")
    with torch.no_grad():
        full = model.run_with_edits(seq, [edit])
        with pytest.raises(RuntimeError, match="does not record how many tokens"):
            with model.edits([edit]):
                model(seq[:, 25:], past_key_values=model.cache_of(twin(seq[:, :25], use_cache=True)),
                      use_cache=True)
        # an attention mask over cached + new tokens tells the offset (what HF generate passes)
        with model.edits([edit]):
            step = model(seq[:, 25:], past_key_values=model.cache_of(twin(seq[:, :25], use_cache=True)),
                         use_cache=True, attention_mask=torch.ones(2, 30, dtype=torch.long))
        assert (step - full[:, 25:]).abs().max() <= 1e-5
        # a cache made by the hooked model records its length itself
        cache = model.cache_of(model(seq[:, :25], use_cache=True, return_type="hf"))
        with model.edits([edit]):
            step = model(seq[:, 25:], past_key_values=cache, use_cache=True)
        assert (step - full[:, 25:]).abs().max() <= 1e-5
        # no edit: nothing needs the offset, the continuation just runs
        plain = model(seq[:, 25:], past_key_values=model.cache_of(twin(seq[:, :25], use_cache=True)),
                      use_cache=True)
        assert (plain - model(seq)[:, 25:]).abs().max() <= 1e-5

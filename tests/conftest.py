"""Shared fixtures: tiny random-init models of the real HF classes, saved and reloaded from a temp dir."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny_models import GDN_FAMILIES, SAFE_VOCAB, make_tiny_model  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# With the [fla] extra installed (scripts/setup.sh installs it), transformers binds fla's triton kernels for Gated
# DeltaNet and Kimi Linear at import, and a plain (unhooked) CPU forward of those models fails ("0 active
# drivers"); fla's own models fail the same way. The tests' plain reference forwards therefore run with the
# adapters' CPU routing on, made explicit here: CPU calls of those kernels run the pure-torch functions (for
# transformers' kernels, transformers' own torch fallback, i.e. what it runs without fla). A no-op without fla.
from writesae_plugin.adapters import route_cpu_to_torch  # noqa: E402

route_cpu_to_torch()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


_CACHE: dict = {}


def load_tiny(tmp_root, family="qwen3_5", layout="causal_lm", **kw):
    """A freshly reloaded tiny model (cached save dir per configuration)."""
    key = (family, layout, repr(sorted(kw.items())))
    path = tmp_root / f"{family}-{layout}-{abs(hash(key))}"
    return make_tiny_model(family, path, layout=layout, **kw)


@pytest.fixture
def qwen(tiny_dir):
    """A fresh tiny Qwen3.5 causal LM (2 key heads, 4 value heads, d_k = d_v = 16)."""
    return load_tiny(tiny_dir, "qwen3_5")


@pytest.fixture(scope="session")
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, SAFE_VOCAB, (2, 70), generator=g)  # 70: not a multiple of the chunk size 64


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer in HF format, trained offline on a fixed text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    text = ["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1",
            "import torch", "hello world, recurrent models write matrices"] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=240, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


__all__ = ["GDN_FAMILIES", "SAFE_VOCAB", "load_tiny"]


@pytest.fixture(scope="session")
def model_and_corpus(tmp_path_factory, tiny_tokenizer):
    """A directory with ``model/`` (the tiny Qwen3.5 and its tokenizer, as ``from_pretrained`` loads it) and
    ``corpus.txt`` (120 short paragraphs): what the CLI's ``--model`` / ``--dataset`` take."""
    root = tmp_path_factory.mktemp("model_and_corpus")
    load_tiny(root, "qwen3_5").save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    paragraphs = [f"paragraph {i}: the quick brown fox jumps over the lazy dog; def f(x): return x + {i}"
                  for i in range(120)]
    (root / "corpus.txt").write_text("\n\n".join(paragraphs))
    return root

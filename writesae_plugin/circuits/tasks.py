"""Clean/corrupted prompt pairs for patching on real text: the quote task and the copy (induction) task.

Quote task (:func:`quote_task`, the default of the CLI commands): a held-out code prefix, then
``x = f(`` + a quote + a word; the clean prompt opens the string with ``'``, the corrupted one with ``"``.
A model that remembers which quote is open prefers the matching one to close the string; the metric is
``logit(') - logit(")`` at the last position, and the corrupted position is the quote. The memory of the
quote lives in the recurrent state, so the effect runs through cache writes.

Copy task (:func:`copy_task`):

From held-out contexts of ``length`` tokens: the bigram ``A B`` at ``source_pos - 1, source_pos`` is repeated
by setting the last token to ``A``, so a model that copies predicts ``B`` next. The corrupted prompt
replaces ``B`` at ``source_pos`` by ``r`` (another token of the same context, neither ``A`` nor ``B``). The
metric is ``logit(B) - logit(r)`` at the last position. Every pair has the same length and positions, so
positions line up across the batch (as TransformerLens-style patching assumes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from .patching import Metric, logit_diff


@dataclass
class PromptPairs:
    """``clean`` / ``corrupted`` ``[n, T]``, ``answer`` / ``wrong`` ``[n]``, ``source_pos``: the corrupted
    position (the same in every row)."""

    clean: Tensor
    corrupted: Tensor
    answer: Tensor
    wrong: Tensor
    source_pos: int

    def metric(self, per_prompt: bool = False) -> Metric:
        return logit_diff(self.answer, self.wrong, per_prompt=per_prompt)

    def __len__(self) -> int:
        return self.clean.shape[0]


def quote_task(tokenizer, texts: Iterable[str], n: int, length: int = 24, words: int = 2,
               seed: int = 0) -> PromptPairs:
    """``n`` quote-task pairs of ``length`` tokens: a held-out prefix, ``"\n    x = f("``, the quote, then
    ``words`` identifier tokens taken from the same text (see the module docstring)."""
    from ..data import token_contexts

    ids = tokenizer.convert_tokens_to_ids(["'", '"'])
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or i == unk for i in ids):
        raise ValueError("the quote task needs the tokenizer to have single-token ' and \" (byte-level BPE does)")
    single, double = ids
    opener = tokenizer("\n    x = f(", add_special_tokens=False)["input_ids"]
    prefix_len = length - len(opener) - 1 - words
    if prefix_len < 1:
        raise ValueError(f"length {length} leaves no room for a prefix (opener {len(opener)} tokens + quote + "
                         f"{words} words)")
    g = torch.Generator().manual_seed(seed)
    clean, corrupted = [], []
    for c in token_contexts(texts, tokenizer, 4 * length):
        pool = [int(t) for t in c.tolist() if (w := tokenizer.decode([int(t)])).isidentifier() and len(w) >= 3
                and w.isascii() and w.islower()]
        if len(pool) < words:
            continue
        pick = [pool[int(i)] for i in torch.randint(len(pool), (words,), generator=g)]
        head = c[:prefix_len].tolist() + opener
        clean.append(torch.tensor(head + [single] + pick))
        corrupted.append(torch.tensor(head + [double] + pick))
        if len(clean) >= n:
            break
    if len(clean) < n:
        raise RuntimeError(f"the texts yield only {len(clean)} quote-task pairs (asked {n})")
    n_ = len(clean)
    return PromptPairs(torch.stack(clean), torch.stack(corrupted), torch.full((n_,), single), torch.full((n_,), double),
                       length - 1 - words)


def copy_task(tokenizer, texts: Iterable[str], n: int, length: int = 32, source_pos: int = 8,
              seed: int = 0) -> PromptPairs:
    """``n`` copy-task pairs from ``texts`` (see the module docstring)."""
    from ..data import token_contexts

    if not 1 <= source_pos < length - 2:
        raise ValueError(f"source_pos must be in [1, {length - 2}), got {source_pos}")
    g = torch.Generator().manual_seed(seed)
    clean, corrupted, answer, wrong = [], [], [], []
    for c in token_contexts(texts, tokenizer, length):
        a, b = int(c[source_pos - 1]), int(c[source_pos])
        pool = [int(t) for t in c.tolist() if int(t) not in (a, b)]
        if a == b or not pool or (c[:-1] == a).sum() > 1:  # A must be unambiguous before the repeat
            continue
        r = pool[int(torch.randint(len(pool), (1,), generator=g))]
        x = c.clone()
        x[-1] = a
        y = x.clone()
        y[source_pos] = r
        clean.append(x)
        corrupted.append(y)
        answer.append(b)
        wrong.append(r)
        if len(clean) >= n:
            break
    if len(clean) < n:
        raise RuntimeError(f"the texts yield only {len(clean)} copy-task pairs of {length} tokens (asked {n})")
    return PromptPairs(torch.stack(clean), torch.stack(corrupted), torch.tensor(answer), torch.tensor(wrong),
                       source_pos)

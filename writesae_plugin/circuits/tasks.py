"""Clean/corrupted prompt pairs for patching on real text: the copy (induction) task.

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

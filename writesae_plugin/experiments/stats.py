"""Statistics for the experiments, through scipy: Wilson intervals, their difference (Newcombe), cluster
bootstrap, paired Wilcoxon, McNemar's exact test for paired successes.

Every function returns plain dicts of floats (JSON-ready) that carry their ``n``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import numpy as np
from scipy import stats


def wilson(successes: int, n: int, confidence: float = 0.95) -> dict:
    """Proportion with its Wilson score interval (scipy ``binomtest(...).proportion_ci``)."""
    if n == 0:
        return {"rate": float("nan"), "lo": float("nan"), "hi": float("nan"), "k": 0, "n": 0}
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return {"rate": successes / n, "lo": float(ci.low), "hi": float(ci.high), "k": int(successes), "n": int(n)}


def rate_difference(a: dict, b: dict) -> dict:
    """Difference ``a.rate - b.rate`` of two independent :func:`wilson` proportions with Newcombe's hybrid
    score interval (method 10: from the two Wilson intervals, at their confidence level)."""
    if not a.get("n") or not b.get("n"):
        return {"difference": float("nan"), "lo": float("nan"), "hi": float("nan"), "n_a": a.get("n", 0),
                "n_b": b.get("n", 0)}
    p1, l1, u1, p2, l2, u2 = a["rate"], a["lo"], a["hi"], b["rate"], b["lo"], b["hi"]
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return {"difference": d, "lo": lo, "hi": hi, "n_a": int(a["n"]), "n_b": int(b["n"])}


def cluster_bootstrap(wins: Sequence[bool], clusters: Sequence, n_resamples: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """Pooled rate with a percentile CI from resampling whole clusters (atoms or contexts) with
    replacement (``scipy.stats.bootstrap`` on per-cluster (wins, n) pairs; statistic = sum(wins)/sum(n))."""
    per = defaultdict(lambda: [0, 0])
    for w, c in zip(wins, clusters):
        per[c][0] += int(w)
        per[c][1] += 1
    k = np.array([v[0] for v in per.values()], dtype=float)
    n = np.array([v[1] for v in per.values()], dtype=float)
    out = {"rate": float(k.sum() / n.sum()) if n.sum() else float("nan"), "n_clusters": int(len(n)),
           "n": int(n.sum())}
    if len(n) < 2:
        out.update(lo=float("nan"), hi=float("nan"))
        return out
    res = stats.bootstrap((k, n), lambda a, b, axis=-1: a.sum(axis) / b.sum(axis), paired=True, vectorized=True,
                          n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                          random_state=np.random.default_rng(seed))
    out.update(lo=float(res.confidence_interval.low), hi=float(res.confidence_interval.high))
    return out


def per_cluster_mean(wins: Sequence[bool], clusters: Sequence, min_count: int = 5, confidence: float = 0.95) -> dict:
    """Mean over clusters (atoms) with ``>= min_count`` items of their win rates, with a t interval."""
    per = defaultdict(list)
    for w, c in zip(wins, clusters):
        per[c].append(float(w))
    rates = np.array([np.mean(v) for v in per.values() if len(v) >= min_count])
    out = {"mean": float(rates.mean()) if len(rates) else float("nan"), "n_clusters": int(len(rates)),
           "min_count": min_count}
    if len(rates) >= 2:
        sem = stats.sem(rates)
        lo, hi = stats.t.interval(confidence, len(rates) - 1, loc=rates.mean(), scale=sem) if sem > 0 else (
            rates.mean(), rates.mean())
        out.update(lo=float(lo), hi=float(hi))
    else:
        out.update(lo=float("nan"), hi=float("nan"))
    return out


def paired_wilcoxon(x: Sequence[float], y: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of ``x`` vs ``y`` with the matched-pairs rank-biserial effect size
    ``r = (R+ - R-) / (R+ + R-)`` of ``d = y - x`` (positive: ``x`` smaller) and the median difference."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    d = y - x
    nz = d[d != 0]
    out = {"n": int(len(d)), "n_nonzero": int(len(nz)), "median_diff": float(np.median(d)) if len(d) else float("nan")}
    if len(nz) < 1:
        out.update(statistic=float("nan"), p=float("nan"), rank_biserial=float("nan"))
        return out
    res = stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
    ranks = stats.rankdata(np.abs(nz))
    r_plus, r_minus = ranks[nz > 0].sum(), ranks[nz < 0].sum()
    out.update(statistic=float(res.statistic), p=float(res.pvalue),
               rank_biserial=float((r_plus - r_minus) / (r_plus + r_minus)))
    return out


def mcnemar(after: Sequence[bool], before: Sequence[bool], alpha: float = 0.05) -> dict:
    """McNemar's exact test of paired successes (the same units ``before`` and ``after`` a change): the two-sided
    binomial test of the discordant pairs (``gained``: success only after; ``lost``: only before) at p = 1/2.
    Returns the rate difference, the counts, ``p`` and ``significant`` (``p < alpha``; False with no discordant
    pair)."""
    after, before = np.asarray(after, bool), np.asarray(before, bool)
    if after.shape != before.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {after.shape} and {before.shape}")
    gained, lost = int((after & ~before).sum()), int((~after & before).sum())
    n = int(after.size)
    p = float(stats.binomtest(gained, gained + lost, 0.5).pvalue) if gained + lost else 1.0
    return {"difference": float(after.mean() - before.mean()) if n else float("nan"), "gained": gained,
            "lost": lost, "n": n, "p": p, "significant": bool(gained + lost and p < alpha)}

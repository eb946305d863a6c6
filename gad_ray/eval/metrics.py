"""Text-overlap diagnostics, length statistics and mean +- 95% confidence intervals.

Overlap (docs/algorithms.md §5.4: diagnostics only, they do not track quality): texts are lower-cased and split
into ``\\w+`` words; n-gram F1 is the F1 of the clipped n-gram multiset overlap, ROUGE-L the
F1 of the longest common subsequence (precision LCS/|pred|, recall LCS/|ref|).

Confidence intervals are Student-t intervals: mean +- t(0.975, n-1) * s / sqrt(n), with s the
sample standard deviation; the t quantile is computed by integrating the t density (no scipy).
"""

from __future__ import annotations

import math
import re
from collections import Counter

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def ngram_f1(pred: str, ref: str, n: int = 1) -> float:
    """F1 of the n-gram multisets of ``pred`` and ``ref`` (1.0 when both have none)."""
    a, b = words(pred), words(ref)
    ga = Counter(tuple(a[i : i + n]) for i in range(len(a) - n + 1))
    gb = Counter(tuple(b[i : i + n]) for i in range(len(b) - n + 1))
    if not ga and not gb:
        return 1.0
    return _f1(sum((ga & gb).values()), sum(ga.values()), sum(gb.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(|a| |b|) time, O(|b|) memory)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (LCS-based) of ``pred`` against ``ref`` (1.0 when both are empty)."""
    a, b = words(pred), words(ref)
    if not a and not b:
        return 1.0
    return _f1(lcs_length(a, b), len(a), len(b))


def _t_density(x: float, df: int) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf_upper_half(x: float, df: int, steps: int = 2000) -> float:
    """P(0 <= T <= x) by Simpson's rule."""
    h = x / steps
    total = _t_density(0.0, df) + _t_density(x, df)
    for i in range(1, steps):
        total += (4 if i % 2 else 2) * _t_density(i * h, df)
    return total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with ``df`` degrees of freedom, by bisection."""
    lo, hi = 0.0, 1.0
    while 0.5 + _t_cdf_upper_half(hi, df) < p:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + _t_cdf_upper_half(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``; with fewer than 2 values the interval is the mean itself."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def length_stats(lengths: list[int]) -> dict[str, float]:
    """Mean, median and max of response lengths."""
    if not lengths:
        return {"mean": math.nan, "median": math.nan, "max": math.nan}
    s = sorted(lengths)
    mid = len(s) // 2
    median = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    return {"mean": sum(s) / len(s), "median": float(median), "max": float(s[-1])}

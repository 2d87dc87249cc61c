"""Paired statistics over validation segments, for every comparison a report states.

Two regimes (or two capacities, or a regime and fp's gain) evaluated on the
same seeds are compared on the per-segment differences d_s, never on two
intervals as if they were independent (the segments are shared, so the
noise of the text cancels in d_s):

- the estimate is the mean of d_s, with a 95% bootstrap interval
  (`scipy.stats.bootstrap`, BCa, 9,999 resamples, fixed seed);
- the p-value is that of a sign-flip permutation test of mean(d) = 0
  (`scipy.stats.permutation_test`, `permutation_type="samples"`: each
  segment's two values swapped; exact up to 2^13 sign patterns, 9,999
  random ones with a fixed seed beyond);
- the p-values of one report are Holm-corrected together (`holm`), and a
  finding's wording follows from its corrected p: `ALPHA` decides.

With n segments the smallest two-sided p is 2/2^n, so n >= 6 is needed for
any finding at all, and about 10 to survive Holm over a report's findings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

ALPHA = 0.05
RESAMPLES = 9_999
EXACT_UP_TO = 16  # segments: all 2^n sign patterns of the permutation test


@dataclass(frozen=True)
class Paired:
    """One comparison: the mean per-segment difference, its interval, and its p-values."""

    what: str
    n: int
    mean: float
    low: float
    high: float
    p: float
    p_holm: float = math.nan

    @property
    def sign(self) -> int:
        """+1 / −1 when the corrected test says the difference is positive / negative, 0 when it does not."""
        if math.isnan(self.p_holm) or self.p_holm >= ALPHA:
            return 0
        return 1 if self.mean > 0 else -1

    def text(self, digits: int = 2) -> str:
        """"+0.14, 95% interval [+0.08, +0.20], p = 0.004 (Holm)"."""
        if self.n == 0:
            return "no paired segments"
        interval = "" if math.isnan(self.low) else f", 95% interval [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        p = "" if math.isnan(self.p_holm) else f", p = {self.p_holm:.3g} (Holm, n = {self.n})"
        return f"{self.mean:+.{digits}f}{interval}{p}"


def paired(diffs, what: str = "", seed: int = 0) -> Paired:
    """Mean of per-segment differences with its bootstrap interval and sign-flip permutation p-value."""
    d = np.asarray([x for x in diffs if not (isinstance(x, float) and math.isnan(x))], dtype=float)
    n = d.size
    if n == 0:
        return Paired(what, 0, math.nan, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2 or np.allclose(d, d[0]):
        low = high = mean if n >= 2 else math.nan
        p = 2.0 ** (1 - n) if n >= 2 and mean != 0 else 1.0
        return Paired(what, n, mean, low, high, min(1.0, p))
    rng = np.random.default_rng(seed)
    ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=RESAMPLES, method="BCa", random_state=rng)
    low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    if math.isnan(low) or math.isnan(high):  # BCa undefined (e.g. one value far from all others): percentile
        ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, method="percentile", random_state=rng)
        low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    test = stats.permutation_test((d, np.zeros_like(d)), lambda x, y, axis: np.mean(x - y, axis=axis),
                                  permutation_type="samples", vectorized=True, alternative="two-sided",
                                  n_resamples=np.inf if n <= EXACT_UP_TO else RESAMPLES, random_state=rng)
    return Paired(what, n, mean, low, high, float(test.pvalue))


def smallest_holm_p(n: int, comparisons: int) -> float:
    """The smallest corrected p-value a report of `comparisons` sign-flip tests over `n` segments can reach: with
    too few segments for its comparisons, no finding can be significant, whatever the data."""
    return min(1.0, comparisons * 2.0 ** (1 - n)) if n >= 1 else 1.0


def holm(results: list[Paired]) -> list[Paired]:
    """The same comparisons with Holm's step-down correction of their p-values (family-wise error `ALPHA`)."""
    order = sorted((i for i, r in enumerate(results) if not math.isnan(r.p)), key=lambda i: results[i].p)
    out = list(results)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * results[i].p))
        out[i] = replace(results[i], p_holm=running)
    return out

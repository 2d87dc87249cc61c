"""The paired statistics by their definitions, on numbers small enough to count by hand."""
import math

import numpy as np
import pytest

from analysis.stats import ALPHA, Paired, holm, paired, smallest_holm_p


def test_the_sign_flip_p_value_is_the_share_of_sign_patterns_at_least_as_extreme():
    # six positive differences: only all-plus and all-minus reach |mean| 3.5, so p = 2 / 2^6
    assert paired([1, 2, 3, 4, 5, 6]).p == pytest.approx(2 / 64)
    # [1, 1, 1, -1]: |mean| >= 0.5 for the patterns with at least three of one sign: 2 * (1 + 4) of 16
    assert paired([1.0, 1.0, 1.0, -1.0]).p == pytest.approx(10 / 16)
    r = paired([0.5, 1.5, 1.0, 2.0, 0.7, 1.3], what="x")
    assert r.what == "x" and r.n == 6 and r.mean == pytest.approx(7.0 / 6)
    assert r.low < r.mean < r.high and 0.5 <= r.low and r.high <= 2.0  # a bootstrap interval of the mean


def test_degenerate_inputs_are_said_as_such():
    empty = paired([])
    assert (empty.n, empty.text()) == (0, "no paired segments") and math.isnan(empty.mean) and math.isnan(empty.p)
    one = paired([0.3, math.nan])  # NaNs are dropped: one segment
    assert (one.n, one.mean, one.p) == (1, 0.3, 1.0) and math.isnan(one.low) and one.text() == "+0.30"
    same = paired([0.2] * 5)  # no spread: the interval is the point, p that of five equal signs
    assert (same.low, same.high) == (0.2, 0.2) and same.p == pytest.approx(2 / 32)
    assert paired([0.0] * 5).p == 1.0
    assert paired(np.array([1, 2, 3], dtype=np.int64)).mean == 2.0


def test_holm_steps_down_and_never_lowers_a_later_p():
    rs = [Paired("a", 6, 1, 0, 2, 0.01), Paired("b", 6, 1, 0, 2, 0.04), Paired("c", 6, 1, 0, 2, 0.03),
          Paired("d", 6, 1, 0, 2, math.nan)]
    out = holm(rs)
    # sorted p 0.01, 0.03, 0.04 times 3, 2, 1; running maximum; NaN untouched and uncounted
    assert [o.p_holm for o in out[:3]] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(out[3].p_holm) and [o.p for o in out[:3]] == [0.01, 0.04, 0.03]  # raw p kept
    assert [o.sign for o in out[:3]] == [1, 0, 0]
    assert Paired("e", 6, -0.2, -0.3, -0.1, 0.01, p_holm=ALPHA / 2).sign == -1
    assert Paired("f", 6, 0.2, 0.1, 0.3, 0.01, p_holm=ALPHA).sign == 0  # significant means below ALPHA


def test_text_and_the_smallest_reachable_p():
    r = Paired("g", 10, 0.1234, 0.05, 0.2, 0.001, p_holm=0.0215)
    assert r.text() == "+0.12, 95% interval [+0.05, +0.20], p = 0.0215 (Holm, n = 10)"
    assert r.text(3) == "+0.123, 95% interval [+0.050, +0.200], p = 0.0215 (Holm, n = 10)"
    assert Paired("h", 3, -0.5, math.nan, math.nan, 0.5).text() == "-0.50"
    assert smallest_holm_p(10, 11) == pytest.approx(11 / 512)
    assert smallest_holm_p(1, 3) == 1.0 and smallest_holm_p(0, 3) == 1.0 and smallest_holm_p(20, 1) == 2.0 ** -19


def test_the_defaults_and_edges_a_report_relies_on():
    d = [0.5, 1.5, 1.0, 2.0, 0.7, 1.3]
    assert paired(d) == paired(d, what="", seed=0)  # the documented fixed seed, and no name unless given
    single = np.asarray(d, dtype=np.float32)  # a float32 column is summed in float64
    assert paired(single).mean == float(single.astype(np.float64).mean()) != float(single.mean())
    empty = paired([], what="e")
    assert empty.what == "e" and math.isnan(empty.low) and math.isnan(empty.high)
    two = paired([1.0, 3.0])  # two segments: an interval of a spread, and p that of two sign patterns of four
    assert two.low < two.high and two.p == pytest.approx(0.5)
    flat = paired([0.2, 0.2 + 1e-12, 0.2, 0.2 - 1e-12, 0.2])  # spread below allclose's tolerance: a point
    assert flat.low == flat.high == flat.mean
    # Holm never corrects past 1
    assert [o.p_holm for o in holm([Paired("a", 6, 1, 0, 2, 0.6), Paired("b", 6, 1, 0, 2, 0.7)])] == [1.0, 1.0]


def test_two_equal_segments_and_one_named_segment_are_points():
    two = paired([0.3, 0.3])  # no spread over two segments: the point, and p that of two equal signs
    assert (two.low, two.high, two.p) == (0.3, 0.3, 0.5)
    assert paired([0.3], what="w").what == "w"


def test_the_interval_is_scipys_bca_bootstrap_of_the_mean_at_95_percent_with_the_documented_resamples():
    from scipy import stats

    d = np.array([0.5, 1.5, 1.0, 2.0, 0.7, 1.3, 0.2, 2.4])
    r = paired(d)
    bca = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=9_999, method="BCa",
                          random_state=np.random.default_rng(0)).confidence_interval
    assert (r.low, r.high) == (bca.low, bca.high)
    pct = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=9_999, method="percentile",
                          random_state=np.random.default_rng(0)).confidence_interval
    assert (r.low, r.high) != (pct.low, pct.high)  # the two methods differ on this sample


def test_the_permutation_test_is_exact_up_to_16_segments_and_seeded_beyond():
    # all positive: only the all-plus and all-minus patterns reach the observed |mean|
    assert paired(list(range(1, 16))).p == pytest.approx(2 / 2**15, rel=1e-9)
    assert paired(list(range(1, 17))).p == pytest.approx(2 / 2**16, rel=1e-9)
    assert paired(list(range(1, 18))).p > 2 / 2**17  # 9,999 random patterns beyond 16: p is at least 2 / 10,000
    d = np.random.default_rng(3).normal(0.3, 1.0, 24)
    assert paired(d).p == paired(d).p  # beyond 16 the random patterns come from the fixed seed

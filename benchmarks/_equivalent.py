"""Surviving mutants no test can tell from the original, each with the reason.

Keyed by (module as in mutation.py's TARGETS, function, the mutated line as
mutmut writes it), so that a key outlives mutmut's numbering: a change to the
function that alters the line drops the entry, and the mutant counts as a
survivor again until someone looks at it.
"""
from __future__ import annotations

STATS = "analysis/stats.py"
ONLY_CALLED_WITH_SEGMENTS = ("families.findings calls it only with n >= 1 segments and comparisons >= 1, where both "
                             "sides give min(1, comparisons * 2^(1-n))")

EQUIVALENT: dict[tuple[str, str, str], str] = {
    (STATS, "paired", "if n < 2 or np.allclose(d, d[1]):"):
        "the segments are all within allclose's tolerance of d[0] exactly when they are of d[1], except for spreads "
        "of about 1e-8 bpb at the tolerance's edge, where both branches give the same mean and a point interval",
    (STATS, "paired", "p = 2.0 ** (1 - n) if n >= 2 and mean != 0 else 2.0"):
        "the return line caps p with min(1.0, p): 2.0 and 1.0 both come back as 1.0",
    (STATS, "paired", "return Paired(what, n, mean, low, high, min(2.0, p))"):
        "p on this branch is 2^(1-n) for n >= 2 (at most 0.5) or 1.0, never above 1",
    (STATS, "paired", 'ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, method="BCa", random_state=rng)'):
        "scipy.stats.bootstrap's default confidence_level is 0.95, the value the line gives",
    (STATS, "paired", 'ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, method="BCa", random_state=rng)'):
        "scipy.stats.bootstrap's default n_resamples is 9,999, RESAMPLES",
    (STATS, "paired",
     "ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=RESAMPLES, random_state=rng)"):
        "scipy.stats.bootstrap's default method is BCa, the one the line names",
    (STATS, "paired",
     'ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=RESAMPLES, method="bca", random_state=rng)'):
        "scipy.stats.bootstrap reads method case-insensitively",
    (STATS, "paired",
     'ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=RESAMPLES, method="BCA", random_state=rng)'):
        "scipy.stats.bootstrap reads method case-insensitively",
    (STATS, "smallest_holm_p", "return min(1.0, comparisons * 2.0 ** (1 - n)) if (n >= 1) or True else 1.0"):
        ONLY_CALLED_WITH_SEGMENTS,
    (STATS, "smallest_holm_p", "return min(1.0, comparisons * 2.0 ** (1 - n)) if n > 1 else 1.0"):
        ONLY_CALLED_WITH_SEGMENTS + "; at n = 1 that is min(1, comparisons) = 1",
    (STATS, "smallest_holm_p", "return min(1.0, comparisons * 2.0 ** (1 - n)) if n >= 2 else 1.0"):
        ONLY_CALLED_WITH_SEGMENTS + "; at n = 1 that is min(1, comparisons) = 1",
}

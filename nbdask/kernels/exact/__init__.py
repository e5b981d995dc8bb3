"""Conditional exact test of the log fold change at a given dispersion (``test="exact"|"auto"``).

Under H0 both groups share one rate r. A group's count total S_g = sum_i y_i is then close to
NB(mean r L_g, size k_g) with L_g = sum_i l_i and k_g = L_g^2 / (phi sum_i l_i^2): moment matched,
and exact when the group's size factors are equal (a sum of n iid NB(m, 1/phi) is NB(n m, n/phi)).
Conditioning on s = S_T + S_C gives P(S_T = t | s) proportional to a_t = NB(t; M_T, k_T) NB(s - t;
M_C, k_C), with r estimated by s / (L_T + L_C) as in edgeR's exact test. The p-value is the
doubled mid-p tail, edgeR's default ``"doubletail"`` rejection region: 2 min(L, U) / sum of all
a_t, capped at 1, with L (U) the sum of a_t below (above) the observed t plus half of a_obs. It
is free of the normal approximation that makes Wald tests conservative at counts below ~2 (see
README, "Calibration"). The tails, not the small-probability rule, decide: when both sizes k_g
are below 1 the distribution is U-shaped (at large phi the total tends to fall in one group), and
the small-probability rule would call an even split significant because it is improbable there.

The walk computes a_t / a_obs outward from the observed t by the recurrence
a_{t+1} / a_t = c (t + k_T)(s - t) / ((t + 1)(s - t - 1 + k_C)), c = p_T / p_C, p_g = M_g/(M_g+k_g),
so it costs one division per term; values past 1e280 are rescaled (tracked exponents), so p-values
down to the float64 range survive. When k_T, k_C >= 1 the distribution is log-concave and a walk
stops once its terms drop below TRUNCATION of its running tail sum. The numba form sums every
term, untruncated and unscaled, for totals up to 64 (where that is cheaper than checking), and
walks as above when a term overflows; the two differ by less than TRUNCATION relative.

``test="auto"`` (the default) runs it where s <= AUTO_MAX_TOTAL, where it matters, and keeps the
Wald test elsewhere, where the normal approximation is good: like scipy's ``mannwhitneyu``
``method="auto"``. ``test="exact"`` runs it everywhere (cost grows with the spread of S_T).

Two forms of one test: ``array.py`` is the definition over the array namespace (NumPy, CuPy),
``fused.py`` its numba twin for NumPy blocks (one scalar walk per comparison);
``conditional_outputs`` picks one.
"""

from __future__ import annotations

from ..backend import is_host, namespaces
from . import array
from .array import (AUTO_MAX_TOTAL, BIG, CONDITIONAL_TESTS, LOG_BIG, TRUNCATION, conditional_p,
                    doubled_tail, group_totals, max_total)


def conditional_outputs(out, counts, size_factor, control_counts, control_size_factor, *,
                        test, engine="auto"):
    """Replace ``p_value`` and ``statistic`` of a kernel's outputs by the conditional exact test.

    ``out`` is a kernel's dict (design §5) with a Wald ``p_value``; the test runs at its
    reported dispersion exp(``log_dispersion``), where the kernel's p is finite and (for
    ``test="auto"``) the total count is at most AUTO_MAX_TOTAL. ``statistic`` becomes the signed
    normal quantile with the same two-sided p. The fused numba walk runs on NumPy blocks unless
    ``engine="array"`` (or numba is missing).
    """
    xp, _ = namespaces(counts)
    if engine != "array" and is_host(xp):
        try:
            from .fused import exact_fused
        except ImportError:
            pass
        else:
            p, z = exact_fused(counts, size_factor, control_counts, control_size_factor,
                               out["log_dispersion"], out["p_value"], out["statistic"],
                               max_total(test))
            return {**out, "p_value": p, "statistic": z}
    return array.conditional_outputs(out, counts, size_factor, control_counts, control_size_factor,
                                     test=test)


__all__ = ["AUTO_MAX_TOTAL", "BIG", "CONDITIONAL_TESTS", "LOG_BIG", "TRUNCATION", "conditional_outputs",
           "conditional_p", "doubled_tail", "group_totals", "max_total"]

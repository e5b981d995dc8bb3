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
stops once its terms drop below TRUNCATION of its running tail sum.

``test="auto"`` (the default) runs it where s <= AUTO_MAX_TOTAL, where it matters, and keeps the
Wald test elsewhere, where the normal approximation is good: like scipy's ``mannwhitneyu``
``method="auto"``. ``test="exact"`` runs it everywhere (cost grows with the spread of S_T).
"""

from __future__ import annotations

import math

from .backend import any_true, host_scalar, is_host, namespaces

#: ``test="auto"``: comparisons whose total count is at most this get the exact test.
AUTO_MAX_TOTAL = 32
#: A log-concave walk stops at a term below this fraction of its small-term sum.
TRUNCATION = 1e-14
BIG = 1e280
LOG_BIG = math.log(BIG)
CONDITIONAL_TESTS = ("exact", "auto")


def group_totals(xp, counts, size_factor, control_counts, control_size_factor):
    """(obs [P_b, G_b], total [P_b, G_b], L_T [P_b, 1], L2_T [P_b, 1], L_C, L2_C) in float64."""
    f64 = xp.float64
    sf = xp.astype(size_factor, f64)
    present = xp.isfinite(sf)
    l_t = xp.where(present, sf, 0.0)
    obs = xp.sum(xp.where(present[:, None, :], xp.astype(counts, f64), 0.0), axis=-1)
    total = obs + xp.sum(xp.astype(control_counts, f64), axis=-1)
    csf = xp.astype(control_size_factor, f64)
    return (obs, total, xp.sum(l_t, axis=-1)[:, None], xp.sum(l_t * l_t, axis=-1)[:, None],
            xp.sum(csf), xp.sum(csf * csf))


def _walk(xp, obs, total, kt, kc, c, active, trunc, up, steps):
    """Log of the tail sum of a_t / a_obs beyond obs in one direction ([P_b, G_b]; -inf if empty)."""
    value = xp.ones_like(obs)
    zero = xp.zeros_like(obs)
    e, tot, etot = zero, zero, zero
    done = ~active
    for j in range(steps):
        if up:
            t = obs + j
            valid = ~done & (t < total)
            ratio = c * (t + kt) * (total - t) / ((t + 1.0) * (total - t - 1.0 + kc))
        else:
            t = obs - j
            valid = ~done & (t > 0)
            ratio = t * (total - t + kc) / (c * (t - 1.0 + kt) * (total - t + 1.0))
        value = xp.where(valid, value * ratio, value)
        over = valid & (value > BIG)
        under = valid & ~over & (e > 0) & (value < 1.0)
        value = value * xp.where(over, 1.0 / BIG, xp.where(under, BIG, xp.ones_like(value)))
        e = e + xp.astype(over, e.dtype) - xp.astype(under, e.dtype)
        higher = valid & (e > etot)
        tot = xp.where(valid & (e == etot), tot + value, xp.where(higher, tot / BIG + value, tot))
        etot = xp.where(higher, e, etot)
        negligible = (e < etot) | (value < TRUNCATION * tot)
        done = done | ~valid | (valid & trunc & negligible)
        if j % 32 == 31 and not any_true(xp, ~done):  # one sync per 32 steps
            break
    return xp.where(tot > 0, xp.log(xp.where(tot > 0, tot, 1.0)) + etot * LOG_BIG, -xp.inf)


def conditional_p(xp, obs, total, l_t, l2_t, l_c, l2_c, phi, active, *, steps):
    """Mid-p of the conditional exact test [P_b, G_b]; NaN outside ``active``."""
    rate = total / xp.where(active, l_t + l_c, 1.0)
    phi = xp.where(active, phi, 1.0)
    kt = l_t * l_t / (phi * xp.where(l2_t > 0, l2_t, 1.0))
    kc = l_c * l_c / (phi * l2_c)
    mt, mc = rate * l_t, rate * l_c
    c = (mt / (mt + kt)) / xp.where(active, mc / (mc + kc), 1.0)
    trunc = (kt >= 1.0) & (kc >= 1.0)
    lu = _walk(xp, obs, total, kt, kc, c, active, trunc, True, steps)
    ld = _walk(xp, obs, total, kt, kc, c, active, trunc, False, steps)
    return xp.where(active, doubled_tail(xp, lu, ld), xp.nan)


def doubled_tail(xp, log_upper, log_lower):
    """2 min(L, U) / (L + U), capped at 1, from the logs of the tail sums beyond a_obs = 1 on
    each side (L = lower + 1/2, U = upper + 1/2)."""
    half = xp.full_like(log_upper, math.log(0.5))
    lu = xp.logaddexp(log_upper, half)
    ld = xp.logaddexp(log_lower, half)
    return xp.minimum(2.0 * xp.exp(xp.minimum(lu, ld) - xp.logaddexp(lu, ld)), 1.0)


def conditional_outputs(out, counts, size_factor, control_counts, control_size_factor, *,
                        test, engine="auto"):
    """Replace ``p_value`` and ``statistic`` of a kernel's outputs by the conditional exact test.

    ``out`` is a kernel's dict (design §5) with a Wald ``p_value``; the test runs at its
    reported dispersion exp(``log_dispersion``), where the kernel's p is finite and (for
    ``test="auto"``) the total count is at most AUTO_MAX_TOTAL. ``statistic`` becomes the signed
    normal quantile with the same two-sided p. The fused numba walk runs on NumPy blocks unless
    ``engine="array"``.
    """
    xp, special = namespaces(counts)
    max_total = AUTO_MAX_TOTAL if test == "auto" else math.inf
    fused = None
    if engine != "array" and is_host(xp):
        try:
            from .fused import exact_fused as fused
        except ImportError:
            fused = None
    if fused is not None:
        p, z = fused(counts, size_factor, control_counts, control_size_factor,
                     out["log_dispersion"], out["p_value"], out["statistic"], max_total)
        return {**out, "p_value": p, "statistic": z}
    obs, total, l_t, l2_t, l_c, l2_c = group_totals(xp, counts, size_factor, control_counts,
                                                    control_size_factor)
    phi = xp.exp(xp.astype(out["log_dispersion"], xp.float64))
    active = (xp.isfinite(out["p_value"]) & (total > 0) & (total <= max_total) & xp.isfinite(phi)
              & (l_t > 0))
    steps = int(host_scalar(xp.max(xp.where(active, total, 0.0)))) if test == "exact" else AUTO_MAX_TOTAL
    p = conditional_p(xp, obs, total, l_t, l2_t, l_c, l2_c, phi, active, steps=steps)
    direction = xp.sign(obs * l_c - (total - obs) * l_t)
    z = -direction * special.ndtri(xp.where(active, p, 1.0) / 2.0)
    return {**out,
            "p_value": xp.where(active, p, out["p_value"]),
            "statistic": xp.where(active, xp.astype(z, xp.float32), out["statistic"])}

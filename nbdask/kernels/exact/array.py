"""The conditional exact test over the array namespace (NumPy or CuPy): the definition.

``group_totals`` gives each comparison's counts and size-factor sums, ``conditional_p`` walks the
two tails at once for a whole block (see the package docstring for the test and the walk), and
``conditional_outputs`` puts its p-value and signed normal quantile into a kernel's outputs.
"""

from __future__ import annotations

import math

from ..backend import any_true, host_scalar, namespaces

#: ``test="auto"``: comparisons whose total count is at most this get the exact test.
AUTO_MAX_TOTAL = 32
#: A log-concave walk stops at a term below this fraction of its small-term sum.
TRUNCATION = 1e-14
BIG = 1e280
LOG_BIG = math.log(BIG)
CONDITIONAL_TESTS = ("exact", "auto")


def max_total(test: str) -> float:
    """The largest comparison total count that ``test`` ("auto" or "exact") tests exactly."""
    return AUTO_MAX_TOTAL if test == "auto" else math.inf


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


def conditional_outputs(out, counts, size_factor, control_counts, control_size_factor, *, test):
    """The array form of ``exact.conditional_outputs`` (which picks it or the numba twin): any
    array-API arrays, NumPy or CuPy."""
    xp, special = namespaces(counts)
    limit = max_total(test)
    obs, total, l_t, l2_t, l_c, l2_c = group_totals(xp, counts, size_factor, control_counts,
                                                    control_size_factor)
    phi = xp.exp(xp.astype(out["log_dispersion"], xp.float64))
    active = (xp.isfinite(out["p_value"]) & (total > 0) & (total <= limit) & xp.isfinite(phi)
              & (l_t > 0))
    steps = int(host_scalar(xp.max(xp.where(active, total, 0.0)))) if test == "exact" else AUTO_MAX_TOTAL
    p = conditional_p(xp, obs, total, l_t, l2_t, l_c, l2_c, phi, active, steps=steps)
    direction = xp.sign(obs * l_c - (total - obs) * l_t)
    z = -direction * special.ndtri(xp.where(active, p, 1.0) / 2.0)
    return {**out,
            "p_value": xp.where(active, p, out["p_value"]),
            "statistic": xp.where(active, xp.astype(z, xp.float32), out["statistic"])}

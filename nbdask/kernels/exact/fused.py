"""The conditional exact test as one numba walk per comparison: the twin of ``exact.array``.

NumPy blocks only; ``exact.conditional_outputs`` picks it for host arrays unless
``engine="array"``.
"""

from __future__ import annotations

import math

import numpy as np

from ..fused_common import jit, present
from .array import BIG as _BIG
from .array import LOG_BIG as _LOG_BIG
from .array import TRUNCATION as _TRUNCATION


@jit
def _up(t, s, kt, kc, c):
    """a_{t+1} / a_t, the walk's step above t."""
    return c * (t + kt) * (s - t) / ((t + 1.0) * (s - t - 1.0 + kc))


@jit
def _down(t, s, kt, kc, c):
    """a_{t-1} / a_t, the walk's step below t."""
    return t * (s - t + kc) / (c * (t - 1.0 + kt) * (s - t + 1.0))


@jit
def _exact_walk(obs, s, kt, kc, c, trunc, up):
    """``array._walk`` for one comparison: its tail sum as (mantissa, exponent): the sum is
    mantissa * BIG**exponent (mantissa 0 when empty)."""
    value = 1.0
    e = 0
    tot = 0.0
    etot = 0
    t = obs
    while (t < s) if up else (t > 0):
        if up:
            value *= _up(t, s, kt, kc, c)
            t += 1.0
        else:
            value *= _down(t, s, kt, kc, c)
            t -= 1.0
        if value > _BIG:
            value /= _BIG
            e += 1
        elif e > 0 and value < 1.0:
            value *= _BIG
            e -= 1
        if e == etot:
            tot += value
        elif e > etot:
            tot = tot / _BIG + value
            etot = e
        if trunc and (e < etot or value < _TRUNCATION * tot):
            break
    return tot, etot


#: Totals up to this walk every term without truncation or rescaling checks (``_plain_tails``).
_PLAIN_MAX_TOTAL = 64


@jit
def _plain_tails(obs, s, kt, kc, c):
    """Both tail sums of a_t / a_obs in plain float64, every term: no branch in the loops, so
    the divisions overlap. Their sum exceeds BIG (or is NaN) when a term overflowed; the caller
    then takes ``_exact_walk``."""
    up = 0.0
    value = 1.0
    t = obs
    while t < s:
        value *= _up(t, s, kt, kc, c)
        up += value
        t += 1.0
    down = 0.0
    value = 1.0
    t = obs
    while t > 0:
        value *= _down(t, s, kt, kc, c)
        down += value
        t -= 1.0
    return up, down


@jit
def _log_tail(tot, etot):
    return math.log(tot) + etot * _LOG_BIG if tot > 0 else -math.inf


@jit
def _logaddexp(a, b):
    hi = max(a, b)
    return hi + math.log(math.exp(a - hi) + math.exp(b - hi))


@jit
def _doubled(up, down):
    """The doubled mid-p from tail sums relative to the observed table's probability, without
    logs: 2 min(U + 1/2, D + 1/2) / (U + D + 1), capped at 1."""
    u = up + 0.5
    d = down + 0.5
    return min(2.0 * min(u, d) / (u + d), 1.0)


@jit
def _exact_p(obs, s, l_t, l2_t, l_c, l2_c, phi):
    """``exact.conditional_p`` for one comparison (doubled mid-p tail)."""
    rate = s / (l_t + l_c)
    kt = l_t * l_t / (phi * l2_t)
    kc = l_c * l_c / (phi * l2_c)
    mt = rate * l_t
    mc = rate * l_c
    c = (mt / (mt + kt)) / (mc / (mc + kc))
    if s <= _PLAIN_MAX_TOTAL:
        up, down = _plain_tails(obs, s, kt, kc, c)
        if up <= _BIG and down <= _BIG:  # no term overflowed (nor NaN: comparisons fail)
            return _doubled(up, down)
    trunc = kt >= 1.0 and kc >= 1.0
    up, e_up = _exact_walk(obs, s, kt, kc, c, trunc, True)
    down, e_down = _exact_walk(obs, s, kt, kc, c, trunc, False)
    if e_up == 0 and e_down == 0:  # no tail term passed BIG (the usual case)
        return _doubled(up, down)
    half = math.log(0.5)
    lu = _logaddexp(_log_tail(up, e_up), half)
    ld = _logaddexp(_log_tail(down, e_down), half)
    return min(2.0 * math.exp(min(lu, ld) - _logaddexp(lu, ld)), 1.0)


# Acklam's rational approximation of the normal quantile (relative error < 1.2e-9: ample for
# the float32 ``statistic``).
_NDTRI_A = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
            1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00)
_NDTRI_B = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
            6.680131188771972e+01, -1.328068155288572e+01)
_NDTRI_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
            -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
_NDTRI_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
            3.754408661907416e+00)


@jit
def _ndtri_lower(p):
    """Phi^-1(p) for 0 <= p <= 0.5 (-inf at 0, where a p-value underflowed)."""
    a, b, c, d = _NDTRI_A, _NDTRI_B, _NDTRI_C, _NDTRI_D
    if p <= 0.0:
        return -math.inf
    if p < 0.02425:
        q = math.sqrt(-2.0 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0)


@jit
def exact_one(obs, s, l_t, l2_t, l_c, l2_c, phi):
    """The test of one comparison: (mid-p, the signed normal quantile with that two-sided p).

    ``obs`` is the treated count total, ``s`` the comparison's, ``l_*`` and ``l2_*`` the sums of
    each group's size factors and their squares, ``phi`` the dispersion. ``mom.fused`` calls it
    from the estimator's own loop where the kernel runs the test itself.
    """
    pv = _exact_p(obs, s, l_t, l2_t, l_c, l2_c, phi)
    dev = obs * l_c - (s - obs) * l_t
    z = -_ndtri_lower(0.5 * pv) if pv < 1.0 else 0.0
    return pv, (z if dev > 0 else (-z if dev < 0 else 0.0))


@jit
def _exact_block(counts, sf, ctrl, csf, log_dispersion, max_total, p_out, z_out):
    """Totals, then the exact p and its signed normal quantile where the kernel's p is finite
    and 0 < total <= max_total (``p_out``/``z_out`` hold the kernel's values on entry)."""
    P, G, R = counts.shape
    C = csf.shape[0]
    l_c = 0.0
    l2_c = 0.0
    for j in range(C):
        l_c += csf[j]
        l2_c += csf[j] * csf[j]
    control_totals = np.zeros(G)
    for g in range(G):
        for j in range(C):
            control_totals[g] += ctrl[g, j]
    keep = np.empty(R, np.int64)
    inv = np.empty(R)
    # exp(log_dispersion) per feature, recomputed only when a perturbation's value differs
    # (one value per feature with a pooled dispersion).
    last_log_phi = np.full(G, np.nan, np.float32)
    last_phi = np.zeros(G)
    for p in range(P):
        n = present(sf, p, keep, inv)
        l_t = 0.0
        l2_t = 0.0
        for i in range(n):
            l_t += sf[p, keep[i]]
            l2_t += sf[p, keep[i]] * sf[p, keep[i]]
        if l_t <= 0:
            continue
        for g in range(G):
            if not math.isfinite(p_out[p, g]):
                continue
            obs = 0.0
            for i in range(n):
                obs += counts[p, g, keep[i]]
            s = obs + control_totals[g]
            if s <= 0 or s > max_total:
                continue
            log_phi = log_dispersion[p, g]
            if log_phi != last_log_phi[g]:
                last_log_phi[g] = log_phi
                last_phi[g] = math.exp(np.float64(log_phi))
            phi = last_phi[g]
            if not math.isfinite(phi):
                continue
            p_out[p, g], z_out[p, g] = exact_one(obs, s, l_t, l2_t, l_c, l2_c, phi)


def exact_fused(counts, size_factor, control_counts, control_size_factor, log_dispersion, p_value,
                statistic, max_total):
    """Numba twin of the conditional test in ``exact.conditional_outputs`` (NumPy blocks):
    ``(p_value, statistic)`` with the exact test where it applies, the kernel's elsewhere."""
    p_out = np.array(p_value, dtype=np.float64)
    z_out = np.array(statistic, dtype=np.float32)
    _exact_block(counts, np.asarray(size_factor, np.float64), control_counts,
                 np.asarray(control_size_factor, np.float64), log_dispersion, float(max_total),
                 p_out, z_out)
    return p_out, z_out

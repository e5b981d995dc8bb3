"""MoM with the Wald test as one numba loop per comparison: the twin of ``mom.array``.

Every dispersion mode (per comparison, per feature, shrunk), NumPy inputs only; the same
outputs as ``mom_kernel``.
"""

from __future__ import annotations

import math

import numpy as np

from ..exact.fused import exact_one
from ..fused_common import SQRT2, jit, present
from .array import MIN_DISPERSION, ZERO_GROUP_COUNT


@jit
def _mom_one(q, n_c, qbar_c, s2_c, inv_c, L_c, n_t, inv_t, L_t):
    """MoM estimates for one comparison; q holds the treated rates y_i / l_i (present only)."""
    qbar_t = 0.0
    for i in range(n_t):
        qbar_t += q[i]
    qbar_t = qbar_t / max(n_t, 1)
    s2_t = 0.0
    for i in range(n_t):
        d = q[i] - qbar_t
        s2_t += d * d
    s2_t = s2_t / max(n_t - 1.0, 1.0)
    rate_c = qbar_c if qbar_c > 0 else ZERO_GROUP_COUNT / L_c
    rate_t = qbar_t if qbar_t > 0 else ZERO_GROUP_COUNT / (L_t if L_t > 0 else 1.0)
    num = 0.0
    den = 0.0
    if qbar_c > 0:
        w = max(n_c - 1.0, 0.0)
        num += w * (s2_c - qbar_c * inv_c) / (qbar_c * qbar_c)
        den += w
    if qbar_t > 0:
        w = max(n_t - 1.0, 0.0)
        num += w * (s2_t - qbar_t * inv_t) / (qbar_t * qbar_t)
        den += w
    phi = max(num / den, MIN_DISPERSION) if den > 0 else MIN_DISPERSION
    raw = num / den if den > 0 else 0.0
    return rate_c, rate_t, phi, qbar_t, raw, den


@jit
def _shrunk(raw, weight, poisson, phi_f, spread):
    """``mom.shrink_dispersion`` for one comparison."""
    v = 2.0 * (phi_f + poisson) ** 2 / (weight if weight > 0 else 1.0)
    w = spread / (spread + v) if weight > 0 else 0.0
    return max(w * raw + (1.0 - w) * phi_f, MIN_DISPERSION)


@jit
def _test(z, obs, s, max_exact, L_t, l2_t, L_c, l2_c, log_phi, narrow):
    """(p, statistic) of one testable comparison: the Wald test's, or the conditional exact
    test's at the stored dispersion where 0 < s <= ``max_exact`` (as ``exact.conditional_outputs``
    would replace them: ``log_phi`` goes through the outputs' float32 first when ``narrow``),
    which then skips the Wald tail."""
    if 0 < s <= max_exact and z == z:
        phi = math.exp(np.float64(np.float32(log_phi)) if narrow else log_phi)
        if math.isfinite(phi):
            return exact_one(obs, s, L_t, l2_t, L_c, l2_c, phi)
    return math.erfc(abs(z) / SQRT2), z


@jit
def _mom_block(counts, sf, ctrl, csf, phi_f, spread, mode, max_exact, narrow, out, pval):
    """mode 0: per-comparison dispersion; 1: phi_f[g] (feature); 2: shrunk toward phi_f[g].

    Writes ``MOM_NAMES`` into out[0:5] (float32 when ``narrow``, else float64) and the p-values
    into ``pval``; comparisons whose total count is in (0, ``max_exact``] get the conditional
    exact test (``_test``)."""
    P, G, R = counts.shape
    C = csf.shape[0]
    L_c = 0.0
    l2_c = 0.0
    inv_c = 0.0
    for j in range(C):
        L_c += csf[j]
        l2_c += csf[j] * csf[j]
        inv_c += 1.0 / csf[j]
    inv_c /= C
    # Control statistics per feature, then perturbation-outer loops: each perturbation's
    # present replicates and 1/l are found once, and counts[p, g, :] is read in memory order.
    qbar_cs = np.empty(G)
    s2_cs = np.empty(G)
    totals_c = np.zeros(G)
    for g in range(G):
        qbar_c = 0.0
        for j in range(C):
            qbar_c += ctrl[g, j] / csf[j]
            totals_c[g] += ctrl[g, j]
        qbar_c /= C
        s2_c = 0.0
        for j in range(C):
            d = ctrl[g, j] / csf[j] - qbar_c
            s2_c += d * d
        qbar_cs[g] = qbar_c
        s2_cs[g] = s2_c / max(C - 1.0, 1.0)
    # With one dispersion per feature (mode 1) the control's 1 / information, mu and log phi are
    # the same for every perturbation: computed once per feature.
    inv_info_cs = np.empty(G)
    log_phis = np.empty(G)
    mus = np.empty(G)
    if mode == 1:
        for g in range(G):
            rate_c = qbar_cs[g] if qbar_cs[g] > 0 else ZERO_GROUP_COUNT / L_c
            a = 0.0
            for j in range(C):
                m = csf[j] * rate_c
                a += m / (1.0 + phi_f[g] * m)
            inv_info_cs[g] = 1.0 / a
            log_phis[g] = math.log(phi_f[g])
            mus[g] = math.log(rate_c)
    q = np.empty(R)
    l = np.empty(R)
    inv_l = np.empty(R)
    keep = np.empty(R, np.int64)
    for p in range(P):
        n_t = present(sf, p, keep, inv_l)
        L_t = 0.0
        l2_t = 0.0
        inv_t = 0.0
        for i in range(n_t):
            l[i] = sf[p, keep[i]]
            L_t += l[i]
            l2_t += l[i] * l[i]
            inv_t += inv_l[i]
        inv_t /= max(n_t, 1)
        if mode == 1:
            _feature_row(p, counts, keep, l, n_t, L_t, l2_t, L_c, l2_c, qbar_cs, totals_c, mus,
                         inv_info_cs, phi_f, log_phis, max_exact, narrow, out, pval)
            continue
        for g in range(G):
            qbar_c = qbar_cs[g]
            s2_c = s2_cs[g]
            obs = 0.0
            for i in range(n_t):
                obs += counts[p, g, keep[i]]
                q[i] = counts[p, g, keep[i]] / l[i]
            rate_c, rate_t, phi, qbar_t, raw, den = _mom_one(q, C, qbar_c, s2_c, inv_c, L_c,
                                                             n_t, inv_t, L_t)
            if mode == 2:
                poisson = (inv_c * C / rate_c + inv_t * n_t / rate_t) / (C + n_t)
                phi = _shrunk(raw, den, poisson, phi_f[g], spread[g])
            mu = math.log(rate_c)
            beta = math.log(rate_t) - mu
            a = 0.0
            for j in range(C):
                m = csf[j] * rate_c
                a += m / (1.0 + phi * m)
            b = 0.0
            for i in range(n_t):
                m = l[i] * rate_t
                b += m / (1.0 + phi * m)
            out[0, p, g] = mu
            if n_t == 0:
                for k in range(1, 5):
                    out[k, p, g] = np.nan
                pval[p, g] = np.nan
                continue
            se = math.sqrt(1.0 / a + 1.0 / b)
            z = beta / se
            log_phi = math.log(phi)
            out[1, p, g] = beta
            out[2, p, g] = log_phi
            out[3, p, g] = se
            if qbar_c == 0 and qbar_t == 0:
                out[4, p, g] = np.nan
                pval[p, g] = np.nan
            else:
                pval[p, g], out[4, p, g] = _test(z, obs, obs + totals_c[g], max_exact, L_t, l2_t,
                                                 L_c, l2_c, log_phi, narrow)


@jit
def _feature_row(p, counts, keep, l, n_t, L_t, l2_t, L_c, l2_c, qbar_cs, totals_c, mus,
                 inv_info_cs, phi_f, log_phis, max_exact, narrow, out, pval):
    """Perturbation p of ``_mom_block`` with one dispersion per feature (mode 1): only the
    treated mean varies along the row; the control's mu, 1 / information and log phi are
    per-feature constants, and no comparison dispersion is estimated."""
    G = counts.shape[1]
    if n_t == 0:
        for g in range(G):
            out[0, p, g] = mus[g]
            for k in range(1, 5):
                out[k, p, g] = np.nan
            pval[p, g] = np.nan
        return
    zero_rate = ZERO_GROUP_COUNT / (L_t if L_t > 0 else 1.0)
    for g in range(G):
        total = 0.0
        obs = 0.0
        for i in range(n_t):
            y = counts[p, g, keep[i]]
            obs += y
            total += y / l[i]
        qbar_t = total / n_t
        rate_t = qbar_t if qbar_t > 0 else zero_rate
        phi = phi_f[g]
        b = 0.0
        for i in range(n_t):
            m = l[i] * rate_t
            b += m / (1.0 + phi * m)
        beta = math.log(rate_t) - mus[g]
        se = math.sqrt(inv_info_cs[g] + 1.0 / b)
        out[0, p, g] = mus[g]
        out[1, p, g] = beta
        out[2, p, g] = log_phis[g]
        out[3, p, g] = se
        if qbar_cs[g] == 0 and qbar_t == 0:
            out[4, p, g] = np.nan
            pval[p, g] = np.nan
        else:
            pval[p, g], out[4, p, g] = _test(beta / se, obs, obs + totals_c[g], max_exact, L_t,
                                             l2_t, L_c, l2_c, log_phis[g], narrow)


MOM_NAMES = ("log_base_mean", "log_fold_change", "log_dispersion", "standard_error", "statistic")


def mom_arrays(counts, size_factor, control_counts, control_size_factor, feature_dispersion=None,
                dispersion_spread=None, dtype=np.float64, max_exact_total=None):
    """(estimates [5, P, G] of ``dtype`` in ``MOM_NAMES`` order, p-values [P, G] float64)."""
    p, g, _ = counts.shape
    out = np.empty((5, p, g), dtype)
    pval = np.empty((p, g))
    mode = 0 if feature_dispersion is None else (1 if dispersion_spread is None else 2)
    phi_f = np.zeros(g) if feature_dispersion is None else np.asarray(feature_dispersion, np.float64)
    spread = np.zeros(g) if dispersion_spread is None else np.asarray(dispersion_spread, np.float64)
    _mom_block(counts, np.asarray(size_factor, np.float64), control_counts,
               np.asarray(control_size_factor, np.float64), phi_f, spread, mode,
               0.0 if max_exact_total is None else float(max_exact_total),
               np.dtype(dtype) == np.float32, out, pval)
    return out, pval


def mom_fused(counts, size_factor, control_counts, control_size_factor, *,
              feature_dispersion=None, dispersion_spread=None, max_exact_total=None):
    """Numba twin of ``mom_kernel`` (NumPy inputs only, every dispersion mode); same outputs.

    ``max_exact_total``: comparisons whose total count is in (0, max_exact_total] get the
    conditional exact test in the same loop, the p-value and statistic that
    ``exact.conditional_outputs`` with ``test="auto"`` (32) or ``"exact"`` (inf) would put in
    (``Method.fused_exact``); None: the Wald test everywhere.
    """
    out, pval = mom_arrays(counts, size_factor, control_counts, control_size_factor,
                            feature_dispersion, dispersion_spread, np.float32, max_exact_total)
    return {**{name: out[k] for k, name in enumerate(MOM_NAMES)}, "p_value": pval}

"""Fused CPU kernels (numba): the MoM and IRLS kernels as one loop per comparison.

They compute what ``mom.py`` and ``irls.py`` compute, step for step, but without the array
temporaries, which is what bounds the array-API kernels on a CPU. The array-API kernels stay
the definition (and the GPU path); tests hold these to them. Imported lazily so that importing
nbdask does not trigger compilation; ``cache=True`` keeps compiled code across processes.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .exact import BIG as _BIG
from .exact import LOG_BIG as _LOG_BIG
from .exact import TRUNCATION as _TRUNCATION
from .irls import CHECK_EVERY, INNER_STEPS, MAX_ALPHA_STEP, MAX_DISPERSION, MAX_LOG_FOLD_CHANGE
from .mom import MIN_DISPERSION, ZERO_GROUP_COUNT

_jit = numba.njit(cache=True, nogil=True, fastmath=False)
_LO = math.log(MIN_DISPERSION)
_HI = math.log(MAX_DISPERSION)
_SQRT2 = math.sqrt(2.0)
#: Counts up to this use exact finite sums for digamma/trigamma/lgamma differences.
_EXACT_SUM_MAX = 16
_ = CHECK_EVERY  # the fused loop exits per comparison; nothing to check across a block


@_jit
def _digamma(x):
    acc = 0.0
    while x < 10.0:
        acc -= 1.0 / x
        x += 1.0
    iz2 = 1.0 / (x * x)
    series = iz2 * (1.0 / 12 - iz2 * (1.0 / 120 - iz2 * (1.0 / 252 - iz2 * (1.0 / 240 - iz2 * (1.0 / 132)))))
    return acc + math.log(x) - 0.5 / x - series


@_jit
def _trigamma(x):
    acc = 0.0
    while x < 10.0:
        acc += 1.0 / (x * x)
        x += 1.0
    iz = 1.0 / x
    iz2 = iz * iz
    series = iz2 * (1 / 6 + iz2 * (-1 / 30 + iz2 * (1 / 42 + iz2 * (-1 / 30 + iz2 * (5 / 66 + iz2 * (-691 / 2730))))))
    return acc + iz + 0.5 * iz2 + iz * series


@_jit
def _lgamma_diff(y, r):
    """lgamma(y + r) - lgamma(r) for integral y >= 0, exact sums for small y."""
    if y <= _EXACT_SUM_MAX:
        acc = 0.0
        for k in range(int(y)):
            acc += math.log(r + k)
        return acc
    return math.lgamma(y + r) - math.lgamma(r)


@_jit
def _psi_diffs(y, r):
    """psi(y + r) - psi(r) and psi_1(y + r) - psi_1(r) for integral y >= 0."""
    if y <= _EXACT_SUM_MAX:
        d1 = 0.0
        d2 = 0.0
        for k in range(int(y)):
            v = 1.0 / (r + k)
            d1 += v
            d2 -= v * v
        return d1, d2
    return _digamma(y + r) - _digamma(r), _trigamma(y + r) - _trigamma(r)


@_jit
def _present(sf, p, keep, inv):
    """Present replicates of perturbation p: their positions in keep[:n] and 1/l in inv[:n]; n."""
    n = 0
    for r in range(sf.shape[1]):
        if math.isfinite(sf[p, r]):
            keep[n] = r
            inv[n] = 1.0 / sf[p, r]
            n += 1
    return n


# --------------------------------------------------------------------------- MoM

@_jit
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


@_jit
def _shrunk(raw, weight, poisson, phi_f, spread):
    """``mom.shrink_dispersion`` for one comparison."""
    v = 2.0 * (phi_f + poisson) ** 2 / (weight if weight > 0 else 1.0)
    w = spread / (spread + v) if weight > 0 else 0.0
    return max(w * raw + (1.0 - w) * phi_f, MIN_DISPERSION)


@_jit
def _mom_block(counts, sf, ctrl, csf, phi_f, spread, mode, out, pval):
    """mode 0: per-comparison dispersion; 1: phi_f[g] (feature); 2: shrunk toward phi_f[g].

    Writes ``_MOM_NAMES`` into out[0:5] (float32 or float64) and the p-values into ``pval``."""
    P, G, R = counts.shape
    C = csf.shape[0]
    L_c = 0.0
    inv_c = 0.0
    for j in range(C):
        L_c += csf[j]
        inv_c += 1.0 / csf[j]
    inv_c /= C
    # Control statistics per feature, then perturbation-outer loops: each perturbation's
    # present replicates and 1/l are found once, and counts[p, g, :] is read in memory order.
    qbar_cs = np.empty(G)
    s2_cs = np.empty(G)
    for g in range(G):
        qbar_c = 0.0
        for j in range(C):
            qbar_c += ctrl[g, j] / csf[j]
        qbar_c /= C
        s2_c = 0.0
        for j in range(C):
            d = ctrl[g, j] / csf[j] - qbar_c
            s2_c += d * d
        qbar_cs[g] = qbar_c
        s2_cs[g] = s2_c / max(C - 1.0, 1.0)
    # With one dispersion per feature (mode 1) the control's information, mu and log phi are
    # the same for every perturbation: computed once per feature.
    info_cs = np.empty(G)
    log_phis = np.empty(G)
    if mode == 1:
        for g in range(G):
            rate_c = qbar_cs[g] if qbar_cs[g] > 0 else ZERO_GROUP_COUNT / L_c
            a = 0.0
            for j in range(C):
                m = csf[j] * rate_c
                a += m / (1.0 + phi_f[g] * m)
            info_cs[g] = a
            log_phis[g] = math.log(phi_f[g])
    q = np.empty(R)
    l = np.empty(R)
    inv_l = np.empty(R)
    keep = np.empty(R, np.int64)
    for p in range(P):
        n_t = _present(sf, p, keep, inv_l)
        L_t = 0.0
        inv_t = 0.0
        for i in range(n_t):
            l[i] = sf[p, keep[i]]
            L_t += l[i]
            inv_t += inv_l[i]
        inv_t /= max(n_t, 1)
        for g in range(G):
            qbar_c = qbar_cs[g]
            s2_c = s2_cs[g]
            for i in range(n_t):
                q[i] = counts[p, g, keep[i]] / l[i]
            rate_c, rate_t, phi, qbar_t, raw, den = _mom_one(q, C, qbar_c, s2_c, inv_c, L_c,
                                                             n_t, inv_t, L_t)
            if mode == 1:
                phi = phi_f[g]
            elif mode == 2:
                poisson = (inv_c * C / rate_c + inv_t * n_t / rate_t) / (C + n_t)
                phi = _shrunk(raw, den, poisson, phi_f[g], spread[g])
            mu = math.log(rate_c)
            beta = math.log(rate_t) - mu
            if mode == 1:
                a = info_cs[g]
            else:
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
            out[1, p, g] = beta
            out[2, p, g] = log_phis[g] if mode == 1 else math.log(phi)
            out[3, p, g] = se
            if qbar_c == 0 and qbar_t == 0:
                out[4, p, g] = np.nan
                pval[p, g] = np.nan
            else:
                out[4, p, g] = z
                pval[p, g] = math.erfc(abs(z) / _SQRT2)


_MOM_NAMES = ("log_base_mean", "log_fold_change", "log_dispersion", "standard_error", "statistic")


def _mom_arrays(counts, size_factor, control_counts, control_size_factor, feature_dispersion=None,
                dispersion_spread=None, dtype=np.float64):
    """(estimates [5, P, G] of ``dtype`` in ``_MOM_NAMES`` order, p-values [P, G] float64)."""
    p, g, _ = counts.shape
    out = np.empty((5, p, g), dtype)
    pval = np.empty((p, g))
    mode = 0 if feature_dispersion is None else (1 if dispersion_spread is None else 2)
    phi_f = np.zeros(g) if feature_dispersion is None else np.asarray(feature_dispersion, np.float64)
    spread = np.zeros(g) if dispersion_spread is None else np.asarray(dispersion_spread, np.float64)
    _mom_block(counts, np.asarray(size_factor, np.float64), control_counts,
               np.asarray(control_size_factor, np.float64), phi_f, spread, mode, out, pval)
    return out, pval


def mom_fused(counts, size_factor, control_counts, control_size_factor, *,
              feature_dispersion=None, dispersion_spread=None):
    """Numba twin of ``mom_kernel`` (NumPy inputs only, every dispersion mode); same outputs."""
    out, pval = _mom_arrays(counts, size_factor, control_counts, control_size_factor,
                            feature_dispersion, dispersion_spread, np.float32)
    return {**{name: out[k] for k, name in enumerate(_MOM_NAMES)}, "p_value": pval}


# --------------------------------------------------------------------------- IRLS

@_jit
def _loglik(y, l, owner, n, th0, th1, alpha):
    phi = math.exp(alpha)
    r = 1.0 / phi
    e0 = math.exp(th0)
    e1 = math.exp(th1)
    total = 0.0
    for i in range(n):
        th = th0 if owner[i] == 0 else th1
        m = l[i] * (e0 if owner[i] == 0 else e1)
        pm = phi * m
        lg = _lgamma_diff(y[i], r)
        lp = math.log1p(pm)
        total += lg - math.lgamma(y[i] + 1.0) - lp / phi + y[i] * (alpha + math.log(l[i]) + th - lp)
    return total


@_jit
def _theta_step(y, l, owner, n, th0, th1, phi, zero0, zero1):
    s0 = 0.0
    h0 = 0.0
    s1 = 0.0
    h1 = 0.0
    e0 = math.exp(th0)
    e1 = math.exp(th1)
    for i in range(n):
        m = l[i] * (e0 if owner[i] == 0 else e1)
        d = 1.0 + phi * m
        s = (y[i] - m) / d
        h = -m * (1.0 + phi * y[i]) / (d * d)
        if owner[i] == 0:
            s0 += s
            h0 += h
        else:
            s1 += s
            h1 += h
    st0 = 0.0
    st1 = 0.0
    if h0 < 0 and not zero0:
        st0 = min(max(-s0 / h0, -5.0), 5.0)
    if h1 < 0 and not zero1:
        st1 = min(max(-s1 / h1, -5.0), 5.0)
    return th0 + st0, th1 + st1, max(abs(st0), abs(st1))


@_jit
def _alpha_terms(y, l, owner, n, th0, th1, alpha, cox_reid, zero0, zero1):
    """Profile gradient and Schur curvature in alpha, plus the pieces of the Wald information."""
    phi = math.exp(alpha)
    r = 1.0 / phi
    g_a = 0.0
    s1 = 0.0
    s2 = 0.0
    hta0 = 0.0
    hta1 = 0.0
    htt0 = 0.0
    htt1 = 0.0
    w0 = 0.0
    w1 = 0.0
    wa0 = 0.0
    wa1 = 0.0
    wt0 = 0.0
    wt1 = 0.0
    e0 = math.exp(th0)
    e1 = math.exp(th1)
    for i in range(n):
        m = l[i] * (e0 if owner[i] == 0 else e1)
        pm = phi * m
        d = 1.0 + pm
        dg, tg = _psi_diffs(y[i], r)
        resid = (m - y[i]) * phi / d
        s1 += dg - math.log1p(pm) + resid
        s2 += tg + phi * phi * m / d - resid * phi / d
        cross = pm * (m - y[i]) / (d * d)
        htt = -m * (1.0 + phi * y[i]) / (d * d)
        if owner[i] == 0:
            hta0 += cross
            htt0 += htt
            w0 += m / d
            wa0 -= phi * m * m / (d * d)
            wt0 += m / (d * d)
        else:
            hta1 += cross
            htt1 += htt
            w1 += m / d
            wa1 -= phi * m * m / (d * d)
            wt1 += m / (d * d)
    g_a = -r * s1
    h_aa = r * s1 + r * r * s2
    schur = h_aa
    if not zero0:
        schur -= hta0 * hta0 / (htt0 if htt0 < 0 else -1.0)
    if not zero1:
        schur -= hta1 * hta1 / (htt1 if htt1 < 0 else -1.0)
    grad = g_a
    if cox_reid:
        dt0 = 0.0 if zero0 else -hta0 / (htt0 if htt0 < 0 else -1.0)
        dt1 = 0.0 if zero1 else -hta1 / (htt1 if htt1 < 0 else -1.0)
        grad -= 0.5 * (wa0 + wt0 * dt0) / (w0 if w0 > 0 else 1.0)
        grad -= 0.5 * (wa1 + wt1 * dt1) / (w1 if w1 > 0 else 1.0)
    return grad, schur, h_aa, hta0, hta1, htt0, htt1


@_jit
def _fit(y, l, owner, n, cox_reid, max_iter, tol):
    """Scalar twin of ``irls.fit_nb`` for one comparison with one or two rate parameters."""
    ty0 = 0.0
    tl0 = 0.0
    ty1 = 0.0
    tl1 = 0.0
    two = False
    for i in range(n):
        if owner[i] == 0:
            ty0 += y[i]
            tl0 += l[i]
        else:
            ty1 += y[i]
            tl1 += l[i]
            two = True
    th0 = math.log((ty0 if ty0 > 0 else 1.0) / (tl0 if tl0 > 0 else 1.0))
    th1 = math.log((ty1 if ty1 > 0 else 1.0) / (tl1 if tl1 > 0 else 1.0))
    zero0 = ty0 <= 0
    zero1 = (ty1 <= 0) and two
    if two:
        top = th1 if zero0 else max(th0, th0 if zero1 else th1)
        if zero0:
            th0 = top - MAX_LOG_FOLD_CHANGE
        if zero1:
            th1 = top - MAX_LOG_FOLD_CHANGE
    capped = zero0 or zero1
    # profile score at phi = 0 and the moment start
    score = 0.0
    num = 0.0
    den = 0.0
    my0 = 0.0
    my1 = 0.0
    m0 = 0.0
    m1 = 0.0
    e0 = math.exp(th0)
    e1 = math.exp(th1)
    for i in range(n):
        m = l[i] * (e0 if owner[i] == 0 else e1)
        res = y[i] - m
        score += 0.5 * (res * res - y[i])
        num += res * res - y[i]
        den += m * m
        if owner[i] == 0:
            my0 += m * y[i]
            m0 += m
        else:
            my1 += m * y[i]
            m1 += m
    if cox_reid:
        score += 0.5 * my0 / (m0 if m0 > 0 else 1.0)
        if two:
            score += 0.5 * my1 / (m1 if m1 > 0 else 1.0)
    interior = score > 0
    phi0 = min(max(num / (den if den > 0 else 1.0), 1e-3), 1e2)
    alpha = math.log(phi0) if interior else _LO
    converged = not interior
    iterations = 0
    if interior:
        bound = MAX_ALPHA_STEP
        last_grad = 0.0
        last_alpha = alpha
        for _ in range(max_iter):
            phi = math.exp(alpha)
            moved = 0.0
            for _k in range(INNER_STEPS):
                th0, th1, mv = _theta_step(y, l, owner, n, th0, th1, phi, zero0, zero1)
                moved = max(moved, mv)
            grad, schur, _, _, _, _, _ = _alpha_terms(y, l, owner, n, th0, th1, alpha, cox_reid,
                                                      zero0, zero1)
            if cox_reid:
                da = alpha - last_alpha
                if abs(da) > 1e-12:
                    schur = (grad - last_grad) / da
                last_alpha = alpha
            if schur < 0:
                step = -grad / schur
            else:
                step = math.copysign(bound, grad) if grad != 0 else 0.0
            if grad * last_grad < 0:
                bound *= 0.5
            step = min(max(step, -bound), bound)
            new = min(max(alpha + step, _LO), _HI)
            step = new - alpha
            alpha = new
            last_grad = grad
            iterations += 1
            at_floor = alpha <= _LO and grad < 0
            small = abs(step) < tol or abs(grad * step) < tol * tol
            if (small and moved < tol) or at_floor:
                converged = True
                break
    phi = math.exp(alpha)
    for _k in range(INNER_STEPS):
        th0, th1, _ = _theta_step(y, l, owner, n, th0, th1, phi, zero0, zero1)
    converged = converged and not capped and alpha < _HI
    return th0, th1, alpha, converged, iterations


@_jit
def _wald_se(y, l, owner, n, th0, th1, alpha):
    _, _, h_aa, hta0, hta1, htt0, htt1 = _alpha_terms(y, l, owner, n, th0, th1, alpha, False,
                                                      False, False)
    a = -htt0
    b = -htt1
    c = -h_aa
    d = -hta0
    e = -hta1
    det = a * b * c - a * e * e - b * d * d
    if alpha > _LO and det > 0 and c > 0:
        var = ((a * c - d * d) + (b * c - e * e) - 2.0 * d * e) / det
    else:
        var = 1.0 / a + 1.0 / b
    return math.sqrt(var) if var > 0 else np.nan


@_jit
def _irls_block(counts, sf, ctrl, csf, mom, mom_p, lrt, cox_reid, max_iter, tol, out, conv, iters):
    P, G, R = counts.shape
    C = csf.shape[0]
    n_max = C + R
    y = np.empty(n_max)
    l = np.empty(n_max)
    owner = np.zeros(n_max, np.int64)
    null_owner = np.zeros(n_max, np.int64)
    for g in range(G):
        for j in range(C):
            y[j] = ctrl[g, j]
            l[j] = csf[j]
        for p in range(P):
            if math.isnan(mom_p[p, g]):
                for k in range(5):
                    out[k, p, g] = mom[k, p, g]
                out[4, p, g] = np.nan
                out[5, p, g] = np.nan
                conv[p, g] = False
                iters[p, g] = 0
                continue
            n = C
            for r in range(R):
                if math.isfinite(sf[p, r]):
                    y[n] = counts[p, g, r]
                    l[n] = sf[p, r]
                    owner[n] = 1
                    n += 1
            th0, th1, alpha, ok, it = _fit(y, l, owner, n, cox_reid, max_iter, tol)
            beta = th1 - th0
            se = _wald_se(y, l, owner, n, th0, th1, alpha)
            if lrt:
                t0, _, a0, ok0, _ = _fit(y, l, null_owner, n, cox_reid, max_iter, tol)
                ll1 = _loglik(y, l, owner, n, th0, th1, alpha)
                ll0 = _loglik(y, l, null_owner, n, t0, t0, a0)
                stat = max(2.0 * (ll1 - ll0), 0.0)
                pval = math.erfc(math.sqrt(stat / 2.0))
                ok = ok and ok0
            else:
                stat = beta / se
                pval = math.erfc(abs(stat) / _SQRT2)
                if not math.isfinite(pval):
                    pval = 1.0
            out[0, p, g] = th0
            out[1, p, g] = beta
            out[2, p, g] = alpha
            out[3, p, g] = se
            out[4, p, g] = stat
            out[5, p, g] = pval
            conv[p, g] = ok
            iters[p, g] = it


def irls_fused(counts, size_factor, control_counts, control_size_factor, *, test="wald",
               dispersion_fit="ml", max_iter=50, tol=1e-6):
    """Numba twin of ``irls_kernel`` (NumPy inputs only); same outputs and dtypes."""
    sf = np.asarray(size_factor, np.float64)
    csf = np.asarray(control_size_factor, np.float64)
    mom_est, mom_p = _mom_arrays(counts, sf, control_counts, csf)
    p, g, _ = counts.shape
    out = np.empty((6, p, g))
    conv = np.empty((p, g), np.bool_)
    iters = np.empty((p, g), np.int8)
    _irls_block(counts, sf, control_counts, csf, mom_est, mom_p, test == "lrt", dispersion_fit == "cox-reid",
                min(int(max_iter), 127), float(tol), out, conv, iters)
    res = {name: out[k].astype(np.float32) for k, name in enumerate(_MOM_NAMES)}
    res["p_value"] = out[5]
    res["converged"] = conv
    res["iterations"] = iters
    return res


# --------------------------------------------------------------------------- pooling pass

@_jit
def pooling_terms(counts, sf, inv_t, rate_mean, rate_var, num, den):
    """Fill [P, G] treated rate means and variances (ddof 1; 0 below two replicates) over present
    replicates, as ``moments.group_moments`` defines them, and each group's pooling terms
    num = (n-1)(s2 - qbar mean(1/l)), den = (n-1)(qbar^2 - s2/n) (``inv_t`` [P]: mean(1/l))."""
    P, G, R = counts.shape
    keep = np.empty(R, np.int64)
    inv = np.empty(R)
    for p in range(P):
        n = _present(sf, p, keep, inv)
        w = max(n - 1.0, 0.0)
        for g in range(G):
            total = 0.0
            for i in range(n):
                total += counts[p, g, keep[i]] * inv[i]
            mean = total / max(n, 1)
            dev = 0.0
            for i in range(n):
                d = counts[p, g, keep[i]] * inv[i] - mean
                dev += d * d
            var = dev / max(n - 1.0, 1.0)
            rate_mean[p, g] = mean
            rate_var[p, g] = var
            num[p, g] = w * (var - mean * inv_t[p])
            den[p, g] = w * (mean * mean - var / max(n, 1.0))


@_jit
def kept_sums(num, den, keep, out_num, out_den):
    """Column sums of num and den over the groups where ``keep``: [G] each."""
    P, G = num.shape
    out_num[:] = 0.0
    out_den[:] = 0.0
    for p in range(P):
        for g in range(G):
            if keep[p, g]:
                out_num[g] += num[p, g]
                out_den[g] += den[p, g]


@_jit
def pooling_rows(num, den, keep, valid, rate_mean, rate_var, n_t, inv_t, library_t, inv_l,
                 phi_c, w_c, rate_c, inv_c, n_c, out):
    """The 10 rows of ``dispersion.SUMS`` for one block, as ``dispersion.feature_sums`` defines
    them (per-perturbation [P] inputs: n, mean(1/l), sum(l), sum(1/l); control [G] inputs)."""
    P, G = num.shape
    out[:, :] = 0.0
    for p in range(P):
        w = max(n_t[p] - 1.0, 0.0)
        for g in range(G):
            if keep[p, g]:
                out[0, g] += num[p, g]
                out[1, g] += den[p, g]
                out[2, g] += 1.0
            elif valid[p, g]:
                out[3, g] += 1.0
            mean = rate_mean[p, g]
            phi_t, w_t = 0.0, 0.0
            if mean > 0:
                phi_t = (rate_var[p, g] - mean * inv_t[p]) / (mean * mean)
                w_t = w
            df = w_c[g] + w_t
            if not (df > 0 and n_t[p] > 0):
                continue
            phi = (phi_c[g] * w_c[g] + phi_t * w_t) / df
            rate_t = mean if mean > 0 else ZERO_GROUP_COUNT / (library_t[p] if library_t[p] > 0 else 1.0)
            a = (inv_c[g] + inv_l[p] / rate_t) / (n_c + n_t[p])
            inv_df = 1.0 / df
            out[4, g] += phi
            out[5, g] += phi * phi
            out[6, g] += inv_df
            out[7, g] += a * inv_df
            out[8, g] += a * a * inv_df
            out[9, g] += 1.0


@_jit
def evidence_rows(rate_mean, keep, n_t, inv_t, library_t, out):
    """``dispersion.evidence_rows`` of a block's treated groups into ``out`` [9 + R - 1, G]:
    the nine EVIDENCE_ROWS, then ``excess_<n>`` for n = 2 ... R."""
    P, G = rate_mean.shape
    sizes = out.shape[0] - 9
    out[:, :] = 0.0
    for p in range(P):
        n = n_t[p]
        if n <= 0:
            continue
        w = max(n - 1.0, 0.0)
        wn = w * w / n
        inv_l = n / library_t[p]
        row = 9 + int(n) - 2
        for g in range(G):
            q = rate_mean[p, g]
            out[3, g] += n * q
            out[4, g] += n
            if not keep[p, g]:
                continue
            a = q * inv_t[p]
            b = q * q
            out[0, g] += w * a
            out[1, g] += w
            out[2, g] += w * b
            out[5, g] += 2.0 * w * a * a + wn * q * inv_l * inv_l * inv_l
            out[6, g] += 4.0 * w * a * b + wn * (6.0 * a * a + b * inv_l * inv_l)
            out[7, g] += 2.0 * w * b * b + 12.0 * wn * a * b
            out[8, g] += 6.0 * wn * b * b
            if 9 <= row < 9 + sizes:
                out[row, g] += w * max(b - a / n, 0.0)


@_jit
def pearson_statistics(counts, sf, rate_mean, est, out):
    """out[p, g] = sum over present i of (q_i - qbar)^2 / (qbar / l_i + est_g qbar^2) (a zero
    variance counts as 1), the treated groups' Pearson statistics under dispersions ``est``."""
    P, G, R = counts.shape
    keep = np.empty(R, np.int64)
    inv = np.empty(R)
    for p in range(P):
        n = _present(sf, p, keep, inv)
        for g in range(G):
            qbar = rate_mean[p, g]
            extra = est[g] * qbar * qbar
            total = 0.0
            for i in range(n):
                d = counts[p, g, keep[i]] * inv[i] - qbar
                var = qbar * inv[i] + extra
                total += d * d / (var if var > 0 else 1.0)
            out[p, g] = total


# --------------------------------------------------------------------------- conditional exact test

@_jit
def _exact_walk(obs, s, kt, kc, c, trunc, up):
    """``exact._walk`` for one comparison: the log of its tail sum (-inf when empty)."""
    value = 1.0
    e = 0
    tot = 0.0
    etot = 0
    t = obs
    while (t < s) if up else (t > 0):
        if up:
            value *= c * (t + kt) * (s - t) / ((t + 1.0) * (s - t - 1.0 + kc))
            t += 1.0
        else:
            value *= t * (s - t + kc) / (c * (t - 1.0 + kt) * (s - t + 1.0))
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
    return math.log(tot) + etot * _LOG_BIG if tot > 0 else -math.inf


@_jit
def _logaddexp(a, b):
    hi = max(a, b)
    return hi + math.log(math.exp(a - hi) + math.exp(b - hi))


@_jit
def _exact_p(obs, s, l_t, l2_t, l_c, l2_c, phi):
    """``exact.conditional_p`` for one comparison (doubled mid-p tail)."""
    rate = s / (l_t + l_c)
    kt = l_t * l_t / (phi * l2_t)
    kc = l_c * l_c / (phi * l2_c)
    mt = rate * l_t
    mc = rate * l_c
    c = (mt / (mt + kt)) / (mc / (mc + kc))
    trunc = kt >= 1.0 and kc >= 1.0
    half = math.log(0.5)
    lu = _logaddexp(_exact_walk(obs, s, kt, kc, c, trunc, True), half)
    ld = _logaddexp(_exact_walk(obs, s, kt, kc, c, trunc, False), half)
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


@_jit
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


@_jit
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
    for p in range(P):
        n = _present(sf, p, keep, inv)
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
            phi = math.exp(np.float64(log_dispersion[p, g]))
            if not math.isfinite(phi):
                continue
            pv = _exact_p(obs, s, l_t, l2_t, l_c, l2_c, phi)
            p_out[p, g] = pv
            dev = obs * l_c - (s - obs) * l_t
            z = -_ndtri_lower(0.5 * pv) if pv < 1.0 else 0.0
            z_out[p, g] = z if dev > 0 else (-z if dev < 0 else 0.0)


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

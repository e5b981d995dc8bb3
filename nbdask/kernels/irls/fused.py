"""Maximum likelihood with Wald and LR tests as one numba loop per comparison: the twin of
``irls.array`` (``fit_nb`` step for step, for one comparison with one or two rate parameters),
with the scalar digamma, trigamma and log-gamma differences it needs. NumPy inputs only.
"""

from __future__ import annotations

import math

import numpy as np

from ..fused_common import SQRT2, jit
from ..mom.array import MIN_DISPERSION
from ..mom.fused import MOM_NAMES, mom_arrays
from .array import INNER_STEPS, MAX_ALPHA_STEP, MAX_DISPERSION, MAX_LOG_FOLD_CHANGE

_LO = math.log(MIN_DISPERSION)
_HI = math.log(MAX_DISPERSION)
#: Counts up to this use exact finite sums for digamma/trigamma/lgamma differences.
_EXACT_SUM_MAX = 16
# The array form checks convergence across a block every CHECK_EVERY iterations; this loop exits
# per comparison, so it has nothing to check across a block.


@jit
def _digamma(x):
    acc = 0.0
    while x < 10.0:
        acc -= 1.0 / x
        x += 1.0
    iz2 = 1.0 / (x * x)
    series = iz2 * (1.0 / 12 - iz2 * (1.0 / 120 - iz2 * (1.0 / 252 - iz2 * (1.0 / 240 - iz2 * (1.0 / 132)))))
    return acc + math.log(x) - 0.5 / x - series


@jit
def _trigamma(x):
    acc = 0.0
    while x < 10.0:
        acc += 1.0 / (x * x)
        x += 1.0
    iz = 1.0 / x
    iz2 = iz * iz
    series = iz2 * (1 / 6 + iz2 * (-1 / 30 + iz2 * (1 / 42 + iz2 * (-1 / 30 + iz2 * (5 / 66 + iz2 * (-691 / 2730))))))
    return acc + iz + 0.5 * iz2 + iz * series


@jit
def _lgamma_diff(y, r):
    """lgamma(y + r) - lgamma(r) for integral y >= 0, exact sums for small y."""
    if y <= _EXACT_SUM_MAX:
        acc = 0.0
        for k in range(int(y)):
            acc += math.log(r + k)
        return acc
    return math.lgamma(y + r) - math.lgamma(r)


@jit
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


@jit
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


@jit
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


@jit
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


@jit
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


@jit
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


@jit
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
                pval = math.erfc(abs(stat) / SQRT2)
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
    mom_est, mom_p = mom_arrays(counts, sf, control_counts, csf)
    p, g, _ = counts.shape
    out = np.empty((6, p, g))
    conv = np.empty((p, g), np.bool_)
    iters = np.empty((p, g), np.int8)
    _irls_block(counts, sf, control_counts, csf, mom_est, mom_p, test == "lrt", dispersion_fit == "cox-reid",
                min(int(max_iter), 127), float(tol), out, conv, iters)
    res = {name: out[k].astype(np.float32) for k, name in enumerate(MOM_NAMES)}
    res["p_value"] = out[5]
    res["converged"] = conv
    res["iterations"] = iters
    return res

"""Batched maximum likelihood over the array namespace (NumPy, CuPy): the definition.

Everything is vectorised over the block with masked updates; the only data-dependent branch is
the early exit when every comparison has converged (checked every ``CHECK_EVERY`` iterations).
"""

from __future__ import annotations

import math

from ..backend import any_true, namespaces, trigamma
from ..mom import MIN_DISPERSION, mom_kernel

#: Dispersion bounds of the fit (phi); the lower one is the reported Poisson limit.
MAX_DISPERSION = 1e4
#: Log-rate distance at which a group with all-zero counts is held (|beta| cap).
MAX_LOG_FOLD_CHANGE = 10.0
#: Newton steps for the group log rates per dispersion step.
INNER_STEPS = 2
#: Largest dispersion step (natural-log units); halved at every sign change of the gradient.
MAX_ALPHA_STEP = 2.0
CHECK_EVERY = 4

DISPERSION_FITS = ("ml", "cox-reid")


class _Group:
    """One group's samples broadcast to the comparison grid: y, l and a presence weight."""

    def __init__(self, xp, y, size_factor, present):
        self.y = xp.astype(y, xp.float64)
        self.size_factor = xp.where(present, size_factor, 1.0)
        self.log_size_factor = xp.log(self.size_factor)
        self.weight = xp.astype(present, xp.float64)
        self.total_y = xp.sum(self.y * self.weight, axis=-1)
        self.total_l = xp.sum(self.size_factor * self.weight, axis=-1)


def _mean(xp, group, theta):
    return group.size_factor * xp.exp(theta)[..., None]


def _theta_derivatives(xp, group, theta, phi):
    """Score and observed second derivative of the log-likelihood in the group's log rate."""
    m = _mean(xp, group, theta)
    pm = phi[..., None] * m
    d = 1.0 + pm
    w = group.weight
    score = xp.sum(w * (group.y - m) / d, axis=-1)
    hess = -xp.sum(w * m * (1.0 + phi[..., None] * group.y) / (d * d), axis=-1)
    return score, hess


def _alpha_derivatives(xp, special, group, theta, alpha):
    """d/d alpha, d2/d alpha2 and d2/d alpha d theta of the group's log-likelihood (alpha = log phi)."""
    phi = xp.exp(alpha)[..., None]
    r = 1.0 / phi
    m = _mean(xp, group, theta)
    pm = phi * m
    d = 1.0 + pm
    y, w = group.y, group.weight
    resid = (m - y) * phi / d  # (m - y) / (r + m)
    dl_dr = special.digamma(y + r) - special.digamma(r) - xp.log1p(pm) + resid
    d2l_dr2 = (trigamma(xp, y + r) - trigamma(xp, r)
               + phi * phi * m / d - resid * phi / d)
    r0 = r[..., 0]
    s1 = xp.sum(w * dl_dr, axis=-1)
    grad = -r0 * s1
    hess = r0 * s1 + r0 * r0 * xp.sum(w * d2l_dr2, axis=-1)
    cross = xp.sum(w * pm * (m - y) / (d * d), axis=-1)
    return grad, hess, cross


def _weights(xp, group, theta, alpha):
    """sum W, d(sum W)/d alpha and d(sum W)/d theta for W = m / (1 + phi m)."""
    phi = xp.exp(alpha)[..., None]
    m = _mean(xp, group, theta)
    d = 1.0 + phi * m
    w = group.weight
    total = xp.sum(w * m / d, axis=-1)
    d_alpha = -xp.sum(w * phi * m * m / (d * d), axis=-1)
    d_theta = xp.sum(w * m / (d * d), axis=-1)
    return total, d_alpha, d_theta


def log_likelihood(xp, special, group, theta, alpha):
    """NB2 log-likelihood of a group with all constants, stable up to the Poisson limit.

    lgamma(y + r) - lgamma(r) - lgamma(y + 1) = -log y - betaln(y, r) for y >= 1 (0 for y = 0),
    and betaln stays accurate for r >> y, where the lgamma difference cancels.
    """
    phi = xp.exp(alpha)[..., None]
    r = 1.0 / phi
    m = _mean(xp, group, theta)
    pm = phi * m
    y = group.y
    positive = y > 0
    y_safe = xp.where(positive, y, 1.0)
    comb = xp.where(positive, -xp.log(y_safe) - special.betaln(y_safe, r), 0.0)
    log_pm = alpha[..., None] + group.log_size_factor + theta[..., None]
    ll = comb - xp.log1p(pm) / phi + y * (log_pm - xp.log1p(pm))
    return xp.sum(group.weight * ll, axis=-1)


def _boundary_score(xp, groups, owner, n_params, thetas, cox_reid):
    """Profile score in phi at phi = 0 (Poisson fit): > 0 means an interior optimum."""
    score = 0.0
    adj = [0.0] * n_params
    mean_tot = [0.0] * n_params
    for group, k in zip(groups, owner):
        m = _mean(xp, group, thetas[k])
        resid = group.y - m
        score = score + 0.5 * xp.sum(group.weight * (resid * resid - group.y), axis=-1)
        adj[k] = adj[k] + xp.sum(group.weight * m * group.y, axis=-1)
        mean_tot[k] = mean_tot[k] + xp.sum(group.weight * m, axis=-1)
    if cox_reid:
        for k in range(n_params):
            score = score + 0.5 * adj[k] / xp.where(mean_tot[k] > 0, mean_tot[k], 1.0)
    return score


def fit_nb(xp, special, groups, owner, *, cox_reid=False, max_iter=50, tol=1e-6,
           alpha_fixed=None):
    """Fit log rates theta_k (k = 0 .. max(owner)) and one alpha per comparison.

    ``groups`` are data groups; ``owner[j]`` is the theta index group j uses (the full model
    gives each group its own rate, the reduced model ties them). With ``alpha_fixed`` (log phi
    per comparison) only the rates are fitted. Returns (thetas, alpha, converged, iterations,
    capped) with comparison-shaped arrays.
    """
    n_params = max(owner) + 1
    totals_y = [0.0] * n_params
    totals_l = [0.0] * n_params
    for group, k in zip(groups, owner):
        totals_y[k] = totals_y[k] + group.total_y
        totals_l[k] = totals_l[k] + group.total_l
    # Poisson ML rates; an all-zero parameter is held below the largest other rate.
    log_rates = [xp.log(xp.where(ty > 0, ty, 1.0) / xp.where(tl > 0, tl, 1.0))
                 for ty, tl in zip(totals_y, totals_l)]
    zero = [ty <= 0 for ty in totals_y]
    if n_params > 1:
        top = log_rates[0]
        for k in range(1, n_params):
            top = xp.where(zero[0], log_rates[k], xp.maximum(top, xp.where(zero[k], top, log_rates[k])))
        log_rates = [xp.where(z, top - MAX_LOG_FOLD_CHANGE, lr) for z, lr in zip(zero, log_rates)]
    thetas = list(xp.broadcast_arrays(*log_rates, *(g.total_y for g in groups)))[:n_params]
    zero = list(xp.broadcast_arrays(*zero, thetas[0]))[:n_params]
    capped = zero[0]
    for z in zero[1:]:
        capped = capped | z
    shape = thetas[0].shape
    lo, hi = math.log(MIN_DISPERSION), math.log(MAX_DISPERSION)

    if alpha_fixed is not None:
        return _fit_rates(xp, groups, owner, n_params, thetas, zero, capped,
                          xp.broadcast_to(alpha_fixed, shape) + 0.0, max_iter, tol)
    interior = _boundary_score(xp, groups, owner, n_params, thetas, cox_reid) > 0
    # Start alpha from the moment estimate of the Poisson residuals.
    num = 0.0
    den = 0.0
    for group, k in zip(groups, owner):
        m = _mean(xp, group, thetas[k])
        num = num + xp.sum(group.weight * ((group.y - m) ** 2 - group.y), axis=-1)
        den = den + xp.sum(group.weight * m * m, axis=-1)
    phi0 = xp.clip(num / xp.where(den > 0, den, 1.0), 1e-3, 1e2)
    alpha = xp.where(interior, xp.log(phi0), lo)
    alpha = xp.broadcast_to(alpha, shape) + 0.0
    active = interior
    converged = ~interior  # the Poisson boundary is the constrained optimum
    iterations = xp.zeros_like(alpha, dtype=xp.int8)
    step_bound = xp.full_like(alpha, MAX_ALPHA_STEP)
    last_grad = xp.zeros_like(alpha)
    last_alpha = alpha

    for it in range(max_iter):
        phi = xp.exp(alpha)
        theta_moved = xp.zeros_like(alpha)
        for _ in range(INNER_STEPS):
            thetas, moved = _theta_newton(xp, groups, owner, n_params, thetas, phi, zero, active)
            theta_moved = xp.maximum(theta_moved, moved)
        grad, schur = _profile_alpha(xp, special, groups, owner, n_params, thetas, alpha, zero,
                                     cox_reid)
        if cox_reid:
            # The Schur curvature omits the Cox-Reid term's own curvature: use the secant of
            # the total gradient once two iterates exist.
            moved = alpha - last_alpha
            secant = (grad - last_grad) / xp.where(xp.abs(moved) > 1e-12, moved, 1.0)
            schur = xp.where(xp.abs(moved) > 1e-12, secant, schur)
            last_alpha = alpha
        newton = -grad / xp.where(schur < 0, schur, -1.0)
        step = xp.where(schur < 0, newton, xp.sign(grad) * step_bound)
        flipped = (grad * last_grad) < 0
        step_bound = xp.where(active & flipped, step_bound * 0.5, step_bound)
        step = xp.clip(step, -step_bound, step_bound)
        new_alpha = xp.clip(alpha + step, lo, hi)
        step = new_alpha - alpha
        alpha = xp.where(active, new_alpha, alpha)
        last_grad = xp.where(active, grad, last_grad)
        iterations = xp.where(active, iterations + 1, iterations)
        at_floor = (alpha <= lo) & (grad < 0)
        # Converged when the step, or the log-likelihood gain it predicts, is negligible.
        small = (xp.abs(step) < tol) | (xp.abs(grad * step) < tol * tol)
        done = (small & (theta_moved < tol)) | at_floor
        converged = converged | (active & done)
        active = active & ~done
        if (it + 1) % CHECK_EVERY == 0 and not any_true(xp, active):
            break
    # Polish the rates at the final dispersion (rates of the Poisson-boundary fits included).
    phi = xp.exp(alpha)
    for _ in range(INNER_STEPS):
        thetas, _ = _theta_newton(xp, groups, owner, n_params, thetas, phi, zero,
                                  xp.ones_like(alpha, dtype=xp.bool))
    converged = converged & ~capped & (alpha < hi)
    return thetas, alpha, converged, iterations, capped


def _fit_rates(xp, groups, owner, n_params, thetas, zero, capped, alpha, max_iter, tol):
    """Newton for the log rates at a fixed dispersion (a concave 1-D problem per rate)."""
    phi = xp.exp(alpha)
    active = xp.ones_like(alpha, dtype=xp.bool)
    iterations = xp.zeros_like(alpha, dtype=xp.int8)
    for it in range(max_iter):
        thetas, moved = _theta_newton(xp, groups, owner, n_params, thetas, phi, zero, active)
        iterations = xp.where(active, iterations + 1, iterations)
        active = active & ~(moved < tol)
        if (it + 1) % CHECK_EVERY == 0 and not any_true(xp, active):
            break
    return thetas, alpha, ~active & ~capped, iterations, capped


def _theta_newton(xp, groups, owner, n_params, thetas, phi, zero, active):
    scores = [0.0] * n_params
    hessians = [0.0] * n_params
    for group, k in zip(groups, owner):
        s, h = _theta_derivatives(xp, group, thetas[k], phi)
        scores[k] = scores[k] + s
        hessians[k] = hessians[k] + h
    out, moved = [], xp.zeros_like(thetas[0])
    for k in range(n_params):
        h = hessians[k]
        step = -scores[k] / xp.where(h < 0, h, -1.0)
        step = xp.clip(step, -5.0, 5.0)
        step = xp.where(active & ~zero[k] & (h < 0), step, 0.0)
        out.append(thetas[k] + step)
        moved = xp.maximum(moved, xp.abs(step))
    return out, moved


def _profile_alpha(xp, special, groups, owner, n_params, thetas, alpha, zero, cox_reid):
    """Profile gradient in alpha and its Newton curvature (Schur complement)."""
    phi = xp.exp(alpha)
    g_a = 0.0
    h_aa = 0.0
    h_ta = [0.0] * n_params
    h_tt = [0.0] * n_params
    for group, k in zip(groups, owner):
        ga, haa, hta = _alpha_derivatives(xp, special, group, thetas[k], alpha)
        _, htt = _theta_derivatives(xp, group, thetas[k], phi)
        g_a, h_aa = g_a + ga, h_aa + haa
        h_ta[k] = h_ta[k] + hta
        h_tt[k] = h_tt[k] + htt
    schur = h_aa
    for k in range(n_params):
        safe = xp.where(h_tt[k] < 0, h_tt[k], -1.0)
        schur = schur - xp.where(zero[k], 0.0, h_ta[k] * h_ta[k] / safe)
    grad = g_a
    if cox_reid:
        totals = [0.0] * n_params
        d_alpha = [0.0] * n_params
        d_theta = [0.0] * n_params
        for group, k in zip(groups, owner):
            t, da_, dt = _weights(xp, group, thetas[k], alpha)
            totals[k], d_alpha[k], d_theta[k] = totals[k] + t, d_alpha[k] + da_, d_theta[k] + dt
        for k in range(n_params):
            safe_h = xp.where(h_tt[k] < 0, h_tt[k], -1.0)
            dtheta = xp.where(zero[k], 0.0, -h_ta[k] / safe_h)
            total = xp.where(totals[k] > 0, totals[k], 1.0)
            grad = grad - 0.5 * (d_alpha[k] + d_theta[k] * dtheta) / total
    return grad, schur


def _wald_observed(xp, special, groups, thetas, alpha, fix_alpha):
    """SE of beta from the inverse observed Hessian of (theta_C, theta_T, alpha).

    ``fix_alpha`` drops the alpha row and column (dispersion at its Poisson floor).
    """
    phi = xp.exp(alpha)
    (s_c, h_c), (s_t, h_t) = (_theta_derivatives(xp, g, t, phi) for g, t in zip(groups, thetas))
    ga_c, haa_c, hta_c = _alpha_derivatives(xp, special, groups[0], thetas[0], alpha)
    ga_t, haa_t, hta_t = _alpha_derivatives(xp, special, groups[1], thetas[1], alpha)
    a, b, c = -h_c, -h_t, -(haa_c + haa_t)  # information = -Hessian
    d, e = -hta_c, -hta_t
    # Inverse of [[a, 0, d], [0, b, e], [d, e, c]]: Var(theta_T - theta_C) = i11 + i22 - 2 i12.
    det = a * b * c - a * e * e - b * d * d
    use_full = ~fix_alpha & (det > 0) & (c > 0)
    var_full = ((a * c - d * d) + (b * c - e * e) - 2.0 * (d * e)) / xp.where(use_full, det, 1.0)
    # A group without samples has no information: NaN, not a division by zero.
    var_fixed = 1.0 / xp.where(a > 0, a, xp.nan) + 1.0 / xp.where(b > 0, b, xp.nan)
    var = xp.where(use_full, var_full, var_fixed)
    return xp.sqrt(xp.where(var > 0, var, xp.nan))


def irls_kernel(counts, size_factor, control_counts, control_size_factor, *, test="wald",
                dispersion_fit="ml", max_iter=50, tol=1e-6, feature_dispersion=None,
                dispersion_spread=None):
    """Maximum-likelihood NB2 fit and test for every comparison of one block.

    Parameters
    ----------
    counts, size_factor, control_counts, control_size_factor
        As for ``mom_kernel``: [P_b, G_b, R], [P_b, R] (NaN = absent), [G_b, C], [C].
    test
        ``"wald"`` (z from the observed information of the joint fit) or ``"lrt"`` (2 x the
        log-likelihood gain over the beta = 0 model with its own ML dispersion, chi-square 1 df).
    dispersion_fit
        ``"ml"`` or ``"cox-reid"`` (adjusted profile likelihood).
    max_iter, tol
        Dispersion iterations (at most 127) and the convergence tolerance on the alpha and
        log-rate steps.
    feature_dispersion, dispersion_spread : array [G_b], optional
        With ``dispersion="feature"`` / ``"shrunk"``: phi is fixed at the pooled value (or the
        MoM estimate shrunk toward it) and only the rates are fitted; Wald uses the (mu, beta)
        information at that phi, and the LRT's reduced model shares it.

    Returns
    -------
    dict of [P_b, G_b] arrays: the MoM kernel's variables plus ``converged`` (bool) and
    ``iterations`` (int8).
    """
    xp, special = namespaces(counts, size_factor, control_counts, control_size_factor)
    max_iter = min(int(max_iter), 127)
    f64 = xp.float64
    size_factor = xp.astype(size_factor, f64)
    control_size_factor = xp.astype(control_size_factor, f64)
    present = xp.isfinite(size_factor)
    ctrl = _Group(xp, control_counts[None, :, :], control_size_factor[None, None, :],
                  xp.ones_like(control_size_factor, dtype=xp.bool)[None, None, :])
    trt = _Group(xp, counts, size_factor[:, None, :], present[:, None, :])
    groups = [ctrl, trt]
    cox_reid = dispersion_fit == "cox-reid"
    mom = mom_kernel(counts, size_factor, control_counts, control_size_factor,
                     feature_dispersion=feature_dispersion, dispersion_spread=dispersion_spread)
    fixed = None
    if feature_dispersion is not None:
        fixed = xp.astype(mom["log_dispersion"], f64)
        fixed = xp.where(xp.isfinite(fixed), fixed, 0.0)
    thetas, alpha, converged, iterations, capped = fit_nb(
        xp, special, groups, [0, 1], cox_reid=cox_reid, max_iter=max_iter, tol=tol,
        alpha_fixed=fixed)
    thetas = [xp.broadcast_to(t, alpha.shape) for t in thetas]
    beta = thetas[1] - thetas[0]
    if test == "lrt":
        ll_full = sum(log_likelihood(xp, special, g, t, alpha) for g, t in zip(groups, thetas))
        (theta0,), alpha0, conv0, _, _ = fit_nb(xp, special, groups, [0, 0], cox_reid=cox_reid,
                                                max_iter=max_iter, tol=tol, alpha_fixed=fixed)
        ll_null = sum(log_likelihood(xp, special, g, theta0, alpha0) for g in groups)
        stat = xp.maximum(2.0 * (ll_full - ll_null), 0.0)
        p = special.chdtrc(1.0, stat)
        converged = converged & conv0
    fix_alpha = (alpha <= math.log(MIN_DISPERSION)) | (fixed is not None)
    se = _wald_observed(xp, special, groups, thetas, alpha, fix_alpha)
    if test != "lrt":
        stat = beta / se
        p = 2.0 * special.ndtr(-xp.abs(stat))
        p = xp.where(xp.isfinite(p), p, 1.0)

    # Untestable comparisons keep the MoM conventions (NaN p); their fit is not meaningful.
    untestable = xp.isnan(mom["p_value"])
    no_samples = xp.isnan(mom["log_fold_change"])
    nan = xp.nan
    f32 = xp.float32
    both_zero = untestable & ~no_samples
    return {
        "log_base_mean": xp.astype(xp.where(untestable, mom["log_base_mean"], thetas[0]), f32),
        "log_fold_change": xp.astype(xp.where(untestable, mom["log_fold_change"], beta), f32),
        "log_dispersion": xp.astype(xp.where(untestable, mom["log_dispersion"], alpha), f32),
        "standard_error": xp.astype(xp.where(untestable, mom["standard_error"], se), f32),
        "statistic": xp.astype(xp.where(untestable, nan, stat), f32),
        "p_value": xp.where(untestable, nan, p),
        "converged": converged & ~untestable,
        "iterations": xp.where(both_zero | no_samples, xp.zeros_like(iterations), iterations),
    }

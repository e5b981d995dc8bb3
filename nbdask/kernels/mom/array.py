"""Method-of-moments estimates with the Wald test (design §6) over the array namespace: one
source for NumPy and CuPy, and the definition that ``fused.py`` follows."""

from __future__ import annotations

from ..backend import namespaces
from ..moments import block_moments, poisson_term
from ..wald import wald_outputs

#: Floor of the shared dispersion estimate phi hat (DESeq2's minDisp).
MIN_DISPERSION = 1e-8
#: Ceiling of the pooled and moderated dispersions: with 2-10 replicates no data tell larger values
#: apart, and the pooled moment ratio is unbounded where its denominator nears zero.
DISPERSION_CEILING = 100.0
#: Pseudo-count for a group whose counts are all zero: q bar = ZERO_GROUP_COUNT / sum(l_i).
ZERO_GROUP_COUNT = 0.5


def group_dispersion(xp, moments):
    """Per-group moment dispersion (s^2 - q bar * mean(1/l)) / q bar^2 and its weight n - 1.

    The weight is 0 for groups with q bar = 0 or fewer than two replicates.
    """
    qbar = moments.rate_mean
    has_signal = qbar > 0
    safe = xp.where(has_signal, qbar, 1.0)
    phi = (moments.rate_var - safe * moments.inv_size_factor) / (safe * safe)
    weight = xp.where(has_signal, xp.maximum(moments.n - 1.0, 0.0), 0.0)
    return xp.where(has_signal, phi, 0.0), weight


def pooled_dispersion(xp, parts):
    """(n_g - 1)-weighted mean of per-group dispersions, floored at MIN_DISPERSION."""
    num = sum(phi * w for phi, w in parts)
    den = sum(w for _, w in parts)
    pooled = num / xp.where(den > 0, den, 1.0)
    return xp.maximum(xp.where(den > 0, pooled, MIN_DISPERSION), MIN_DISPERSION)


def group_rates(xp, ctrl, trt):
    """Group rates for the estimates: q bar, or ZERO_GROUP_COUNT / sum(l) for an all-zero group."""
    rate_c = xp.where(ctrl.rate_mean > 0, ctrl.rate_mean, ZERO_GROUP_COUNT / ctrl.library)
    library_t = xp.where(trt.library > 0, trt.library, 1.0)
    rate_t = xp.where(trt.rate_mean > 0, trt.rate_mean, ZERO_GROUP_COUNT / library_t)
    return rate_c, rate_t


def shrink_dispersion(xp, phi_comparison, weight, poisson, feature_dispersion, spread):
    """Empirical-Bayes compromise between a comparison's moment dispersion and its feature's.

    phi = w phi_c + (1 - w) phi_f, w = tau^2 / (tau^2 + v_c), v_c = 2 (phi_f + a_c)^2 / df_c:
    the sampling variance of phi_c against the feature's between-perturbation variance tau^2.
    """
    v = 2.0 * (feature_dispersion + poisson) ** 2 / xp.where(weight > 0, weight, 1.0)
    w = xp.where(weight > 0, spread / (spread + v), 0.0)
    return xp.maximum(w * phi_comparison + (1.0 - w) * feature_dispersion, MIN_DISPERSION)


def moment_dispersion(xp, ctrl, trt, rate_c, rate_t, control_size_factor, size_factor, present, *,
                      feature_dispersion=None, dispersion_spread=None):
    """The dispersion phi [P_b, G_b] a Wald test uses, by the ``dispersion=`` mode.

    Per comparison (no feature values): the pooled moment estimate of design §6; with
    ``feature_dispersion`` [G_b] alone: that value; with ``dispersion_spread`` too: the comparison
    estimate shrunk toward it (``shrink_dispersion``).
    """
    parts = [group_dispersion(xp, ctrl), group_dispersion(xp, trt)]
    if feature_dispersion is None:
        return pooled_dispersion(xp, parts)
    if dispersion_spread is None:
        return xp.broadcast_to(feature_dispersion, rate_t.shape)
    weight = parts[0][1] + parts[1][1]
    raw = (parts[0][0] * parts[0][1] + parts[1][0] * parts[1][1]) / xp.where(weight > 0, weight, 1.0)
    a = poisson_term(xp, ctrl, trt, rate_c, rate_t, control_size_factor, size_factor, present)
    return shrink_dispersion(xp, raw, weight, a, feature_dispersion, dispersion_spread)


def mom_kernel(counts, size_factor, control_counts, control_size_factor, *,
               feature_dispersion=None, dispersion_spread=None):
    """MoM estimates and Wald test for every comparison of one block.

    Parameters
    ----------
    counts : array [P_b, G_b, R]
        Treated counts; positions of absent replicates are ignored.
    size_factor : array [P_b, R]
        Treated size factors; NaN marks an absent replicate.
    control_counts : array [G_b, C]
        Control counts.
    control_size_factor : array [C]
        Control size factors.
    feature_dispersion, dispersion_spread : array [G_b], optional
        Per-feature pooled dispersion phi_f (``dispersion="feature"``: used as phi) and, with it,
        the between-perturbation variance tau^2 (``dispersion="shrunk"``: phi is shrunk toward
        phi_f by ``shrink_dispersion``). See ``nbdask.dispersion``.

    Returns
    -------
    dict of arrays [P_b, G_b]: ``log_base_mean``, ``log_fold_change``, ``log_dispersion``,
    ``standard_error``, ``statistic`` (float32) and ``p_value`` (float64, NaN = untestable).
    """
    xp, special = namespaces(counts, size_factor, control_counts, control_size_factor)
    # Control statistics: once per feature block, broadcast over perturbations.
    size_factor, control_size_factor, present, ctrl, trt = block_moments(
        xp, counts, size_factor, control_counts, control_size_factor)

    rate_c, rate_t = group_rates(xp, ctrl, trt)
    log_rate_c = xp.log(rate_c)
    mu = xp.broadcast_to(log_rate_c, rate_t.shape)
    beta = xp.log(rate_t) - log_rate_c

    phi = moment_dispersion(xp, ctrl, trt, rate_c, rate_t, control_size_factor, size_factor, present,
                            feature_dispersion=feature_dispersion, dispersion_spread=dispersion_spread)
    return wald_outputs(xp, special, mu, beta, phi, rate_c, rate_t, control_size_factor, size_factor,
                        present, ctrl, trt)

"""Wald test of the log fold change in the two-group NB2 GLM (design §6).

With fitted means m_i = l_i * rate_g and weights W_i = m_i / (1 + phi m_i), the expected
information for (mu, beta) is [[A + B, B], [B, B]] with A = sum_C W_i, B = sum_T W_i, so
SE(beta) = sqrt(1/A + 1/B), z = beta / SE and p = 2 Phi(-|z|).
"""

from __future__ import annotations


def weight_sum(xp, rate, phi, size_factor, present=None):
    """sum_i m_i / (1 + phi m_i) over the replicate axis, m_i = size_factor_i * rate.

    ``rate`` and ``phi`` are [..., G] comparison arrays; ``size_factor`` is [..., R] with the
    replicate axis last, broadcast as ``size_factor[..., None, R]`` against them.
    """
    m = rate[..., None] * size_factor[..., None, :]
    w = m / (1.0 + phi[..., None] * m)
    if present is not None:
        w = xp.where(present[..., None, :], w, 0.0)
    return xp.sum(w, axis=-1)


def wald_test(xp, special, log_fold_change, info_control, info_treated):
    """Return ``(standard_error, z, p_value)`` from the per-group weight sums A and B."""
    # A group without samples has no information: NaN, not a division by zero.
    info_control = xp.where(info_control > 0, info_control, xp.nan)
    info_treated = xp.where(info_treated > 0, info_treated, xp.nan)
    se = xp.sqrt(1.0 / info_control + 1.0 / info_treated)
    z = log_fold_change / se
    p = 2.0 * special.ndtr(-xp.abs(z))
    return se, z, p


def wald_outputs(xp, special, mu, beta, phi, rate_c, rate_t, control_size_factor, size_factor,
                 present, ctrl, trt):
    """The estimator outputs of design §3 from (mu, beta, phi) with the plug-in Wald test.

    ``rate_c`` ([G_b] or [P_b, G_b]) and ``rate_t`` [P_b, G_b] are the fitted group rates the
    weights use. From the group moments ``ctrl`` and ``trt``: a comparison without treated
    samples gets NaN estimates, and one whose groups are both all zero NaN statistic and p.
    """
    no_samples = trt.n == 0
    untestable = no_samples | ((ctrl.rate_mean == 0) & (trt.rate_mean == 0))
    info_c = weight_sum(xp, rate_c, phi, control_size_factor)
    info_t = weight_sum(xp, rate_t, phi, size_factor, present)
    se, z, p = wald_test(xp, special, beta, info_c, info_t)
    nan, f32 = xp.nan, xp.float32
    return {
        "log_base_mean": xp.astype(xp.broadcast_to(mu, rate_t.shape), f32),
        "log_fold_change": xp.astype(xp.where(no_samples, nan, beta), f32),
        "log_dispersion": xp.astype(xp.where(no_samples, nan, xp.log(phi)), f32),
        "standard_error": xp.astype(xp.where(no_samples, nan, se), f32),
        "statistic": xp.astype(xp.where(untestable, nan, z), f32),
        "p_value": xp.where(untestable, nan, p),
    }

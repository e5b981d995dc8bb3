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

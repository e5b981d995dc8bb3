"""Per-group moments of size-factor-normalised counts, shared by the estimators."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GroupMoments:
    """Moments of the rates q_i = y_i / l_i over the present replicates of one group.

    Shapes: ``rate_mean`` and ``rate_var`` have the comparison shape (e.g. [P_b, G_b] or [G_b]);
    ``n``, ``library`` and ``inv_size_factor`` have the shape of the size factors without their
    replicate axis, broadcastable against it.
    """

    n: object                # present replicates
    library: object          # sum of present size factors, l_sum
    inv_size_factor: object  # mean of 1 / l_i over present replicates
    rate_mean: object        # q bar
    rate_var: object         # sample variance of q (ddof = 1); 0 where n < 2


def group_moments(xp, y, size_factor, present) -> GroupMoments:
    """Moments of ``y / size_factor`` along the last axis, over positions where ``present``.

    ``y`` is [..., R]; ``size_factor`` and ``present`` broadcast against it and keep singleton
    axes where they are constant (e.g. [P_b, 1, R] for a treated block). Absent positions may
    hold anything, NaN included.
    """
    f64 = xp.float64
    weight = xp.astype(present, f64)
    sf = xp.where(present, size_factor, 1.0)
    n = xp.sum(weight, axis=-1)
    n_safe = xp.maximum(n, 1.0)
    rate = xp.where(present, xp.astype(y, f64) / sf, 0.0)
    rate_mean = xp.sum(rate, axis=-1) / n_safe
    dev = xp.where(present, rate - rate_mean[..., None], 0.0)
    rate_var = xp.sum(dev * dev, axis=-1) / xp.maximum(n - 1.0, 1.0)
    library = xp.sum(xp.where(present, sf, 0.0), axis=-1)
    inv = xp.sum(weight / sf, axis=-1) / n_safe
    return GroupMoments(n, library, inv, rate_mean, rate_var)


def poisson_term(xp, ctrl: GroupMoments, trt: GroupMoments, rate_c, rate_t, control_size_factor,
                 size_factor, present):
    """Mean of 1/m_i over a comparison's samples, m_i = l_i * rate of its group: [P_b, G_b].

    ``rate_c`` [G_b] and ``rate_t`` [P_b, G_b] are the fitted group rates; ``size_factor`` and
    ``present`` are the treated [P_b, R] arrays.
    """
    inv_c = xp.sum(1.0 / control_size_factor) / rate_c
    inv_l = xp.sum(xp.where(present, 1.0 / xp.where(present, size_factor, 1.0), 0.0), axis=-1)
    n = control_size_factor.shape[0] + trt.n
    return (inv_c + inv_l[:, None] / rate_t) / n


def block_moments(xp, counts, size_factor, control_counts, control_size_factor):
    """The moments every kernel starts from, for one block of the kernel contract.

    Returns ``(size_factor, control_size_factor, present, ctrl, trt)``: float64 size factors,
    the treated presence mask [P_b, R], the control group's moments ([G_b] rates; computed once
    per feature block) and the treated groups' ([P_b, G_b] rates).
    """
    size_factor = xp.astype(size_factor, xp.float64)
    control_size_factor = xp.astype(control_size_factor, xp.float64)
    present = xp.isfinite(size_factor)
    ctrl = group_moments(xp, control_counts, control_size_factor,
                         xp.ones_like(control_size_factor, dtype=xp.bool))
    trt = group_moments(xp, counts, size_factor[:, None, :], present[:, None, :])
    return size_factor, control_size_factor, present, ctrl, trt

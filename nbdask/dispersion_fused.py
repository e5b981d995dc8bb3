"""The pooling pass's [P_b, G_b] loops in numba: ``dispersion.feature_sums`` for NumPy blocks.

Each loop computes what the array form in ``dispersion`` computes, without its array
temporaries; ``dispersion._fused`` picks them for host blocks, and the tests hold the sums to
the array form's.
"""

from __future__ import annotations

import numpy as np

from .kernels.fused_common import jit, present
from .kernels.mom import ZERO_GROUP_COUNT


#: Rows of ``dispersion.SUMS`` (10 pooling rows, then the 9 EVIDENCE_ROWS at 10-18); the
#: ``excess_<n>`` rows follow (tests/test_dispersion.py compares every row with the array form).
_SUMS = 19


@jit
def pooling_terms(counts, sf, rate_mean, rate_var):
    """Fill [P, G] treated rate means and variances (ddof 1; 0 below two replicates) over present
    replicates, as ``moments.group_moments`` defines them."""
    P, G, R = counts.shape
    keep = np.empty(R, np.int64)
    inv = np.empty(R)
    for p in range(P):
        n = present(sf, p, keep, inv)
        for g in range(G):
            total = 0.0
            for i in range(n):
                total += counts[p, g, keep[i]] * inv[i]
            mean = total / max(n, 1)
            dev = 0.0
            for i in range(n):
                d = counts[p, g, keep[i]] * inv[i] - mean
                dev += d * d
            rate_mean[p, g] = mean
            rate_var[p, g] = dev / max(n - 1.0, 1.0)


@jit
def _terms(mean, var, n, inv_t):
    """A group's pooling terms num = (n-1)(s2 - qbar mean(1/l)), den = (n-1)(qbar^2 - s2/n)
    (``inv_t``: mean(1/l)); recomputed where needed rather than kept as [P, G] arrays."""
    w = max(n - 1.0, 0.0)
    return w * (var - mean * inv_t), w * (mean * mean - var / max(n, 1.0))


@jit
def kept_sums(rate_mean, rate_var, n_t, inv_t, keep, out_num, out_den):
    """Column sums of the pooling terms over the groups where ``keep``: [G] each."""
    P, G = rate_mean.shape
    out_num[:] = 0.0
    out_den[:] = 0.0
    for p in range(P):
        for g in range(G):
            if keep[p, g]:
                num, den = _terms(rate_mean[p, g], rate_var[p, g], n_t[p], inv_t[p])
                out_num[g] += num
                out_den[g] += den


@jit
def pooling_rows(keep, valid, rate_mean, rate_var, n_t, inv_t, library_t, inv_l,
                 phi_c, w_c, rate_c, inv_c, n_c, out):
    """Every row of ``dispersion.sum_rows`` for one block in one pass over its groups: the 10
    pooling rows of ``dispersion.SUMS`` as ``dispersion.feature_sums`` defines them, then the
    nine EVIDENCE_ROWS and ``excess_<n>`` (n = 2 ... R) of ``dispersion.evidence_rows``
    (per-perturbation [P] inputs: n, mean(1/l), sum(l), sum(1/l); control [G] inputs).

    The sums build up in a [G, rows] scratch, each feature's rows side by side (in [rows, G]
    they are a feature's column, a cache line per row), and are copied to ``out`` last.
    """
    P, G = rate_mean.shape
    K = out.shape[0]
    sizes = K - _SUMS
    acc = np.zeros((G, K))
    for p in range(P):
        n = n_t[p]
        w = max(n - 1.0, 0.0)
        wn = w * w / n if n > 0 else 0.0
        inv_le = n / library_t[p] if n > 0 else 0.0
        row = _SUMS + int(n) - 2
        for g in range(G):
            if keep[p, g]:
                num, den = _terms(rate_mean[p, g], rate_var[p, g], n, inv_t[p])
                acc[g, 0] += num
                acc[g, 1] += den
                acc[g, 2] += 1.0
            elif valid[p, g]:
                acc[g, 3] += 1.0
            mean = rate_mean[p, g]
            phi_t, w_t = 0.0, 0.0
            if mean > 0:
                phi_t = (rate_var[p, g] - mean * inv_t[p]) / (mean * mean)
                w_t = w
            df = w_c[g] + w_t
            if df > 0 and n > 0:
                phi = (phi_c[g] * w_c[g] + phi_t * w_t) / df
                rate_t = mean if mean > 0 else ZERO_GROUP_COUNT / (library_t[p] if library_t[p] > 0 else 1.0)
                a = (inv_c[g] + inv_l[p] / rate_t) / (n_c + n)
                inv_df = 1.0 / df
                acc[g, 4] += phi
                acc[g, 5] += phi * phi
                acc[g, 6] += inv_df
                acc[g, 7] += a * inv_df
                acc[g, 8] += a * a * inv_df
                acc[g, 9] += 1.0
            if n <= 0:
                continue
            q = mean
            acc[g, 13] += n * q
            acc[g, 14] += n
            if not keep[p, g]:
                continue
            a = q * inv_t[p]
            b = q * q
            acc[g, 10] += w * a
            acc[g, 11] += w
            acc[g, 12] += w * b
            acc[g, 15] += 2.0 * w * a * a + wn * q * inv_le * inv_le * inv_le
            acc[g, 16] += 4.0 * w * a * b + wn * (6.0 * a * a + b * inv_le * inv_le)
            acc[g, 17] += 2.0 * w * b * b + 12.0 * wn * a * b
            acc[g, 18] += 6.0 * wn * b * b
            if _SUMS <= row < _SUMS + sizes:
                acc[g, row] += w * max(b - a / n, 0.0)
    for k in range(K):
        for g in range(G):
            out[k, g] = acc[g, k]


@jit
def pearson_statistics(counts, sf, rate_mean, est, valid, out, total, groups):
    """out[p, g] = sum over present i of (q_i - qbar)^2 / (qbar / l_i + est_g qbar^2) (a zero
    variance counts as 1), the treated groups' Pearson statistics under dispersions ``est``;
    total[p] and groups[p]: their sum over the perturbation's ``valid`` groups and how many
    (what ``dispersion._wild`` scores perturbations by)."""
    P, G, R = counts.shape
    keep = np.empty(R, np.int64)
    inv = np.empty(R)
    for p in range(P):
        n = present(sf, p, keep, inv)
        row_total = 0.0
        row_groups = 0.0
        for g in range(G):
            qbar = rate_mean[p, g]
            extra = est[g] * qbar * qbar
            stat = 0.0
            for i in range(n):
                d = counts[p, g, keep[i]] * inv[i] - qbar
                var = qbar * inv[i] + extra
                stat += d * d / (var if var > 0 else 1.0)
            out[p, g] = stat
            if valid[p, g]:
                row_total += stat
                row_groups += 1.0
        total[p] = row_total
        groups[p] = row_groups


@jit
def screened(pearson, valid, limit, wild, keep):
    """keep[p, g]: valid, Pearson statistic at most ``limit[p]`` (the chi-square quantile for
    its replicates) and not in a ``wild`` perturbation, as ``dispersion._screen`` defines it."""
    P, G = pearson.shape
    for p in range(P):
        for g in range(G):
            keep[p, g] = valid[p, g] and pearson[p, g] <= limit[p] and not wild[p]

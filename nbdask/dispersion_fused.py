"""The pooling pass's [P_b, G_b] loops in numba: ``dispersion.feature_sums`` for NumPy blocks.

Each loop computes what the array form in ``dispersion`` computes, without its array
temporaries; ``dispersion._fused`` picks them for host blocks, and the tests hold the sums to
the array form's.
"""

from __future__ import annotations

import numpy as np

from .kernels.fused_common import jit, present
from .kernels.mom import ZERO_GROUP_COUNT


@jit
def pooling_terms(counts, sf, inv_t, rate_mean, rate_var, num, den):
    """Fill [P, G] treated rate means and variances (ddof 1; 0 below two replicates) over present
    replicates, as ``moments.group_moments`` defines them, and each group's pooling terms
    num = (n-1)(s2 - qbar mean(1/l)), den = (n-1)(qbar^2 - s2/n) (``inv_t`` [P]: mean(1/l))."""
    P, G, R = counts.shape
    keep = np.empty(R, np.int64)
    inv = np.empty(R)
    for p in range(P):
        n = present(sf, p, keep, inv)
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


@jit
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


@jit
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


@jit
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


@jit
def pearson_statistics(counts, sf, rate_mean, est, out):
    """out[p, g] = sum over present i of (q_i - qbar)^2 / (qbar / l_i + est_g qbar^2) (a zero
    variance counts as 1), the treated groups' Pearson statistics under dispersions ``est``."""
    P, G, R = counts.shape
    keep = np.empty(R, np.int64)
    inv = np.empty(R)
    for p in range(P):
        n = present(sf, p, keep, inv)
        for g in range(G):
            qbar = rate_mean[p, g]
            extra = est[g] * qbar * qbar
            total = 0.0
            for i in range(n):
                d = counts[p, g, keep[i]] * inv[i] - qbar
                var = qbar * inv[i] + extra
                total += d * d / (var if var > 0 else 1.0)
            out[p, g] = total

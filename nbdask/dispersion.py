"""Screen-aware dispersion: one NB2 dispersion per feature, pooled over all its perturbations.

Every feature is compared against the same control in every perturbation, and under the model
its dispersion is the same in all of them. Pooling the per-group moment equations over the
control and every perturbation's treated group gives a per-feature estimate from thousands of
samples instead of the 2–10 + 2–10 of one comparison.

Estimator (per feature, a ratio of sums over groups k with n_k >= 2 replicates, each group
around its own mean so true effects do not inflate it):

    phi_f = sum_k (n_k - 1)(s2_k - qbar_k * mean_k(1/l)) / sum_k (n_k - 1)(qbar_k^2 - s2_k / n_k)

The numerator is unbiased for (n_k - 1) phi lambda_k^2 and the denominator, through the
``- s2_k / n_k`` correction of qbar_k^2, for (n_k - 1) lambda_k^2, so the ratio is consistent at
every mean count (without the correction it runs 15% low at means below 2). Robustness, within
each block and in two rounds under the block's own pooled estimate: a group whose Pearson
statistic sum_i (q_i - qbar)^2 / (qbar/l_i + phi qbar^2) exceeds the 99.9% chi-square quantile
(n_k - 1 df) is left out (~0.1% of groups at the null), and so is every group of a perturbation
whose Pearson statistics, pooled over the block's features, sit more than 5 scaled MADs above
the block's median perturbation: with 2–10 replicates a single group has little power to look
over-dispersed, but a perturbation that disrupts variability does so across hundreds of
features.

``"shrunk"`` moves each comparison's own moment estimate phi_c toward phi_f on the dispersion
scale, phi = w phi_c + (1 - w) phi_f with w = tau^2 / (tau^2 + v_c): v_c = 2 (phi_f + a_c)^2 / df_c
is the sampling variance of phi_c (a_c the mean Poisson term 1/m_i, df_c = n_C + n_T - 2) and
tau^2 the feature's between-perturbation variance of the true dispersion, estimated by moments
(variance of phi_c across perturbations minus the mean v_c, floored at 0). With one shared
dispersion tau^2 ~ 0 and shrunk equals feature; a perturbation that changes the variability
keeps part of its own estimate.

All sums decompose over perturbation blocks, so the pass is one map-reduce over the cube.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import stats

from .kernels.backend import device, is_host, namespaces, to_host
from .kernels.moments import block_moments, group_moments, poisson_term
from .kernels.mom import MIN_DISPERSION, ZERO_GROUP_COUNT, group_rates
from .schema import FEATURE, host_values

DISPERSIONS = ("comparison", "feature", "shrunk")
#: Groups whose Pearson statistic exceeds this chi-square quantile are left out of the pool.
OUTLIER_LEVEL = 0.999
OUTLIER_ROUNDS = 2
#: Perturbations whose over-dispersion score across a block's features exceeds the block median
#: by this many scaled MADs are left out of every feature's pool.
WILD_MADS = 5.0
MIN_FEATURES = 20
_CHI2 = stats.chi2.ppf(OUTLIER_LEVEL, np.arange(1, 128))  # indexed by df - 1

#: Rows of the per-block partial sums (axis 0 of ``feature_sums``).
SUMS = ("numerator", "denominator", "groups", "outliers", "phi", "phi_sq", "inv_df", "a_df",
        "a_sq_df", "comparisons")


def _pooled(xp, num, den):
    return xp.maximum(xp.where(den > 0, num / xp.where(den > 0, den, 1.0), MIN_DISPERSION),
                      MIN_DISPERSION)


def feature_sums(counts, size_factor, control_counts, control_size_factor):
    """Partial per-feature sums of one block: array [len(SUMS), G_b] (float64)."""
    xp, _ = namespaces(counts, size_factor, control_counts, control_size_factor)
    fused = _fused(xp)
    if fused is not None:
        return _feature_sums_fused(fused, counts, size_factor, control_counts, control_size_factor)
    f64 = xp.float64
    size_factor, control_size_factor, present, ctrl, trt = block_moments(
        xp, counts, size_factor, control_counts, control_size_factor)

    def contributions(m):
        w = xp.maximum(m.n - 1.0, 0.0)
        return (w * (m.rate_var - m.rate_mean * m.inv_size_factor),
                w * (m.rate_mean * m.rate_mean - m.rate_var / xp.maximum(m.n, 1.0)))

    num_c, den_c = contributions(ctrl)
    num_t, den_t = contributions(trt)  # [P_b, G_b]
    sf = xp.where(present, size_factor, 1.0)[:, None, :]
    rate = xp.where(present[:, None, :], xp.astype(counts, f64) / sf, 0.0)
    qbar = trt.rate_mean[..., None]
    dev2 = (rate - qbar) ** 2

    def pearson_statistics(est):
        """Each treated group's Pearson statistic under the feature dispersions ``est``."""
        var = qbar / sf + est[None, :, None] * qbar * qbar
        return xp.sum(xp.where(present[:, None, :], dev2 / xp.where(var > 0, var, 1.0), 0.0), axis=-1)

    n_t = trt.n  # [P_b, 1]
    valid = (n_t >= 2) & (trt.rate_mean > 0)
    keep = valid
    for _ in range(OUTLIER_ROUNDS):
        est = _pooled(xp, xp.sum(xp.where(keep, num_t, 0.0), axis=0) + num_c,
                      xp.sum(xp.where(keep, den_t, 0.0), axis=0) + den_c)
        keep = _screen(xp, pearson_statistics(est), n_t, valid)
    outliers = valid & ~keep

    # Per-comparison moment dispersion (unfloored) and its sampling-variance pieces.
    phi_c, w_c = _group_phi(xp, ctrl)
    phi_t, w_t = _group_phi(xp, trt)
    df = w_c + w_t
    comp = (df > 0) & (n_t > 0)
    phi = (phi_c * w_c + phi_t * w_t) / xp.where(df > 0, df, 1.0)
    rate_c, rate_t = group_rates(xp, ctrl, trt)
    a = poisson_term(xp, ctrl, trt, rate_c, rate_t, control_size_factor, size_factor, present)
    inv_df = 1.0 / xp.where(df > 0, df, 1.0)

    def total(x):
        return xp.sum(xp.where(comp, x, 0.0), axis=0)

    rows = [
        xp.sum(xp.where(keep, num_t, 0.0), axis=0),
        xp.sum(xp.where(keep, den_t, 0.0), axis=0),
        xp.sum(xp.astype(keep, f64), axis=0),
        xp.sum(xp.astype(outliers, f64), axis=0),
        total(phi), total(phi * phi), total(inv_df), total(a * inv_df), total(a * a * inv_df),
        xp.sum(xp.astype(comp, f64), axis=0),
    ]
    return xp.stack([xp.broadcast_to(r, rows[0].shape) for r in rows])


def _screen(xp, pearson, n_t, valid):
    """Groups kept in the pool: valid, Pearson statistic under the chi-square limit, and not in
    an over-dispersed perturbation ([P_b, G_b] bool)."""
    df_index = xp.astype(xp.clip(n_t - 2.0, 0, 126), xp.int64)
    limit = xp.reshape(xp.take(xp.asarray(_CHI2, dtype=xp.float64, device=device(n_t)), xp.reshape(df_index, (-1,))),
                       n_t.shape)
    return valid & (pearson <= limit) & ~_wild_perturbations(xp, pearson, n_t, valid)


def _feature_sums_fused(fused, counts, size_factor, control_counts, control_size_factor):
    """``feature_sums`` for NumPy blocks: the [P_b, G_b] work in numba loops (``kernels.fused``),
    the same sums without the array temporaries."""
    f64 = np.float64
    sf = np.asarray(size_factor, f64)
    csf = np.asarray(control_size_factor, f64)
    present = np.isfinite(sf)
    ctrl = group_moments(np, control_counts, csf, np.ones(csf.shape, dtype=bool))
    per = group_moments(np, np.zeros(present.shape, dtype=f64), np.where(present, sf, 1.0), present)
    n_t, inv_t, library_t = per.n, per.inv_size_factor, per.library  # [P_b]
    shape = counts.shape[:2]
    rate_mean, rate_var, num_t, den_t = (np.empty(shape) for _ in range(4))
    fused.pooling_terms(counts, sf, inv_t, rate_mean, rate_var, num_t, den_t)
    w = max(ctrl.n - 1.0, 0.0)
    num_c = w * (ctrl.rate_var - ctrl.rate_mean * ctrl.inv_size_factor)
    den_c = w * (ctrl.rate_mean * ctrl.rate_mean - ctrl.rate_var / max(ctrl.n, 1.0))
    valid = (n_t >= 2)[:, None] & (rate_mean > 0)
    keep = valid
    num, den, pearson = np.empty(shape[1]), np.empty(shape[1]), np.empty(shape)
    for _ in range(OUTLIER_ROUNDS):
        fused.kept_sums(num_t, den_t, keep, num, den)
        fused.pearson_statistics(counts, sf, rate_mean, _pooled(np, num + num_c, den + den_c), pearson)
        keep = _screen(np, pearson, n_t[:, None], valid)
    phi_c, w_c = _group_phi(np, ctrl)
    rate_c = np.where(ctrl.rate_mean > 0, ctrl.rate_mean, ZERO_GROUP_COUNT / ctrl.library)
    inv_l = np.sum(np.where(present, 1.0 / np.where(present, sf, 1.0), 0.0), axis=-1)
    out = np.empty((len(SUMS), shape[1]))
    fused.pooling_rows(num_t, den_t, keep, valid, rate_mean, rate_var, n_t, inv_t, library_t, inv_l,
                       phi_c, np.broadcast_to(w_c, phi_c.shape).astype(f64), rate_c,
                       np.sum(1.0 / csf) / rate_c, float(csf.shape[0]), out)
    return out


def _fused(xp):
    """The numba helpers for host blocks (None for CuPy or without numba)."""
    if not is_host(xp):
        return None
    try:
        from .kernels import fused
    except ImportError:
        return None
    return fused


def _wild_perturbations(xp, pearson, n_t, valid):
    """Perturbations over-dispersed across the block's features: [P_b, 1] bool.

    A perturbation's score is its Pearson statistic per degree of freedom summed over the
    block's features; scores above median + WILD_MADS x (scaled MAD) of the block's scores are
    flagged. Needs at least MIN_FEATURES valid groups per perturbation to say anything.
    """
    df = xp.maximum(n_t - 1.0, 1.0)
    groups = xp.sum(xp.astype(valid, xp.float64), axis=1)
    score = xp.sum(xp.where(valid, pearson, 0.0), axis=1) / (xp.where(groups > 0, groups, 1.0) * df[:, 0])
    usable = groups >= MIN_FEATURES
    ranked = xp.sort(xp.where(usable, score, xp.inf))
    n = xp.sum(xp.astype(usable, xp.int64))
    half = xp.astype(xp.maximum(n - 1, 0) // 2, xp.int64)
    median = xp.take(ranked, xp.reshape(half, (1,)))[0]
    spread = xp.sort(xp.where(usable, xp.abs(score - median), xp.inf))
    mad = 1.4826 * xp.take(spread, xp.reshape(half, (1,)))[0]
    wild = usable & (n >= 8) & (score > median + WILD_MADS * mad)
    return wild[:, None]


def _group_phi(xp, m):
    """Unfloored per-group moment dispersion and its weight n - 1 (0 without signal)."""
    signal = m.rate_mean > 0
    safe = xp.where(signal, m.rate_mean, 1.0)
    phi = (m.rate_var - safe * m.inv_size_factor) / (safe * safe)
    return xp.where(signal, phi, 0.0), xp.where(signal, xp.maximum(m.n - 1.0, 0.0), 0.0)


def combine(sums, control_counts, control_size_factor) -> dict[str, np.ndarray]:
    """Per-feature dispersion and between-perturbation variance from the summed partials."""
    xp, _ = namespaces(sums)
    s = {name: sums[i, ...] for i, name in enumerate(SUMS)}
    ctrl = group_moments(xp, control_counts, xp.astype(control_size_factor, xp.float64),
                         xp.ones_like(control_size_factor, dtype=xp.bool))
    w = xp.maximum(ctrl.n - 1.0, 0.0)
    num = s["numerator"] + w * (ctrl.rate_var - ctrl.rate_mean * ctrl.inv_size_factor)
    den = s["denominator"] + w * (ctrl.rate_mean ** 2 - ctrl.rate_var / ctrl.n)
    phi_f = _pooled(xp, num, den)
    cnt = xp.where(s["comparisons"] > 0, s["comparisons"], 1.0)
    spread = s["phi_sq"] / cnt - 2.0 * phi_f * s["phi"] / cnt + phi_f * phi_f
    sampling = 2.0 * (phi_f * phi_f * s["inv_df"] + 2.0 * phi_f * s["a_df"] + s["a_sq_df"]) / cnt
    tau2 = xp.maximum(spread - sampling, 0.0)
    return {"feature_dispersion": phi_f, "dispersion_spread": tau2,
            "outlier_groups": s["outliers"], "pooled_groups": s["groups"]}


def _sums_block(counts, size_factor, control_counts, control_size_factor):
    p_b, g_b, r = counts.shape
    out = feature_sums(counts, size_factor.reshape(p_b, r), control_counts.reshape(g_b, -1),
                       control_size_factor)
    return out[None, ...]


def feature_dispersion(cube: xr.Dataset) -> xr.Dataset:
    """Run the pooling pass over a validated cube; returns per-feature variables (computed).

    Variables (feature,): ``feature_log_dispersion`` (log phi_f), ``feature_dispersion_spread``
    (tau^2), ``feature_outlier_groups`` (treated groups left out of the pool).
    """
    counts = cube["counts"]
    side = [cube[v].drop_vars(list(cube[v].coords)) for v in
            ("size_factor", "control_counts", "control_size_factor")]
    if counts.chunks is not None:
        chunks = dict(zip(counts.dims, counts.chunks))
        side = [v.chunk({d: chunks.get(d, -1) for d in v.dims}) for v in side]
        import dask.array as da

        blocks = da.blockwise(
            _sums_block, "bkg",
            counts.data, "bgr", side[0].data, "br", side[1].data, "gc", side[2].data, "c",
            new_axes={"k": len(SUMS)}, concatenate=True, dtype=np.float64,
            adjust_chunks={"b": 1},
        )
        sums = to_host(blocks.sum(axis=0).compute())
    else:
        sums = to_host(_sums_block(counts.data, *(v.data for v in side))[0])
    out = combine(sums, host_values(cube["control_counts"]), host_values(cube["control_size_factor"]))
    coords = {FEATURE: cube[FEATURE]} if FEATURE in cube.coords else {}
    return xr.Dataset(
        {
            "feature_log_dispersion": (FEATURE, np.log(out["feature_dispersion"]).astype(np.float32)),
            "feature_dispersion_spread": (FEATURE, out["dispersion_spread"]),
            "feature_outlier_groups": (FEATURE, out["outlier_groups"].astype(np.int64)),
        },
        coords=coords,
    )


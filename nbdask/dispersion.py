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
from scipy.special import chdtri

from .cache import widen
from .kernels.backend import device, is_host, namespaces, to_host
from .kernels.moments import GroupMoments, block_moments, group_moments, poisson_term
from .kernels.mom import DISPERSION_CEILING, MIN_DISPERSION, ZERO_GROUP_COUNT, group_rates
from .moderation import Evidence, fit_trend, moderate
from .schema import FEATURE, NODE, host_arrays

DISPERSIONS = ("comparison", "feature", "shrunk")
#: Groups whose Pearson statistic exceeds this chi-square quantile are left out of the pool.
OUTLIER_LEVEL = 0.999
OUTLIER_ROUNDS = 2
#: Perturbations whose over-dispersion score across a block's features exceeds the block median
#: by this many scaled MADs are left out of every feature's pool.
WILD_MADS = 5.0
MIN_FEATURES = 20
#: Screening needs this many perturbations: with fewer, a treated group left out of the pool is a
#: large part of its own feature's evidence, and its comparison would be tested without it.
MIN_SCREENED_PERTURBATIONS = 8
_CHI2 = chdtri(np.arange(1, 128), 1.0 - OUTLIER_LEVEL)  # chi2.ppf(OUTLIER_LEVEL, df), by df - 1

#: Rows of the per-block partial sums (axis 0 of ``feature_sums``); ``sum_rows`` adds one
#: ``excess_<n>`` row per treated group size n = 2 ... R. The rows from ``poisson`` on are the
#: evidence ``moderation`` borrows across features with (over the kept groups, but ``mean_rate``
#: and ``samples`` over every group with a present replicate).
SUMS = ("numerator", "denominator", "groups", "outliers", "phi", "phi_sq", "inv_df", "a_df",
        "a_sq_df", "comparisons", "poisson", "dof", "square", "mean_rate", "samples",
        "var0", "var1", "var2", "var3")
EVIDENCE_ROWS = SUMS[SUMS.index("poisson"):]
DISPERSION_PRIORS = ("trend", "none")


def sum_rows(replicates: int) -> tuple[str, ...]:
    """Names of the rows ``feature_sums`` returns for a cube of ``replicates`` treated replicates."""
    return SUMS + tuple(f"excess_{n}" for n in range(2, max(replicates, 1) + 1))


def _pooled(xp, num, den):
    return xp.clip(xp.where(den > 0, num / xp.where(den > 0, den, 1.0), MIN_DISPERSION),
                   MIN_DISPERSION, DISPERSION_CEILING)


def evidence_rows(xp, m, keep, mean_size_factor, replicates):
    """The EVIDENCE_ROWS and ``excess_<n>`` rows (n = 2 ... ``replicates``) of groups with
    moments ``m`` ([..., G] rates; n, mean(1/l) and ``mean_size_factor`` broadcastable), summed
    over the leading axis where ``keep`` ([..., G] bool): a list of [G] arrays.

    With w = n - 1, a = q bar mean(1/l), b = q bar^2 and mean size factor l: ``poisson`` = w a,
    ``square`` = w b, ``var0..3`` the coefficients of Var(w s2) = 2 w sigma^4 + w^2/n kappa
    sigma^4 as a cubic in phi (sigma^2 = a + phi b, NB excess kurtosis kappa = 6 phi +
    1 / (m (1 + phi m)), m = q bar l), ``excess_<n>`` = w (b - a / n)_+ for groups of n.
    """
    n = m.n + xp.zeros_like(m.rate_mean)
    q = m.rate_mean
    w = xp.maximum(n - 1.0, 0.0)
    a = q * m.inv_size_factor
    b = q * q
    inv_l = 1.0 / (mean_size_factor + xp.zeros_like(q))
    wn = w * w / xp.maximum(n, 1.0)

    def kept(x):
        return xp.sum(xp.where(keep, x, 0.0), axis=0)

    seen = n > 0
    return [kept(w * a), kept(w), kept(w * b),
            xp.sum(xp.where(seen, n * q, 0.0), axis=0), xp.sum(xp.where(seen, n, 0.0), axis=0),
            kept(2.0 * w * a * a + wn * q * inv_l * inv_l * inv_l),
            kept(4.0 * w * a * b + wn * (6.0 * a * a + b * inv_l * inv_l)),
            kept(2.0 * w * b * b + 12.0 * wn * a * b), kept(6.0 * wn * b * b)] + [
        kept(xp.where(n == size, w * xp.maximum(b - a / size, 0.0), 0.0))
        for size in range(2, replicates + 1)]


def feature_sums(counts, size_factor, control_counts, control_size_factor, *, screen=True):
    """Partial per-feature sums of one block: array [len(sum_rows(R)), G_b] (float64)."""
    xp, _ = namespaces(counts, size_factor, control_counts, control_size_factor)
    fused = _fused(xp)
    if fused is not None:
        return _feature_sums_fused(fused, counts, size_factor, control_counts, control_size_factor,
                                   screen)
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
    for _ in range(OUTLIER_ROUNDS if screen else 0):
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
    mean_sf = trt.library / xp.maximum(trt.n, 1.0)
    rows += evidence_rows(xp, trt, keep, mean_sf, counts.shape[-1])
    return xp.stack([xp.broadcast_to(r, rows[0].shape) for r in rows])


def _screen(xp, pearson, n_t, valid):
    """Groups kept in the pool: valid, Pearson statistic under the chi-square limit, and not in
    an over-dispersed perturbation ([P_b, G_b] bool)."""
    return valid & (pearson <= _outlier_limit(xp, n_t)) & ~_wild_perturbations(xp, pearson, n_t, valid)


def _outlier_limit(xp, n_t):
    """The chi-square quantile (OUTLIER_LEVEL, n - 1 df) for groups of ``n_t`` replicates,
    shaped like ``n_t``."""
    df_index = xp.astype(xp.clip(n_t - 2.0, 0, 126), xp.int64)
    return xp.reshape(xp.take(xp.asarray(_CHI2, dtype=xp.float64, device=device(n_t)),
                              xp.reshape(df_index, (-1,))), n_t.shape)


def _feature_sums_fused(fused, counts, size_factor, control_counts, control_size_factor, screen):
    """``feature_sums`` for NumPy blocks: the [P_b, G_b] work in numba loops (``dispersion_fused``),
    the same sums without the array temporaries."""
    f64 = np.float64
    sf = np.asarray(size_factor, f64)
    csf = np.asarray(control_size_factor, f64)
    present = np.isfinite(sf)
    ctrl = group_moments(np, control_counts, csf, np.ones(csf.shape, dtype=bool))
    per = group_moments(np, np.zeros(present.shape, dtype=f64), np.where(present, sf, 1.0), present)
    n_t, inv_t, library_t = per.n, per.inv_size_factor, per.library  # [P_b]
    shape = counts.shape[:2]
    rate_mean, rate_var = np.empty(shape), np.empty(shape)
    fused.pooling_terms(counts, sf, rate_mean, rate_var)
    w = max(ctrl.n - 1.0, 0.0)
    num_c = w * (ctrl.rate_var - ctrl.rate_mean * ctrl.inv_size_factor)
    den_c = w * (ctrl.rate_mean * ctrl.rate_mean - ctrl.rate_var / max(ctrl.n, 1.0))
    valid = (n_t >= 2)[:, None] & (rate_mean > 0)
    keep = valid
    num, den, pearson = np.empty(shape[1]), np.empty(shape[1]), np.empty(shape)
    total, groups = np.empty(shape[0]), np.empty(shape[0])
    limit = _outlier_limit(np, n_t)
    for _ in range(OUTLIER_ROUNDS if screen else 0):
        fused.kept_sums(rate_mean, rate_var, n_t, inv_t, keep, num, den)
        fused.pearson_statistics(counts, sf, rate_mean, _pooled(np, num + num_c, den + den_c),
                                 valid, pearson, total, groups)
        keep = np.empty(shape, dtype=bool)
        fused.screened(pearson, valid, limit, _wild(np, total, groups, n_t), keep)
    phi_c, w_c = _group_phi(np, ctrl)
    rate_c = np.where(ctrl.rate_mean > 0, ctrl.rate_mean, ZERO_GROUP_COUNT / ctrl.library)
    inv_l = np.sum(np.where(present, 1.0 / np.where(present, sf, 1.0), 0.0), axis=-1)
    out = np.empty((len(sum_rows(counts.shape[-1])), shape[1]))
    fused.pooling_rows(keep, valid, rate_mean, rate_var, n_t, inv_t, library_t, inv_l,
                       phi_c, np.broadcast_to(w_c, phi_c.shape).astype(f64), rate_c,
                       np.sum(1.0 / csf) / rate_c, float(csf.shape[0]), out)
    return out


def _fused(xp):
    """The numba helpers for host blocks (None for CuPy or without numba)."""
    if not is_host(xp):
        return None
    try:
        from . import dispersion_fused as fused
    except ImportError:
        return None
    return fused


def _wild_perturbations(xp, pearson, n_t, valid):
    """Perturbations over-dispersed across the block's features: [P_b, 1] bool.

    A perturbation's score is its Pearson statistic per degree of freedom summed over the
    block's features; scores above median + WILD_MADS x (scaled MAD) of the block's scores are
    flagged. Needs at least MIN_FEATURES valid groups per perturbation to say anything.
    """
    groups = xp.sum(xp.astype(valid, xp.float64), axis=1)
    return _wild(xp, xp.sum(xp.where(valid, pearson, 0.0), axis=1), groups, n_t[:, 0])[:, None]


def _wild(xp, total, groups, n_t):
    """``_wild_perturbations`` from each perturbation's summed Pearson statistics over its
    valid groups, their number and its replicates ([P_b] each): [P_b] bool."""
    df = xp.maximum(n_t - 1.0, 1.0)
    score = total / (xp.where(groups > 0, groups, 1.0) * df)
    usable = groups >= MIN_FEATURES
    ranked = xp.sort(xp.where(usable, score, xp.inf))
    n = xp.sum(xp.astype(usable, xp.int64))
    half = xp.astype(xp.maximum(n - 1, 0) // 2, xp.int64)
    median = xp.take(ranked, xp.reshape(half, (1,)))[0]
    spread = xp.sort(xp.where(usable, xp.abs(score - median), xp.inf))
    mad = 1.4826 * xp.take(spread, xp.reshape(half, (1,)))[0]
    return usable & (n >= 8) & (score > median + WILD_MADS * mad)


def _group_phi(xp, m):
    """Unfloored per-group moment dispersion and its weight n - 1 (0 without signal)."""
    signal = m.rate_mean > 0
    safe = xp.where(signal, m.rate_mean, 1.0)
    phi = (m.rate_var - safe * m.inv_size_factor) / (safe * safe)
    return xp.where(signal, phi, 0.0), xp.where(signal, xp.maximum(m.n - 1.0, 0.0), 0.0)


def _control(xp, control_counts, control_size_factor):
    """The control group's moments and its (numerator, denominator) terms [G]."""
    ctrl = group_moments(xp, control_counts, xp.astype(control_size_factor, xp.float64),
                         xp.ones_like(control_size_factor, dtype=xp.bool))
    w = xp.maximum(ctrl.n - 1.0, 0.0)
    return (ctrl, w * (ctrl.rate_var - ctrl.rate_mean * ctrl.inv_size_factor),
            w * (ctrl.rate_mean ** 2 - ctrl.rate_var / ctrl.n))


def spread(xp, sums, phi_f):
    """tau^2: the between-perturbation variance of the comparisons' moment dispersions around
    ``phi_f`` [G], their sampling variance taken out (floored at 0)."""
    s = {name: sums[i, ...] for i, name in enumerate(SUMS)}
    cnt = xp.where(s["comparisons"] > 0, s["comparisons"], 1.0)
    around = s["phi_sq"] / cnt - 2.0 * phi_f * s["phi"] / cnt + phi_f * phi_f
    sampling = 2.0 * (phi_f * phi_f * s["inv_df"] + 2.0 * phi_f * s["a_df"] + s["a_sq_df"]) / cnt
    return xp.maximum(around - sampling, 0.0)


def combine(sums, control_counts, control_size_factor) -> dict[str, np.ndarray]:
    """Per-feature pooled dispersion (bounded; 0 where no group informs it) and between-
    perturbation variance from the summed partials."""
    xp, _ = namespaces(sums)
    s = {name: sums[i, ...] for i, name in enumerate(SUMS)}
    _, num_c, den_c = _control(xp, control_counts, control_size_factor)
    num, den = s["numerator"] + num_c, s["denominator"] + den_c
    phi_f = _pooled(xp, num, den)
    return {"feature_dispersion": phi_f, "dispersion_spread": spread(xp, sums, phi_f),
            "informed": den > 0, "outlier_groups": s["outliers"], "pooled_groups": s["groups"]}


def evidence(sums, control_counts, control_size_factor, reference_size: float) -> Evidence:
    """Each feature's evidence (``moderation.Evidence``) from the summed partials and the
    control group (host arrays); ``reference_size`` turns mean rates into mean counts."""
    s = {name: sums[i] for i, name in enumerate(SUMS)}
    excess = sums[len(SUMS):]
    ctrl, num_c, den_c = _control(np, control_counts, control_size_factor)
    n_c = int(ctrl.n)
    keep_c = ((n_c >= 2) & (ctrl.rate_mean > 0))[None, :]
    moments = GroupMoments(ctrl.n, ctrl.library, ctrl.inv_size_factor, ctrl.rate_mean[None, :],
                           ctrl.rate_var[None, :])
    rows_c = evidence_rows(np, moments, keep_c, ctrl.library / max(n_c, 1), n_c)
    c = dict(zip(EVIDENCE_ROWS, rows_c))
    sizes = max(excess.shape[0], len(rows_c) - len(EVIDENCE_ROWS))
    excess_all = np.zeros((sizes, sums.shape[1]))
    excess_all[:excess.shape[0]] += excess
    excess_all[:len(rows_c) - len(EVIDENCE_ROWS)] += np.asarray(rows_c[len(EVIDENCE_ROWS):])
    total = {k: s[k] + c[k] for k in EVIDENCE_ROWS}
    numerator, denominator = s["numerator"] + num_c, s["denominator"] + den_c
    samples = total["samples"]
    mean = np.where(samples > 0, total["mean_rate"] / np.where(samples > 0, samples, 1.0), 0.0)
    return Evidence(variance=numerator + total["poisson"], poisson=total["poisson"],
                    excess=excess_all, numerator=numerator, denominator=denominator,
                    square=total["square"],
                    moments4=np.stack([total[f"var{i}"] for i in range(4)]), dof=total["dof"],
                    mean=mean * reference_size)


def _sums_block(counts, size_factor, control_counts, control_size_factor, screen=True):
    p_b, g_b, r = counts.shape
    out = feature_sums(widen(counts), size_factor.reshape(p_b, r), control_counts.reshape(g_b, -1),
                       control_size_factor, screen=screen)
    return out[None, ...]


def feature_dispersion(cube: xr.Dataset, *, prior: str = "trend") -> xr.Dataset:
    """Run the pooling pass over a validated cube; returns per-feature variables (computed).

    Variables (feature,): ``feature_log_dispersion`` (the dispersion the tests use: with
    ``prior="trend"`` the posterior mean of log phi under the trend prior, see
    ``nbdask.moderation``; with ``"none"`` the pooled log phi_f, the trend where no group
    informs it), ``feature_log_dispersion_sd``, ``feature_log_dispersion_trend``,
    ``feature_base_mean``, ``feature_dispersion_spread`` (tau^2), ``feature_outlier_groups``;
    with ``"trend"`` also ``feature_dispersion_nodes`` and ``feature_dispersion_weights``
    (feature, dispersion_node): the posterior's nodes and their weights.
    """
    counts = cube["counts"]
    side = [cube[v].drop_vars(list(cube[v].coords)) for v in
            ("size_factor", "control_counts", "control_size_factor")]
    rows = sum_rows(counts.shape[-1])
    screen = counts.shape[0] >= MIN_SCREENED_PERTURBATIONS
    if counts.chunks is not None:
        chunks = dict(zip(counts.dims, counts.chunks))
        side = [v.chunk({d: chunks.get(d, -1) for d in v.dims}) for v in side]
        import dask.array as da

        blocks = da.blockwise(
            _sums_block, "bkg",
            counts.data, "bgr", side[0].data, "br", side[1].data, "gc", side[2].data, "c",
            new_axes={"k": len(rows)}, concatenate=True, dtype=np.float64,
            adjust_chunks={"b": 1}, screen=screen,
        )
        sums = blocks.sum(axis=0)
    else:
        sums = _sums_block(counts.data, *(v.data for v in side), screen)[0]
    # the small inputs come back in the same round trip as the sums
    sums, control_counts, control_size_factor, sf = host_arrays(
        sums, cube["control_counts"], cube["control_size_factor"], cube["size_factor"])
    control_size_factor = control_size_factor.astype(np.float64)
    out = combine(sums, control_counts, control_size_factor)
    sf = sf.astype(np.float64)
    sizes = np.concatenate([control_size_factor, sf[np.isfinite(sf)]])
    ev = evidence(sums, control_counts, control_size_factor, float(np.exp(np.mean(np.log(sizes)))))
    attrs = {"dispersion_prior": prior}
    if prior == "trend":
        fit = moderate(ev)
        log_phi, log_sd, log_trend = fit["log_dispersion"], fit["log_dispersion_sd"], fit["log_dispersion_trend"]
        tau2 = spread(np, sums, np.exp(log_phi))
        attrs.update({"dispersion_prior_shift": fit["prior"].shift,
                      "dispersion_prior_scale": fit["prior"].scale,
                      "dispersion_prior_df": fit["prior"].df})
    else:
        log_trend = fit_trend(ev)(ev.mean)
        log_phi = np.where(out["informed"], np.log(out["feature_dispersion"]), log_trend)
        log_sd, tau2 = np.zeros_like(log_phi), spread(np, sums, np.exp(log_phi))
    coords = {FEATURE: cube[FEATURE]} if FEATURE in cube.coords else {}
    variables = {
        "feature_log_dispersion": (FEATURE, log_phi.astype(np.float32)),
        "feature_log_dispersion_sd": (FEATURE, log_sd.astype(np.float32)),
        "feature_log_dispersion_trend": (FEATURE, log_trend.astype(np.float32)),
        "feature_base_mean": (FEATURE, ev.mean),
        "feature_dispersion_spread": (FEATURE, tau2),
        "feature_outlier_groups": (FEATURE, out["outlier_groups"].astype(np.int64)),
    }
    if prior == "trend":
        variables["feature_dispersion_nodes"] = ((FEATURE, NODE), fit["nodes"].astype(np.float32))
        variables["feature_dispersion_weights"] = ((FEATURE, NODE), fit["node_weights"])
    return xr.Dataset(variables, coords=coords, attrs=attrs)

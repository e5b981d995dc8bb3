"""Independent filtering: leave features too sparse to reach significance out of the FDR step.

Features with a low mean count can hardly reject, yet each of their comparisons counts in the m
of Benjamini–Hochberg. As DESeq2's ``results(independentFiltering = TRUE)`` does (Bourgon, Gentleman
& Huber 2010, PNAS 107:9546), the FDR step keeps only the features whose mean normalised count
over every sample (``feature_base_mean``, from the pooling pass) reaches a threshold chosen among
the FILTER_QUANTILES of the features' means by DESeq2's rule: count the rejections at q <
FILTER_ALPHA for each candidate, smooth the counts over the quantiles by lowess (span 1/5, three
robustness rounds, as R's ``lowess``), and take the lowest quantile whose count exceeds the
smooth curve's maximum less the residuals' root mean square; no filter where no candidate
rejects more than MIN_REJECTIONS (a handful of rejections is noise, and the maximum of noise is
not a threshold). The filter statistic uses both groups and no labels, so under the null it is
independent of the test statistic and BH keeps its guarantee on the kept comparisons. Filtered
comparisons keep their p-value; their q-value is NaN.

Choosing the threshold needs, for every candidate, the number of BH rejections: each block counts
its p-values by filter level and by a log-spaced p grid (HIST_BINS bins of 1/HIST_PER_DECADE
decade down to 10^-HIST_DECADES), and from the summed counts F_j(t) at the grid points t the
rejections are max{F_j(t) : F_j(t) >= m_j t / alpha}, BH's count on that grid.
"""

from __future__ import annotations

import numpy as np

#: Candidate thresholds: these quantiles of the features' mean counts (DESeq2's grid).
FILTER_QUANTILES = np.linspace(0.0, 0.95, 50)
#: The threshold is chosen by the BH rejections at this level (DESeq2's default alpha).
FILTER_ALPHA = 0.1
MIN_REJECTIONS = 10
#: p-values below 10^-HIST_DECADES share the grid's lowest bin (they are rejected whenever BH
#: rejects anything among up to 1e11 tests).
HIST_DECADES = 12
HIST_PER_DECADE = 25
HIST_BINS = HIST_DECADES * HIST_PER_DECADE + 1
LEVELS = len(FILTER_QUANTILES) + 1  # a feature's level: how many thresholds its mean reaches
#: The p grid: a p-value counts in the bin of the first grid point t >= p.
GRID = 10.0 ** (np.arange(HIST_BINS) / HIST_PER_DECADE - HIST_DECADES)


def thresholds(base_mean: np.ndarray) -> np.ndarray:
    """Candidate mean-count thresholds: FILTER_QUANTILES of the finite, positive means."""
    mean = np.asarray(base_mean, dtype=np.float64)
    mean = mean[np.isfinite(mean) & (mean > 0)]
    if mean.size == 0:
        return np.zeros(len(FILTER_QUANTILES))
    return np.quantile(mean, FILTER_QUANTILES)


def levels(base_mean: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Each feature's level (int8): the number of thresholds its mean reaches (0 for NaN/0)."""
    mean = np.nan_to_num(np.asarray(base_mean, dtype=np.float64), nan=0.0)
    level = np.searchsorted(cuts, mean, side="right")
    return np.where(mean > 0, level, 0).astype(np.int8)


def histogram(p: np.ndarray, feature_level: np.ndarray) -> np.ndarray:
    """Counts of a [P_b, G_b] block's finite p-values by (level of its feature, p grid bin):
    [LEVELS * HIST_BINS] int64, flattened (blocks sum)."""
    from .fdr_fused import level_histogram

    p, level, out = _histogram_inputs(p, feature_level)
    level_histogram(p, level, GRID, out)
    return out


def counts_and_histogram(p: np.ndarray, feature_level: np.ndarray) -> np.ndarray:
    """The FDR counts of a [P_b, G_b] block (``fdr._chunk_counts``) followed by its
    ``histogram``, in one pass over its p-values (the estimates pass's block tasks)."""
    from .fdr import LAMBDAS, N_KEYS, SHIFT, counts_row
    from .fdr_fused import block_counts

    p, level, hist = _histogram_inputs(p, feature_level)
    row = counts_row(*block_counts(p, level, GRID, SHIFT, N_KEYS, LAMBDAS, hist), p.size)
    return np.concatenate([row, hist])


def _histogram_inputs(p, feature_level):
    """(p as a contiguous 2-D float64 block, each column's level as int64, zeroed counts)."""
    p = np.asarray(p, dtype=np.float64)
    p = p.reshape(-1, p.shape[-1]) if p.ndim else p.reshape(1, 1)
    level = np.broadcast_to(np.asarray(feature_level, np.int64).reshape(-1), p.shape[-1:])
    return (np.ascontiguousarray(p), np.ascontiguousarray(level),
            np.zeros(LEVELS * HIST_BINS, np.int64))


def rejections(hist: np.ndarray, alpha: float = FILTER_ALPHA) -> np.ndarray:
    """BH rejections at ``alpha`` on the p grid for each candidate threshold j (keeping the
    features of level > j): [len(FILTER_QUANTILES)] int64."""
    per_level = np.asarray(hist, dtype=np.int64).reshape(LEVELS, HIST_BINS)
    kept = np.cumsum(per_level[::-1], axis=0)[::-1][1:]  # [j] counts over levels > j
    cdf = np.cumsum(kept, axis=1)
    m = cdf[:, -1:]
    ok = cdf * alpha >= m * GRID[None, :]
    return np.max(np.where(ok, cdf, 0), axis=1)


def choose(hist: np.ndarray) -> int:
    """The candidate index by DESeq2's rule (module docstring); 0 (no filter) without signal."""
    counts = rejections(hist).astype(np.float64)
    if counts.max() <= MIN_REJECTIONS:
        return 0
    fit = lowess(FILTER_QUANTILES, counts)
    residual = (counts - fit)[counts > 0]
    above = np.flatnonzero(counts > fit.max() - np.sqrt(np.mean(residual ** 2)))
    return int(above[0]) if above.size else 0


def lowess(x: np.ndarray, y: np.ndarray, *, span: float = 0.2, rounds: int = 3) -> np.ndarray:
    """Cleveland's robust locally weighted linear fit at the points x (sorted): R's ``lowess``
    with ``f = span``, ``iter = rounds`` and no interpolation shortcut."""
    n = len(x)
    k = max(2, int(np.ceil(span * n)))
    robust = np.ones(n)
    fit = np.empty(n)
    for _ in range(rounds + 1):
        for i in range(n):
            dist = np.abs(x - x[i])
            h = np.sort(dist)[k - 1]
            w = np.clip(1 - (dist / (h if h > 0 else 1.0)) ** 3, 0, None) ** 3 * robust
            sw = w.sum()
            mx, my = (w * x).sum() / sw, (w * y).sum() / sw
            var = (w * (x - mx) ** 2).sum()
            slope = (w * (x - mx) * (y - my)).sum() / var if var > 0 else 0.0
            fit[i] = my + slope * (x[i] - mx)
        residual = y - fit
        scale = 6.0 * np.median(np.abs(residual))
        if scale <= 0:
            break
        robust = np.clip(1 - (residual / scale) ** 2, 0, None) ** 2
    return fit


def keep_mask(feature_level: np.ndarray, chosen: int) -> np.ndarray:
    """Features that pass the chosen threshold: [G] bool."""
    return np.asarray(feature_level) > chosen


def summary(base_mean, hist: np.ndarray, chosen: int) -> dict:
    """The attrs a results store records about the filter."""
    cuts = thresholds(base_mean)
    kept = np.asarray(hist).reshape(LEVELS, HIST_BINS)[chosen + 1:].sum()
    return {"filter_threshold": float(cuts[chosen]), "filter_quantile": float(FILTER_QUANTILES[chosen]),
            "n_filtered": int(np.asarray(hist).sum() - kept)}


def histogram_graph(p, feature_level: np.ndarray):
    """The summed ``histogram`` of a (perturbation, feature) dask array of p-values (lazy)."""
    import dask.array as da

    lv = da.from_array(np.asarray(feature_level), chunks=(p.chunks[1],))
    parts = da.map_blocks(lambda block, lb: histogram(block, lb)[None, None, :], p, lv[None, :],
                          new_axis=2, chunks=(tuple(1 for _ in p.chunks[0]), tuple(1 for _ in p.chunks[1]),
                                              (LEVELS * HIST_BINS,)),
                          dtype=np.int64, meta=np.empty((0, 0, 0), np.int64))
    return parts.sum(axis=(0, 1))


def filter_p(p_value, base_mean):
    """p-values for the FDR step and what the filter did: comparisons of features below the
    chosen threshold become NaN. A NumPy-backed input is filtered at once (``info`` dict); a
    dask-backed one lazily (``info`` None: ``save_results`` records it from its own pass)."""
    import xarray as xr

    from .schema import FEATURE

    feature_level = levels(base_mean, thresholds(base_mean))
    if p_value.chunks is None:
        hist = histogram(p_value.values, feature_level)
        chosen = choose(hist)
        keep = xr.DataArray(keep_mask(feature_level, chosen), dims=FEATURE)
        return p_value.where(keep), summary(base_mean, hist, chosen)
    import dask
    import dask.array as da

    chosen = dask.delayed(choose)(histogram_graph(p_value.data, feature_level))
    keep = da.from_delayed(dask.delayed(keep_mask)(feature_level, chosen), shape=feature_level.shape,
                           dtype=bool).rechunk((p_value.chunks[1],))
    return p_value.where(xr.DataArray(keep, dims=FEATURE)), None

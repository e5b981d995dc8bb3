"""The studies' one set of metrics: accuracy against the truth, rejection rates with standard
errors, uniformity of null p-values, power at a matched false-positive rate, FDP at a q cut.

Comparisons of one feature share its control group (and, for the pooled modes, its dispersion
estimate), so they are not independent: standard errors of rates treat features as clusters
(the cluster-robust variance of a mean), which is the binomial SE when comparisons are
independent and larger when they are not.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

#: Mean-count bins (expected count per sample at the mean size factor), lower edges inclusive.
BIN_EDGES = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, math.inf)
LEVELS = (0.05, 0.01)


def bin_label(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}" if math.isfinite(hi) else f">={lo:g}"


BIN_LABELS = tuple(bin_label(lo, hi) for lo, hi in zip(BIN_EDGES[:-1], BIN_EDGES[1:]))


def mean_count_bins(mean_count: np.ndarray) -> np.ndarray:
    """Bin label of each mean count (same shape, dtype object)."""
    idx = np.clip(np.searchsorted(BIN_EDGES, mean_count, side="right") - 1, 0, len(BIN_LABELS) - 1)
    return np.asarray(BIN_LABELS, dtype=object)[idx]


def rate(hits: np.ndarray, cluster: np.ndarray) -> tuple[float, float]:
    """Mean of boolean ``hits`` and its cluster-robust standard error (clusters: ``cluster``)."""
    hits = np.asarray(hits, float).ravel()
    cluster = np.asarray(cluster).ravel()
    n = hits.size
    if n == 0:
        return math.nan, math.nan
    r = float(hits.mean())
    _, inverse = np.unique(cluster, return_inverse=True)
    k = int(inverse.max()) + 1
    resid = np.bincount(inverse, weights=hits - r, minlength=k)
    if k < 2:
        return r, math.sqrt(r * (1 - r) / n)
    return r, math.sqrt(float(np.sum(resid ** 2)) * k / (k - 1)) / n


def rejection(p: np.ndarray, level: float, cluster: np.ndarray) -> tuple[float, float]:
    """Fraction of comparisons with p < level (no p-value = not rejected) and its SE."""
    p = np.asarray(p, float)
    return rate(np.isfinite(p) & (p < level), cluster)


def ks_uniform(p: np.ndarray) -> float:
    """Kolmogorov–Smirnov distance of the finite p-values from Uniform(0, 1)."""
    p = np.asarray(p, float).ravel()
    p = p[np.isfinite(p)]
    return float(stats.kstest(p, "uniform").statistic) if p.size else math.nan


def matched_threshold(p_null: np.ndarray, fpr: float = 0.05) -> float:
    """The p cut at which the null p-values reject a fraction ``fpr`` of all null comparisons
    (a comparison without a p-value never rejects)."""
    p = np.asarray(p_null, float).ravel()
    finite = np.sort(p[np.isfinite(p)])
    k = int(math.floor(fpr * p.size))
    if k == 0 or finite.size == 0:
        return 0.0
    if k > finite.size:
        return 1.0
    return float(finite[k - 1])


def fdp_power(q: np.ndarray, null: np.ndarray, level: float,
              cluster: np.ndarray) -> tuple[float, float, int, float]:
    """(false discovery proportion, power, discoveries, SE of the FDP) at q < level against
    the truth. The SE is the cluster-robust one of a ratio (false / all discoveries summed per
    cluster): false discoveries come in bursts when one feature's dispersion is misjudged."""
    q = np.asarray(q, float)
    hit = np.isfinite(q) & (q < level)
    n_hit = int(hit.sum())
    false = hit & null
    fdp = float(false.sum() / n_hit) if n_hit else 0.0
    alt = ~null
    power = float((hit & alt).sum() / alt.sum()) if alt.any() else math.nan
    _, inverse = np.unique(np.asarray(cluster).ravel(), return_inverse=True)
    k = int(inverse.max()) + 1
    resid = np.bincount(inverse, weights=(false.astype(float) - fdp * hit).ravel(), minlength=k)
    se = math.sqrt(float(np.sum(resid ** 2)) * k / max(k - 1, 1)) / n_hit if n_hit else math.nan
    return fdp, power, n_hit, se


def errors(estimate: dict, truth: dict, mask: np.ndarray) -> dict:
    """MAE and bias of mu, beta and alpha hats over ``mask``: ``{"mae_mu": ..., "bias_mu": ...}``."""
    out = {}
    for short, key in (("mu", "log_base_mean"), ("beta", "log_fold_change"), ("alpha", "log_dispersion")):
        d = (estimate[key] - truth[key])[mask]
        out[f"mae_{short}"] = float(np.mean(np.abs(d))) if d.size else math.nan
        out[f"bias_{short}"] = float(np.mean(d)) if d.size else math.nan
    return out


def qq_points(p: np.ndarray, n_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(expected, observed) -log10 p for a QQ plot, thinned to about ``n_points`` quantiles."""
    p = np.sort(np.asarray(p, float)[np.isfinite(p)])
    if p.size == 0:
        return np.empty(0), np.empty(0)
    expected = (np.arange(1, p.size + 1) - 0.5) / p.size
    # Keep every point in the tail, where the eye reads calibration, and thin the bulk.
    idx = np.unique(np.concatenate([np.arange(min(p.size, 50)),
                                    np.geomspace(1, p.size, n_points).astype(int) - 1]))
    return -np.log10(expected[idx]), -np.log10(np.maximum(p[idx], 1e-300))

"""Size factors of pseudobulk (or bulk) samples, from the cube's counts.

With K_gj the count of feature g in sample j (every present treated replicate and every control
replicate is a sample; absent replicates take no part) and n the number of samples:

- ``"ratio"``: DESeq2's median of ratios. log g_g = (1/n) sum_j log K_gj, over the features
  with K_gj > 0 in every sample; s_j = exp(median_g(log K_gj - log g_g)).
- ``"poscounts"``: DESeq2's variant for sparse data. log g_g = (1/n) sum_{j: K_gj > 0} log K_gj
  over features with any positive count; s_j = exp(median over those g with K_gj > 0 of
  (log K_gj - log g_g)), then scaled to geometric mean 1 over the samples.
- ``"total"``: library size, s_j = N_j / exp(mean_j log N_j) with N_j = sum_g K_gj.

The counts may be a Zarr-backed dask array of any size: the per-feature means are one
reduction, and the per-sample medians read stripes of perturbations across all features.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from ..errors import OptionError, SourceError

METHODS = ("ratio", "poscounts", "total")
#: Bytes of float64 per stripe when the median needs every feature of a sample at once.
STRIPE_BYTES = 64 * 2**20


def check_option(size_factors, n_units: int, unit: str):
    """A method name, or the user's values as a float64 array of one value per ``unit``."""
    if isinstance(size_factors, str):
        if size_factors not in METHODS:
            raise OptionError(f"size_factors={size_factors!r}: use one of {', '.join(METHODS)} "
                              f"or an array with one value per {unit}")
        return size_factors
    values = np.asarray(size_factors, dtype=np.float64).reshape(-1)
    if values.size != n_units:
        raise OptionError(f"size_factors: got {values.size} values, expected one per {unit} "
                          f"({n_units})")
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        raise OptionError(f"size_factors: {int(bad.sum())} value(s) are not finite and > 0 "
                          f"(first at {unit} {int(np.flatnonzero(bad)[0])}: "
                          f"{values[bad][0]}); give every {unit} a positive size factor")
    return values


def from_values(values: np.ndarray, row: np.ndarray, present: np.ndarray, n_control: int):
    """User size factors: each replicate gets the sum of its cells' (or its sample's) values."""
    n_pert, n_rep = present.shape
    used = row >= 0
    sums = np.bincount(row[used], values[used], minlength=n_pert * n_rep + n_control)
    sf = sums[:n_pert * n_rep].reshape(n_pert, n_rep)
    return np.where(present, sf, np.nan), sums[n_pert * n_rep:]


def _stripe(counts: da.Array) -> da.Array:
    """``counts`` with the feature axis whole and as many perturbations as fit a stripe."""
    n_g, n_r = counts.shape[1], counts.shape[2]
    rows = max(1, STRIPE_BYTES // (8 * n_g * max(n_r, 1)))
    return counts.rechunk({0: min(rows, counts.shape[0]), 1: -1, 2: -1})


def _median_log_ratio(k, log_geo_mean):
    """Per sample (axes 0 and 2 of ``k``: [p, feature, r]) the median over usable features of
    log K - log geometric mean; NaN where no feature is usable."""
    k = np.asarray(k, dtype=np.float64)
    usable = np.isfinite(log_geo_mean)[None, :, None] & (k > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(usable, np.log(k) - log_geo_mean[None, :, None], np.nan)
    out = np.full((k.shape[0], k.shape[2]), np.nan)
    has = usable.any(axis=1)
    if has.any():
        ratio = np.moveaxis(ratio, 1, -1)[has]
        out[has] = np.nanmedian(ratio, axis=-1)
    return out


def _log_sums(counts, control, present):
    """Per feature: sum of log K over samples with K > 0, and how many samples have K > 0."""
    mask = da.from_array(present[:, None, :], chunks=(counts.chunks[0], 1, -1))
    positive = (counts > 0) & mask
    with np.errstate(divide="ignore"):
        logs = da.where(positive, da.log(da.maximum(counts, 1).astype(np.float64)), 0.0)
        control_logs = da.where(control > 0, da.log(da.maximum(control, 1).astype(np.float64)), 0.0)
    return (logs.sum(axis=(0, 2)) + control_logs.sum(axis=1),
            positive.sum(axis=(0, 2)) + (control > 0).sum(axis=1))


def compute(counts: da.Array, control: da.Array, present: np.ndarray, method: str, *,
            scheduler=None, names=None):
    """(size_factor [P, R] with NaN at absent replicates, control_size_factor [C]) as NumPy.

    ``counts`` [P, G, R] and ``control`` [G, C] are dask arrays (any chunks); computes on
    ``scheduler`` (default: the active one). Raises ``SourceError`` when a sample's factor is
    undefined, naming it by ``names`` = (perturbation [P], replicate sample [P, R], control
    sample [C]) when given.
    """
    n_samples = int(present.sum()) + control.shape[1]
    if method == "total":
        totals = da.where(da.from_array(present, chunks=(counts.chunks[0], -1)),
                          counts.sum(axis=1), 0)
        sf, csf = (np.asarray(a, dtype=np.float64) for a in dask.compute(totals, control.sum(axis=0),
                                                                  scheduler=scheduler))
        sf = np.where(present, sf, np.nan)
        _check(sf, csf, present, method, "no counts at all", names)
        return _unit_geometric_mean(sf, csf, present)
    log_sum, n_positive = (np.asarray(a) for a in dask.compute(*_log_sums(counts, control, present),
                                                              scheduler=scheduler))
    if method == "ratio":
        log_geo_mean = np.where(n_positive == n_samples, log_sum / n_samples, -np.inf)
        if not np.isfinite(log_geo_mean).any():
            raise SourceError(
                f"size_factors='ratio': every feature has a zero count in at least one of the "
                f"{n_samples} samples, so DESeq2's geometric means are all zero; use "
                f"size_factors='poscounts' (DESeq2's choice for sparse data) or 'total'")
    else:
        log_geo_mean = np.where(n_positive > 0, log_sum / n_samples, -np.inf)
    treated = da.map_blocks(_median_log_ratio, _stripe(counts), log_geo_mean, drop_axis=1,
                            dtype=np.float64, meta=np.empty((0, 0), np.float64))
    controls = da.map_blocks(_median_log_ratio, control.rechunk(-1)[None], log_geo_mean,
                             drop_axis=1, dtype=np.float64, meta=np.empty((0, 0), np.float64))
    med, control_med = dask.compute(treated, controls, scheduler=scheduler)
    sf = np.where(present, np.exp(med), np.nan)
    csf = np.exp(control_med[0])
    _check(sf, csf, present, method, "no feature with a positive count there and a positive "
           "geometric mean", names)
    if method == "poscounts":
        sf, csf = _unit_geometric_mean(sf, csf, present)
    return sf, csf


def _unit_geometric_mean(sf, csf, present):
    log_mean = (np.log(sf[present]).sum() + np.log(csf).sum()) / (present.sum() + csf.size)
    scale = np.exp(log_mean)
    return sf / scale, csf / scale


def _check(sf, csf, present, method, problem, names):
    bad_t = present & ~(np.isfinite(sf) & (sf > 0))
    bad_c = ~(np.isfinite(csf) & (csf > 0))
    if not (bad_t.any() or bad_c.any()):
        return
    if bad_t.any():
        p, r = (int(i) for i in np.argwhere(bad_t)[0])
        first = (f"perturbation {str(names[0][p])!r}, sample {str(names[1][p, r])!r}" if names
                 else f"treated replicate {r} of perturbation {p}")
    else:
        c = int(np.flatnonzero(bad_c)[0])
        first = f"control sample {str(names[2][c])!r}" if names else f"control replicate {c}"
    raise SourceError(f"size_factors={method!r}: undefined for {int(bad_t.sum() + bad_c.sum())} "
                      f"sample(s), first {first}: {problem}; drop such samples (raise min_cells) "
                      f"or use another size_factors method")

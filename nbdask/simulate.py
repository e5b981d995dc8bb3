"""NB2 count cubes with known truth, generated block by block so any size fits in memory."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from .errors import OptionError
from .schema import (CONTROL_REPLICATE, FEATURE, INPUTS, PERTURBATION, REPLICATE, TRUTH)

#: Default expected-count distribution: log-normal, median 4, clipped to [0.1, 1000].
BASE_MEAN_MEDIAN, BASE_MEAN_LOG_SD, BASE_MEAN_RANGE = 4.0, 1.2, (0.1, 1000.0)
#: Default dispersion distribution: log-normal, median 0.1, clipped to [0.005, 5].
DISPERSION_MEDIAN, DISPERSION_LOG_SD, DISPERSION_RANGE = 0.1, 0.8, (0.005, 5.0)
#: Size factors: log-normal around 1 with this log-scale standard deviation.
SIZE_FACTOR_LOG_SD = 0.3
#: True effects: |log fold change| uniform on this range, random sign.
EFFECT_RANGE = (0.5, 2.5)


def _draw(rng, n, *, median, log_sd, bounds, given):
    """log-normal(median, log_sd) clipped to ``bounds``; log-uniform on ``given`` if set."""
    if given is not None:
        lo, hi = given
        if not 0 < lo <= hi:
            raise OptionError(f"range {given}: need 0 < low <= high")
        return np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    return np.clip(np.exp(rng.normal(np.log(median), log_sd, n)), *bounds)


def simulate(*, perturbations: int, features: int, replicates: int = 4,
             control_replicates: int = 8, effect_fraction: float = 0.1,
             ragged_fraction: float = 0.1, base_mean: tuple[float, float] | None = None,
             dispersion: tuple[float, float] | None = None, seed: int = 0,
             chunks: int | tuple[int, int] = 1024) -> xr.Dataset:
    """Simulate a count cube (lazy, dask-backed) with its ground truth.

    Parameters
    ----------
    perturbations, features, replicates, control_replicates
        Cube shape; ``replicates`` is the most treated replicates a perturbation has.
    effect_fraction
        Fraction of comparisons with a true effect, |log fold change| ~ U(0.5, 2.5).
    ragged_fraction
        Fraction of perturbations with fewer present replicates, U{2..replicates}; the absent
        ones have NaN size factors and zero counts.
    base_mean, dispersion
        (low, high) ranges for log-uniform expected counts per unit size factor and NB2
        dispersions per feature; by default log-normal, median 4 (0.1–1000) and 0.1 (0.005–5).
    seed
        Reproducibility: the same seed, shape and chunks give the same cube.
    chunks
        Dask chunk (and later shard) size along perturbation and feature.

    Returns
    -------
    Dataset with ``counts`` [P, G, R] int32, ``size_factor`` [P, R], ``control_counts`` [G, C]
    int32, ``control_size_factor`` [C] and ``true_log_base_mean``, ``true_log_fold_change``,
    ``true_log_dispersion``.
    """
    if replicates < 1 or control_replicates < 2:
        raise OptionError("replicates must be >= 1 and control_replicates >= 2")
    if not 0 <= effect_fraction <= 1 or not 0 <= ragged_fraction <= 1:
        raise OptionError("effect_fraction and ragged_fraction must lie in [0, 1]")
    chunk_p, chunk_g = (chunks, chunks) if isinstance(chunks, int) else chunks
    chunk_p, chunk_g = min(chunk_p, perturbations), min(chunk_g, features)
    rng = np.random.default_rng([seed, 0])
    mean = _draw(rng, features, median=BASE_MEAN_MEDIAN, log_sd=BASE_MEAN_LOG_SD,
                 bounds=BASE_MEAN_RANGE, given=base_mean)
    phi = _draw(rng, features, median=DISPERSION_MEDIAN, log_sd=DISPERSION_LOG_SD,
                bounds=DISPERSION_RANGE, given=dispersion)
    size_factor = np.exp(rng.normal(0.0, SIZE_FACTOR_LOG_SD, (perturbations, replicates)))
    ragged = rng.random(perturbations) < ragged_fraction
    n_present = np.where(ragged, rng.integers(min(2, replicates), replicates + 1, perturbations),
                         replicates)
    size_factor[np.arange(replicates)[None, :] >= n_present[:, None]] = np.nan
    control_sf = np.exp(rng.normal(0.0, SIZE_FACTOR_LOG_SD, control_replicates))
    control_counts = _nb(rng, mean[:, None] * control_sf[None, :], phi[:, None])

    params = dict(seed=seed, effect_fraction=effect_fraction, log_mean=np.log(mean),
                  phi=phi, size_factor=size_factor)
    grid = ((_split(perturbations, chunk_p), _split(features, chunk_g)))
    lfc = da.map_blocks(_lfc_block, dtype=np.float32, chunks=grid, meta=np.empty((0, 0), np.float32),
                        **params)
    counts = da.map_blocks(_counts_block, dtype=np.int32, chunks=grid + ((replicates,),),
                           meta=np.empty((0, 0, 0), np.int32), **params)
    pf = (PERTURBATION, FEATURE)
    ds = xr.Dataset(
        {
            "counts": (INPUTS["counts"].dims, counts),
            "size_factor": ((PERTURBATION, REPLICATE),
                            da.from_array(size_factor, chunks=(chunk_p, replicates))),
            "control_counts": ((FEATURE, CONTROL_REPLICATE),
                               da.from_array(control_counts, chunks=(chunk_g, control_replicates))),
            "control_size_factor": (CONTROL_REPLICATE, control_sf),
            "true_log_base_mean": (FEATURE, np.log(mean).astype(np.float32)),
            "true_log_fold_change": (pf, lfc),
            "true_log_dispersion": (FEATURE, np.log(phi).astype(np.float32)),
        },
        coords={PERTURBATION: _labels("P", perturbations), FEATURE: _labels("G", features)},
        attrs={"nbdask_simulation": (f"seed={seed} effect_fraction={effect_fraction} "
                                     f"ragged_fraction={ragged_fraction} base_mean={base_mean} "
                                     f"dispersion={dispersion}")},
    )
    for name, spec in {**INPUTS, **TRUTH}.items():
        ds[name].attrs.update(spec.attrs())
    return ds


def _labels(prefix: str, n: int) -> np.ndarray:
    width = len(str(max(n - 1, 0)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)])


def _split(n: int, size: int) -> tuple[int, ...]:
    return (size,) * (n // size) + ((n % size,) if n % size else ())


def _nb(rng, mean, phi):
    """NB2 draws with Var = m + phi m^2 (gamma–Poisson mixture)."""
    return rng.poisson(rng.gamma(1.0 / phi, phi * mean)).astype(np.int32)


def _block_truth(block_info, *, seed, effect_fraction):
    loc = block_info[None]["array-location"]
    (p0, p1), (g0, g1) = loc[0], loc[1]
    rng = np.random.default_rng([seed, 1, p0, g0])
    shape = (p1 - p0, g1 - g0)
    effect = rng.random(shape) < effect_fraction
    magnitude = rng.uniform(*EFFECT_RANGE, shape) * rng.choice([-1.0, 1.0], shape)
    return rng, (slice(p0, p1), slice(g0, g1)), np.where(effect, magnitude, 0.0)


def _lfc_block(block_info=None, *, seed, effect_fraction, **_):
    return _block_truth(block_info, seed=seed, effect_fraction=effect_fraction)[2].astype(np.float32)


def _counts_block(block_info=None, *, seed, effect_fraction, log_mean, phi, size_factor):
    rng, (ps, gs), lfc = _block_truth(block_info, seed=seed, effect_fraction=effect_fraction)
    sf = size_factor[ps]
    present = np.isfinite(sf)
    rate = np.exp(log_mean[gs][None, :] + lfc)
    mean = rate[:, :, None] * np.where(present, sf, 0.0)[:, None, :]
    counts = _nb(rng, np.maximum(mean, 1e-300), phi[gs][None, :, None])
    return np.where(present[:, None, :], counts, 0).astype(np.int32)

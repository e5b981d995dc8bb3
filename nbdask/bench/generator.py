"""The one generator behind ``nbdask bench`` and ``nbdask calibrate``: NB2 count cubes with truth.

``nb_cube`` draws counts for any design (per-feature rates and dispersions, per-comparison log
fold changes, size factors with NaN for absent replicates). ``paper_cube`` fixes the parameters
of the paper's study as far as they are known (shared/reference/nb-paper.md §7–§8); where the
paper is silent the choice is ours and is listed here:

- design "n vs n": n control and n treated replicates, all present, n = 2..10 (the paper's range);
- shape: a small screen, ``SCREEN_WIDTH`` = 20 perturbations share each feature and its control
  group, so nbdask's pooled dispersion modes have 20 treated groups plus the control to borrow
  from; the paper's per-comparison methods see one comparison at a time, as in the paper;
- mean count per sample, per feature: the shipped transformer's training prior (70% log-uniform
  on 0.1–10, 30% on 10–1000; ``nbdask.train.prior.PRIOR``), the paper's "small counts" regime;
  the paper's own validation draws from its training prior as far as its scripts show;
- dispersion per feature: log-uniform on 0.01–10 (the same prior);
- size factors: log-normal around 1, log-SD 0.3 per sample (``nbdask.simulate``'s);
- log fold change: accuracy draws 50% exactly 0 and 50% N(0, 1) per comparison (the prior);
  calibration 0; power a fixed positive beta per perturbation;
- counts: gamma–Poisson, Var = m + phi m^2.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ..schema import CONTROL_REPLICATE, FEATURE, INPUTS, PERTURBATION, REPLICATE, TRUTH
from ..simulate import SIZE_FACTOR_LOG_SD, _labels, _nb
from ..train.prior import PRIOR

#: Perturbations that share one feature (and its control group) in the paper-study cubes.
SCREEN_WIDTH = 20


def nb_cube(rng: np.random.Generator, *, rate, dispersion, log_fold_change, size_factor,
            control_size_factor) -> xr.Dataset:
    """An in-memory count cube drawn from NB2 with the given truth.

    Parameters
    ----------
    rate, dispersion
        [G] control rate per unit size factor (expected count at size factor 1) and NB2 phi.
    log_fold_change
        [P, G] natural-log fold change of each comparison.
    size_factor, control_size_factor
        [P, R] (NaN = absent replicate) and [C].
    """
    rate, phi = np.asarray(rate, float), np.asarray(dispersion, float)
    lfc = np.asarray(log_fold_change, float)
    sf, csf = np.asarray(size_factor, float), np.asarray(control_size_factor, float)
    present = np.isfinite(sf)
    mean = (rate[None, :] * np.exp(lfc))[:, :, None] * np.where(present, sf, 0.0)[:, None, :]
    counts = np.where(present[:, None, :], _nb(rng, np.maximum(mean, 1e-300), phi[None, :, None]), 0)
    control = _nb(rng, rate[:, None] * csf[None, :], phi[:, None])
    p, g = lfc.shape
    ds = xr.Dataset(
        {
            "counts": (INPUTS["counts"].dims, counts.astype(np.int32)),
            "size_factor": ((PERTURBATION, REPLICATE), sf),
            "control_counts": ((FEATURE, CONTROL_REPLICATE), control.astype(np.int32)),
            "control_size_factor": (CONTROL_REPLICATE, csf),
            "true_log_base_mean": (FEATURE, np.log(rate).astype(np.float32)),
            "true_log_fold_change": ((PERTURBATION, FEATURE), lfc.astype(np.float32)),
            "true_log_dispersion": (FEATURE, np.log(phi).astype(np.float32)),
        },
        coords={PERTURBATION: _labels("P", p), FEATURE: _labels("G", g)},
    )
    for name, spec in {**INPUTS, **TRUTH}.items():
        ds[name].attrs.update(spec.attrs())
    return ds


def prior_rates(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] mean counts per unit size factor from the prior's two-part log-uniform mixture."""
    m = PRIOR["mean_count"]
    low = rng.random(n) < m["p_low"]
    return np.exp(np.where(low, rng.uniform(*np.log(m["low"]), n), rng.uniform(*np.log(m["high"]), n)))


def prior_dispersions(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] NB2 dispersions, log-uniform over the prior's range."""
    return np.exp(rng.uniform(*np.log(PRIOR["dispersion"]), n))


def size_factors(rng: np.random.Generator, shape) -> np.ndarray:
    """Log-normal size factors around 1 (log-SD ``nbdask.simulate.SIZE_FACTOR_LOG_SD``)."""
    return np.exp(rng.normal(0.0, SIZE_FACTOR_LOG_SD, shape))


def paper_cube(rng: np.random.Generator, *, replicates: int, comparisons: int,
               beta: str | float | np.ndarray = "prior") -> xr.Dataset:
    """A design "n vs n" cube: SCREEN_WIDTH perturbations share each feature.

    ``beta``: ``"prior"`` (50% 0, 50% N(0, 1) per comparison) or a number (every comparison):
    at least ``comparisons`` comparisons in all; or K values (the power grid): SCREEN_WIDTH // K
    perturbations per value, each value covering at least ``comparisons`` comparisons.
    """
    if isinstance(beta, str):
        p = SCREEN_WIDTH
        g = math.ceil(comparisons / p)
        b = PRIOR["beta"]
        lfc = np.where(rng.random((p, g)) < b["p_null"], 0.0, b["sd"] * rng.standard_normal((p, g)))
    elif np.ndim(beta) == 0:
        p, g = SCREEN_WIDTH, math.ceil(comparisons / SCREEN_WIDTH)
        lfc = np.full((p, g), float(beta))
    else:
        values = np.asarray(beta, float)
        # Every beta value gets SCREEN_WIDTH perturbations' worth of each feature, so the pooled
        # modes see the same screen width at every effect size.
        per = max(1, SCREEN_WIDTH // len(values)) if len(values) < SCREEN_WIDTH else 1
        p = per * len(values)
        g = math.ceil(comparisons / per)
        lfc = np.repeat(values, per)[:, None] * np.ones((1, g))
    return nb_cube(rng, rate=prior_rates(rng, g), dispersion=prior_dispersions(rng, g),
                   log_fold_change=lfc, size_factor=size_factors(rng, (p, replicates)),
                   control_size_factor=size_factors(rng, replicates))


def screen_cube(rng: np.random.Generator, *, perturbations: int, features: int, replicates: int,
                control_replicates: int, ragged_fraction: float = 0.0,
                mean_range: tuple[float, float] = (0.5, 20.0),
                dispersion_range: tuple[float, float] = (0.02, 1.0),
                effect_fraction: float = 0.0) -> xr.Dataset:
    """A screen-shaped cube: log-uniform rates and dispersions per feature, a fraction of ragged
    perturbations (U{2..replicates} present), ``effect_fraction`` of the comparisons with
    |beta| ~ U(0.5, 2.5) and a random sign (``nbdask.simulate``'s effects)."""
    from ..simulate import EFFECT_RANGE

    sf = size_factors(rng, (perturbations, replicates))
    ragged = rng.random(perturbations) < ragged_fraction
    n_present = np.where(ragged, rng.integers(min(2, replicates), replicates + 1, perturbations), replicates)
    sf[np.arange(replicates)[None, :] >= n_present[:, None]] = np.nan
    shape = (perturbations, features)
    effect = rng.random(shape) < effect_fraction
    lfc = np.where(effect, rng.uniform(*EFFECT_RANGE, shape) * rng.choice([-1.0, 1.0], shape), 0.0)
    return nb_cube(rng, rate=np.exp(rng.uniform(*np.log(mean_range), features)),
                   dispersion=np.exp(rng.uniform(*np.log(dispersion_range), features)),
                   log_fold_change=lfc, size_factor=sf,
                   control_size_factor=size_factors(rng, control_replicates))

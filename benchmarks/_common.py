"""Shared helpers for the benchmark scripts: cached cubes, timing, statsmodels baseline."""

from __future__ import annotations

import os
import platform
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("NBDASK_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))


@contextmanager
def timer(label: str, results: dict):
    start = time.perf_counter()
    yield
    results[label] = time.perf_counter() - start


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def cached_cube(perturbations: int, features: int, *, replicates=4, control_replicates=8,
                shards=1024, seed=1) -> str:
    """Simulate once into the benchmark cache; return the Zarr path."""
    import nbdask

    path = CACHE / f"cube_{perturbations}x{features}x{replicates}v{control_replicates}_s{shards}_seed{seed}.zarr"
    if not (path / "zarr.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        cube = nbdask.simulate(perturbations=perturbations, features=features, replicates=replicates,
                               control_replicates=control_replicates, seed=seed, chunks=shards)
        nbdask.save_cube(cube, str(path), overwrite=True)
    return str(path)


def statsmodels_fits(cube, n: int = 200, seed: int = 0) -> tuple[float, int]:
    """Seconds per statsmodels discrete NegativeBinomial fit over ``n`` random comparisons."""
    from statsmodels.discrete.discrete_model import NegativeBinomial

    rng = np.random.default_rng(seed)
    n_p, n_g = cube.sizes["perturbation"], cube.sizes["feature"]
    ctrl = cube["control_counts"].values
    csf = cube["control_size_factor"].values
    picks = [(int(rng.integers(n_p)), int(rng.integers(n_g))) for _ in range(n)]
    data = []
    for i, j in picks:
        sf = cube["size_factor"].values[i]
        keep = np.isfinite(sf)
        y = np.concatenate([ctrl[j], cube["counts"].values[i, j][keep]]).astype(float)
        x = np.concatenate([np.zeros(len(csf)), np.ones(keep.sum())])
        exposure = np.concatenate([csf, sf[keep]])
        data.append((y, np.column_stack([np.ones_like(x), x]), exposure))
    failures = 0
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for y, X, exposure in data:
            try:
                fit = NegativeBinomial(y, X, exposure=exposure).fit(method="newton", maxiter=200, disp=0)
                failures += not fit.mle_retvals.get("converged", False)
            except Exception:
                failures += 1
    return (time.perf_counter() - start) / n, failures

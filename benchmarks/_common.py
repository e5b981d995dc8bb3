"""Shared helpers for the benchmark scripts: cached cubes, timing, the statsmodels baseline."""

from __future__ import annotations

import os
import platform
import time
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
    """Seconds per statsmodels fit (the paper's default fit, ``nbdask.bench.methods``) over
    ``n`` random comparisons of ``cube``, and how many failed."""
    from nbdask.bench.methods import cube_arrays, statsmodels_block

    rng = np.random.default_rng(seed)
    counts, sf, control, csf = cube_arrays(cube)
    rows = rng.choice(counts.shape[0], min(n, counts.shape[0]), replace=False)
    cols = rng.choice(counts.shape[1], max(1, n // len(rows)), replace=False)
    sub = counts[np.ix_(rows, cols)], sf[rows], control[cols], csf
    start = time.perf_counter()
    fits = statsmodels_block(*sub)
    done = sub[0].shape[0] * sub[0].shape[1]
    return (time.perf_counter() - start) / done, int((~fits["success"]).sum())

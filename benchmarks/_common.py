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


INPUTS = ("counts", "size_factor", "control_counts", "control_size_factor")


def cube_arguments(ap, *, size: int, shards: int) -> None:
    """The options every in-memory-vs-pipeline benchmark takes: cube size, shards, workers, fits."""
    ap.add_argument("--perturbations", type=int, default=size)
    ap.add_argument("--features", type=int, default=size)
    ap.add_argument("--shards", type=int, default=shards)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--statsmodels-fits", type=int, default=200)


def loaded_cube(args):
    """``(path, cube, arrays, head)``: the cached cube, loaded, its kernel inputs, and the inputs
    of its first two perturbations (to compile kernels before timing)."""
    import nbdask

    path = cached_cube(args.perturbations, args.features, shards=args.shards)
    cube = nbdask.open_cube(path).load()
    arrays = [cube[v].values for v in INPUTS]
    head = [x[:2] if k in (0, 1) else x for k, x in enumerate(arrays)]
    return path, cube, arrays, head


def pipeline_seconds(path: str, *, workers: int, warm_perturbations: int, **options) -> float:
    """Wall time of ``nbdask.test(**options)`` + ``save_results`` Zarr -> Zarr on a fresh
    LocalCluster, after a warm-up run on the first perturbations (compiles, loads weights)."""
    import shutil
    import tempfile

    import nbdask
    from distributed import Client
    from nbdask.cluster import local_cluster

    out_dir = tempfile.mkdtemp(prefix="nbdask-bench-")
    try:
        with local_cluster(workers=workers) as cluster, Client(cluster) as client:
            warm = nbdask.test(nbdask.open_cube(path).isel(perturbation=slice(0, warm_perturbations)),
                               **options)
            warm["p_value"].data.sum().compute()
            start = time.perf_counter()
            nbdask.save_results(nbdask.test(nbdask.open_cube(path), **options), out_dir + "/r.zarr",
                                client=client)
            return time.perf_counter() - start
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


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

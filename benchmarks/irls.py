"""Batched IRLS vs statsmodels, side by side on the same comparisons.

Prints statsmodels' discrete NegativeBinomial time per fit (a sample of fits), nbdask's IRLS
time per comparison in memory (fused numba and array-API kernels) and through the full
pipeline (Zarr -> IRLS + BH -> Zarr on a LocalCluster), the ratios, and the agreement of the
estimates with statsmodels on the sampled comparisons.

    python benchmarks/irls.py --perturbations 1000 --features 1000 --workers 2
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np

from nbdask.kernels.fused import irls_fused
from nbdask.kernels.irls import irls_kernel

from _common import cube_arguments, loaded_cube, machine, pipeline_seconds, timer


def statsmodels_sample(cube, out, n, seed=0):
    """Time statsmodels on ``n`` random comparisons; return per-fit seconds and agreement."""
    from statsmodels.discrete.discrete_model import NegativeBinomial

    rng = np.random.default_rng(seed)
    ctrl, csf = cube["control_counts"].values, cube["control_size_factor"].values
    counts, sf = cube["counts"].values, cube["size_factor"].values
    data = []
    for _ in range(n):
        i, j = int(rng.integers(counts.shape[0])), int(rng.integers(counts.shape[1]))
        keep = np.isfinite(sf[i])
        y = np.concatenate([ctrl[j], counts[i, j][keep]]).astype(float)
        x = np.concatenate([np.zeros(len(csf)), np.ones(keep.sum())])
        data.append(((i, j), y, np.column_stack([np.ones_like(x), x]), np.concatenate([csf, sf[i][keep]])))
    fits = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, y, X, ex in data:
            try:
                fits.append(NegativeBinomial(y, X, exposure=ex).fit(method="newton", maxiter=200, disp=0))
            except Exception:
                fits.append(None)
    per_fit = (time.perf_counter() - start) / n
    worst = {"beta": 0.0, "log_phi": 0.0}
    failed = compared = 0
    for ((i, j), *_), fit in zip(data, fits):
        if fit is None or not fit.mle_retvals.get("converged", False):
            failed += 1
            continue
        if fit.params[2] > 1e-4 and out["converged"][i, j]:
            compared += 1
            worst["beta"] = max(worst["beta"], abs(float(out["log_fold_change"][i, j]) - fit.params[1]))
            worst["log_phi"] = max(worst["log_phi"], abs(float(out["log_dispersion"][i, j]) - math.log(fit.params[2])))
    return per_fit, failed, compared, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cube_arguments(ap, size=1000, shards=500)
    ap.add_argument("--array-sample", type=int, default=100,
                    help="perturbations of the cube timed with the (slow on CPU) array-API kernel")
    args = ap.parse_args()

    path, cube, a, head = loaded_cube(args)
    n = args.perturbations * args.features
    t: dict[str, float] = {}
    irls_fused(*head)  # compile
    with timer("fused", t):
        out = irls_fused(*a)
    sub = [a[0][:args.array_sample], a[1][:args.array_sample], a[2], a[3]]
    with timer("array", t):
        irls_kernel(*sub)
    n_sub = args.array_sample * args.features
    t["pipeline"] = pipeline_seconds(path, workers=args.workers, warm_perturbations=args.shards,
                                     method="irls", dispersion="comparison")
    per_fit, failed, compared, worst = statsmodels_sample(cube, out, args.statsmodels_fits)
    fused_per, array_per, pipe_per = t["fused"] / n, t["array"] / n_sub, t["pipeline"] / n
    print(f"nbdask IRLS benchmark ({machine()}, {args.workers} workers)")
    print(f"cube: {args.perturbations} x {args.features} = {n:,} comparisons, 4 vs 8 replicates")
    print(f"statsmodels NegativeBinomial (newton)  {per_fit * 1e3:9.3f} ms/fit ({args.statsmodels_fits} fits, {failed} failed)")
    print(f"nbdask IRLS fused kernel, in memory    {fused_per * 1e6:9.3f} us/comparison ({out['iterations'].mean():.1f} iterations on average)")
    print(f"nbdask IRLS array-API kernel, in memory{array_per * 1e6:9.3f} us/comparison ({n_sub:,} comparisons)")
    print(f"nbdask IRLS pipeline Zarr -> Zarr      {pipe_per * 1e6:9.3f} us/comparison ({t['pipeline']:.1f} s)")
    print("ratios (statsmodels time per fit / nbdask time per comparison)")
    print(f"  fused kernel   {per_fit / fused_per:10,.0f}x")
    print(f"  array kernel   {per_fit / array_per:10,.0f}x")
    print(f"  pipeline       {per_fit / pipe_per:10,.0f}x")
    print(f"agreement on {compared} sampled comparisons with statsmodels phi > 1e-4: "
          f"max |d beta| {worst['beta']:.2e}, max |d log phi| {worst['log_phi']:.2e}")


if __name__ == "__main__":
    main()

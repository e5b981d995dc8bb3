"""Dispersion modes side by side: calibration, power at matched FPR, and the pooling pass's cost.

Prints, per design and per mean-count bin, the false-positive rate at p < 0.05 and 0.01 on
all-null cubes and the power at a matched empirical FPR of 0.05 on cubes with 20% true effects,
for each dispersion mode and method; then the wall time of a MoM run with and without the
pooling pass on a larger cube (Zarr -> results Zarr on a LocalCluster) and their ratio.

    python benchmarks/dispersion.py --perturbations 300 --features 1000 --scale 5000
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile

import numpy as np

import nbdask
from nbdask.cluster import local_cluster

from _common import cached_cube, machine, timer

DESIGNS = {"3v3": (3, 3, 0.0), "5v5": (5, 5, 0.0), "3v8": (3, 8, 0.0), "ragged2-6v4": (6, 4, 1.0)}
BINS = ((0.5, 2), (2, 5), (5, 20))
MODES = ("comparison", "feature", "shrunk")
#: (dispersion, test) runs of the wall-time comparison: the pooling pass, then the test's cost.
RUNS = (("comparison", "wald"), ("feature", "wald"), ("shrunk", "wald"), ("feature", "auto"),
        ("feature", "exact"))


def cube_for(design, p, g, effects, seed):
    r, c, ragged = DESIGNS[design]
    return nbdask.simulate(perturbations=p, features=g, replicates=r, control_replicates=c,
                           effect_fraction=effects, ragged_fraction=ragged, base_mean=(0.5, 20),
                           dispersion=(0.02, 1.0), seed=seed, chunks=max(p, g)).load()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--perturbations", type=int, default=300)
    ap.add_argument("--features", type=int, default=1000)
    ap.add_argument("--methods", nargs="+", default=["mom", "irls"])
    ap.add_argument("--tests", nargs="+", default=["wald", "auto"], help="tests to tabulate")
    ap.add_argument("--scale", type=int, default=5000, help="P = G of the wall-time cube")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--wall-time-only", action="store_true", help="skip the calibration/power tables")
    args = ap.parse_args()
    print(f"nbdask dispersion-mode benchmark ({machine()})")
    if not args.wall_time_only:
        tables(args)
    wall_times(args)


def tables(args) -> None:
    print(f"calibration/power cubes: {args.perturbations} x {args.features}, mean counts 0.5-20, phi 0.02-1")
    header = f"{'design':<12}{'method':<6}{'test':<6}{'mode':<11}{'FPR.05':>8}{'FPR.01':>8}{'power':>8} | " + \
        "  ".join(f"FPR.05[{lo},{hi})" for lo, hi in BINS) + " | " + "  ".join(f"pow[{lo},{hi})" for lo, hi in BINS)
    print(header)
    for design in DESIGNS:
        null = cube_for(design, args.perturbations, args.features, 0.0, 1)
        alt = cube_for(design, args.perturbations, args.features, 0.2, 2)
        mean_null = np.exp(null["true_log_base_mean"].values)
        mean_alt = np.exp(alt["true_log_base_mean"].values)
        truth = alt["true_log_fold_change"].values
        for method, test, mode in itertools.product(args.methods, args.tests, MODES):
            p0 = nbdask.test(null, method=method, test=test, dispersion=mode, fdr="none")["p_value"].values
            p1 = nbdask.test(alt, method=method, test=test, dispersion=mode, fdr="none")["p_value"].values
            null_alt = (truth == 0) & np.isfinite(p1)
            thr = np.quantile(p1[null_alt], 0.05)
            effect = (truth != 0) & np.isfinite(p1)
            fpr_bins = [np.nanmean(p0[:, (mean_null >= lo) & (mean_null < hi)] < 0.05) for lo, hi in BINS]
            pow_bins = []
            for lo, hi in BINS:
                sel = effect & ((mean_alt >= lo) & (mean_alt < hi))[None, :]
                pow_bins.append(np.mean(p1[sel] <= thr) if sel.any() else np.nan)
            print(f"{design:<12}{method:<6}{test:<6}{mode:<11}{np.nanmean(p0 < 0.05):8.4f}{np.nanmean(p0 < 0.01):8.4f}"
                  f"{np.mean(p1[effect] <= thr):8.4f} | " + "  ".join(f"{v:13.4f}" for v in fpr_bins)
                  + " | " + "  ".join(f"{v:10.4f}" for v in pow_bins))


def wall_times(args) -> None:
    from distributed import Client

    path = cached_cube(args.scale, args.scale, shards=min(2048, args.scale))
    out = tempfile.mkdtemp(prefix="nbdask-bench-")
    t: dict[str, float] = {}
    try:
        with local_cluster(workers=args.workers) as cluster, Client(cluster) as client:
            small = nbdask.open_cube(path).isel(perturbation=slice(0, 2048))
            nbdask.test(small, dispersion="feature")["p_value"].data.sum().compute()  # warm up
            for mode, test in RUNS:
                with timer(f"{mode}/{test}", t):
                    nbdask.save_results(nbdask.test(nbdask.open_cube(path), dispersion=mode, test=test),
                                        f"{out}/{mode}-{test}.zarr", client=client)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    n = args.scale * args.scale
    print(f"wall time, MoM, {n:,} comparisons, Zarr -> Zarr, {args.workers} workers:")
    base = t["comparison/wald"]
    for key in (f"{m}/{x}" for m, x in RUNS):
        print(f"  {key:<16}{t[key]:8.1f} s   ratio to comparison/wald {t[key] / base:.2f}x")


if __name__ == "__main__":
    main()

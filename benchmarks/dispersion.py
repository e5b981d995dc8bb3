"""Dispersion modes side by side: calibration, power at matched FPR, and the pooling pass's cost.

Prints, per design and per mean-count bin, the false-positive rate at p < 0.05 and 0.01 on
all-null cubes and the power at a matched empirical FPR of 0.05 on cubes with 20% true effects,
for each dispersion mode and method; then the wall time of a MoM run with and without the
pooling pass on a larger cube (Zarr -> results Zarr on a LocalCluster) and their ratio. The
cubes come from the benchmark generator and the rates from its metrics (``nbdask.bench``); for
a design fitted from your own cube, run ``nbdask calibrate``.

    python benchmarks/dispersion.py --perturbations 300 --features 1000 --scale 5000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile

import numpy as np

import nbdask
from nbdask.bench import generator, metrics
from nbdask.bench.methods import all_combinations, run_nbdask
from nbdask.cluster import local_cluster

from _common import cached_cube, machine, timer

DESIGNS = {"3v3": (3, 3, 0.0), "5v5": (5, 5, 0.0), "3v8": (3, 8, 0.0), "ragged2-6v4": (6, 4, 1.0)}
BINS = ((0.5, 2), (2, 5), (5, 20))
#: (dispersion, test) runs of the wall-time comparison: the pooling pass, then the test's cost.
RUNS = (("comparison", "wald"), ("feature", "wald"), ("shrunk", "wald"), ("feature", "auto"),
        ("feature", "exact"))


def cube_for(design, p, g, effects, seed):
    """The benchmark generator's screen cube (nbdask.bench.generator): means 0.5-20, phi 0.02-1."""
    r, c, ragged = DESIGNS[design]
    return generator.screen_cube(np.random.default_rng(seed), perturbations=p, features=g,
                                 replicates=r, control_replicates=c, ragged_fraction=ragged,
                                 effect_fraction=effects)


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
    """FPR (null cube) and power at matched FPR 0.05 (20% effects) of every dispersion mode,
    with the metrics of ``nbdask bench`` (nbdask.bench.metrics)."""
    print(f"calibration/power cubes: {args.perturbations} x {args.features}, mean counts 0.5-20, phi 0.02-1")
    header = f"{'design':<12}{'setting':<28}{'FPR.05':>8}{'FPR.01':>8}{'power':>8} | " + \
        "  ".join(f"FPR.05[{lo},{hi})" for lo, hi in BINS) + " | " + "  ".join(f"pow[{lo},{hi})" for lo, hi in BINS)
    print(header)
    settings = [s for s in all_combinations() if s.method in args.methods and s.opts["test"] in args.tests
                and s.opts.get("dispersion_fit", "ml") == "ml"]
    for design in DESIGNS:
        null = cube_for(design, args.perturbations, args.features, 0.0, 1)
        alt = cube_for(design, args.perturbations, args.features, 0.2, 2)
        feat = np.broadcast_to(np.arange(args.features)[None, :], (args.perturbations, args.features))
        mean_null = np.exp(null["true_log_base_mean"].values)[None, :]
        mean_alt = np.exp(alt["true_log_base_mean"].values)[None, :]
        truth = alt["true_log_fold_change"].values
        for s in settings:
            p0 = run_nbdask(null, s)["p_value"]
            p1 = run_nbdask(alt, s)["p_value"]
            cut = metrics.matched_threshold(p1[truth == 0])
            effect = truth != 0
            fpr_bins = [metrics.rejection(p0[:, sel[0]], 0.05, feat[:, sel[0]])[0]
                        for sel in (((mean_null >= lo) & (mean_null < hi)) for lo, hi in BINS)]
            pow_bins = [metrics.rate((p1 <= cut)[effect & sel], feat[effect & sel])[0]
                        for sel in (((mean_alt >= lo) & (mean_alt < hi)) for lo, hi in BINS)]
            print(f"{design:<12}{s.label:<28}{metrics.rejection(p0, 0.05, feat)[0]:8.4f}"
                  f"{metrics.rejection(p0, 0.01, feat)[0]:8.4f}{metrics.rate((p1 <= cut)[effect], feat[effect])[0]:8.4f} | "
                  + "  ".join(f"{v:13.4f}" for v in fpr_bins) + " | " + "  ".join(f"{v:10.4f}" for v in pow_bins))


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

"""Throughput of the core pipeline, measured side by side in one run.

Prints: raw Zarr read of the counts, MoM kernel in memory, the full pipeline Zarr -> MoM ->
exact BH -> results Zarr on a LocalCluster, and statsmodels' per-fit time, with the ratios.

    python benchmarks/throughput.py --perturbations 2000 --features 2000 --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile

import dask.array as da
import zarr

import nbdask
from nbdask.cluster import local_cluster
from nbdask.kernels.mom.fused import mom_fused
from nbdask.kernels.mom import mom_kernel

from _common import cached_cube, machine, statsmodels_fits, timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--perturbations", type=int, default=2000)
    ap.add_argument("--features", type=int, default=2000)
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--control-replicates", type=int, default=8)
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--statsmodels-fits", type=int, default=200)
    args = ap.parse_args()

    from distributed import Client

    path = cached_cube(args.perturbations, args.features, replicates=args.replicates,
                       control_replicates=args.control_replicates, shards=args.shards)
    n = args.perturbations * args.features
    t: dict[str, float] = {}
    out_dir = tempfile.mkdtemp(prefix="nbdask-bench-")
    try:
        with local_cluster(workers=args.workers) as cluster, Client(cluster) as client:
            counts = da.from_zarr(zarr.open_array(path + "/counts", mode="r"))
            counts.sum().compute()  # warm the workers (imports, file cache)
            with timer("raw_read", t):
                counts.sum().compute()
            with timer("pipeline", t):
                res = nbdask.test(nbdask.open_cube(path), dispersion="comparison")
                saved = nbdask.save_results(res, out_dir + "/results.zarr", client=client)
            n_tests = saved.attrs["n_tests"]

        cube = nbdask.open_cube(path).load()
        arrays = [cube[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")]
        with timer("kernel_array", t):
            mom_kernel(*arrays)
        mom_fused(*(x[:2] if k < 2 else x for k, x in enumerate(arrays)))  # compile
        with timer("kernel", t):
            mom_fused(*arrays)
        per_fit, failures = statsmodels_fits(cube, args.statsmodels_fits)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    mom_per = t["kernel"] / n
    print(f"nbdask throughput benchmark ({machine()}, {args.workers} workers)")
    print(f"cube: {args.perturbations} x {args.features} = {n:,} comparisons, "
          f"{args.replicates} treated vs {args.control_replicates} control replicates, shards {args.shards}")
    print(f"raw Zarr read of counts (cluster)   {t['raw_read']:8.2f} s")
    print(f"MoM fused kernel in memory (1 proc) {t['kernel']:8.2f} s   {mom_per * 1e6:8.3f} us/comparison")
    print(f"MoM array-API kernel in memory      {t['kernel_array']:8.2f} s   {t['kernel_array'] / n * 1e6:8.3f} us/comparison")
    print(f"pipeline Zarr -> MoM+BH -> Zarr     {t['pipeline']:8.2f} s   ({n_tests:,} tests)")
    print(f"statsmodels NegativeBinomial        {per_fit * 1e3:8.3f} ms/fit  ({args.statsmodels_fits} fits, {failures} failed)")
    print("ratios")
    print(f"  pipeline comparisons/s            {n / t['pipeline']:12,.0f}")
    print(f"  pipeline / raw read               {t['pipeline'] / t['raw_read']:12.2f}x")
    print(f"  speed-up over statsmodels, kernel {per_fit / mom_per:12,.0f}x per comparison")
    print(f"  speed-up over statsmodels, pipeline {per_fit / (t['pipeline'] / n):10,.0f}x per comparison")


if __name__ == "__main__":
    main()

"""Screen scale: a P x G cube from Zarr to FDR-corrected results Zarr, against the I/O bound.

Simulates the cube once (cached under benchmarks/.cache), then prints: cube size on disk, the
raw read+decompress time of the counts, the raw compress+write time of result arrays of the
same shapes and dtypes as nbdask's outputs, the pipeline's wall time with its breakdown
(estimates pass = read + kernel + write; FDR pass = read p, exact BH, write q), comparisons per
second, peak worker memory, and the ratio pipeline / (raw read + raw write).

With ``--cli`` the cube comes from ``nbdask simulate`` with its default shards (cached) and the
command a user runs, ``nbdask test CUBE OUT --workers N``, is timed from process start to exit
beside the in-process pipeline (``--cli-only`` skips the latter): the figure a user gets,
process start, cluster start, validation, the pooling pass and the FDR pass included.
``--raw-again`` measures the raw read + write once more after the command and prints the ratio
to it and to the mean of both: on a shared VM the machine's speed drifts within a run.
``--raw-one-process`` also measures the raw read + write in this one process, one block at a
time (dask's synchronous scheduler), as issue #16 measured its baseline, and prints the ratio to
that too; the default bound reads and writes in parallel on the workers, which is stricter.

    python benchmarks/screen_scale.py --perturbations 20000 --features 20000 --workers 2 \\
        --memory-limit 8GiB [--cli]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

import nbdask
from nbdask.cluster import local_cluster
from nbdask.gpu import cube_to_device, results_to_host
from nbdask.io import RESULTS_CODEC, _inner
from nbdask.schema import OUTPUTS

from _common import CACHE, machine


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def raw_write(path: str, shape, shard: int, names, scheduler=None) -> float:
    """Compress and write random arrays shaped like the outputs (same codec and shards)."""
    from zarr.codecs import BloscCodec

    start = time.perf_counter()
    arrays = []
    for name in names:
        dtype = np.dtype(OUTPUTS[name].dtype)
        src = da.random.default_rng(0).random(shape, chunks=(shard, shard)).astype(dtype)
        target = zarr.create_array(f"{path}/{name}", shape=shape, dtype=dtype,
                                   chunks=(_inner(shard), _inner(shard)), shards=(shard, shard),
                                   compressors=[BloscCodec(shuffle="shuffle", **RESULTS_CODEC)])
        arrays.append(da.store(src, target, lock=False, compute=False))
    da.compute(*arrays, scheduler=scheduler)
    return time.perf_counter() - start


def raw_io(args, cube_path, out: str, names, scheduler=None) -> tuple[float, float]:
    """(raw read + decompress of the counts, raw compress + write of ``names``), seconds, on
    the active client (or ``scheduler``: "sync" for one block at a time in this process)."""
    counts = da.from_zarr(zarr.open_array(str(cube_path / "counts"), mode="r"))
    start = time.perf_counter()
    counts.sum().compute(scheduler=scheduler)
    read = time.perf_counter() - start
    write = raw_write(f"{out}/raw.zarr", (args.perturbations, args.features), args.shards, names,
                      scheduler)
    shutil.rmtree(f"{out}/raw.zarr", ignore_errors=True)
    return read, write


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--perturbations", type=int, default=5000)
    ap.add_argument("--features", type=int, default=5000)
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--control-replicates", type=int, default=8)
    ap.add_argument("--shards", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--memory-limit", default="8GiB")
    ap.add_argument("--method", default="mom")
    ap.add_argument("--dispersion", default="feature", choices=["feature", "comparison", "shrunk"])
    ap.add_argument("--dispersion-prior", default="trend", choices=["trend", "none"])
    ap.add_argument("--no-independent-filtering", dest="independent_filtering", action="store_false")
    ap.add_argument("--test", default="auto", choices=["auto", "exact", "wald"])
    ap.add_argument("--fdr-backend", default="auto", choices=["auto", "gather", "buckets"])
    ap.add_argument("--cli", action="store_true",
                    help="cube from `nbdask simulate` (default shards); time `nbdask test` too")
    ap.add_argument("--cli-only", action="store_true", help="with --cli: skip the in-process run")
    ap.add_argument("--raw-again", action="store_true",
                    help="with --cli: measure the raw read + write again after the command, so a "
                         "drift of the machine's speed during the run shows")
    ap.add_argument("--raw-one-process", action="store_true",
                    help="with --cli: also measure the raw read + write in this one process, one "
                         "block at a time, as issue #16's baseline was measured")
    ap.add_argument("--cupy", action="store_true",
                    help="move blocks to the GPU: the array-API kernels on CuPy (benchmarks/gpu.py)")
    args = ap.parse_args(argv)
    from distributed import Client

    n = args.perturbations * args.features
    cube_path = CACHE / (f"screen_{args.perturbations}x{args.features}x{args.replicates}"
                         f"v{args.control_replicates}_s{args.shards}.zarr")
    nbdask_cli = str(Path(sys.executable).with_name("nbdask"))
    if args.cli:
        cube_path = CACHE / (f"cli_{args.perturbations}x{args.features}x{args.replicates}"
                             f"v{args.control_replicates}.zarr")
        if not (cube_path / "zarr.json").exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run([nbdask_cli, "simulate", str(cube_path), "--perturbations",
                            str(args.perturbations), "--features", str(args.features), "--replicates",
                            str(args.replicates), "--control-replicates", str(args.control_replicates),
                            "--seed", "1", "--overwrite"], check=True)
        args.shards = zarr.open_array(str(cube_path / "counts"), mode="r").shards[0]
    out = tempfile.mkdtemp(prefix="nbdask-scale-", dir=CACHE.parent if CACHE.parent.exists() else None)
    t: dict[str, float] = {}
    saved = None
    try:
        with local_cluster(workers=args.workers, threads_per_worker=args.threads_per_worker,
                           memory_limit=args.memory_limit) as cluster, \
                Client(cluster) as client:
            if not (cube_path / "zarr.json").exists():  # (--cli made its cube above)
                start = time.perf_counter()
                CACHE.mkdir(parents=True, exist_ok=True)
                cube = nbdask.simulate(perturbations=args.perturbations, features=args.features,
                                       replicates=args.replicates,
                                       control_replicates=args.control_replicates, seed=1,
                                       chunks=args.shards)
                nbdask.save_cube(cube, str(cube_path), overwrite=True)
                print(f"simulated in {time.perf_counter() - start:.1f} s")
            names = [v for v in OUTPUTS if OUTPUTS[v].dims == ("perturbation", "feature")
                     and v not in ("converged", "iterations")]
            if args.method == "irls":
                names += ["converged", "iterations"]
            t["raw_read"], t["raw_write"] = raw_io(args, cube_path, out, names)
            if not args.cli_only:
                saved, peak, limit = in_process(args, cube_path, out, client, t)
        if args.cli:
            # After the benchmark's cluster is gone: the command starts its own, as a user's does.
            options = ["--method", args.method, "--dispersion", args.dispersion, "--test", args.test,
                       "--dispersion-prior", args.dispersion_prior, "--fdr-backend", args.fdr_backend]
            options += [] if args.independent_filtering else ["--no-independent-filtering"]
            start = time.perf_counter()
            subprocess.run([nbdask_cli, "test", str(cube_path), f"{out}/cli.zarr", "--workers",
                            str(args.workers), "--no-progress", *options], check=True)
            t["cli"] = time.perf_counter() - start
            if args.raw_again:
                with local_cluster(workers=args.workers, threads_per_worker=args.threads_per_worker,
                                   memory_limit=args.memory_limit) as cluster, Client(cluster):
                    t["raw_read_after"], t["raw_write_after"] = raw_io(args, cube_path, out, names)
            if args.raw_one_process:
                t["raw_read_one"], t["raw_write_one"] = raw_io(args, cube_path, out, names, "sync")
        io = t["raw_read"] + t["raw_write"]
        print(f"nbdask screen-scale benchmark ({machine()}{', CuPy blocks' if args.cupy else ''}, "
              f"{args.workers} workers x "
              f"{args.threads_per_worker} threads x "
              f"{args.memory_limit}, method {args.method}, dispersion {args.dispersion}, "
              f"prior {args.dispersion_prior}, filtering {args.independent_filtering}, test {args.test})")
        print(f"cube {args.perturbations} x {args.features} = {n:,} comparisons, "
              f"{args.replicates} vs {args.control_replicates} replicates, shards {args.shards}; "
              f"{du(str(cube_path)) / 1e9:.2f} GB on disk")
        print(f"raw read + decompress of counts      {t['raw_read']:8.1f} s")
        print(f"raw compress + write of {len(names)} outputs    {t['raw_write']:8.1f} s")
        if saved is not None:
            attrs = saved.attrs
            est = attrs.get("wall_seconds_estimates", float("nan"))
            print(f"pipeline wall time (in-process)      {t['pipeline']:8.1f} s")
            print(f"  setup (open, validate, pooling)    {t['pipeline'] - attrs['wall_seconds']:8.1f} s")
            print(f"  estimates pass (read+kernel+write) {est:8.1f} s")
            print(f"  FDR pass ({attrs.get('fdr_backend', '?')}: read p, BH, write q) "
                  f"{attrs['wall_seconds'] - est:6.1f} s")
            print(f"comparisons per second               {n / t['pipeline']:14,.0f}")
            print(f"peak cluster process memory          {peak / 2**30:8.2f} GiB (limit {limit / 2**30:.0f} GiB)")
            print(f"results on disk                      {du(out + '/results.zarr') / 1e9:8.2f} GB")
            print(f"ratio pipeline / (raw read + raw write) {t['pipeline'] / io:6.2f}x")
            print(f"tests {attrs['n_tests']:,}, q < 0.05: {attrs['n_significant_q05']:,}")
        if "cli" in t:
            print(f"nbdask test (CLI, process start to exit) {t['cli']:6.1f} s")
            print(f"ratio CLI / (raw read + raw write)   {t['cli'] / io:8.2f}x")
        if "raw_read_after" in t:
            after = t["raw_read_after"] + t["raw_write_after"]
            print(f"raw read + write again, after the CLI {t['raw_read_after']:5.1f} + "
                  f"{t['raw_write_after']:.1f} s")
            print(f"ratio CLI / (raw read + raw write), after {t['cli'] / after:4.2f}x; "
                  f"to the mean of both {t['cli'] / ((io + after) / 2):.2f}x")
        if "raw_read_one" in t:
            one = t["raw_read_one"] + t["raw_write_one"]
            print(f"raw read + write in one process      {t['raw_read_one']:5.1f} + "
                  f"{t['raw_write_one']:.1f} s")
            print(f"ratio CLI / (one-process raw read + write) {t['cli'] / one:4.2f}x")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def in_process(args, cube_path, out, client, t):
    """The pipeline inside this process on its cluster: (results reopened, peak memory, limit)."""
    from distributed.diagnostics import MemorySampler

    sampler = MemorySampler()
    with sampler.sample("pipeline", measure="process"):
        start = time.perf_counter()
        cube = nbdask.open_cube(str(cube_path))
        res = nbdask.test(cube_to_device(cube) if args.cupy else cube, method=args.method,
                          dispersion=args.dispersion, test=args.test,
                          dispersion_prior=args.dispersion_prior,
                          independent_filtering=args.independent_filtering,
                          fdr_backend=args.fdr_backend)
        if args.cupy:
            res = results_to_host(res)
        saved = nbdask.save_results(res, f"{out}/results.zarr", client=client)
        t["pipeline"] = time.perf_counter() - start
    peak = max(v for _, v in sampler.samples["pipeline"])
    limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
    return saved, peak, sum(limits)


if __name__ == "__main__":
    main()

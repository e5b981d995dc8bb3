"""A cluster run: a dask scheduler and workers as separate processes, nbdask as their client.

    python examples/cluster.py                                   # starts them on 127.0.0.1
    python examples/cluster.py --scheduler tcp://HOST:8786       # or uses a running scheduler

With no --scheduler it starts `dask scheduler` and `dask worker` processes bound to 127.0.0.1
(what a cluster's nodes would run), tests a simulated cube through them, and stops them. The
command-line equivalent of the test step is
`nbdask test cube.zarr results.zarr --scheduler tcp://HOST:8786`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbdask


def start_cluster(workdir: Path, workers: int) -> tuple[str, list[subprocess.Popen]]:
    """Scheduler + ``workers`` single-thread worker processes on loopback; (address, processes)."""
    info = workdir / "scheduler.json"
    log = open(workdir / "cluster.log", "w")
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", "0", "--dashboard-address", "127.0.0.1:0",
                                  "--scheduler-file", str(info)], stdout=log, stderr=log)
    procs = [scheduler]
    deadline = time.time() + 60
    while not info.exists() and time.time() < deadline:
        time.sleep(0.2)
    if not info.exists():
        raise RuntimeError(f"the scheduler did not start; see {workdir / 'cluster.log'}")
    procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                   str(info), "--nworkers", str(workers), "--nthreads", "1",
                                   "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
                                   "--memory-limit", "2GiB"], stdout=log, stderr=log))
    return json.loads(info.read_text())["address"], procs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scheduler", help="address of a running scheduler (default: start one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="folder for the stores (default: a temporary one)")
    parser.add_argument("--perturbations", type=int, default=200)
    parser.add_argument("--features", type=int, default=200)
    args = parser.parse_args(argv)

    from distributed import Client

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        address, procs = (args.scheduler, []) if args.scheduler else start_cluster(Path(tmp), args.workers)
        try:
            with Client(address, timeout="60s") as client:
                if procs:
                    client.wait_for_workers(args.workers, timeout=120)
                print(f"scheduler {address}: {len(client.scheduler_info()['workers'])} workers")
                cube = nbdask.simulate(perturbations=args.perturbations, features=args.features,
                                       seed=3, chunks=min(512, max(16, args.perturbations // 2)))
                nbdask.save_cube(cube, out / "cube.zarr", overwrite=True)
                results = nbdask.save_results(nbdask.test(nbdask.open_cube(out / "cube.zarr")),
                                              out / "results.zarr", overwrite=True, client=client)
                summary = results.nb.summary()
                print(f"{summary['n_tests']:,} tested, {summary['n_significant_q10']:,} with "
                      f"q < 0.1, in {summary['wall_seconds']:.1f} s on the cluster")
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()

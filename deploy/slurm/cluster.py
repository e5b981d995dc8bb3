"""nbdask on a SLURM cluster through dask-jobqueue (pip install 'nbdask[hpc]').

    python deploy/slurm/cluster.py screen.zarr results.zarr --jobs 8 --queue normal

Each SLURM job is one dask worker process (1 core, 8 GiB, node-local spill directory, a
55-minute lifetime staggered so long runs survive the walltime); the client runs here.
"""

from __future__ import annotations

import argparse


def make_cluster(*, queue: str | None = None, account: str | None = None, cores: int = 1,
                 memory: str = "8GiB", walltime: str = "01:00:00", interface: str | None = None,
                 local_directory: str = "$TMPDIR", scheduler_options: dict | None = None):
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue=queue, account=account, cores=cores, processes=1, memory=memory,
        walltime=walltime, interface=interface, local_directory=local_directory,
        worker_extra_args=["--lifetime", "55m", "--lifetime-stagger", "4m"],
        job_extra_directives=["--job-name=nbdask"],
        scheduler_options=scheduler_options or {},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cube")
    ap.add_argument("results")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--queue")
    ap.add_argument("--account")
    args = ap.parse_args()
    from distributed import Client

    import nbdask

    with make_cluster(queue=args.queue, account=args.account) as cluster, Client(cluster) as client:
        cluster.scale(jobs=args.jobs)
        client.wait_for_workers(1)
        res = nbdask.test(nbdask.open_cube(args.cube))
        nbdask.save_results(res, args.results, client=client, progress=True)


if __name__ == "__main__":
    main()

"""A bad block seen as a person sees it: the CLI's whole stderr is one line, on nbdask's own
LocalCluster and on a user's `dask scheduler` / `dask worker` pair."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import nbdask
from test_faults import dask_cli, start, stop, wait_for

#: The bad value sits in the first of 4 perturbation blocks, which dask's ordering runs last on
#: one worker thread: it is found mid-run, after other blocks were written.
BAD_AT = (5, 3, 1)
BAD_CASES = {
    "negative count": (np.int32, -2, "counts: 1 negative count(s) (first at perturbation 'P05', feature 'G03'); counts must be >= 0"),
    "non-integer count": (np.float64, 2.5, "counts: 1 non-integer count(s), e.g. 2.5 (first at perturbation 'P05', feature 'G03'); pass raw integer counts, not normalised values"),
    "NaN in a present replicate": (np.float64, np.nan, "counts: 1 NaN/inf count(s) in present replicates (first at perturbation 'P05', feature 'G03'); fill them, or mark the replicate absent with a NaN size factor"),
}


def nbdask_script() -> str:
    """The installed console script (as a user runs it), beside this interpreter."""
    script = Path(sys.executable).with_name("nbdask")
    return str(script) if script.exists() else shutil.which("nbdask")


def bad_cube(tmp_path, dtype, value) -> str:
    cube = nbdask.simulate(perturbations=64, features=16, seed=8, chunks=16, ragged_fraction=0.0).load()
    counts = cube["counts"].values.astype(dtype)
    counts[BAD_AT] = value
    cube["counts"] = (cube["counts"].dims, counts)
    path = str(tmp_path / "bad.zarr")
    nbdask.save_cube(cube.chunk({"perturbation": 16, "feature": 16}), path)
    return path


def run_test(*args):
    return subprocess.run([nbdask_script(), "test", *args, "--no-progress"], capture_output=True,
                          text=True, timeout=300)


def assert_failed_mid_run(out: str) -> None:
    """The store exists, is not complete, and holds blocks finished before the bad one."""
    group = zarr.open_group(out, mode="r")
    assert group.attrs["nbdask_status"] == "failed"
    assert group["nbdask_done_blocks"][:].sum() >= 1, "the bad block was not found mid-run"
    with pytest.raises(nbdask.ResultsError, match="failed"):
        nbdask.open_results(out)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_block_is_one_line_on_nbdasks_own_cluster(case, tmp_path):
    dtype, value, message = BAD_CASES[case]
    out = str(tmp_path / "r.zarr")
    r = run_test(bad_cube(tmp_path, dtype, value), out, "--workers", "1")
    assert r.returncode == 2
    assert r.stderr == f"nbdask test: error: {message}\n"
    assert_failed_mid_run(out)


def test_bad_block_is_one_line_on_a_users_cluster(tmp_path):
    """A user's `dask scheduler` + `dask worker`: their logs are theirs (the worker still reports
    the failed task in its own log), the client prints one line."""
    sched_file = tmp_path / "scheduler.json"
    worker_log = tmp_path / "worker.log"
    procs = [start(dask_cli("scheduler", "--host", "127.0.0.1", "--port", "0",
                            "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)))]
    try:
        address = wait_for(sched_file)["address"]
        with open(worker_log, "w") as log:
            procs.append(subprocess.Popen(
                dask_cli("worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                         "--dashboard-address", "127.0.0.1:0"), stdout=log, stderr=log))
        dtype, value, message = BAD_CASES["negative count"]
        out = str(tmp_path / "r.zarr")
        r = run_test(bad_cube(tmp_path, dtype, value), out, "--scheduler", address)
        assert r.returncode == 2
        assert r.stderr == f"nbdask test: error: {message}\n"
        assert_failed_mid_run(out)
    finally:
        stop(procs)
    assert "Compute Failed" in worker_log.read_text()


def test_own_cluster_keeps_block_sized_arrays_on_the_heap(monkeypatch):
    """Workers nbdask starts get WORKER_MALLOC before they spawn, also after an earlier plain
    distributed cluster left its default in this process's environment; a user's setting, in
    the dask config or in the environment, wins."""
    import dask
    from distributed import Client

    from nbdask.cluster import WORKER_MALLOC, local_cluster

    def environ():
        import os
        return {k: os.environ.get(k) for k in WORKER_MALLOC}

    def workers_see():
        with local_cluster(workers=1) as cluster, Client(cluster) as client:
            (seen,) = client.run(environ).values()
        return seen

    ours = {k: str(v) for k, v in WORKER_MALLOC.items()}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # what distributed's nannies leave
    assert workers_see() == ours
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment is kept
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 4096}):
        assert workers_see()["MALLOC_TRIM_THRESHOLD_"] == "4096"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert workers_see()["MALLOC_MMAP_THRESHOLD_"] == "1048576"


def test_own_cluster_runs_no_stack_profiler():
    """distributed's statistical profiler (a thread sampling every stack each 10 ms, for a
    dashboard nbdask's own cluster serves on loopback only) is off in the workers nbdask
    starts, and on in a plain LocalCluster; their system monitor samples every 2 s without
    disk counters (0.5 s with them in a plain one), and every server times its event loop every
    500 ms (20 ms in a plain one)."""
    import threading

    from distributed import Client, LocalCluster

    from nbdask.cluster import local_cluster

    def profiler():
        return [t.name for t in threading.enumerate() if t.name == "Profile"]

    def monitor(dask_worker):  # the system monitor's period (ms) and whether it reads disks
        return dask_worker.periodic_callbacks["monitor"].callback_time, dask_worker.monitor.monitor_disk_io

    def scheduler_monitor(dask_scheduler):
        return dask_scheduler.periodic_callbacks["monitor"].callback_time

    def ticks(dask_worker=None, dask_scheduler=None):  # the event-loop timer's period (ms)
        return (dask_worker or dask_scheduler).periodic_callbacks["tick"].callback_time

    with local_cluster(workers=1) as cluster, Client(cluster) as client:
        assert list(client.run(profiler).values()) == [[]]
        assert list(client.run(monitor).values()) == [(2000, False)]
        assert client.run_on_scheduler(scheduler_monitor) == 2000
        assert list(client.run(ticks).values()) == [500] and client.run_on_scheduler(ticks) == 500
        assert [n.periodic_callbacks["tick"].callback_time for n in cluster.workers.values()] == [500]
    with LocalCluster(n_workers=1, processes=True, host="127.0.0.1", dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        assert list(client.run(profiler).values()) == [["Profile"]]
        assert list(client.run(monitor).values()) == [(500, True)]
        assert list(client.run(ticks).values()) == [20] and client.run_on_scheduler(ticks) == 20

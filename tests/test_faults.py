"""Faults with real processes: a worker killed mid-run, and a TLS-only cluster."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import nbdask

ROOT = Path(__file__).resolve().parents[1]


def start(cmd, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def wait_for(path: Path, timeout=60):
    deadline = time.time() + timeout
    while not path.exists() or not path.read_text().strip():
        if time.time() > deadline:
            raise TimeoutError(f"{path} not written")
        time.sleep(0.2)
    time.sleep(0.3)
    return json.loads(path.read_text())


def stop(procs, grace=3.0):
    """SIGTERM, then SIGKILL what is still running after ``grace`` seconds: a dask worker whose
    scheduler goes down with it (or is gone) can take 20 s and more to exit on its own."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def dask_cli(*args):
    return [sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]]


@pytest.fixture
def scheduler(tmp_path):
    procs = []
    sched_file = tmp_path / "scheduler.json"
    procs.append(start(dask_cli("scheduler", "--host", "127.0.0.1", "--port", "0",
                                "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file))))
    info = wait_for(sched_file)
    yield info["address"], procs, sched_file
    stop(procs)


#: The slow array-API IRLS kernel keeps a run of N_BLOCKS blocks going for several seconds.
IRLS = ["--method", "irls", "--engine", "array", "--dispersion", "comparison"]
N_BLOCKS = 16


@pytest.fixture(scope="module")
def irls_cube(tmp_path_factory):
    """A cube of 4 x 4 blocks and its IRLS results computed in memory here: (path, reference)."""
    path = str(tmp_path_factory.mktemp("faults") / "cube.zarr")
    nbdask.save_cube(nbdask.simulate(perturbations=160, features=160, seed=4, chunks=40), path)
    reference = nbdask.test(nbdask.open_cube(path).load(), method="irls", engine="array",
                            dispersion="comparison")
    return path, reference


def ticked_blocks(out: str) -> int:
    """Blocks the run writing results store ``out`` has finished (0 before it has a record)."""
    import zarr

    if not (Path(out) / "nbdask_done_blocks" / "zarr.json").exists():
        return 0
    return int(zarr.open_group(out, mode="r")["nbdask_done_blocks"][:].sum())


def wait_for_blocks(out: str, n: int, job, timeout=120) -> None:
    deadline = time.time() + timeout
    while ticked_blocks(out) < n:
        assert job.poll() is None, "the job ended before it wrote %d blocks" % n
        assert time.time() < deadline, f"no {n} blocks written in {timeout} s"
        time.sleep(0.05)


def test_job_survives_a_killed_worker(scheduler, irls_cube, tmp_path):
    address, procs, sched_file = scheduler
    workers = [start(dask_cli("worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                              "--no-nanny", "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"))
               for _ in range(2)]
    procs.extend(workers)
    cube_path, reference = irls_cube
    out = str(tmp_path / "r.zarr")
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
        job = subprocess.Popen([sys.executable, "-m", "nbdask.cli", "test", cube_path, out,
                                "--scheduler", address, *IRLS, "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # once the job has written a block, kill one worker process outright
        wait_for_blocks(out, 1, job)
        os.kill(workers[0].pid, signal.SIGKILL)
        assert ticked_blocks(out) < N_BLOCKS, "the job finished before a worker could be killed"
        out_text, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
        assert len(client.scheduler_info()["workers"]) == 1
    res = nbdask.open_results(out)
    for name in ("log_fold_change", "log_dispersion", "p_value", "q_value", "converged"):
        np.testing.assert_array_equal(res[name].values, reference[name].values, err_msg=name)


def test_tls_only_cluster(tmp_path):
    spec = importlib.util.spec_from_file_location("make_certs", ROOT / "deploy" / "docker" / "make_certs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    certs = module.make_certs(tmp_path / "certs", ("localhost",))
    sched_file = tmp_path / "scheduler.json"
    tls = ["--tls-ca-file", certs["ca"], "--tls-cert", certs["node"], "--tls-key", certs["node_key"]]
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
    procs = [start(dask_cli("scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                            "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file), *tls),
                   env=env)]
    try:
        address = wait_for(sched_file)["address"]
        assert address.startswith("tls://127.0.0.1:")
        procs.append(start(dask_cli("worker", address, "--nthreads", "1", "--no-nanny",
                                    "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0", *tls), env=env))
        from distributed import Client
        from distributed.security import Security

        security = Security(tls_ca_file=certs["ca"], tls_client_cert=certs["client"],
                            tls_client_key=certs["client_key"], require_encryption=True)
        cube = nbdask.simulate(perturbations=30, features=20, seed=2, chunks=10)
        with Client(address, security=security, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
            res = nbdask.save_results(nbdask.test(cube, dispersion="comparison"),
                                      str(tmp_path / "r.zarr"), client=client)
        expected = nbdask.test(cube.load(), dispersion="comparison")
        np.testing.assert_array_equal(res["p_value"].values, expected["p_value"].values)
        # Without the certificates: plain TCP is refused, and TLS without a client cert fails.
        with pytest.raises((OSError, TimeoutError)):
            Client(address.replace("tls://", "tcp://"), timeout="5s")
        # A client whose certificate another CA signed is refused in the TLS handshake.
        stranger = module.make_certs(tmp_path / "stranger", ("localhost",))
        impostor = Security(tls_ca_file=certs["ca"], tls_client_cert=stranger["client"],
                            tls_client_key=stranger["client_key"], require_encryption=True)
        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=impostor, timeout="5s")
    finally:
        stop(procs)


def test_killed_client_leaves_an_incomplete_store_that_resumes(client, irls_cube, tmp_path):
    """Kill the CLI mid-write (SIGKILL): the store is visibly incomplete; --resume computes only
    the blocks not yet ticked, finalises, and equals an uninterrupted run."""
    import zarr

    cube_path, reference = irls_cube
    out = str(tmp_path / "r.zarr")
    args = [sys.executable, "-m", "nbdask.cli", "test", cube_path, out, "--scheduler",
            client.scheduler.address, *IRLS, "--no-progress"]
    job = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_blocks(out, 3, job)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    group = zarr.open_group(out, mode="r")
    ticked = int(group["nbdask_done_blocks"][:].sum())
    assert group.attrs["nbdask_status"] == "incomplete" and 3 <= ticked < N_BLOCKS
    with pytest.raises(nbdask.ResultsError, match="not complete"):
        nbdask.open_results(out)
    time.sleep(1.0)  # let the scheduler release the dead client's tasks
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = nbdask.open_results(out)
    # blocks in flight at the kill may be redone
    assert res.attrs["resumed_blocks"] <= N_BLOCKS - ticked + 2
    for name in ("log_fold_change", "p_value", "q_value", "iterations"):
        np.testing.assert_array_equal(res[name].values, reference[name].values, err_msg=name)

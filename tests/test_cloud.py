"""Object stores for real: a moto S3 server (IAM auth on) on loopback, s3fs, Zarr v3, a
LocalCluster with worker processes, and the CLI."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import nbdask

pytest.importorskip("s3fs")
pytest.importorskip("moto")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "nbdask.cli", *args], capture_output=True,
                          text=True, timeout=300)


def option_flags(options):
    return ["--storage-option", f"key={options['key']}", "--storage-option", f"secret={options['secret']}",
            "--storage-option", "client_kwargs=" + json.dumps(options["client_kwargs"])]


def test_cli_round_trip_through_s3_equals_local_disk(s3, client, tmp_path):
    """The CLI's own LocalCluster is tested elsewhere (test_pipeline.py, test_cluster.py): this
    run goes to the session's cluster, whose worker processes get the credentials as a user's
    scheduler would."""
    cube = nbdask.simulate(perturbations=40, features=32, seed=3, chunks=16)
    nbdask.save_cube(cube, "s3://nbdask/cube.zarr", storage_options=s3["options"], overwrite=True)
    flags = option_flags(s3["options"])
    r = cli("test", "s3://nbdask/cube.zarr", "s3://nbdask/results.zarr", "--scheduler",
            client.scheduler.address, "--dispersion", "comparison",
            "--no-progress", "--overwrite", *flags)
    assert r.returncode == 0, r.stderr
    assert s3["secret"] not in r.stdout + r.stderr and s3["key"] not in r.stdout + r.stderr
    remote = nbdask.open_results("s3://nbdask/results.zarr", storage_options=s3["options"])
    local_cube = str(tmp_path / "c.zarr")
    nbdask.save_cube(cube, local_cube)
    local = nbdask.test(nbdask.open_cube(local_cube), dispersion="comparison").compute()
    for name in ("log_fold_change", "p_value", "q_value"):
        np.testing.assert_array_equal(remote[name].values, local[name].values, err_msg=name)
    attrs = json.dumps(dict(remote.attrs), default=str)
    assert s3["secret"] not in attrs and s3["key"] not in attrs


def timed(fn):
    start = time.perf_counter()
    try:
        fn()
    except nbdask.NbdaskError as err:
        return err, time.perf_counter() - start
    raise AssertionError("no error raised")


def test_missing_bucket_wrong_credentials_and_unreachable_endpoint(s3):
    opts = s3["options"]
    err, took = timed(lambda: nbdask.open_cube("s3://no-such-bucket/cube.zarr", storage_options=opts))
    assert isinstance(err, nbdask.StoreError) and "no-such-bucket" in str(err) and took < 20
    wrong = {**opts, "secret": "not-the-secret-at-all"}
    err, took = timed(lambda: nbdask.open_cube("s3://nbdask/cube.zarr", storage_options=wrong))
    assert isinstance(err, nbdask.StoreError) and "credentials" in str(err) and took < 20
    assert "not-the-secret-at-all" not in str(err) and "\n" not in str(err)
    dead = {**opts, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    err, took = timed(lambda: nbdask.open_cube("s3://nbdask/cube.zarr", storage_options=dead))
    assert isinstance(err, nbdask.StoreError) and "endpoint" in str(err) and took < 60
    assert opts["secret"] not in str(err)


def test_failed_write_leaves_no_complete_store(s3, client):
    cube = nbdask.simulate(perturbations=20, features=20, seed=1, chunks=10)
    wrong = {**s3["options"], "secret": "wrong-secret-value"}
    with pytest.raises(nbdask.StoreError) as err:
        nbdask.save_results(nbdask.test(cube), "s3://nbdask/bad.zarr", storage_options=wrong)
    assert "wrong-secret-value" not in str(err.value)
    with pytest.raises(nbdask.StoreError):
        nbdask.open_results("s3://nbdask/bad.zarr", storage_options=s3["options"])

"""Stores nbdask writes open with a plain ``xr.open_zarr(path)``: consolidated metadata, no
warnings; and the completion marker still decides what open_results accepts."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import nbdask


def open_strictly(path: str) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path)
    assert zarr.open_group(path, mode="r").metadata.consolidated_metadata is not None
    return ds


def test_cubes_and_results_open_without_warnings(tmp_path, client):
    cube_path = str(tmp_path / "cli.zarr")
    r = subprocess.run([sys.executable, "-m", "nbdask.cli", "simulate", cube_path, "--perturbations",
                        "20", "--features", "16", "--shards", "8"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert open_strictly(cube_path)["counts"].shape[:2] == (20, 16)

    cube = nbdask.simulate(perturbations=32, features=24, seed=4, chunks=8)
    # The last block has a negative count: the first run fails there, after other blocks are done.
    bad = cube.copy()
    bad["counts"] = cube["counts"].where((cube["perturbation"] != "P31") | (cube["feature"] != "G23"), -1)
    path, out = str(tmp_path / "cube.zarr"), str(tmp_path / "results.zarr")
    nbdask.save_cube(bad, path)
    ds = open_strictly(path)
    assert set(nbdask.schema.INPUTS) <= set(ds.data_vars)
    with pytest.raises(nbdask.CubeError, match="negative"):
        nbdask.save_results(nbdask.test(nbdask.open_cube(path), dispersion="comparison"), out,
                            client=client)
    assert zarr.open_group(out, mode="r").attrs["nbdask_status"] == "failed"
    with pytest.raises(nbdask.ResultsError, match="not complete"):
        nbdask.open_results(out)

    # The cube mended (at a new path: the failed tasks' keys, named after the path, may still
    # be held by this process's traceback), resume finishes the store.
    path = str(tmp_path / "mended.zarr")
    nbdask.save_cube(cube, path)
    resumed = nbdask.save_results(nbdask.test(nbdask.open_cube(path), dispersion="comparison"),
                                  out, resume=True, client=client)
    assert resumed.attrs["nbdask_status"] == "complete" and resumed.attrs["resumed_blocks"] >= 1
    ds = open_strictly(out)
    assert ds.attrs["nbdask_status"] == "complete"
    ref = nbdask.test(cube.load(), dispersion="comparison")
    np.testing.assert_array_equal(ds["q_value"].values, ref["q_value"].values)

    fresh = str(tmp_path / "fresh.zarr")
    nbdask.save_results(nbdask.test(nbdask.open_cube(path)), fresh, client=client)
    assert open_strictly(fresh).attrs["n_tests"] == 32 * 24

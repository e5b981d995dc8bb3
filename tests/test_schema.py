"""Every bad input gets one clear CubeError naming the variable, and no complete results store."""

import numpy as np
import pytest
import xarray as xr

import nbdask
from nbdask.errors import CubeError, ResultsError
from nbdask.schema import INPUTS, LABELS, OUTPUTS
from conftest import make_cube


def good_cube(p=8, g=6, r=3, c=4, dtype=np.int32):
    rng = np.random.default_rng(0)
    return make_cube(rng.poisson(3, (p, g, r)).astype(dtype), np.ones((p, r)),
                     rng.poisson(3, (g, c)).astype(dtype), np.ones(c))


def with_value(name, index, value, dtype=np.int32):
    cube = good_cube(dtype=dtype)
    arr = cube[name].values.copy()
    arr[index] = value
    return cube.assign({name: (cube[name].dims, arr)})


def drop_control_replicates(n):
    cube = good_cube()
    return cube.isel(control_replicate=slice(0, n))


def misaligned_controls():
    """control_counts on other feature labels: xarray's outer join fills NaN."""
    cube = good_cube()
    ctrl = cube["control_counts"].assign_coords(feature=[f"x{i}" for i in range(6)])
    return xr.merge([cube.drop_vars("control_counts"), ctrl.to_dataset()], join="outer")


VALUE_CASES = {
    "negative counts": (lambda: with_value("counts", (1, 2, 0), -1), "counts", "negative"),
    "non-integer counts": (lambda: with_value("counts", (0, 0, 1), 2.5, np.float64), "counts", "non-integer"),
    "NaN counts in a present replicate": (lambda: with_value("counts", (3, 1, 2), np.nan, np.float64), "counts", "NaN"),
    "negative control counts": (lambda: with_value("control_counts", (2, 0), -3), "control_counts", "negative"),
    "zero size factor": (lambda: with_value("size_factor", (2, 1), 0.0), "size_factor", "zero, negative or infinite"),
    "negative size factor": (lambda: with_value("size_factor", (2, 1), -1.0), "size_factor", "zero, negative or infinite"),
    "infinite size factor": (lambda: with_value("size_factor", (0, 0), np.inf), "size_factor", "zero, negative or infinite"),
    "zero control size factor": (lambda: with_value("control_size_factor", 1, 0.0), "control_size_factor", "> 0"),
}

STRUCTURE_CASES = {
    "one control replicate": (lambda: drop_control_replicates(1), "control_counts", "at least 2"),
    "missing variable": (lambda: good_cube().drop_vars("control_size_factor"), "control_size_factor", "missing"),
    "wrong dims": (lambda: good_cube().assign(counts=good_cube()["counts"].transpose("feature", "perturbation", "replicate")),
                   "counts", "dims"),
    "string counts": (lambda: good_cube().assign(counts=good_cube()["counts"].astype(str)), "counts", "dtype"),
    "mismatched feature coordinates": (misaligned_controls, "control_counts", "NaN"),
    "duplicate feature labels": (lambda: good_cube().assign_coords(feature=["a", "a", "b", "c", "d", "e"]), "feature", "unique"),
    "chunked replicate axis": (lambda: good_cube().chunk({"replicate": 1}), "counts", "replicate"),
    "numeric feature names": (lambda: good_cube().assign_coords(feature_name=("feature", np.arange(6))),
                              "feature_name", "expected text along ('feature',)"),
    "feature names along perturbation": (
        lambda: good_cube().assign_coords(feature_name=("perturbation", list("abcdefgh"))),
        "feature_name", "has dims ('perturbation',)"),
}


def assert_one_line(err, variable, fragment):
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(variable + ":") or f"{variable}:" in msg, msg
    assert fragment in msg, msg


@pytest.mark.parametrize("case", list(VALUE_CASES) + list(STRUCTURE_CASES))
def test_in_memory_cube_is_rejected(case):
    build, variable, fragment = {**VALUE_CASES, **STRUCTURE_CASES}[case]
    with pytest.raises(CubeError) as err:
        nbdask.test(build())
    assert_one_line(err, variable, fragment)


def test_good_cube_passes():
    res = nbdask.test(good_cube(), dispersion="comparison")
    assert set(res.data_vars) == {n for n in OUTPUTS if n not in ("converged", "iterations") and not n.startswith("feature_")}
    assert res.attrs["n_tests"] == 48


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_bad_values_through_zarr_leave_no_complete_store(case, tmp_path, client):
    build, variable, fragment = VALUE_CASES[case]
    cube = build()
    path = str(tmp_path / "cube.zarr")
    cube.chunk({"perturbation": 4, "feature": 3}).to_zarr(path, zarr_format=3, consolidated=False)
    out = str(tmp_path / "results.zarr")
    with pytest.raises(CubeError) as err:
        opened = nbdask.open_cube(path)
        nbdask.save_results(nbdask.test(opened), out)
    assert_one_line(err, variable, fragment)
    with pytest.raises((ResultsError, nbdask.StoreError)):
        nbdask.open_results(out)


def test_absent_replicate_may_hold_nan_counts():
    cube = with_value("counts", (3, 1, 2), np.nan, np.float64)
    sf = cube["size_factor"].values.copy()
    sf[3, 2] = np.nan
    res = nbdask.test(cube.assign(size_factor=(("perturbation", "replicate"), sf)))
    assert np.isfinite(res["p_value"].values).all()


def test_perturbation_without_replicates_is_untestable_not_an_error():
    cube = good_cube()
    sf = cube["size_factor"].values.copy()
    sf[5] = np.nan
    res = nbdask.test(cube.assign(size_factor=(("perturbation", "replicate"), sf)))
    assert np.isnan(res["p_value"].values[5]).all()
    assert res.attrs["n_perturbations_without_replicates"] == 1
    assert res.attrs["n_tests"] == 42


def test_misaligned_dask_chunks_are_rejected(tmp_path):
    cube = good_cube(p=16, g=12).chunk({"perturbation": 4, "feature": 4})
    path = str(tmp_path / "cube.zarr")
    nbdask.save_cube(cube, path)
    with pytest.raises(CubeError, match="chunks: perturbation=6 is not a whole multiple"):
        nbdask.open_cube(path, chunks={"perturbation": 6})
    assert nbdask.open_cube(path, chunks={"perturbation": 8})["counts"].chunks[0] == (8, 8)
    rechunked = nbdask.open_cube(path).chunk({"feature": 6})
    with pytest.raises(CubeError) as err:
        nbdask.test(rechunked)
    assert_one_line(err, "counts", "not whole multiples")


def test_mismatched_feature_lengths_in_zarr(tmp_path):
    cube = good_cube()
    path = str(tmp_path / "cube.zarr")
    cube.drop_vars("control_counts").to_zarr(path, zarr_format=3, consolidated=False)
    ctrl = xr.Dataset({"control_counts": (("feature", "control_replicate"), np.ones((5, 4), np.int32))})
    ctrl.to_zarr(path, mode="a", zarr_format=3, consolidated=False)
    with pytest.raises(CubeError) as err:
        nbdask.open_cube(path)
    assert_one_line(err, "control_counts", "do not match")


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(nbdask.StoreError, match="no Zarr store"):
        nbdask.open_cube(str(tmp_path / "nope.zarr"))


def test_every_variable_declared_once_with_doc():
    for spec in {**INPUTS, **OUTPUTS, **LABELS}.values():
        assert spec.doc and spec.dims
    assert OUTPUTS["p_value"].dtype == OUTPUTS["q_value"].dtype == "float64"

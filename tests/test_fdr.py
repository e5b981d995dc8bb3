"""Exact BH against scipy.stats.false_discovery_control and R's p.adjust fixture."""

import csv

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy.stats import false_discovery_control

from nbdask import fdr
from conftest import SHARED


def hard_p_values(shape, seed=0):
    """p-values with ties, exact 0s and 1s, values down to 1e-300 and NaNs."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=shape)
    flat = p.reshape(-1)
    n = flat.size
    idx = rng.permutation(n)
    k = n // 10
    flat[idx[:k]] = 1.0
    flat[idx[k:2 * k]] = 0.25  # ties
    flat[idx[2 * k:3 * k]] = 10.0 ** rng.uniform(-300, -5, k)
    flat[idx[3 * k:3 * k + 3]] = 0.0
    flat[idx[3 * k + 3:3 * k + 3 + n // 50]] = np.nan
    flat[idx[-k:]] = np.round(flat[idx[-k:]], 2)  # more ties
    return p


def scipy_bh(p):
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    out[ok] = false_discovery_control(p[ok], method="bh")
    return out


def test_in_memory_global_matches_scipy():
    p = hard_p_values((37, 53))
    np.testing.assert_allclose(fdr.bh(p), scipy_bh(p.reshape(-1)).reshape(p.shape), rtol=1e-12)
    assert np.array_equal(np.isnan(fdr.bh(p)), np.isnan(p))


def test_in_memory_per_row_matches_scipy():
    p = hard_p_values((9, 101), seed=1)
    expected = np.stack([scipy_bh(row) for row in p])
    np.testing.assert_allclose(fdr.bh(p, axis=1), expected, rtol=1e-12)


def test_matches_r_p_adjust_fixture():
    with open(SHARED / "fixtures" / "bh_reference.csv") as fh:
        rows = list(csv.DictReader(fh))
    p = np.array([float(r["p_value"]) if r["p_value"] != "NA" else np.nan for r in rows])
    q_r = np.array([float(r["q_bh"]) if r["q_bh"] != "NA" else np.nan for r in rows])
    q = fdr.bh(p)
    assert np.array_equal(np.isnan(q), np.isnan(q_r))
    np.testing.assert_allclose(q, q_r, rtol=1e-14, atol=0)


def test_all_nan_and_empty():
    assert np.isnan(fdr.bh(np.full(5, np.nan))).all()
    assert fdr.bh(np.array([])).shape == (0,)


@pytest.mark.parametrize("chunks", [(37, 53), (10, 20), (1, 53), (37, 7)])
@pytest.mark.parametrize("scope", ["global", "perturbation"])
def test_dask_on_cluster_matches_scipy(client, chunks, scope):
    p = hard_p_values((37, 53), seed=2)
    arr = xr.DataArray(da.from_array(p, chunks=chunks), dims=("perturbation", "feature"))
    q = fdr.adjust(arr, method="bh", scope=scope)
    assert q.chunks == arr.chunks
    got = q.compute().values
    if scope == "global":
        expected = scipy_bh(p.reshape(-1)).reshape(p.shape)
    else:
        expected = np.stack([scipy_bh(row) for row in p])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.array_equal(np.isnan(got), np.isnan(p))

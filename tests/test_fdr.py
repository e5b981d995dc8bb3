"""Exact BH against scipy.stats.false_discovery_control and R's p.adjust fixture."""

import csv

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy.stats import false_discovery_control

import nbdask
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


@pytest.mark.parametrize("bucket_size", [500, 3000, 10**6])
def test_bucketed_bh_is_bit_identical_to_gather(client, bucket_size):
    p = hard_p_values((120, 97), seed=4)
    arr = xr.DataArray(da.from_array(p, chunks=(32, 40)), dims=("perturbation", "feature"))
    gathered = fdr.adjust(arr, backend="gather").compute().values
    bucketed = fdr.adjust(arr, backend="buckets", bucket_size=bucket_size)
    assert bucketed.attrs["fdr_backend"] == "buckets"
    got = bucketed.compute().values
    assert np.array_equal(got, gathered, equal_nan=True)
    np.testing.assert_allclose(got, scipy_bh(p.reshape(-1)).reshape(p.shape), rtol=1e-12)


def test_auto_uses_buckets_when_p_values_outgrow_a_worker(tmp_path):
    """Workers limited to 1 GiB (a worker process with nbdask imported already holds ~0.3 GiB):
    14.1 million p-values need 566 MB on one worker to gather (40 B each, over half the
    limit), so "auto" must take the distributed path."""
    import logging

    import zarr
    from distributed import Client, LocalCluster

    from nbdask import fdr_fused

    # Compile (and cache on disk) the numba core here rather than inside a small worker.
    fdr_fused.bh(np.random.default_rng(0).uniform(size=1000))
    p = hard_p_values((3800, 3800), seed=9)
    path = str(tmp_path / "p.zarr")
    zarr.create_array(path, shape=p.shape, chunks=(760, 760), dtype="f8")[:] = p
    expected = scipy_bh(p.reshape(-1)).reshape(p.shape)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      memory_limit="1GiB", dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster):
        stored = xr.DataArray(da.from_zarr(path), dims=("perturbation", "feature"))
        q = fdr.adjust(stored, backend="auto")
        assert q.attrs["fdr_backend"] == "buckets"
        got = q.compute().values
    assert np.array_equal(np.isnan(got), np.isnan(p))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def reference_storey_pi0(p):
    """R qvalue::pi0est(pi0.method = "bootstrap"), written out with plain loops."""
    p = p[~np.isnan(p)]
    m = len(p)
    lambdas = [round(0.05 * k, 2) for k in range(1, 20)]
    pi0 = [np.sum(p >= lam) / (m * (1 - lam)) for lam in lambdas]
    ordered = sorted(pi0)
    h = (len(ordered) - 1) * 0.1  # type-7 quantile at 0.1
    min_pi0 = ordered[int(np.floor(h))] + (h - np.floor(h)) * (ordered[int(np.ceil(h))] - ordered[int(np.floor(h))])
    mse = [np.sum(p >= lam) / (m ** 2 * (1 - lam) ** 2) * (1 - np.sum(p >= lam) / m) + (v - min_pi0) ** 2
           for lam, v in zip(lambdas, pi0)]
    best = min(mse)
    return min(min(v for v, e in zip(pi0, mse) if e == best), 1.0)


@pytest.mark.parametrize("backend", ["gather", "buckets"])
def test_storey_q_values(client, backend):
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.uniform(size=8000), rng.beta(0.2, 8, size=2000)])
    p[rng.choice(p.size, 50, replace=False)] = np.nan
    p = rng.permutation(p).reshape(100, 100)
    pi0 = reference_storey_pi0(p.reshape(-1))
    assert 0.7 < pi0 < 0.95
    arr = xr.DataArray(da.from_array(p, chunks=(25, 50)), dims=("perturbation", "feature"))
    q = fdr.adjust(arr, method="storey", backend=backend, bucket_size=2000)
    np.testing.assert_allclose(q.compute().values, pi0 * scipy_bh(p.reshape(-1)).reshape(p.shape), rtol=1e-12)
    assert fdr.storey_pi0(fdr.counts(p)["storey"], int(np.sum(~np.isnan(p)))) == pytest.approx(pi0, rel=1e-14)
    with pytest.raises(nbdask.OptionError, match="storey"):
        fdr.adjust(arr, method="storey", scope="perturbation")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numba_core_is_bit_identical_to_the_sort_definition(seed):
    p = hard_p_values((211, 173), seed=seed)
    assert np.array_equal(fdr.bh(p), fdr.bh_sorted(p.reshape(-1), axis=0).reshape(p.shape), equal_nan=True)


@pytest.mark.parametrize("kind", ["hard", "dense", "negative_zero", "wide"])
def test_radix_order_matches_numpy_sort(kind):
    """The sort behind bh_block, on inputs that take every path: skewed key bins, a cluster far
    narrower than a key bin, ties, -0.0, and a key bin too full for its values and positions
    to share one 63-bit key (the 8-bit digit passes)."""
    from nbdask.fdr_fused import sort_positions

    rng = np.random.default_rng(3)
    p = hard_p_values((400, 500), seed=3).reshape(-1)
    p = p[~np.isnan(p)]
    if kind == "dense":
        p[: p.size // 2] = 0.5 + rng.uniform(0, 1e-12, p.size // 2)
    elif kind == "wide":  # 2**20 values filling one key bin: 44 value bits + 20 position bits
        p = np.concatenate([p, 0.5 + rng.uniform(0, 0.5 / 256, 2 ** 20)])
    elif kind == "negative_zero":
        p[rng.choice(p.size, 1000, replace=False)] = -0.0
    rng.shuffle(p)
    values, positions = sort_positions(p)
    assert np.array_equal(values, np.sort(p))
    assert np.array_equal(np.sort(positions), np.arange(p.size))
    assert np.array_equal(p[positions], values)
    assert np.array_equal(fdr.bh(p), scipy_bh(p))
    counts = fdr._chunk_counts(p)  # -0.0 counts in the first key bin
    assert counts[0] >= (p == 0).sum() and counts[:fdr.N_KEYS].sum() == p.size


@pytest.mark.parametrize("bits", [1, 11, 12, 33, 63])
def test_radix_passes_sort_a_segment_in_place(bits):
    """``_radix_sort`` (the packed segments' sort) orders keys[lo:hi] of any bit width, with an
    odd or even number of 11-bit passes, and leaves the rest of the array alone."""
    from nbdask.fdr_fused import _radix_sort

    rng = np.random.default_rng(bits)
    keys = rng.integers(0, 2 ** bits, 10_000, dtype=np.int64)
    before = keys.copy()
    _radix_sort(keys, np.empty_like(keys), 100, 9_000, bits)
    assert np.array_equal(keys[100:9_000], np.sort(before[100:9_000]))
    assert np.array_equal(keys[:100], before[:100]) and np.array_equal(keys[9_000:], before[9_000:])


def test_reusable_result_buffers_never_overwrite_a_live_result():
    """``fdr_fused.reusable`` (the assembled q chunk) hands a thread's buffer out again only
    once no view of it is alive: a chunk dask still holds keeps its values."""
    from nbdask.fdr_fused import release_scratch, reusable

    first = reusable("test-result", 1000, np.float64)
    first[:] = 1.0
    second = reusable("test-result", 1000, np.float64)  # `first` is alive: a new buffer
    second[:] = 2.0
    assert (first == 1.0).all() and not np.shares_memory(first, second)
    address = second.__array_interface__["data"][0]
    del first, second
    third = reusable("test-result", 800, np.float64)  # nothing alive: reused
    assert third.__array_interface__["data"][0] == address
    del third
    assert release_scratch(["test-result"]) > 0


def test_auto_backend_rule():
    """Buckets when the p-values would crowd one worker, or when several threads can share the
    sort of more than PARALLEL_MIN_TESTS; else gather."""
    gib = 2.0 ** 30
    big = fdr.PARALLEL_MIN_TESTS + 1
    assert fdr.choose_backend(10 ** 6, memory_limit=8 * gib, threads=2) == "gather"
    assert fdr.choose_backend(big, memory_limit=8 * gib, threads=1) == "gather"
    assert fdr.choose_backend(big, memory_limit=8 * gib, threads=2) == "buckets"
    assert fdr.choose_backend(big, memory_limit=None, threads=2) == "buckets"
    # 40 bytes per p-value against half of 1 GiB: 13.4M p-values no longer gather, even alone
    assert fdr.choose_backend(14_000_000, memory_limit=gib, threads=1) == "buckets"
    assert fdr.choose_backend(13_000_000, memory_limit=gib, threads=1) == "gather"


def test_block_counts_match_numpy_counts():
    """The estimates pass's one-pass counts (``filtering.counts_and_histogram``) against NumPy:
    key bins of the IEEE bits, Storey's counts of p >= lambda, NaNs, and the filter's histogram
    by (feature level, first grid point >= p)."""
    from nbdask import filtering

    p = hard_p_values((300, 257), seed=5)
    p[0, :4] = [-0.0, 1e-320, 10.0 ** -12.04, filtering.GRID[7]]  # signed zero, subnormal, grid edges
    level = np.random.default_rng(5).integers(0, filtering.LEVELS, p.shape[1])
    got = filtering.counts_and_histogram(p, level)
    ok = ~np.isnan(p)
    keys = (np.abs(p[ok]).view(np.uint64) >> np.uint64(fdr.SHIFT)).astype(np.int64)
    storey = [(p[ok] >= lam).sum() for lam in fdr.LAMBDAS]
    grid_bin = np.minimum(np.searchsorted(filtering.GRID, p, side="left"), filtering.HIST_BINS - 1)
    cell = np.broadcast_to(level, p.shape) * filtering.HIST_BINS + grid_bin
    hist = np.bincount(cell[ok], minlength=filtering.LEVELS * filtering.HIST_BINS)
    want = np.concatenate([np.bincount(keys, minlength=fdr.N_KEYS), storey, [(~ok).sum()], hist])
    assert np.array_equal(got, want)
    assert np.array_equal(got, np.concatenate([fdr._chunk_counts(p), filtering.histogram(p, level)]))

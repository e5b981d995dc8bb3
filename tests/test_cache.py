"""Counts held in worker memory between the pooling pass and the estimates (``nbdask.cache``):
each block read once, compacted without changing a value, results unchanged, memory given back."""

import numpy as np
import pytest
from distributed import futures_of

import nbdask
from nbdask import cache
from test_resume import CountTasks, finished_tasks, reads_counts


@pytest.mark.parametrize("dtype, values, expect", [
    (np.int32, [0, 3, 255], np.uint8),
    (np.int64, [0, 256, 65535], np.uint16),
    (np.int32, [0, 65536], np.int32),        # too large for uint16: unchanged
    (np.int32, [-2, 3], np.int32),           # negative: unchanged, so the check still sees it
    (np.float64, [0.0, 2.5], np.float64),    # float: unchanged, so the check still sees it
    (np.uint8, [0, 7], np.uint8),            # already as small as it gets
])
def test_compact_keeps_every_value(dtype, values, expect):
    block = np.array(values, dtype=dtype).reshape(1, -1, 1)
    small = cache.compact(block)
    assert small.dtype == expect
    assert np.array_equal(small, block)
    wide = cache.widen(small)
    assert np.array_equal(wide, block)
    assert wide.dtype.kind != "u" or wide.dtype.itemsize >= 4  # no unsigned wrap in the kernels


@pytest.fixture(scope="module")
def cube_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache") / "cube.zarr")
    nbdask.save_cube(nbdask.simulate(perturbations=60, features=48, seed=11, chunks=20), path)
    return path


def run(client, cube_path, out, held: bool):
    """The CLI's sequence (open, test, save_results) with or without ``cached_counts``: the
    results and the number of counts-reading tasks that finished."""
    client.register_plugin(CountTasks())
    cube = nbdask.open_cube(cube_path)
    if held:
        with cache.cached_counts(cube, client=client) as cube:
            kinds = {f.result().dtype for f in futures_of(cube["counts"].data)}
            assert kinds <= {np.dtype(np.uint8), np.dtype(np.uint16)} and kinds
            saved = nbdask.save_results(nbdask.test(cube), out, client=client)
    else:
        saved = nbdask.save_results(nbdask.test(cube), out, client=client)
    finished = finished_tasks(client)
    return saved.load(), sum(n for k, n in finished.items() if reads_counts(k))


def test_held_counts_are_read_once_and_change_nothing(cube_path, tmp_path, client):
    plain, reads_plain = run(client, cube_path, str(tmp_path / "plain.zarr"), held=False)
    held, reads_held = run(client, cube_path, str(tmp_path / "held.zarr"), held=True)
    blocks = 3 * 3
    assert reads_plain == 2 * blocks  # the pooling pass, then the estimates
    assert reads_held == blocks
    for name in ("p_value", "q_value", "log_fold_change", "feature_log_dispersion"):
        assert np.array_equal(held[name].values, plain[name].values, equal_nan=True), name
    # save_results released them once the estimates were written
    assert not cache._HELD
    keys = [f.key for f in futures_of(held)] + list(client.run_on_scheduler(
        lambda dask_scheduler: [k for k in dask_scheduler.tasks if "compact" in str(k)]))
    assert not keys


def test_counts_over_the_budget_stay_in_the_store(cube_path, client):
    cube = nbdask.open_cube(cube_path)
    with cache.cached_counts(cube, client=client, fraction=1e-9) as same:
        assert same is cube
        assert not futures_of(same["counts"].data)
    assert not cache._HELD


def test_workers_without_a_memory_limit_get_no_held_counts(cube_path, caplog):
    """Nothing to size the cache against: the counts stay in the store, and the log says why."""
    import logging

    from distributed import Client, LocalCluster

    cube = nbdask.open_cube(cube_path)
    with LocalCluster(n_workers=1, processes=True, host="127.0.0.1", dashboard_address=":0",
                      memory_limit=0) as cluster, Client(cluster) as client, \
            caplog.at_level(logging.INFO, logger="nbdask"):
        with cache.cached_counts(cube, client=client) as same:
            assert same is cube
    assert "the workers have no memory limit" in caplog.text
    assert not cache._HELD

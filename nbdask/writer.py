"""The results writer: ``save_results`` in two distributed passes, with resume.

Pass 1 runs one task per (perturbation, feature) block that computes the block, writes its
region of every result array (whole shards) and ticks the block in the store's
``nbdask_done_blocks`` array, returning the block's FDR counts (and the independent filter's
histogram). Pass 2 reads the stored p-values back, filters them when the run filters, adjusts
them (``nbdask.fdr``) and writes ``q_value``. The store says ``nbdask_status="incomplete"``
throughout and ``"complete"`` last; ``resume=True`` recomputes only the blocks not ticked. Store
access (stores, encodings, the status marker, ``open_results``) is ``nbdask.io``'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping

import dask
import numpy as np
import xarray as xr
import zarr

from .errors import MissingStoreError, ResultsError
from .fdr import LAMBDAS as _LAMBDAS
from .fdr import N_KEYS
from .io import (DONE_ARRAY, STATUS_ATTR, _check_uniform_chunks, _clear_encoding, _encoding,
                 _exists, _is_store_failure, _mark_failed, _open_group, _storage_grid, consolidate,
                 make_store, open_results, store_error)
from .schema import FEATURE, PERTURBATION

logger = logging.getLogger("nbdask")


def save_results(results: xr.Dataset, url: str, *, overwrite: bool = False,
                 resume: bool = False, storage_options: Mapping | None = None, client=None,
                 progress: bool = False) -> xr.Dataset:
    """Compute ``results`` and write them as sharded Zarr v3, marking the store complete last.

    Computation runs on ``client``, else on the active ``distributed.Client``, else on a
    ``LocalCluster`` started for the call. Lazy results are written in two passes:

    1. every variable but ``q_value``, one task per (perturbation, feature) block that computes
       the block, writes its region of every array (whole shards) and then ticks the block in
       the store's ``nbdask_done_blocks`` array;
    2. the FDR step reads the stored p-values back and writes ``q_value`` (exact BH on one
       worker, or bucketed across workers when the p-values outgrow one: ``fdr_backend`` in the
       results attrs, "auto" by default).

    The store says ``nbdask_status="incomplete"`` until every array and the summary attributes
    are written, and ``"complete"`` only then; an error leaves it ``"failed"``. ``resume=True``
    is idempotent, for retry loops: with no store (or one whose run died before its first block)
    it starts a fresh run; with a complete store it does nothing; with an interrupted or failed
    store written with the same options and chunking it computes only the blocks not ticked,
    then runs pass 2 and finalises, from any machine that reaches the store. It says which, as
    one log line. Returns the results reopened from the store.
    """
    from .cache import release as release_cached_counts
    from .cluster import compute_client
    from .fdr import adjust, release_scratch, worker_threads

    exists = _exists(url, storage_options)
    if exists and not overwrite and not resume:
        raise ResultsError(f"{url}: a store already exists; pass overwrite=True (--overwrite) to "
                           f"replace it, or resume=True (--resume) to finish an interrupted run")
    results = _clear_encoding(results)
    _check_uniform_chunks(results)
    attrs = {k: v for k, v in results.attrs.items() if not k.startswith("n_")}
    attrs[STATUS_ATTR] = "incomplete"
    results = results.assign_attrs(attrs)
    store = make_store(url, storage_options=storage_options)
    lazy = results["p_value"].chunks is not None
    if resume:
        plan = _resume_plan(url, storage_options, results, lazy, exists)
        if plan == "complete":
            return open_results(url, storage_options=storage_options)
        resume = plan == "resume"
    start = time.perf_counter()
    fdr = results.attrs.get("fdr", "none")
    final: dict = {}
    try:
        if not lazy:
            counts = {k: int(v) for k, v in _summary_reductions(results).items()}
            results.to_zarr(store, mode="w", zarr_format=3, consolidated=False,
                            encoding=_encoding(results, {}))
        else:
            grid = dict(zip(results["p_value"].dims, (c[0] for c in results["p_value"].chunks)))
            first = results.drop_vars("q_value", errors="ignore")
            levels = _filter_levels(results) if fdr != "none" else None
            with compute_client(client=client) as active, _graph_allowance(results):
                stats, n_blocks = _write_blocks(active, first, store, grid, progress, resume, levels)
                release_cached_counts(active)  # the FDR pass reads p-values, not counts
                final["resumed_blocks" if resume else "computed_blocks"] = n_blocks
                final["wall_seconds_estimates"] = round(time.perf_counter() - start, 3)
                stored = xr.open_zarr(make_store(url, storage_options=storage_options,
                                                 read_only=True), consolidated=False, zarr_format=3,
                                      chunks=_fdr_grid(grid, results["p_value"].shape,
                                                       worker_threads(active)),
                                      drop_variables=[DONE_ARRAY])
                if stats is None:  # resumed: the skipped blocks' counts are in the store
                    stats = active.compute(_counts_graph(stored["p_value"].data, levels)).result()
                n_base = N_KEYS + len(_LAMBDAS) + 1
                stats, hist = stats[:n_base], stats[n_base:]
                counts = {"n_tests": int(stats[:-(len(_LAMBDAS) + 1)].sum())}
                if fdr != "none":
                    p_fdr = stored["p_value"]
                    if levels is not None:
                        p_fdr, stats, info = _filtered(active, p_fdr, results, levels, hist, stats)
                        counts.update(info)
                    q = adjust(p_fdr, method=fdr,
                               scope=results.attrs.get("fdr_scope", "global"),
                               backend=results.attrs.get("fdr_backend", "auto"),
                               n_tests=int(stats[:-(len(_LAMBDAS) + 1)].sum()), stats=stats)
                    final.update(q.attrs)
                    q_ds = xr.Dataset({"q_value": q.drop_vars(list(q.coords)).assign_attrs(
                        results["q_value"].attrs)}, attrs=first.attrs)  # mode "a" rewrites group attrs
                    try:
                        counts.update(_write_q(active, q_ds, store, grid, progress))
                    finally:
                        release_scratch(active)
    except BaseException as err:
        _mark_failed(url, storage_options, err)
        if _is_store_failure(err):
            raise store_error(url, err, storage_options) from None
        raise
    group = _open_group(url, storage_options, "r+")
    final.update({k: v for k, v in results.attrs.items() if k.startswith("n_")})
    final.update(counts)
    final["wall_seconds"] = round(time.perf_counter() - start, 3)
    group.attrs.update(final)
    # Consolidate while the store still says "incomplete": the root document keeps the
    # consolidated metadata when its attributes change, so the completion marker below stays
    # the last write, and a crash in between leaves a store open_results refuses (and --resume
    # finishes).
    consolidate(store)
    group = _open_group(url, storage_options, "r+")
    group.attrs[STATUS_ATTR] = "complete"  # last: readers trust nothing before this
    logger.info("nbdask: wrote %s (%s tests)", url, final.get("n_tests"))
    return open_results(url, storage_options=storage_options)


#: The FDR pass reads the stored p-values in chunks of at least this many values (whole shards
#: stacked along perturbation): the bucketed sort moves chunks x buckets pieces, so fewer, larger
#: chunks mean fewer tasks (4e8 p-values on 2 workers: FDR pass 44.8 -> 38.5 s).
FDR_CHUNK_VALUES = 2 ** 24


def _fdr_grid(grid: Mapping[str, int], shape: tuple[int, int], threads: int) -> dict:
    """Pass-2 chunks: ``grid`` stacked k times along perturbation, k as large as keeps
    FDR_CHUNK_VALUES per chunk and at least 4 chunks per worker thread."""
    n_p = -(-shape[0] // grid[PERTURBATION])
    n_g = -(-shape[1] // grid[FEATURE])
    k = max(1, FDR_CHUNK_VALUES // (grid[PERTURBATION] * grid[FEATURE]))
    while k > 1 and -(-n_p // k) * n_g < 4 * max(threads, 1):
        k -= 1
    k = -(-n_p // -(-n_p // k))  # the same number of chunks, as even as whole shards allow
    return {PERTURBATION: k * grid[PERTURBATION], FEATURE: grid[FEATURE]}


#: The one line ``save_results(..., resume=True)`` logs for a store that needs nothing.
RESUME_COMPLETE = "%s: already complete; nothing to resume"


def stored_pooling(url: str, *, storage_options: Mapping | None = None) -> xr.Dataset | None:
    """The per-feature variables (first dim ``feature``) of an nbdask results store, loaded, or
    None without a store or without them.

    ``save_results`` writes them with the store's skeleton, before any block, so a store that
    exists holds them whole: ``nbdask test --resume`` hands them to ``nbdask.test(pooled=...)``
    instead of running the pooling pass again.
    """
    try:
        group = _open_group(url, storage_options)
    except MissingStoreError:
        return None
    if group.attrs.get(STATUS_ATTR) is None or DONE_ARRAY not in group:
        return None
    store = make_store(url, storage_options=storage_options, read_only=True)
    ds = xr.open_zarr(store, consolidated=False, zarr_format=3, chunks=None,
                      drop_variables=[DONE_ARRAY])
    names = [n for n, v in ds.data_vars.items() if v.dims[:1] == (FEATURE,)]
    return ds[names].load() if names else None


def _resume_plan(url, storage_options, results, lazy, exists) -> str:
    """What ``resume=True`` does with the store at ``url``, logged as one line: "fresh" (no
    store, or its run died before the block record existed), "complete" or "resume"."""
    if not exists:
        logger.warning("%s: no results store yet; starting a fresh run", url)
        return "fresh"
    group = _open_group(url, storage_options, "r")
    status = group.attrs.get(STATUS_ATTR)
    if status == "complete":
        logger.warning(RESUME_COMPLETE, url)
        return "complete"
    if status is None:
        raise ResultsError(f"{url}: not an nbdask results store (no {STATUS_ATTR!r} attribute); "
                           f"choose another path, or remove it")
    if not lazy or DONE_ARRAY not in group:
        logger.warning("%s: nothing of the interrupted run to keep (no block record); "
                       "starting afresh", url)
        return "fresh"
    if group.attrs.get("options") != results.attrs.get("options"):
        raise ResultsError(f"{url}: cannot resume, the store was written with options "
                           f"{group.attrs.get('options')}, this run has {results.attrs.get('options')}; "
                           f"use the same options or --overwrite")
    blocks = tuple(len(c) for c in results["p_value"].chunks)
    if tuple(group[DONE_ARRAY].shape) != blocks or _storage_grid(group["p_value"]) != tuple(
            c[0] for c in results["p_value"].chunks):
        raise ResultsError(f"{url}: cannot resume, the store's block grid differs from this run's "
                           f"chunks; open the cube with the same chunks or use --overwrite")
    done = group[DONE_ARRAY][:]
    logger.warning("%s: resuming (status %s): %d of %d blocks to compute, then the FDR pass",
                   url, status, int(done.size - done.sum()), done.size)
    return "resume"


def _store_block(*blocks, store, names, run, levels=None, block_info=None):
    """Write one block's region of every array, then tick it; returns its FDR counts.

    Runs as ``da.map_blocks`` over all output arrays at once, so the kernel task that
    produces them is shared (passing each output to a separate task would let graph
    optimisation fuse, and rerun, the kernel once per output).
    """
    from .fdr import _chunk_counts
    from .filtering import counts_and_histogram

    _write_region(store, names, blocks, block_info[0], run)
    _array(store, DONE_ARRAY, run)[tuple(block_info[0]["chunk-location"])] = True  # last: done once all arrays are
    p = blocks[names.index("p_value")]
    if levels is None:
        return _chunk_counts(p)[None, None, :]
    g0, g1 = block_info[0]["array-location"][1]
    return counts_and_histogram(p, levels[g0:g1])[None, None, :]


def _filter_levels(results: xr.Dataset) -> np.ndarray | None:
    """Each feature's independent-filtering level, when the run filters (``nbdask.filtering``)."""
    if not results.attrs.get("independent_filtering") or "feature_base_mean" not in results:
        return None
    from .filtering import levels, thresholds

    base = results["feature_base_mean"].values
    return levels(base, thresholds(base))


def _counts_graph(p, levels):
    """Pass 1's totals for stored p-values: FDR counts, then the filter histogram if filtering."""
    import dask.array as da

    from .fdr import counts_graph
    from .filtering import histogram_graph

    graph = counts_graph(p)
    return graph if levels is None else da.concatenate([graph, histogram_graph(p, levels)])


def _filtered(client, p, results, levels, hist, stats):
    """The p-values of the features that pass the chosen filter, their FDR counts (recounted
    only when the filter drops tested comparisons) and the filter's attrs."""
    from .fdr import counts_graph
    from .filtering import choose, keep_mask, summary

    chosen = choose(hist)
    info = summary(results["feature_base_mean"].values, hist, chosen)
    if info["n_filtered"]:
        p = p.where(xr.DataArray(keep_mask(levels, chosen), dims=FEATURE))
        stats = client.compute(counts_graph(p.data)).result()
    return p, stats, info


def _write_blocks(client, ds: xr.Dataset, store, grid: dict, progress: bool, resume: bool,
                  levels: np.ndarray | None = None):
    """Pass 1: one compute-write-tick task per block not yet done; (FDR counts, then the filter
    histogram when ``levels`` are given, or None; n)."""
    import dask.array as da

    from .cluster import show_progress
    from .fdr import LAMBDAS, N_KEYS

    names = [n for n, v in ds.data_vars.items() if v.chunks is not None and v.dims == (PERTURBATION, FEATURE)]
    chunks = ds["p_value"].chunks
    if resume:
        done = zarr.open_group(store, mode="r")[DONE_ARRAY][:]
    else:
        small = _small_loaded(ds)  # metadata and small variables only
        small.to_zarr(store, mode="w", zarr_format=3, consolidated=False, compute=False,
                      encoding=_encoding(small, grid))
        done = np.zeros(tuple(len(c) for c in chunks), dtype=bool)
        zarr.open_group(store, mode="r+").create_array(
            DONE_ARRAY, shape=done.shape, chunks=(1, 1), dtype=bool, fill_value=False,
            dimension_names=("perturbation_block", "feature_block"))
    from .filtering import HIST_BINS, LEVELS

    n_counts = N_KEYS + len(LAMBDAS) + 1 + (0 if levels is None else LEVELS * HIST_BINS)
    written = da.map_blocks(
        _store_block, *(ds[n].data for n in names), store=store, names=names, run=uuid.uuid4().hex,
        levels=levels,
        chunks=(tuple(1 for _ in chunks[0]), tuple(1 for _ in chunks[1]), (n_counts,)),
        new_axis=2, dtype=np.int64, meta=np.empty((0, 0, 0), np.int64))
    todo = list(zip(*np.nonzero(~done)))
    if not todo:
        return None, 0
    if len(todo) == done.size:
        futures = client.compute(written.sum(axis=(0, 1)))
    else:
        futures = client.compute([written.blocks[int(i), int(j)] for i, j in todo])
    if progress:
        show_progress(futures)
    total = client.gather(futures)
    return (total if len(todo) == done.size else None), len(todo)


#: distributed's setting for the graph size above which it warns on stderr.
LARGE_GRAPH = "distributed.admin.large-graph-warning-threshold"


def _graph_allowance(results: xr.Dataset):
    """distributed's large-graph warning threshold raised by the per-feature inputs the kernel
    tasks carry in their graph (the pooled dispersions, their posterior nodes and weights: 33
    float64 per feature, 16 MB for a 60,000-gene table), which travel once by design; the
    warning still fires for anything else large."""
    from dask.utils import parse_bytes

    carried = sum(v.nbytes for v in results.data_vars.values()
                  if v.chunks is None and PERTURBATION not in v.dims)
    return dask.config.set({LARGE_GRAPH: parse_bytes(dask.config.get(LARGE_GRAPH)) + 2 * carried})


def _small_loaded(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with its lazy variables that are not [perturbation, feature] results (coordinates
    taken from the cube, such as ``feature_name``) computed: ``to_zarr(compute=False)`` writes
    only the skeleton of lazy arrays, and no block task writes these."""
    small = [n for n, v in ds.variables.items()
             if v.chunks is not None and v.dims != (PERTURBATION, FEATURE)]
    if not small:
        return ds
    # read here, as open_cube read the index coordinates: a few values per feature
    values = dict(zip(small, dask.compute(*(ds[n].variable for n in small), scheduler="threads")))
    coords = {n: v for n, v in values.items() if n in ds.coords}
    return ds.assign_coords(coords).assign({n: v for n, v in values.items() if n not in coords})


def _write_q(client, q_ds: xr.Dataset, store, grid: dict, progress: bool) -> dict:
    """Pass 2: one task per block writes its q-values and counts q < 0.05 and q < 0.1.

    The counts come back from the writing tasks themselves: a separate reduction over q (a
    second collection beside ``to_zarr``'s) made dask run the whole FDR graph twice.
    """
    import dask.array as da

    from .cluster import show_progress

    if "q_value" not in zarr.open_group(store, mode="r"):  # else a resumed FDR pass: it exists
        q_ds.to_zarr(store, mode="a", zarr_format=3, consolidated=False, compute=False,
                     encoding=_encoding(q_ds, grid, shard_by_chunks=False))  # metadata only
    q = q_ds["q_value"].data
    written = da.map_blocks(_store_q_block, q, store=store, run=uuid.uuid4().hex,
                            chunks=(tuple(1 for _ in q.chunks[0]), tuple(1 for _ in q.chunks[1]), (2,)),
                            new_axis=2, dtype=np.int64, meta=np.empty((0, 0, 0), np.int64))
    future = client.compute(written.sum(axis=(0, 1)))
    if progress:
        show_progress(future)
    n05, n10 = (int(v) for v in client.gather(future))
    return {"n_significant_q05": n05, "n_significant_q10": n10}


#: Result arrays opened by the block tasks of a run in this process, by (run token, name): each
#: open reads the array's metadata from the store (a round trip per array on object stores),
#: once per process instead of once per block.
_OPENED: dict[tuple[str, str], zarr.Array] = {}


def _array(store, name: str, run: str) -> zarr.Array:
    key = (run, name)
    if key not in _OPENED:
        if len(_OPENED) > 64:
            _OPENED.clear()
        _OPENED[key] = zarr.open_group(store, mode="r+")[name]
    return _OPENED[key]


def _write_region(store, names, blocks, info, run):
    """Write each block into its array's region (``info``: dask's block_info entry)."""
    region = tuple(slice(start, stop) for start, stop in info["array-location"])
    for name, block in zip(names, blocks):
        _array(store, name, run)[region] = block


def _store_q_block(q, *, store, run, block_info=None):
    _write_region(store, ["q_value"], [q], block_info[0], run)
    return np.array([(q < 0.05).sum(), (q < 0.1).sum()], dtype=np.int64)[None, None, :]


def _summary_reductions(results: xr.Dataset) -> dict:
    """Counts for the summary (lazy when the data are): tests, and significant q-values."""
    out = {}
    if "p_value" in results:
        p = results["p_value"].data
        out["n_tests"] = (p == p).sum()
    if "q_value" in results:
        q = results["q_value"].data
        out["n_significant_q05"] = (q < 0.05).sum()
        out["n_significant_q10"] = (q < 0.1).sum()
    return out

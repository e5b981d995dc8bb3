"""False discovery rate adjustment: exact Benjamini–Hochberg with R's ``p.adjust`` semantics.

q(p) = min over observed t >= p of (m / F(t)) * t, capped at 1, where F(t) counts the p-values
<= t and m the non-NaN p-values in scope; NaN p-values stay NaN and are not counted. Ties get
equal q. This is R's ``pmin(1, cummin((n / i) * p[o]))`` with the same operation order.

Two exact paths for a dask array of p-values, bit-identical to each other:

* ``"gather"``: the p-values of the scope go to one task on a worker and are sorted there.
* ``"buckets"``: for more p-values than one worker holds, or to sort on every worker. The raw
  IEEE-754 bits of a non-negative float64, read as uint64, order like the values, so
  ``bits >> SHIFT`` cuts [0, 1] into monotone key bins without knowing the distribution.
  Pass 1 counts p-values per key bin (and the Storey counts); the plan merges adjacent bins into
  buckets of at most ``bucket_size`` values; each chunk splits its p-values by bucket (keeping
  only a 2-byte bucket id per position); each bucket is sorted on its own with ranks offset by
  the counts below it; each chunk gathers its q-values back by those ids and caps them by the
  carry, the minimum term over higher buckets (exact because a running minimum started at the
  carry equals the minimum of the uncarried one and the carry). Every task holds one chunk or
  one bucket.

``fdr="storey"`` multiplies BH q-values by Storey's pi0, estimated from the counts of p >= lambda
on lambda = 0.05, 0.10, ..., 0.95 with the bootstrap-MSE choice of R's ``qvalue::pi0est``.
"""

from __future__ import annotations

import logging
import math

import dask
import numpy as np
import xarray as xr

from .errors import OptionError
from .schema import FEATURE

logger = logging.getLogger("nbdask")

FDR_METHODS = ("bh", "storey", "none")
FDR_SCOPES = ("global", "perturbation")
BACKENDS = ("auto", "gather", "buckets")
#: Key bins: float64 bits >> SHIFT gives 2**(62 - SHIFT) bins over [0, 1], 256 per binade.
SHIFT = 44
N_KEYS = (0x3FF0000000000000 >> SHIFT) + 1
#: Storey's lambda grid (R qvalue's default).
LAMBDAS = np.round(np.arange(0.05, 0.951, 0.05), 2)
#: Bytes per p-value the gather path needs on its worker (p, order, sorted copies, q).
GATHER_BYTES = 40
#: A bucket holds at most this fraction of the smallest worker's memory (at GATHER_BYTES per
#: value): small enough that a bucket being sorted and the pieces waiting for the others stay
#: under the spill threshold, large enough that the chunks x buckets pieces stay few (4e8
#: p-values on 2 x 8 GiB: 13 buckets, 4.6 GiB peak per worker; at 5% it was 37 buckets and
#: the FDR pass took 48.8 s instead of 44.8 s).
BUCKET_MEMORY_FRACTION = 0.15
BUCKETS_PER_THREAD = 2
#: With several worker threads, ``fdr_backend="auto"`` sorts in buckets (in parallel) above this
#: many p-values rather than gathering them onto one worker (2-core machine, 2 workers:
#: 2.5e7 p-values 2.4 s against 3.3 s, 1e8 10.8 s against 17.1 s).
PARALLEL_MIN_TESTS = 2 ** 22


def bh(p: np.ndarray, *, axis: int | None = None) -> np.ndarray:
    """Benjamini–Hochberg q-values of a NumPy array, over all of it or along ``axis``.

    The whole-array case runs the numba core (``fdr_fused``, 2-3x faster, bit-identical);
    ``bh_sorted`` is the plain NumPy definition.
    """
    p = np.asarray(p, dtype=np.float64)
    if axis is None:
        from . import fdr_fused

        return fdr_fused.bh(p)
    return bh_sorted(p, axis=axis)


def bh_sorted(p: np.ndarray, *, axis: int = -1) -> np.ndarray:
    """BH along ``axis`` by a full sort: R's ``pmin(1, cummin((n / i) * p[o]))``."""
    p = np.asarray(p, dtype=np.float64)
    p = np.moveaxis(p, axis, -1)
    order = np.argsort(p, axis=-1)  # NaN sorts last; the order among ties does not change q
    p_sorted = np.take_along_axis(p, order, axis=-1)
    m = np.sum(~np.isnan(p), axis=-1, keepdims=True).astype(np.float64)
    rank = np.arange(1, p.shape[-1] + 1, dtype=np.float64)
    q_sorted = _running_min((m / rank) * p_sorted)
    q = np.empty_like(q_sorted)
    np.put_along_axis(q, order, q_sorted, axis=-1)
    return np.moveaxis(q, -1, axis)


def _running_min(h: np.ndarray) -> np.ndarray:
    """min over the element and everything after it along the last axis (NaN skipped), <= 1."""
    return np.minimum(np.fmin.accumulate(h[..., ::-1], axis=-1)[..., ::-1], 1.0)


# ---------------------------------------------------------------- pass 1: counts

def _chunk_counts(p: np.ndarray) -> np.ndarray:
    """Counts per key bin (N_KEYS), then per lambda of p >= lambda, then the NaN count."""
    from .fdr_fused import chunk_counts

    flat = np.ascontiguousarray(p, dtype=np.float64).reshape(-1)
    return counts_row(*chunk_counts(flat, np.uint64(SHIFT), N_KEYS, LAMBDAS), flat.size)


def counts_row(bins: np.ndarray, below: np.ndarray, n_nan: int, size: int) -> np.ndarray:
    """``_chunk_counts``'s row from a numba counting pass's (bins, below, n_nan) over ``size``
    values."""
    if n_nan < 0:
        raise ValueError("p_value: values outside [0, 1]; BH needs p-values")
    storey = (size - n_nan) - np.cumsum(below)[:-1]  # count of p >= lambda_j
    return np.concatenate([bins, storey, [n_nan]]).astype(np.int64)


def counts_graph(p):
    """The counting pass as a lazy dask array (to share a graph with the p-values' producer)."""
    import dask.array as da

    parts = [da.from_delayed(dask.delayed(_chunk_counts)(c), shape=(N_KEYS + len(LAMBDAS) + 1,),
                             dtype=np.int64) for c in p.to_delayed().ravel()]
    return da.stack(parts).sum(axis=0)


def counts(p) -> dict:
    """One pass over a (dask) array of p-values: key-bin counts, Storey counts, m and NaNs."""
    import dask.array as da

    total = counts_graph(p).compute() if isinstance(p, da.Array) else _chunk_counts(np.asarray(p))
    return _stats(total)


def _stats(total: np.ndarray) -> dict:
    bins, storey, nan = total[:N_KEYS], total[N_KEYS:-1], int(total[-1])
    return {"bins": bins, "storey": storey, "m": int(bins.sum()), "n_nan": nan}


def storey_pi0(storey_counts: np.ndarray, m: int) -> float:
    """pi0 by R ``qvalue::pi0est(pi0.method = "bootstrap")`` from counts of p >= lambda."""
    if m == 0:
        return 1.0
    w = np.asarray(storey_counts, dtype=np.float64)
    pi0 = w / (m * (1.0 - LAMBDAS))
    min_pi0 = np.quantile(pi0, 0.1)  # R's default type 7 quantile
    mse = (w / (m ** 2 * (1.0 - LAMBDAS) ** 2)) * (1.0 - w / m) + (pi0 - min_pi0) ** 2
    return float(min(pi0[mse == mse.min()].min(), 1.0))


# ---------------------------------------------------------------- the bucket path

def plan_buckets(bins: np.ndarray, bucket_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge adjacent key bins into buckets of <= bucket_size values (a single larger bin stays
    whole). Returns (edges, offsets): bucket b holds keys [edges[b], edges[b+1]) and
    ``offsets[b]`` p-values lie in lower buckets."""
    cum = np.concatenate([[0], np.cumsum(bins)])
    edges = [0]
    while edges[-1] < len(bins):
        start = edges[-1]
        # furthest end with at most bucket_size values, at least one bin
        end = int(np.searchsorted(cum, cum[start] + bucket_size, side="right")) - 1
        edges.append(max(end, start + 1))
    edges = np.asarray(edges)
    occupied = np.concatenate([[True], cum[edges[1:]] > cum[edges[:-1]]])
    edges = edges[occupied | (np.arange(len(edges)) == len(edges) - 1)]
    return edges, cum[edges[:-1]]


def _bucket_table(edges: np.ndarray) -> np.ndarray:
    """Bucket of every key bin: a lookup table (N_KEYS int32) for the numba split and scatter."""
    return (np.searchsorted(edges, np.arange(N_KEYS), side="right") - 1).astype(np.int32)


def _split(p: np.ndarray, edges: np.ndarray) -> list[np.ndarray]:
    """A chunk's non-NaN p-values by bucket, each in the chunk's (C) order, then the bucket id
    of every position (what ``_assemble`` needs instead of the p-values: 2 bytes, not 8)."""
    from .fdr_fused import scratch, split_by_bucket

    flat = np.ascontiguousarray(p, dtype=np.float64).reshape(-1)
    grouped = scratch("split", flat.size, np.float64)
    sizes, ids = split_by_bucket(flat, _bucket_table(edges), np.uint64(SHIFT), len(edges) - 1, grouped)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [grouped[a:b].copy() for a, b in zip(bounds[:-1], bounds[1:])] + [ids]


def _bucket_sort(m, offset, *pieces):
    """One bucket's q-values before the carry from higher buckets, split back per chunk, and
    the bucket's minimum term (last)."""
    from .fdr_fused import bh_pieces

    q, low = bh_pieces(pieces, m, offset)
    return tuple(q) + (float(low),)


def _carries(*mins):
    """Per bucket, the minimum term of all higher buckets (inf for the last): the running
    minimum that ``_assemble`` applies."""
    tail = np.minimum.accumulate(np.asarray(mins[::-1], dtype=np.float64))[::-1]
    return np.append(tail[1:], math.inf)


#: The work arrays (``fdr_fused.scratch``) of ``_split`` and ``_bucket_sort``.
_SORT_SCRATCH = ("split", "values", "sorted", "positions", "values_tmp", "positions_tmp")


def release_scratch(client) -> None:
    """Free the bucketed pass's work arrays (``fdr_fused.scratch``) on every worker of
    ``client``: ``save_results`` calls it after the FDR pass; call it after computing a
    ``bh_buckets`` array yourself."""
    from .fdr_fused import release_scratch as release

    try:
        client.run(release)
    except Exception as err:  # a worker gone since: its memory went with it
        logger.debug("nbdask.fdr: releasing scratch arrays: %s", err)


def _assemble(ids: np.ndarray, shape: tuple, carries: np.ndarray, *q_pieces) -> np.ndarray:
    """The chunk's q-values from its per-bucket pieces, the carries and its bucket ids (the
    inverse of ``_split``)."""
    from .fdr_fused import release_scratch, reusable, scatter_by_bucket, scratch

    release_scratch(_SORT_SCRATCH)  # every bucket is sorted once a chunk assembles (_carries)
    sizes = np.array([len(x) for x in q_pieces], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    grouped = scratch("assemble", int(sizes.sum()), np.float64)
    if q_pieces:
        np.concatenate(q_pieces, out=grouped)
    q = reusable("assembled", ids.shape[0], np.float64)
    scatter_by_bucket(ids, grouped, starts, carries, q)
    return q.reshape(shape)


def bh_buckets(p, *, bucket_size: int, stats: dict | None = None):
    """Exact BH of a dask array through key buckets; lazy dask array chunked like ``p``."""
    import dask.array as da

    from .fdr_fused import NAN_BUCKET

    stats = stats or counts(p)
    m = stats["m"]
    edges, offsets = plan_buckets(stats["bins"], bucket_size)
    n_buckets = len(edges) - 1
    logger.info("nbdask.fdr: %d p-values in %d buckets of <= %d", m, n_buckets, bucket_size)
    chunks = p.to_delayed()
    flat_chunks = chunks.ravel()
    if n_buckets >= NAN_BUCKET:
        raise OptionError(f"{n_buckets} FDR buckets: at most {NAN_BUCKET - 1}; raise bucket_size")
    # The p chunks are read once, by _split, and released: only their 2-byte bucket ids wait
    # for the q-values to come back.
    split = [dask.delayed(_split, nout=n_buckets + 1)(c, edges) for c in flat_chunks]
    pieces = [[split[c][b] for c in range(len(flat_chunks))] for b in range(n_buckets)]
    n_chunks = len(flat_chunks)
    sorted_ = [dask.delayed(_bucket_sort, nout=n_chunks + 1)(m, int(offsets[b]), *pieces[b])
               for b in range(n_buckets)]
    carries = dask.delayed(_carries)(*[sorted_[b][n_chunks] for b in range(n_buckets)])
    blocks = []
    for c in range(n_chunks):
        qp = [sorted_[b][c] for b in range(n_buckets)]
        index = np.unravel_index(c, chunks.shape)
        shape = tuple(p.chunks[d][index[d]] for d in range(p.ndim))
        blocks.append(da.from_delayed(dask.delayed(_assemble)(split[c][n_buckets], shape, carries, *qp),
                                      shape=shape, dtype=np.float64))
    grid = np.empty(chunks.shape, dtype=object)
    for c, block in enumerate(blocks):
        grid[np.unravel_index(c, chunks.shape)] = block
    return da.block(grid.tolist())


# ---------------------------------------------------------------- entry point

def _bh_block(block: np.ndarray, axis: int | None) -> np.ndarray:
    return bh(block, axis=axis)


def _bucket_size(m: int, memory_limit: float | None, threads: int) -> int:
    """Values per bucket: at most BUCKET_MEMORY_FRACTION of a worker's memory, at least
    BUCKETS_PER_THREAD buckets per thread (the buckets are what runs in parallel), and a
    number of buckets that the threads share evenly: with 9 buckets on 2 threads one sorts
    alone at the end (4e8 p-values on 2 workers: the last of 5 rounds)."""
    threads = max(threads, 1)
    by_memory = max(int(BUCKET_MEMORY_FRACTION * (memory_limit or 4e9) / GATHER_BYTES), 1)
    n_buckets = max(-(-m // by_memory), BUCKETS_PER_THREAD * threads)
    n_buckets = -(-n_buckets // threads) * threads
    return max(1_000_000, -(-m // n_buckets))


def choose_backend(m: int, *, memory_limit: float | None, threads: int = 1) -> str:
    """``"buckets"`` when m p-values do not fit comfortably in one worker, or when the cluster
    has several threads and more than PARALLEL_MIN_TESTS p-values (the bucketed sort runs on
    all of them, gathering on one); else ``"gather"``."""
    if memory_limit is not None and memory_limit > 0 and m * GATHER_BYTES >= 0.5 * memory_limit:
        return "buckets"
    return "buckets" if threads > 1 and m > PARALLEL_MIN_TESTS else "gather"


def _workers(client=None) -> list[dict]:
    if client is None:
        from .cluster import active_client

        client = active_client()
    return [] if client is None else list(client.scheduler_info()["workers"].values())


def worker_memory_limit(client=None) -> float | None:
    """The smallest memory limit among the workers of ``client`` (default: the active client),
    in bytes, if any."""
    limits = [w.get("memory_limit") or 0 for w in _workers(client)]
    return float(min(limits)) if limits and min(limits) > 0 else None


def worker_threads(client=None) -> int:
    """Threads over all workers of ``client`` (default: the active client; 1 without one)."""
    return max(1, sum(int(w.get("nthreads") or 1) for w in _workers(client)))


def adjust(p_value: xr.DataArray, *, method: str = "bh", scope: str = "global",
           backend: str = "gather", bucket_size: int | None = None,
           n_tests: int | None = None, stats: np.ndarray | None = None) -> xr.DataArray:
    """FDR-adjust a (perturbation, feature) p-value array.

    ``backend="gather"`` keeps a dask input lazy: one task gathers the scope's p-values (and
    Storey's pi0 is a lazy reduction). ``"buckets"`` and ``"auto"`` first run the counting pass
    (they compute, so use them on stored p-values), then return a lazy array; ``"auto"`` picks
    gather or buckets from the smallest worker memory limit and the thread count of the active
    client (``choose_backend``; given
    ``n_tests``, the number of non-NaN p-values, it skips the counting pass when gathering). The
    chosen backend (and pi0 when known) are recorded in the result's attrs. ``stats``: the
    counting pass's totals when already computed (``counts_graph``).
    """
    if method not in FDR_METHODS or method == "none":
        raise OptionError(f"fdr={method!r}: choose one of {[m for m in FDR_METHODS if m != 'none']}")
    if scope not in FDR_SCOPES:
        raise OptionError(f"fdr_scope={scope!r}: choose one of {list(FDR_SCOPES)}")
    if backend not in BACKENDS:
        raise OptionError(f"fdr_backend={backend!r}: choose one of {list(BACKENDS)}")
    if method == "storey" and scope != "global":
        raise OptionError("fdr='storey' needs fdr_scope='global' (pi0 is estimated over all tests)")
    axis = None if scope == "global" else p_value.dims.index(FEATURE)
    data = p_value.data
    lazy = p_value.chunks is not None
    attrs: dict = {}
    stats = _stats(stats) if stats is not None else None
    chosen = "gather"
    if lazy and scope == "global" and backend != "gather":
        chosen = backend
        if backend == "auto":
            if n_tests is None:
                stats = counts(data)
                n_tests = stats["m"]
            chosen = choose_backend(n_tests, memory_limit=worker_memory_limit(), threads=worker_threads())
        if chosen == "buckets" or method == "storey":
            stats = stats or counts(data)
    if chosen == "buckets":
        size = bucket_size or _bucket_size(stats["m"], worker_memory_limit(), worker_threads())
        q = bh_buckets(data, bucket_size=size, stats=stats)
    elif not lazy:
        q = bh(np.asarray(data), axis=axis)
    else:
        gathered = data.rechunk(-1 if axis is None else {axis: -1})
        # meta given: dask would otherwise call the numba core on an empty block to learn it,
        # importing and loading it in the client (1 s) for a graph save_results never runs
        q = gathered.map_blocks(_bh_block, axis, dtype=np.float64,
                                meta=np.empty((0,) * data.ndim)).rechunk(data.chunks)
    attrs["fdr_backend"] = chosen
    if method == "storey":
        if stats is not None or not lazy:
            stats = stats or counts(data)
            pi0 = storey_pi0(stats["storey"], stats["m"])
            attrs["storey_pi0"] = pi0
            q = q * pi0
        else:
            import dask.array as da

            parts = [dask.delayed(_chunk_counts)(c) for c in data.to_delayed().ravel()]
            pi0 = dask.delayed(_pi0_from_total)(dask.delayed(sum)(parts))
            q = q * da.from_delayed(pi0, shape=(), dtype=np.float64)
    return p_value.copy(data=q).rename("q_value").assign_attrs(attrs)


def _pi0_from_total(total: np.ndarray) -> float:
    return storey_pi0(total[N_KEYS:-1], int(total[:N_KEYS].sum()))

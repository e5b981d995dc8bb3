"""Counts read once for both passes of a pooled run, held compacted in the workers' memory.

With a pooled dispersion (``dispersion="feature"`` or ``"shrunk"``) every p-value depends on a
reduction over the whole cube, so ``test`` reads the counts for the pooling pass and
``save_results`` reads them again for the estimates. ``cached_counts`` reads them once into
the workers, each block in the smallest unsigned integer type that holds it (screen counts are
mostly below 65536: a quarter of int64's bytes, half of int32's), and hands both passes those
blocks instead of the store's. At 4e8 comparisons on 2 workers the second read of int32
counts cost 8-10 s of the workers' CPU time (about 4 s of a 2-minute run).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import xarray as xr

logger = logging.getLogger("nbdask")

#: The cache is used only when the compacted counts take at most this fraction of the
#: cluster's memory (the sum of its workers' limits), so the passes keep room for their own
#: blocks and the FDR pass for its buckets.
CACHE_MEMORY_FRACTION = 0.25
#: Bytes per count assumed when sizing the cache: uint16, unless the store's type is smaller.
_COMPACT_BYTES = 2
#: The futures each client holds for ``cached_counts``, by ``Client.id``: ``release`` drops them.
_HELD: dict[str, list] = {}


def compact(block: np.ndarray) -> np.ndarray:
    """``block`` as uint8 or uint16 when its values are non-negative integers that fit, else
    unchanged (so a bad block still fails the estimates pass's checks as it would have)."""
    if block.dtype.kind in "iu" and block.size and block.dtype.itemsize > 1:
        low, high = int(block.min()), int(block.max())
        if low >= 0 and high < 2 ** 16:
            small = np.dtype(np.uint8 if high < 2 ** 8 else np.uint16)
            if small.itemsize < block.dtype.itemsize:
                return block.astype(small)
    return block


def widen(counts):
    """A counts block for the kernels: uint8 and uint16 blocks (``compact``'s, or a cube's own)
    as int32, whose differences cannot wrap; other blocks unchanged. Every task that takes
    counts blocks calls it first, so a held block is widened inside its consumer's task, not
    as a task of its own whose output would wait in memory."""
    if counts.dtype.kind == "u" and counts.dtype.itemsize < 4:
        return counts.astype(np.int32)
    return counts


def _memory(client) -> float:
    workers = client.scheduler_info()["workers"].values()
    return float(sum(w.get("memory_limit") or 0 for w in workers))


@contextmanager
def cached_counts(cube: xr.Dataset, *, client, fraction: float = CACHE_MEMORY_FRACTION):
    """Yield ``cube`` with its counts read once into the workers of ``client`` (compacted,
    see ``compact``), to pass to ``test`` and then ``save_results``.

    The yielded counts keep the store's dtype in their metadata, but their blocks are the
    compacted ones. Yields ``cube`` unchanged when its counts are not dask-backed, when the
    workers have no memory limit to size them against, or when they would take more than
    ``fraction`` of the cluster's memory. ``save_results`` frees the held blocks once it has
    written the estimates (``release``): results computed from the yielded cube cannot be
    computed again after that. Otherwise they go with the cube and results built on them.
    """
    counts = cube["counts"]
    need = counts.size * min(counts.dtype.itemsize, _COMPACT_BYTES)
    memory = _memory(client)
    if counts.chunks is None or not memory or need > fraction * memory:
        if counts.chunks is not None:
            why = (f"over {100 * fraction:.0f}% of the cluster's {memory / 1e9:.1f} GB" if memory
                   else "the workers have no memory limit")
            logger.info("nbdask: counts (%.1f GB compacted) not held in memory: %s; they are "
                        "read once per pass", need / 1e9, why)
        yield cube
        return
    from distributed import futures_of

    # Declared with the store's dtype although most blocks are narrower: the tasks that take
    # them widen them first (``widen``).
    held = client.persist(counts.data.map_blocks(compact, dtype=counts.dtype))
    _HELD.setdefault(client.id, []).extend(futures_of(held))
    try:
        yield cube.assign(counts=counts.copy(data=held))
    finally:
        # Not cancelled here: after a failed pass the scheduler may still hold erred tasks
        # that depend on them, and cancelling through those trips its bookkeeping. They go
        # when the cube and results built on them do.
        _HELD.pop(client.id, None)


def release(client) -> None:
    """Free the counts ``cached_counts`` holds on ``client``'s cluster, once every pass that
    reads them has finished (``save_results`` after its estimates); none: nothing to do."""
    futures = _HELD.pop(getattr(client, "id", None), [])
    if futures:
        client.cancel(futures)

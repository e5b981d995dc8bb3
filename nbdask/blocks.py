"""Work on a results Dataset one (perturbation, feature) block at a time, on the workers.

Exports and reports never bring a whole result to the client: a function runs on every block
and returns something small (a filtered table, a histogram, a top-k list). ``block_tasks``
makes one task per block; ``stream`` brings their outputs back in store order with a bounded
number in flight; ``tree_reduce`` merges them on the workers, a few at a time, into one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import xarray as xr

from .schema import FEATURE, PERTURBATION

#: Blocks in flight per worker thread while streaming (more overlaps I/O; each holds its output).
WINDOW_PER_THREAD = 2


def _as_dask(var: xr.DataArray):
    import dask.array as da

    data = var.transpose(PERTURBATION, FEATURE).data
    return data if var.chunks is not None else da.from_array(np.asarray(data), chunks=data.shape)


def _call(*blocks, fn, names, kwargs, block_info=None):
    origin = tuple(int(start) for start, _ in block_info[0]["array-location"])
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = fn(dict(zip(names, blocks)), origin, **kwargs)
    return out


def in_memory(arrays: Mapping[str, xr.DataArray]) -> bool:
    """Whether every array is already in memory (then shipping it to a cluster gains nothing)."""
    return all(a.chunks is None for a in arrays.values())


def block_tasks(arrays: Mapping[str, xr.DataArray], fn: Callable, **kwargs) -> list:
    """One delayed task per block of the aligned (perturbation, feature) ``arrays``, in store
    order (perturbation blocks outer): ``fn({name: block}, (row0, col0), **kwargs)``.

    ``arrays`` share the chunks of the first one (others are rechunked to it; NumPy-backed
    arrays make one block).
    """
    import dask.array as da

    names = list(arrays)
    data = [_as_dask(arrays[n]) for n in names]
    grid = data[0].chunks
    data = [d if d.chunks == grid else d.rechunk(grid) for d in data]
    out = da.map_blocks(_call, *data, fn=fn, names=names, kwargs=kwargs,
                        chunks=tuple((1,) * len(c) for c in grid), dtype=object,
                        meta=np.empty((0, 0), dtype=object))
    return [_first(t) for t in out.to_delayed().ravel()]


def _unwrap(block):
    return block[0, 0]


def _first(task):
    import dask

    return dask.delayed(_unwrap, pure=True)(task)


def _threads(client) -> int:
    if client is None:
        import os

        return os.cpu_count() or 1
    from .fdr import worker_threads

    return max(1, worker_threads(client))


def _client(client, local: bool):
    from .cluster import active_client

    return None if local else (client or active_client())


def stream(tasks: list, *, client=None, local: bool = False) -> Iterator:
    """Yield the tasks' outputs in order, keeping about 2 per worker thread in flight.

    Runs on ``client``, else the active ``distributed.Client``, else (and with ``local``: for
    arrays already in this process's memory) dask's threads here. Memory on the client stays at
    a window of outputs, whatever the number of tasks.
    """
    client = _client(client, local)
    window = WINDOW_PER_THREAD * _threads(client)
    if client is None:
        import dask

        for start in range(0, len(tasks), window):
            yield from dask.compute(*tasks[start:start + window], scheduler="threads")
        return
    pending: deque = deque()
    todo = iter(tasks)
    for task in todo:
        pending.append(client.compute(task))
        if len(pending) >= window:
            break
    while pending:
        future = pending.popleft()
        yield future.result()
        future.release()
        task = next(todo, None)
        if task is not None:
            pending.append(client.compute(task))


def tree_reduce(tasks: list, merge: Callable, *, split_every: int = 8, **kwargs):
    """One delayed value: ``merge(*outputs, **kwargs)`` applied in a tree, ``split_every`` at a
    time, so no task (and not the client) ever holds more than that many block outputs."""
    import dask

    level = list(tasks)
    if len(level) == 1:
        return dask.delayed(merge, pure=True)(level[0], **kwargs)
    while len(level) > 1:
        level = [dask.delayed(merge, pure=True)(*level[i:i + split_every], **kwargs)
                 for i in range(0, len(level), split_every)]
    return level[0]


def compute(task, *, client=None, local: bool = False):
    """Compute one delayed value on ``client``, the active client, or (``local``) dask's threads."""
    client = _client(client, local)
    if client is None:
        import dask

        return dask.compute(task, scheduler="threads")[0]
    return client.compute(task).result()

"""Pseudobulk sums streamed from chunks of cells into cube-shaped blocks.

Each chunk of cells (rows of X, dense or CSR) is summed per destination row with one sparse
indicator-matrix product, ``I @ X_chunk`` (I: rows present in the chunk x cells), and the
nonzero sums are cut into the cube's (perturbation shard, feature shard) blocks at once. Every
block is then a tree sum over the chunks (``SPLIT_EVERY`` at a time), so a worker holds a few
cell chunks and a few dense blocks, never all cells nor the whole cube.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import dask
import dask.array as da
import numpy as np
from scipy import sparse

from .groups import Groups

#: Chunks (or partial sums) added in one task of the reduction tree.
SPLIT_EVERY = 8


@dataclass(frozen=True)
class Problem:
    """Values of one chunk that are not counts: what, how many, the first one and where."""

    what: str
    count: int
    example: float
    row: int      # position among all cells (or samples)
    column: int   # feature position


def find_problem(x, first_row: int = 0):
    """(``x`` as float64 dense or CSR, the chunk's first ``Problem`` or None)."""
    if sparse.issparse(x):
        x = sparse.csr_matrix(x)
        values = x.data
    else:
        x = np.asarray(x)
        values = x.reshape(-1)
    if values.dtype.kind not in "biuf":
        return x, Problem(f"non-numeric ({values.dtype})", values.size, np.nan, first_row, 0)
    checks = []
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        checks = [("NaN or infinite", ~finite), ("negative", values < 0),
                  ("non-integer", finite & (values != np.floor(values)))]
    elif values.dtype.kind == "i":
        checks = [("negative", values < 0)]
    for what, mask in checks:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            if sparse.issparse(x):
                row, col = int(np.searchsorted(x.indptr, i, side="right") - 1), int(x.indices[i])
            else:
                row, col = divmod(i, x.shape[1])
            return x, Problem(what, int(mask.sum()), float(values[i]), first_row + row, col)
    return x.astype(np.float64), None


#: What to do about values that are not counts (single-cell: the usual culprit is X normalised).
COUNTS_FIX = ("pass raw integer counts (e.g. the layer that holds them: layer='counts', --layer "
              "counts), not normalised or log values")


def describe_problems(problems, *, source: str, columns, unit: str = "cell", rows=None,
                      fix: str = COUNTS_FIX, scanned: int | None = None) -> str | None:
    """One line for the first problem (in row order) and how often its kind occurs (among the
    first ``scanned`` rows when only those were read); or None."""
    found = [p for p in problems if p is not None]
    if not found:
        return None
    first = min(found, key=lambda p: p.row)
    total = sum(p.count for p in found if p.what == first.what)
    row = repr(str(rows[first.row])) if rows is not None else f"{first.row} (0-based row)"
    where = f" in the first {scanned:,} {unit}s" if scanned else ""
    return (f"{source}: {total:,} {first.what} value(s){where}, e.g. {first.example:g} at {unit} {row}, "
            f"feature {str(columns[first.column])!r}; {fix}")


def _partial(x, rows, *, first_cell, n_treated_rows, n_control_rows, rows_per_block, n_blocks,
             feature_shard, n_features):
    """Sums of one cell chunk, cut into blocks: ({(b, h): block sums}, ``Problem`` or None).

    b < n_blocks is a perturbation block (rows_per_block = perturbation shard x R), b ==
    n_blocks the control block; h is the feature block. A block's sums are a flat dense float64
    array where at least half of it is nonzero, else (flat index, value) pairs, whichever is
    smaller. Values that are not counts are reported, not raised: a task that raises makes
    every worker log the traceback, where the client can say it in one line.
    """
    x, problem = find_problem(x, first_cell)
    keep = rows >= 0
    if problem is not None or not keep.any():
        return {}, problem  # the problem fails the import once every chunk has been seen
    targets, inverse = np.unique(rows[keep], return_inverse=True)
    indicator = sparse.csr_matrix((np.ones(inverse.size), (inverse, np.flatnonzero(keep))),
                                  shape=(targets.size, x.shape[0]))
    sums = sparse.csr_matrix(indicator @ x)  # rows: targets, ascending, so blocks are row ranges
    out = {}
    for b in range(n_blocks + 1):
        lo = b * rows_per_block if b < n_blocks else n_treated_rows
        n_rows = (min(rows_per_block, n_treated_rows - lo) if b < n_blocks else n_control_rows)
        r0, r1 = np.searchsorted(targets, [lo, lo + n_rows])
        if r0 == r1:
            continue
        local = targets[r0:r1] - lo
        for h, g0 in enumerate(range(0, n_features, feature_shard)):
            width = min(feature_shard, n_features - g0)
            piece = sums[r0:r1, g0:g0 + width]
            if piece.nnz == 0:
                continue
            if 2 * piece.nnz >= n_rows * width:
                dense = np.zeros((n_rows, width))
                dense[local] = piece.toarray()
                out[b, h] = dense.reshape(-1)
            else:
                piece = piece.tocoo()
                out[b, h] = (local[piece.row] * width + piece.col, piece.data)
    return out, None


def _leaf(partials, *, block, size):
    """Dense sum (float64, flat) of one block over a few cell chunks."""
    pieces = [p[0][block] for p in partials if block in p[0]]
    pairs = [piece for piece in pieces if isinstance(piece, tuple)]
    total = (np.bincount(np.concatenate([f for f, _ in pairs]),
                         np.concatenate([v for _, v in pairs]), minlength=size)
             if pairs else np.zeros(size))
    for piece in pieces:
        if not isinstance(piece, tuple):
            total += piece
    return total


def _add(parts):
    total = np.add(parts[0], parts[1]) if len(parts) > 1 else parts[0].copy()
    for part in parts[2:]:
        total += part
    return total


def _finish(parts, *, shape, order):
    """Sum the last level and lay it out as the cube block (int64)."""
    return np.ascontiguousarray(np.rint(_add(parts)).astype(np.int64).reshape(shape).transpose(order))


def _reduce(partials: list, *, block, size, shape, order):
    leaf = dask.delayed(partial(_leaf, block=block, size=size), pure=True)
    add = dask.delayed(_add, pure=True)
    nodes = [leaf(partials[i:i + SPLIT_EVERY]) for i in range(0, len(partials), SPLIT_EVERY)]
    while len(nodes) > SPLIT_EVERY:
        nodes = [add(nodes[i:i + SPLIT_EVERY]) for i in range(0, len(nodes), SPLIT_EVERY)]
    return dask.delayed(partial(_finish, shape=shape, order=order), pure=True)(nodes)


def _edges(n: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _problem(partial_sums):
    return partial_sums[1]


def pseudobulk(cell_chunks: list, cell_starts: list[int], groups: Groups, *, n_features: int,
               shards: tuple[int, int]):
    """Lazy ``counts`` (P, G, R) and ``control_counts`` (G, C), int64, dask chunks = ``shards``,
    and a Delayed list of each chunk's ``Problem`` (or None) to check once they are computed.

    ``cell_chunks`` are delayed (cells x genes) blocks, dense or sparse, starting at the cells
    ``cell_starts``; ``groups.row`` says where each cell goes.
    """
    n_pert, n_rep, n_ctrl = groups.shape
    p_shard, g_shard = (max(1, min(s, n)) for s, n in zip(shards, (n_pert, n_features)))
    p_edges, g_edges = _edges(n_pert, p_shard), _edges(n_features, g_shard)
    geometry = dict(n_treated_rows=n_pert * n_rep, n_control_rows=n_ctrl, rows_per_block=p_shard * n_rep,
                    n_blocks=len(p_edges), feature_shard=g_shard, n_features=n_features)
    ends = list(cell_starts[1:]) + [len(groups.row)]
    task = dask.delayed(_partial, pure=True)
    partials = [task(chunk, groups.row[start:end], first_cell=start, **geometry)
                for chunk, start, end in zip(cell_chunks, cell_starts, ends)]
    rows = []
    for b, (p0, p1) in enumerate(p_edges):
        row = []
        for h, (g0, g1) in enumerate(g_edges):
            shape = (p1 - p0, n_rep, g1 - g0)
            block = _reduce(partials, block=(b, h), size=int(np.prod(shape)), shape=shape,
                            order=(0, 2, 1))
            row.append(da.from_delayed(block, shape=(p1 - p0, g1 - g0, n_rep), dtype=np.int64,
                                       meta=np.empty((0, 0, 0), np.int64)))
        rows.append(da.concatenate(row, axis=1))
    control = []
    for h, (g0, g1) in enumerate(g_edges):
        shape = (n_ctrl, g1 - g0)
        block = _reduce(partials, block=(len(p_edges), h), size=int(np.prod(shape)), shape=shape,
                        order=(1, 0))
        control.append(da.from_delayed(block, shape=(g1 - g0, n_ctrl), dtype=np.int64,
                                       meta=np.empty((0, 0), np.int64)))
    problems = dask.delayed(list, pure=True)([dask.delayed(_problem, pure=True)(p) for p in partials])
    return da.concatenate(rows, axis=0), da.concatenate(control, axis=0), problems

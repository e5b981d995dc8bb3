"""Numba BH core: exact q-values of a block of p-values without a full comparison sort.

The p-values are first bucketed by their leading IEEE-754 bits (a counting sort, O(n)), then
each small bucket is sorted by insertion (or quicksort when large). Ranks, the running minimum
and the scatter back are single passes. The arithmetic is that of ``fdr.bh``,
``min(1, min_{t' >= t} (m / F(t')) * t')``, so the results are bit-identical.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True)


@_jit
def _sort_segment(sv, idx, lo, hi):
    """Sort sv[lo:hi] ascending, permuting idx alongside (insertion sort; quicksort if long)."""
    if hi - lo > 32:
        order = np.argsort(sv[lo:hi])
        sv[lo:hi] = sv[lo:hi][order]
        idx[lo:hi] = idx[lo:hi][order]
        return
    for i in range(lo + 1, hi):
        v = sv[i]
        cur = idx[i]
        j = i
        while j > lo and sv[j - 1] > v:
            sv[j] = sv[j - 1]
            idx[j] = idx[j - 1]
            j -= 1
        sv[j] = v
        idx[j] = cur


@_jit
def bh_block(vals, m, offset, carry):
    """q-values of ``vals`` (no NaN), ranks offset by ``offset``, running min capped by ``carry``.

    Returns (q in the input order, min of the block's (m / F) * t terms or inf when empty).
    """
    n = vals.shape[0]
    q = np.empty(n)
    if n == 0:
        return q, np.inf
    bits = vals.view(np.uint64)
    lo_bits = bits.min()
    span = bits.max() - lo_bits
    shift = 0
    target = max(n // 4, 1)
    while (span >> np.uint64(shift)) > target:
        shift += 1
    n_bins = int(span >> np.uint64(shift)) + 1
    counts = np.zeros(n_bins + 1, np.int64)
    for i in range(n):
        counts[int((bits[i] - lo_bits) >> np.uint64(shift)) + 1] += 1
    for b in range(n_bins):
        counts[b + 1] += counts[b]
    idx = np.empty(n, np.int64)
    sv = np.empty(n)
    fill = counts[:-1].copy()
    for i in range(n):
        b = int((bits[i] - lo_bits) >> np.uint64(shift))
        k = fill[b]
        idx[k] = i
        sv[k] = vals[i]
        fill[b] = k + 1
    for b in range(n_bins):
        if counts[b + 1] - counts[b] > 1:
            _sort_segment(sv, idx, counts[b], counts[b + 1])
    # From the top: F is the rank of the last of a run of ties (R's "right" edge).
    running = carry
    block_min = np.inf
    i = n - 1
    while i >= 0:
        t = sv[i]
        j = i
        while j > 0 and sv[j - 1] == t:
            j -= 1
        h = (m / float(offset + i + 1)) * t
        if h < block_min:
            block_min = h
        if h < running:
            running = h
        value = min(running, 1.0)
        for k in range(j, i + 1):
            q[idx[k]] = value
        i = j - 1
    return q, block_min


@_jit
def split_by_bucket(flat, table, shift, n_buckets):
    """A chunk's non-NaN values grouped by bucket (each group in chunk order) and group sizes.

    ``table[bits >> shift]`` is the bucket of a value: one counting pass, one placement pass.
    """
    n = flat.shape[0]
    bits = flat.view(np.uint64)
    sizes = np.zeros(n_buckets, np.int64)
    for i in range(n):
        if flat[i] == flat[i]:
            sizes[table[bits[i] >> shift]] += 1
    fill = np.zeros(n_buckets, np.int64)
    for b in range(1, n_buckets):
        fill[b] = fill[b - 1] + sizes[b - 1]
    grouped = np.empty(fill[n_buckets - 1] + sizes[n_buckets - 1])
    for i in range(n):
        if flat[i] == flat[i]:
            b = table[bits[i] >> shift]
            grouped[fill[b]] = flat[i]
            fill[b] += 1
    return grouped, sizes


@_jit
def scatter_by_bucket(flat, table, shift, q_grouped, starts):
    """Inverse of ``split_by_bucket``: q for every position of the chunk (NaN where p is NaN),
    from the q-values grouped by bucket in chunk order, group b starting at ``starts[b]``."""
    n = flat.shape[0]
    bits = flat.view(np.uint64)
    cursor = starts.copy()
    q = np.empty(n)
    for i in range(n):
        if flat[i] == flat[i]:
            b = table[bits[i] >> shift]
            q[i] = q_grouped[cursor[b]]
            cursor[b] += 1
        else:
            q[i] = np.nan
    return q


@_jit
def chunk_counts(flat, shift, n_keys, lambdas):
    """One pass over a chunk's p-values: counts per key bin (bits >> shift), counts by how many
    of ``lambdas`` (ascending) are <= p, and the NaN count. Returns ``(bins, below, n_nan)``;
    ``n_nan`` is -1 when a value lies outside [0, 1]."""
    bins = np.zeros(n_keys, np.int64)
    k = lambdas.shape[0]
    below = np.zeros(k + 1, np.int64)
    bits = flat.view(np.uint64)
    n_nan = 0
    for i in range(flat.shape[0]):
        v = flat[i]
        if v != v:
            n_nan += 1
            continue
        if v < 0.0 or v > 1.0:
            return bins, below, -1
        bins[bits[i] >> shift] += 1
        j = min(int(v * k), k)  # a guess at #(lambdas <= v), then corrected exactly
        while j < k and lambdas[j] <= v:
            j += 1
        while j > 0 and lambdas[j - 1] > v:
            j -= 1
        below[j] += 1
    return bins, below, n_nan


def bh(p: np.ndarray) -> np.ndarray:
    """Global BH q-values of an array (NaN stays NaN, not counted), via ``bh_block``."""
    flat = np.ascontiguousarray(p, dtype=np.float64).reshape(-1)
    ok = ~np.isnan(flat)
    out = np.full(flat.shape, np.nan)
    vals = flat[ok]
    q, _ = bh_block(vals, float(vals.size), 0, np.inf)
    out[ok] = q
    return out.reshape(np.shape(p))

"""Numba BH core: exact q-values of a block of p-values without a full comparison sort.

The p-values are ordered by two counting-sort levels on their IEEE-754 bits (O(n): ~2048
coarse bins, then each coarse bin into bins of ~4 values), finished by insertion sorts (or
quicksort where many values share a bin). Ranks, the running minimum
and the scatter back are single passes. The arithmetic is that of ``fdr.bh``,
``min(1, min_{t' >= t} (m / F(t')) * t')``, so the results are bit-identical.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True)
#: Bucket id of a NaN position in the bucket path's ids (uint16: at most 65534 buckets).
NAN_BUCKET = 65535


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


#: Bins of the first counting-sort level: few enough write streams to stay in cache.
_COARSE_BINS = 2048


@_jit
def _partition(sv_in, idx_in, lo, hi, sv_out, idx_out, target):
    """Stable counting sort of positions [lo, hi) by their leading bits into about ``target``
    bins of [min, max] (same positions of the out arrays); returns the absolute bin bounds."""
    bits = sv_in.view(np.uint64)
    kmin = bits[lo]
    kmax = bits[lo]
    for i in range(lo + 1, hi):
        kmin = min(kmin, bits[i])
        kmax = max(kmax, bits[i])
    span = kmax - kmin
    shift = 0
    while (span >> np.uint64(shift)) >= target:
        shift += 1
    n_bins = int(span >> np.uint64(shift)) + 1
    bounds = np.zeros(n_bins + 1, np.int64)
    for i in range(lo, hi):
        bounds[int((bits[i] - kmin) >> np.uint64(shift)) + 1] += 1
    bounds[0] = lo
    for b in range(n_bins):
        bounds[b + 1] += bounds[b]
    fill = bounds[:-1].copy()
    for i in range(lo, hi):
        b = int((bits[i] - kmin) >> np.uint64(shift))
        k = fill[b]
        sv_out[k] = sv_in[i]
        idx_out[k] = idx_in[i]
        fill[b] = k + 1
    return bounds


@_jit
def bh_block(vals, m, offset, carry):
    """q-values of ``vals`` (no NaN), ranks offset by ``offset``, running min capped by ``carry``.

    Returns (q in the input order, min of the block's (m / F) * t terms or inf when empty).
    """
    n = vals.shape[0]
    q = np.empty(n)
    if n == 0:
        return q, np.inf
    # Two counting-sort levels on the IEEE-754 bits: ~2048 coarse bins first (few write
    # streams), then each coarse bin, now cache-sized, into ~4-value bins finished by insertion.
    idx_a = np.arange(n)
    sv_b = np.empty(n)
    idx_b = np.empty(n, np.int64)
    coarse = _partition(vals, idx_a, 0, n, sv_b, idx_b, _COARSE_BINS)
    sv = np.empty(n)
    idx = np.empty(n, np.int64)
    for c in range(coarse.shape[0] - 1):
        lo, hi = coarse[c], coarse[c + 1]
        if hi - lo <= 32:
            for k in range(lo, hi):
                sv[k] = sv_b[k]
                idx[k] = idx_b[k]
            if hi - lo > 1:
                _sort_segment(sv, idx, lo, hi)
            continue
        fine = _partition(sv_b, idx_b, lo, hi, sv, idx, max((hi - lo) // 4, 1))
        for f in range(fine.shape[0] - 1):
            if fine[f + 1] - fine[f] > 1:
                _sort_segment(sv, idx, fine[f], fine[f + 1])
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
    """A chunk's non-NaN values grouped by bucket (each group in chunk order), the group sizes
    and every position's bucket id (uint16, NAN_BUCKET for NaN): ``table[bits >> shift]`` is
    the bucket of a value. The ids let the q-values go back without the p-values."""
    n = flat.shape[0]
    bits = flat.view(np.uint64)
    ids = np.empty(n, np.uint16)
    sizes = np.zeros(n_buckets, np.int64)
    for i in range(n):
        if flat[i] == flat[i]:
            b = table[bits[i] >> shift]
            ids[i] = b
            sizes[b] += 1
        else:
            ids[i] = NAN_BUCKET
    fill = np.zeros(n_buckets, np.int64)
    for b in range(1, n_buckets):
        fill[b] = fill[b - 1] + sizes[b - 1]
    grouped = np.empty(fill[n_buckets - 1] + sizes[n_buckets - 1])
    for i in range(n):
        b = ids[i]
        if b != NAN_BUCKET:
            grouped[fill[b]] = flat[i]
            fill[b] += 1
    return grouped, sizes, ids


@_jit
def scatter_by_bucket(ids, q_grouped, starts, carries):
    """Inverse of ``split_by_bucket``: q for every position of the chunk (NaN where p is NaN),
    from the q-values grouped by bucket in chunk order, group b starting at ``starts[b]`` and
    capped by ``carries[b]`` (the running minimum from higher buckets)."""
    n = ids.shape[0]
    cursor = starts.copy()
    q = np.empty(n)
    for i in range(n):
        b = ids[i]
        if b != NAN_BUCKET:
            v = q_grouped[cursor[b]]
            q[i] = v if v < carries[b] else carries[b]
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

"""Numba BH core: exact q-values of a block of p-values without a full comparison sort.

The p-values are ordered by their IEEE-754 bits (``sort_positions``: a balanced counting pass,
then 8-bit most-significant-digit passes, then insertion sorts). Ranks, the running minimum
and the scatter back are single passes. The arithmetic is that of ``fdr.bh``,
``min(1, min_{t' >= t} (m / F(t')) * t')``, so the results are bit-identical.
"""

from __future__ import annotations

import math
import sys
import threading

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True)
#: Bucket id of a NaN position in the bucket path's ids (uint16: at most 65534 buckets).
NAN_BUCKET = 65535
#: Masks off the sign bit: -0.0 (which passes ``p >= 0``) keys like 0.0.
_MAGNITUDE = np.int64(0x7FFFFFFFFFFFFFFF)
_UMAGNITUDE = np.uint64(0x7FFFFFFFFFFFFFFF)


@_jit
def _insertion_sort(sv, idx, lo, hi):
    """Sort sv[lo:hi] ascending, permuting idx alongside."""
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


#: The first pass merges adjacent key bins (bits >> _KEY_SHIFT: 256 per binade) into at most
#: _GROUPS groups of about equal size, so one streaming pass spreads any distribution evenly,
#: with few enough write streams to stay in cache (41e6 p-values: 0.5 s at 256 groups, 1.0 s at
#: 4096). Later passes split a segment's bit range into 2**_RADIX_BITS equal-width bins, down to
#: segments of at most _SMALL values that insertion sort finishes.
_GROUPS = 256
_KEY_SHIFT = 44
_RADIX_BITS = 8
_SMALL = 32


@_jit
def _first_level(vals, sv, idx):
    """Stable partition of vals into sv/idx (positions) by groups of adjacent key bins holding
    about n / _GROUPS values each; returns the group bounds. The bits are read as int64 (p >= 0),
    since numba mixes uint64 with int64 through float64."""
    n = vals.shape[0]
    bits = vals.view(np.int64)
    kmin = (bits[0] & _MAGNITUDE) >> _KEY_SHIFT
    kmax = kmin
    for i in range(n):
        k = (bits[i] & _MAGNITUDE) >> _KEY_SHIFT
        kmin = min(kmin, k)
        kmax = max(kmax, k)
    n_keys = kmax - kmin + 1
    count = np.zeros(n_keys, np.int64)
    for i in range(n):
        count[((bits[i] & _MAGNITUDE) >> _KEY_SHIFT) - kmin] += 1
    per = max(n // _GROUPS, 1)
    group = np.empty(n_keys, np.int64)
    g = 0
    filled = 0
    for k in range(n_keys):
        if filled >= per:
            g += 1
            filled = 0
        group[k] = g
        filled += count[k]
    bounds = np.zeros(g + 2, np.int64)
    for k in range(n_keys):
        bounds[group[k] + 1] += count[k]
    for b in range(g + 1):
        bounds[b + 1] += bounds[b]
    fill = bounds[:-1].copy()
    for i in range(n):
        b = group[((bits[i] & _MAGNITUDE) >> _KEY_SHIFT) - kmin]
        j = fill[b]
        sv[j] = vals[i] + 0.0  # -0.0 -> 0.0, so that later passes see bits >= 0
        idx[j] = i
        fill[b] = j + 1
    return bounds


def _sort_into(vals, out_v, out_i, tmp_v, tmp_i):
    """Sort p-values (>= 0, no NaN) into out_v, their positions into out_i (tmp_*: scratch of
    the same sizes; positions int32 or int64).

    A balanced first pass over key bins (``_first_level``), then most-significant-digit passes
    (``_split_segments``) until a segment's bit offsets and local positions fit together in 63 bits:
    then its values are packed with their positions into one int64 each and sorted by NumPy
    (a SIMD sort, in cache). Ties and segments of at most _SMALL values are finished by the
    digit passes. 2e7 real p-values: 0.3 s, against 0.9 s with digit passes down to insertion
    sorts and 1.3 s for NumPy's argsort.
    """
    if vals.shape[0] == 0:
        return
    segments = _split_segments(_first_level(vals, tmp_v, tmp_i), out_v, out_i, tmp_v, tmp_i)
    packed = tmp_v.view(np.int64)  # packed in place: each value is read before its slot is written
    shift = _pack(packed, segments)
    _sort_packed(packed, out_v.view(np.int64), segments, shift)
    _unpack(packed, tmp_i, segments, shift, out_v, out_i)


@_jit
def _bit_length(x):
    bits = 0
    while (x >> bits) > 0:
        bits += 1
    return bits


@_jit
def _split_segments(bounds, out_v, out_i, tmp_v, tmp_i):
    """Order the first pass's groups (in tmp_*) by digit passes until each segment is final in
    out_* (ties only, or at most _SMALL values, insertion-sorted) or packable: its values and
    positions then sit in tmp_*, and its (lo, hi, smallest bits) is returned ([k, 3] int64) for
    ``_pack``.

    A segment of v bits of value range and p bits of positions with v + p > 63 is split on its
    top min(v + p - 63, _RADIX_BITS) bits at least 2: each part has that many fewer value bits
    and, unless the split is skewed, about as many fewer position bits.
    """
    # Segments still to order: (lo, hi, 1 if their values are in tmp_* else 0); each pass moves
    # a segment from one pair of buffers to the other.
    stack = np.empty((bounds.shape[0] + 64 * (1 << _RADIX_BITS), 3), np.int64)
    top = 0
    for g in range(bounds.shape[0] - 1):
        if bounds[g + 1] > bounds[g]:
            stack[top, 0], stack[top, 1], stack[top, 2] = bounds[g], bounds[g + 1], 1
            top += 1
    packable = np.empty((bounds.shape[0] + 16, 3), np.int64)
    n_packable = 0
    count = np.empty((1 << _RADIX_BITS) + 1, np.int64)
    while top > 0:
        top -= 1
        lo, hi, in_tmp = stack[top, 0], stack[top, 1], stack[top, 2]
        src_v, src_i = (tmp_v, tmp_i) if in_tmp else (out_v, out_i)
        dst_v, dst_i = (out_v, out_i) if in_tmp else (tmp_v, tmp_i)
        bits = src_v.view(np.int64)
        kmin = bits[lo]
        kmax = kmin
        for i in range(lo, hi):
            kmin = min(kmin, bits[i])
            kmax = max(kmax, bits[i])
        if hi - lo <= _SMALL or kmin == kmax:  # small, or ties only
            if in_tmp:
                for k in range(lo, hi):
                    out_v[k] = src_v[k]
                    out_i[k] = src_i[k]
            if kmin != kmax:
                _insertion_sort(out_v, out_i, lo, hi)
            continue
        value_bits = _bit_length(kmax - kmin)
        excess = value_bits + _bit_length(hi - lo - 1) - 63
        if excess <= 0:
            if not in_tmp:
                for k in range(lo, hi):
                    tmp_v[k] = src_v[k]
                    tmp_i[k] = src_i[k]
            if n_packable == packable.shape[0]:
                grown = np.empty((2 * n_packable, 3), np.int64)
                grown[:n_packable] = packable[:n_packable]
                packable = grown
            packable[n_packable, 0], packable[n_packable, 1], packable[n_packable, 2] = lo, hi, kmin
            n_packable += 1
            continue
        shift = max(value_bits - min(max(excess, 2), _RADIX_BITS), 0)
        n_bins = ((kmax - kmin) >> shift) + 1
        count[:n_bins + 1] = 0
        for i in range(lo, hi):
            count[((bits[i] - kmin) >> shift) + 1] += 1
        count[0] = lo
        for b in range(n_bins):
            count[b + 1] += count[b]
        for i in range(lo, hi):  # count[b]: bin b's next free slot
            b = (bits[i] - kmin) >> shift
            j = count[b]
            dst_v[j] = src_v[i]
            dst_i[j] = src_i[i]
            count[b] = j + 1
        if top + n_bins > stack.shape[0]:
            grown = np.empty((2 * stack.shape[0] + n_bins, 3), np.int64)
            grown[:top] = stack[:top]
            stack = grown
        start = lo
        for b in range(n_bins):
            if count[b] > start:
                stack[top, 0], stack[top, 1], stack[top, 2] = start, count[b], 1 - in_tmp
                top += 1
            start = count[b]
    return packable[:n_packable]


@_jit
def _pack(packed, segments):
    """Replace each value of the segments ((lo, hi, smallest bits) rows; int64 bits in
    ``packed``) by (bits - smallest) << shift | its position in the segment; returns the
    shift per segment."""
    shift = np.empty(segments.shape[0], np.int64)
    for s in range(segments.shape[0]):
        lo, hi, kmin = segments[s, 0], segments[s, 1], segments[s, 2]
        shift[s] = _bit_length(hi - lo - 1)
        for i in range(lo, hi):
            packed[i] = ((packed[i] - kmin) << shift[s]) | (i - lo)
    return shift


#: Bits per pass of ``_radix_sort``: 2048 counters (16 KiB) per pass stay in L1.
_LSD_BITS = 11


@_jit
def _radix_sort(keys, tmp, lo, hi, bits):
    """Sort keys[lo:hi] (int64 in [0, 2**bits)) by least-significant-digit passes of _LSD_BITS
    bits, through tmp[lo:hi]; all passes' counts come from one read."""
    passes = (bits + _LSD_BITS - 1) // _LSD_BITS
    radix = 1 << _LSD_BITS
    count = np.zeros((passes, radix + 1), np.int64)
    for i in range(lo, hi):
        k = keys[i]
        for d in range(passes):
            count[d, ((k >> (d * _LSD_BITS)) & (radix - 1)) + 1] += 1
    src, dst = keys, tmp
    for d in range(passes):
        c = count[d]
        c[0] = lo
        for b in range(radix):
            c[b + 1] += c[b]
        for i in range(lo, hi):
            k = src[i]
            b = (k >> (d * _LSD_BITS)) & (radix - 1)
            dst[c[b]] = k
            c[b] += 1
        src, dst = dst, src
    if passes % 2 == 1:
        for i in range(lo, hi):
            keys[i] = tmp[i]


@_jit
def _sort_packed(packed, tmp, segments, shift):
    """Sort each packed segment in place (``tmp``: scratch of the same length). A radix sort:
    NumPy's comparison sort of the same keys took 45-75 ns per key on the 2-core AMD EPYC VM
    (its SIMD sort is not used there), the radix passes 15-21."""
    for s in range(segments.shape[0]):
        lo, hi = segments[s, 0], segments[s, 1]
        top = 0
        for i in range(lo, hi):
            top = max(top, packed[i])
        _radix_sort(packed, tmp, lo, hi, _bit_length(top))


@_jit
def _unpack(packed, tmp_i, segments, shift, out_v, out_i):
    """The sorted values and their positions in ``vals`` from the packed, sorted segments."""
    out_bits = out_v.view(np.int64)
    for s in range(segments.shape[0]):
        mask = (np.int64(1) << shift[s]) - 1
        lo, hi = segments[s, 0], segments[s, 1]
        for i in range(lo, hi):
            key = packed[i]
            out_bits[i] = (key >> shift[s]) + segments[s, 2]
            out_i[i] = tmp_i[lo + (key & mask)]


def sort_positions(vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, their positions in ``vals``) for p-values (>= 0, no NaN)."""
    out_v, out_i, tmp_v, tmp_i = _buffers(vals.shape[0])
    _sort_into(vals, out_v, out_i, tmp_v, tmp_i)
    return out_v, out_i


def _positions_dtype(n: int) -> np.dtype:
    # 4-byte positions while they fit: the sort moves 12 bytes per value instead of 16.
    return np.dtype(np.int32 if n < 2 ** 31 else np.int64)


def _buffers(n: int, *, pooled: bool = False):
    """(sorted values, positions, scratch values, scratch positions) for n values: fresh, or
    this thread's scratch arrays (``scratch``) when ``pooled``."""
    get = scratch if pooled else (lambda name, size, dtype: np.empty(size, dtype))
    index = _positions_dtype(n)
    return (get("sorted", n, np.float64), get("positions", n, index), get("values_tmp", n, np.float64),
            get("positions_tmp", n, index))


#: Work arrays of the bucketed FDR pass, by (thread, purpose). Its tasks need arrays of 10^7
#: to 10^8 values; NumPy maps each fresh one from the kernel (larger than malloc's mmap
#: threshold) and faults it in page by page, which cost 0.6 s per GB with two workers at it on
#: the 2-core development VM (a bucket of 2e7 values: 1.5 s fresh, 0.94 s reused). The FDR
#: pass reuses them from task to task and ``release_scratch`` drops them when it is done.
_SCRATCH: dict[tuple[int, str], np.ndarray] = {}


def scratch(name: str, n: int, dtype) -> np.ndarray:
    """A work array of n values for this thread and ``name``: reused while large enough, so
    its contents are garbage and it must not outlive the task (return copies, not views)."""
    return _pooled(name, n, dtype, result=False)


def reusable(name: str, n: int, dtype) -> np.ndarray:
    """A fresh-looking array of n values for a task's *result*: this thread's last one of
    ``name`` when nothing outside the pool still refers to it (no view of it is alive, e.g.
    held by dask as an earlier task's result), else a new one that the pool keeps next.

    A task's 10^7-value output (80 MB, above malloc's mmap threshold) is otherwise a fresh
    mapping whose pages fault in one by one on the VM (see ``scratch``)."""
    return _pooled(name, n, dtype, result=True)


def _pooled(name, n, dtype, *, result):
    key, dtype = (threading.get_ident(), name), np.dtype(dtype)
    buf = _SCRATCH.get(key)
    # A result's buffer is taken again only when its references are the pool's, this name and
    # getrefcount's argument: no view of it lives on.
    if buf is None or buf.size < n or buf.dtype != dtype or result and sys.getrefcount(buf) > 3:
        _SCRATCH.pop(key, None)  # freed (unless still held) before its successor is allocated
        buf = _SCRATCH[key] = np.empty(n + n // 8, dtype)  # room for a slightly larger next one
    return buf[:n]


def release_scratch(names=None) -> int:
    """Drop every thread's work arrays (``scratch``), or those of ``names``; returns the bytes
    freed. A task still using one keeps it alive until it returns."""
    keys = [k for k in list(_SCRATCH) if names is None or k[1] in names]
    return sum(_SCRATCH.pop(k).nbytes for k in keys if k in _SCRATCH)


def bh_block(vals: np.ndarray, m: float, offset: int, carry: float):
    """q-values of ``vals`` (no NaN), ranks offset by ``offset``, running min capped by ``carry``.

    Returns (q in the input order, min of the block's (m / F) * t terms or inf when empty).
    """
    sv, idx, q, tmp_i = _buffers(vals.shape[0])
    low = _bh_sorted(vals, float(m), int(offset), float(carry), sv, idx, q, tmp_i)
    return q, low


def bh_pieces(pieces, m: float, offset: int) -> tuple[list[np.ndarray], float]:
    """``bh_block`` of the concatenated ``pieces`` (no carry), with its work arrays from this
    thread's scratch: (a fresh q array per piece, the minimum term)."""
    n = sum(x.shape[0] for x in pieces)
    vals = scratch("values", n, np.float64)
    if pieces:
        np.concatenate(pieces, out=vals)
    sv, idx, q, tmp_i = _buffers(n, pooled=True)
    low = _bh_sorted(vals, float(m), int(offset), math.inf, sv, idx, q, tmp_i)
    bounds = np.cumsum([0] + [x.shape[0] for x in pieces])
    return [q[a:b].copy() for a, b in zip(bounds[:-1], bounds[1:])], low


def _bh_sorted(vals, m, offset, carry, sv, idx, q, tmp_i):
    """``bh_block`` into ``q`` (also the sort's scratch for values); returns the minimum term."""
    if vals.shape[0] == 0:
        return np.inf
    _sort_into(vals, sv, idx, q, tmp_i)
    return _bh_ranks(sv, idx, m, offset, carry, q)


@_jit
def _bh_ranks(sv, idx, m, offset, carry, q):
    """q-values from the sorted values ``sv`` and their positions ``idx``, scattered into
    ``q``; returns the minimum term."""
    n = sv.shape[0]
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
    return block_min


@_jit
def split_by_bucket(flat, table, shift, n_buckets, grouped):
    """A chunk's non-NaN values grouped by bucket (each group in chunk order) into the front of
    ``grouped`` (at least as long as ``flat``), the group sizes and every position's bucket id
    (uint16, NAN_BUCKET for NaN): ``table[bits >> shift]`` is the bucket of a value. The ids
    let the q-values go back without the p-values."""
    n = flat.shape[0]
    bits = flat.view(np.uint64)
    ids = np.empty(n, np.uint16)
    sizes = np.zeros(n_buckets, np.int64)
    for i in range(n):
        if flat[i] == flat[i]:
            b = table[(bits[i] & _UMAGNITUDE) >> shift]
            ids[i] = b
            sizes[b] += 1
        else:
            ids[i] = NAN_BUCKET
    fill = np.zeros(n_buckets, np.int64)
    for b in range(1, n_buckets):
        fill[b] = fill[b - 1] + sizes[b - 1]
    for i in range(n):
        b = ids[i]
        if b != NAN_BUCKET:
            grouped[fill[b]] = flat[i]
            fill[b] += 1
    return sizes, ids


@_jit
def scatter_by_bucket(ids, q_grouped, starts, carries, q):
    """Inverse of ``split_by_bucket``: q for every position of the chunk (NaN where p is NaN)
    into ``q``, from the q-values grouped by bucket in chunk order, group b starting at
    ``starts[b]`` and capped by ``carries[b]`` (the running minimum from higher buckets)."""
    n = ids.shape[0]
    cursor = starts.copy()
    for i in range(n):
        b = ids[i]
        if b != NAN_BUCKET:
            v = q_grouped[cursor[b]]
            q[i] = v if v < carries[b] else carries[b]
            cursor[b] += 1
        else:
            q[i] = np.nan


@_jit
def _lambda_index(v, lambdas):
    """How many of ``lambdas`` (ascending) are <= v."""
    k = lambdas.shape[0]
    j = min(int(v * k), k)  # a guess, then corrected exactly
    while j < k and lambdas[j] <= v:
        j += 1
    while j > 0 and lambdas[j - 1] > v:
        j -= 1
    return j


@_jit
def _grid_index(v, b, grid, per_log2):
    """The first point t_k >= v of ``grid`` (ascending, log-spaced, ending at 1; the last bin
    past it), for v > 0 with bits b: bracketed from the binary exponent and mantissa, so no
    logarithm is taken."""
    bins = grid.shape[0]
    # log2 v ~ (biased exponent - 1023) + mantissa fraction (off by < 0.09): the estimate
    # lands within a grid point of the bin
    log2 = ((b >> 52) - 1023) + (b & 0xFFFFFFFFFFFFF) * (1.0 / 4503599627370496.0)
    k = int((bins - 1) + log2 * per_log2)
    k = min(max(k, 0), bins - 1)
    while k > 0 and grid[k - 1] >= v:
        k -= 1
    while k < bins - 1 and grid[k] < v:
        k += 1
    return k


@_jit
def chunk_counts(flat, shift, n_keys, lambdas):
    """One pass over a chunk's p-values: counts per key bin (bits >> shift), counts by how many
    of ``lambdas`` (ascending) are <= p, and the NaN count. Returns ``(bins, below, n_nan)``;
    ``n_nan`` is -1 when a value lies outside [0, 1]."""
    bins = np.zeros(n_keys, np.int64)
    below = np.zeros(lambdas.shape[0] + 1, np.int64)
    bits = flat.view(np.uint64)
    n_nan = 0
    for i in range(flat.shape[0]):
        v = flat[i]
        if v != v:
            n_nan += 1
            continue
        if v < 0.0 or v > 1.0:
            return bins, below, -1
        bins[(bits[i] & _UMAGNITUDE) >> shift] += 1
        below[_lambda_index(v, lambdas)] += 1
    return bins, below, n_nan


@_jit
def level_histogram(p, level, grid, out):
    """``filtering.histogram`` of a [P, G] block into ``out`` [levels * bins] (int64, added
    to): each finite p counts at (its feature's ``level``, the first grid point t_k >= p; the
    last bin past the grid)."""
    P, G = p.shape
    bins = grid.shape[0]
    per_log2 = (bins - 1) / (-math.log2(grid[0]))  # grid points per binade
    bits = p.view(np.int64)
    for i in range(P):
        for g in range(G):
            v = p[i, g]
            if math.isfinite(v):
                k = _grid_index(v, bits[i, g], grid, per_log2) if v > 0 else 0
                out[level[g] * bins + k] += 1


@_jit
def block_counts(p, level, grid, shift, n_keys, lambdas, hist):
    """``chunk_counts`` and ``level_histogram`` (into ``hist``) of a [P, G] block of the
    estimates pass in one pass over its p-values."""
    P, G = p.shape
    bins = np.zeros(n_keys, np.int64)
    below = np.zeros(lambdas.shape[0] + 1, np.int64)
    n_grid = grid.shape[0]
    per_log2 = (n_grid - 1) / (-math.log2(grid[0]))
    bits = p.view(np.int64)
    n_nan = 0
    for i in range(P):
        for g in range(G):
            v = p[i, g]
            if v != v:
                n_nan += 1
                continue
            if v < 0.0 or v > 1.0:
                return bins, below, -1
            b = bits[i, g] & _MAGNITUDE
            bins[b >> shift] += 1
            below[_lambda_index(v, lambdas)] += 1
            k = _grid_index(v, b, grid, per_log2) if v > 0 else 0
            hist[level[g] * n_grid + k] += 1
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

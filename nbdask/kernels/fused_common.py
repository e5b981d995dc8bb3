"""What the numba forms share: the ``jit`` options and the present-replicates loop.

The numba forms (``kernels/<method>/fused.py``, ``dispersion_fused.py``) compute what the
array-API forms compute, one comparison at a time in scalar loops, without the array
temporaries that bound the array-API kernels on a CPU. The array-API forms stay the definition
(and the GPU path); tests hold the twins to them. They are imported lazily, so that importing
nbdask does not import numba or compile anything; ``cache=True`` keeps compiled code across
processes.
"""

from __future__ import annotations

import math

import numba

jit = numba.njit(cache=True, nogil=True, fastmath=False)
SQRT2 = math.sqrt(2.0)


@jit
def present(sf, p, keep, inv):
    """Present replicates of perturbation p: their positions in keep[:n] and 1/l in inv[:n]; n."""
    n = 0
    for r in range(sf.shape[1]):
        if math.isfinite(sf[p, r]):
            keep[n] = r
            inv[n] = 1.0 / sf[p, r]
            n += 1
    return n

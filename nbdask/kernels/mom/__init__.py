"""Method-of-moments estimates with the Wald test (design §6).

Two forms of one estimator: ``array.py`` is the definition over the array namespace (NumPy,
CuPy): ``mom_kernel`` and the moment-dispersion pieces that the pooling pass and the transformer
share; ``fused.py`` is its numba twin ``mom_fused`` for NumPy blocks, one loop per comparison,
every dispersion mode. ``Method.select`` (``nbdask.kernels``) picks one.
"""

from __future__ import annotations

from .array import (DISPERSION_CEILING, MIN_DISPERSION, ZERO_GROUP_COUNT, group_dispersion,
                    group_rates, mom_kernel, moment_dispersion, pooled_dispersion, shrink_dispersion)

__all__ = ["DISPERSION_CEILING", "MIN_DISPERSION", "ZERO_GROUP_COUNT", "group_dispersion",
           "group_rates", "mom_kernel", "moment_dispersion", "pooled_dispersion", "shrink_dispersion"]

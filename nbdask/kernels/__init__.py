"""Per-block estimators. Each kernel follows the contract of design §5:

``kernel(counts[P_b, G_b, R], size_factor[P_b, R], control_counts[G_b, C],
control_size_factor[C], **options) -> dict[name, array[P_b, G_b]]``

written once over the array namespace (NumPy or CuPy), without Python branching on data values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .irls import DISPERSION_FITS, irls_kernel
from .mom import mom_kernel

_ESTIMATES = ("log_base_mean", "log_fold_change", "log_dispersion", "standard_error",
              "statistic", "p_value")


@dataclass(frozen=True)
class Method:
    """An estimator: its kernel, the tests it offers, its outputs and its extra options."""

    kernel: object
    tests: tuple[str, ...]
    outputs: tuple[str, ...] = _ESTIMATES
    options: dict = field(default_factory=dict)  # option name -> default


KERNELS = {
    "mom": Method(mom_kernel, ("wald",)),
    "irls": Method(irls_kernel, ("wald", "lrt"), _ESTIMATES + ("converged", "iterations"),
                   {"dispersion_fit": "ml", "max_iter": 50, "tol": 1e-6}),
}

__all__ = ["DISPERSION_FITS", "KERNELS", "Method", "irls_kernel", "mom_kernel"]

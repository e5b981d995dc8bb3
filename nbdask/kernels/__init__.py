"""Per-block estimators. Each kernel follows the contract of design §5:

``kernel(counts[P_b, G_b, R], size_factor[P_b, R], control_counts[G_b, C],
control_size_factor[C], **options) -> dict[name, array[P_b, G_b]]``

written once over the array namespace (NumPy or CuPy), without Python branching on data values.

One package per computation, its forms side by side: ``mom/``, ``irls/`` and ``exact/`` each
hold ``array.py`` (the definition, NumPy/CuPy) and ``fused.py`` (its numba twin for NumPy
blocks); ``fused_common.py`` holds what the twins share. ``backend.py`` gives the array
namespace, ``moments.py`` and ``wald.py`` are the array-API pieces the estimators share,
``integrate.py`` averages a test over a dispersion posterior, ``transformer.py`` is the learned
estimator.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from ..errors import OptionError
from .irls import DISPERSION_FITS, irls_kernel
from .mom import mom_kernel
from .transformer import transformer_kernel

_ESTIMATES = ("log_base_mean", "log_fold_change", "log_dispersion", "standard_error",
              "statistic", "p_value")


@dataclass(frozen=True)
class Method:
    """An estimator: its kernel, the tests it offers, its outputs and its extra options."""

    kernel: object
    tests: tuple[str, ...]
    outputs: tuple[str, ...] = _ESTIMATES
    options: dict = field(default_factory=dict)  # option name -> default
    fused: str | None = None  # the numba twin, "<module under kernels>.<function>"
    fused_pooled: bool = False  # the twin takes feature_dispersion / dispersion_spread too
    fused_exact: bool = False  # the twin runs the conditional exact test itself (max_exact_total)

    def select(self, engine: str, xp_is_host: bool):
        """The kernel to run: the numba twin for host arrays unless ``engine="array"``."""
        if engine == "array" or self.fused is None or not xp_is_host:
            if engine == "numba" and not xp_is_host:
                raise OptionError("engine='numba' runs on NumPy arrays only; use engine='auto' for CuPy")
            return self.kernel
        module, _, name = self.fused.rpartition(".")
        try:
            twins = importlib.import_module(f".{module}", __name__)
        except ImportError as err:
            if engine == "numba":
                raise OptionError(f"engine='numba' needs numba ({err}); pip install numba") from None
            return self.kernel
        return getattr(twins, name)


ENGINES = ("auto", "numba", "array")

KERNELS = {
    "mom": Method(mom_kernel, ("wald",), fused="mom.fused.mom_fused", fused_pooled=True,
                  fused_exact=True),
    "irls": Method(irls_kernel, ("wald", "lrt"), _ESTIMATES + ("converged", "iterations"),
                   {"dispersion_fit": "ml", "max_iter": 50, "tol": 1e-6}, fused="irls.fused.irls_fused"),
    "transformer": Method(transformer_kernel, ("wald",), options={"weights": None}),
}

__all__ = ["DISPERSION_FITS", "ENGINES", "KERNELS", "Method", "irls_kernel", "mom_kernel", "transformer_kernel"]

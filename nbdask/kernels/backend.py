"""Array namespace and special functions for NumPy, CuPy or ``array-api-strict`` inputs.

Kernels call only the namespace ``xp`` and the ``special`` functions returned by ``namespaces``.
Data-dependent Python decisions on device arrays (each one a GPU sync) go through
``any_true`` and ``host_scalar``, the only places that turn a device array into a Python value;
the strict tests hold every kernel to that.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import numpy as np
from array_api_compat import (array_namespace, device, is_array_api_strict_namespace,
                              is_cupy_namespace, is_numpy_namespace)

#: The special functions the kernels use (scipy.special names).
SPECIAL_FUNCTIONS = ("ndtr", "ndtri", "digamma", "betaln", "chdtrc")


def namespaces(*arrays) -> tuple[ModuleType, ModuleType]:
    """Return ``(xp, special)`` for the arrays: the array-API namespace and its special functions.

    ``special`` is ``scipy.special`` for NumPy arrays, ``cupyx.scipy.special`` for CuPy arrays,
    and for ``array_api_strict`` arrays (the test suite's stand-in for a device) the host shim
    ``_strict_special``.
    """
    xp = array_namespace(*arrays)
    if is_cupy_namespace(xp):
        import cupyx.scipy.special as special
    elif is_array_api_strict_namespace(xp):
        special = _strict_special(xp)
    else:
        import scipy.special as special
    return xp, special


def is_host(xp: ModuleType) -> bool:
    """True when ``xp`` is NumPy: host arrays, where the numba twins may run."""
    return is_numpy_namespace(xp)


def to_host(x):
    """Copy an array to a NumPy array (a no-op for NumPy)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):  # CuPy
        return x.get()
    xp = array_namespace(x)
    if is_array_api_strict_namespace(xp):
        return np.asarray(x.to_device(xp.Device("CPU_DEVICE")))
    return np.asarray(x)


def any_true(xp, x) -> bool:
    """``bool(xp.any(x))``: a sanctioned device-to-host sync, for a kernel's early exit."""
    return bool(xp.any(x))


def host_scalar(x) -> float:
    """The value of a 0-d array as a Python float: a sanctioned device-to-host sync."""
    return float(x)


def _strict_special(xp) -> SimpleNamespace:
    """Special-function shim for ``array_api_strict`` arrays: each call copies its arrays to
    NumPy, evaluates ``scipy.special`` there and copies the result back to the arrays' device.

    Test-only plumbing (CuPy has ``cupyx.scipy.special``); kernel code never sees NumPy.
    """
    import scipy.special

    def wrap(name):
        func = getattr(scipy.special, name)

        def call(*args):
            where = next((device(a) for a in args if not isinstance(a, (int, float))), None)
            out = func(*(a if isinstance(a, (int, float)) else to_host(a) for a in args))
            return xp.asarray(out, device=where)

        return call

    return SimpleNamespace(**{name: wrap(name) for name in SPECIAL_FUNCTIONS})


#: Recurrence shift for ``trigamma``: the asymptotic series is used at x + _TRIGAMMA_SHIFT.
_TRIGAMMA_SHIFT = 8


def trigamma(xp, x):
    """psi_1(x) for x > 0, in plain array arithmetic (10x faster than ``polygamma(1, x)``).

    psi_1(x) = sum_{k<8} 1/(x+k)^2 + psi_1(z), z = x + 8, with the asymptotic series
    1/z + 1/(2z^2) + sum_k B_2k / z^(2k+1) through B_12; relative error below 1e-11.
    """
    acc = xp.zeros_like(x)
    for k in range(_TRIGAMMA_SHIFT):
        acc = acc + 1.0 / ((x + k) * (x + k))
    z = x + _TRIGAMMA_SHIFT
    iz = 1.0 / z
    iz2 = iz * iz
    series = iz2 * (1 / 6 + iz2 * (-1 / 30 + iz2 * (1 / 42 + iz2 * (-1 / 30 + iz2 * (5 / 66 + iz2 * (-691 / 2730))))))
    return acc + iz + 0.5 * iz2 + iz * series

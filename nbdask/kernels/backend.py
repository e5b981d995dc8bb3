"""Array namespace and special functions for NumPy or CuPy inputs."""

from __future__ import annotations

from types import ModuleType

from array_api_compat import array_namespace, is_cupy_namespace


def namespaces(*arrays) -> tuple[ModuleType, ModuleType]:
    """Return ``(xp, special)`` for the arrays: the array-API namespace and its special functions.

    ``special`` is ``scipy.special`` for host arrays and ``cupyx.scipy.special`` for CuPy arrays.
    """
    xp = array_namespace(*arrays)
    if is_cupy_namespace(xp):
        import cupyx.scipy.special as special
    else:
        import scipy.special as special
    return xp, special


def is_host(xp: ModuleType) -> bool:
    """True when ``xp`` works on host (NumPy) memory."""
    return not is_cupy_namespace(xp)


def to_host(x):
    """Copy an array to a NumPy array (a no-op for NumPy)."""
    get = getattr(x, "get", None)
    if get is not None and not isinstance(x, __import__("numpy").ndarray):
        return get()
    return x

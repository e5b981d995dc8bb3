"""Run a cube on the GPU: its blocks moved to CuPy inside the graph, the results moved back.

Zarr decoding and encoding stay on the host; ``nbdask.test`` on the moved cube runs the array-API
kernels on CuPy blocks (``engine="auto"`` picks them there), and ``save_results`` writes the
results after ``results_to_host``. Needs ``nbdask[gpu]`` (CuPy) and a CUDA device.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .schema import INPUTS


def cuda_available() -> str | None:
    """None when CuPy sees a CUDA device, else why not (one line)."""
    try:
        import cupy
    except ImportError as err:
        return f"CuPy is not installed ({err}); pip install 'nbdask[gpu]'"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDA driver or runtime missing
        return f"CuPy cannot reach a CUDA device ({type(err).__name__}: {err})"
    return None if count else "CuPy sees no CUDA device"


def cube_to_device(cube: xr.Dataset) -> xr.Dataset:
    """The cube with the blocks of its input variables moved to the GPU as CuPy arrays (lazy)."""
    import cupy

    out = cube.copy()
    for name in INPUTS:
        data = cube[name].data
        out[name] = cube[name].copy(data=data.map_blocks(
            cupy.asarray, meta=cupy.empty((0,) * data.ndim, data.dtype)))
    return out


def results_to_host(results: xr.Dataset) -> xr.Dataset:
    """The results with every dask-backed variable's blocks moved back to NumPy (lazy)."""
    import cupy

    def host(var):
        if not hasattr(var.data, "map_blocks"):
            return var
        return var.copy(data=var.data.map_blocks(
            cupy.asnumpy, meta=np.empty((0,) * var.ndim, var.dtype)))

    return results.map(host, keep_attrs=True).assign_attrs(results.attrs)

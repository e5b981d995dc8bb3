"""nbdask: negative-binomial differential testing of count cubes at screen scale.

Count cubes in chunked Zarr are opened as xarray, tested blockwise on Dask workers with NumPy or
CuPy kernels, FDR-corrected exactly, and written back to Zarr.
"""

__version__ = "0.1.0"

from . import fdr  # noqa: E402
from .errors import CubeError, NbdaskError, OptionError, ResultsError, StoreError  # noqa: E402
from .io import describe, open_cube, open_results, save_cube, save_results  # noqa: E402
from .pipeline import test  # noqa: E402
from .simulate import simulate  # noqa: E402
from .summary import summarize  # noqa: E402

__all__ = [
    "CubeError", "NbdaskError", "OptionError", "ResultsError", "StoreError",
    "describe", "fdr", "open_cube", "open_results", "save_cube", "save_results",
    "simulate", "summarize", "test",
]

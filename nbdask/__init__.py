"""nbdask: negative-binomial differential testing of count cubes at screen scale.

Count cubes in chunked Zarr are opened as xarray, tested blockwise on Dask workers with NumPy or
CuPy kernels, FDR-corrected exactly, and written back to Zarr.

The public names load on first use, so ``nbdask.kernels`` (NumPy/CuPy only) and ``nbdask.train``
(PyTorch) import on machines without xarray, Dask or Zarr, e.g. a bare GPU box or a training venv.
Where xarray is installed, importing nbdask registers the ``.nb`` Dataset accessor
(``nbdask.accessor``: it imports xarray and nothing heavier).
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_PUBLIC = {
    "CubeError": "errors", "NbdaskError": "errors", "OptionError": "errors",
    "ResultsError": "errors", "SourceError": "errors", "StoreError": "errors",
    "describe": "io", "open_cube": "io", "open_results": "io", "save_cube": "io",
    "save_results": "writer", "test": "pipeline", "simulate": "simulate", "summarize": "summary",
    "from_anndata": "importers.anndata", "from_table": "importers.table",
    "from_files": "importers.table",
    "to_dataframe": "export", "export_hits": "export", "report_html": "report",
}

__all__ = ["fdr", *_PUBLIC]


def __getattr__(name: str):
    if name == "fdr":
        return importlib.import_module(".fdr", __name__)
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nbdask' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing ``nbdask.simulate`` (the module) would make the import system set it as the
    package attribute ``simulate``, shadowing the public function of the same name; this keeps
    the function. The module stays reachable as ``from nbdask.simulate import ...`` and through
    ``sys.modules`` (``import nbdask.simulate as m`` binds the function)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _register_accessor() -> None:
    from importlib.util import find_spec

    if find_spec("xarray") is not None:
        importlib.import_module(".accessor", __name__)


_register_accessor()

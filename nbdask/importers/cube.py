"""Assemble an imported cube and write it so that an interrupted import never looks complete.

The store's group attribute ``nbdask_status`` says ``"incomplete"`` from the first byte written
(the template: metadata, coordinates, provenance) through the pseudobulk shards and the size
factors, and ``"complete"`` only after all of them; a failed import leaves ``"failed"``.
``open_cube`` refuses a cube whose status is present and not complete. An attribute rather than
a temporary sibling renamed into place, because object stores (S3) have no atomic rename.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ..schema import (CONTROL_REPLICATE, FEATURE, INPUTS, PERTURBATION, PROVENANCE, REPLICATE)
from . import size_factors as sfmod
from .groups import Groups

logger = logging.getLogger("nbdask")


def assemble(groups: Groups, counts, control_counts, features, attrs: Mapping) -> xr.Dataset:
    """The cube Dataset (design §2) with NaN size factors, provenance variables and ``attrs``."""
    n_pert, n_rep, n_ctrl = groups.shape
    variables = {
        "counts": (INPUTS["counts"].dims, counts),
        "size_factor": ((PERTURBATION, REPLICATE), np.full((n_pert, n_rep), np.nan)),
        "control_counts": (INPUTS["control_counts"].dims, control_counts),
        "control_size_factor": (CONTROL_REPLICATE, np.full(n_ctrl, np.nan)),
        "replicate_sample": ((PERTURBATION, REPLICATE), groups.replicate_sample),
        "control_sample": (CONTROL_REPLICATE, groups.control_sample),
    }
    if attrs.get("unit", "cell") == "cell":
        variables["replicate_cells"] = ((PERTURBATION, REPLICATE), groups.replicate_cells)
        variables["control_cells"] = (CONTROL_REPLICATE, groups.control_cells)
    cube = xr.Dataset(variables, coords={PERTURBATION: groups.perturbation,
                                         FEATURE: np.asarray(features, dtype=str)},
                      attrs={k: v for k, v in attrs.items() if k != "unit"})
    for name, var in cube.data_vars.items():
        var.attrs.update({**INPUTS, **PROVENANCE}[name].attrs())
    return cube


def size_factor_values(counts, control_counts, groups: Groups, option):
    """(size_factor [P, R], control_size_factor [C]) for ``option``: a method of
    ``size_factors.METHODS`` (from the counts, NumPy or dask) or the per-cell/sample values."""
    if isinstance(option, str):
        return sfmod.compute(_dask(counts), _dask(control_counts), groups.present, option)
    return sfmod.from_values(option, groups.row, groups.present, groups.shape[2])


def _dask(data) -> da.Array:
    return data if isinstance(data, da.Array) else da.from_array(data)


def _option_name(option) -> str:
    return option if isinstance(option, str) else "given"


def in_memory(cube: xr.Dataset, groups: Groups, option) -> xr.Dataset:
    """Compute the pseudobulk (on the active scheduler) and the size factors; NumPy-backed."""
    counts, control = dask.compute(cube["counts"].data, cube["control_counts"].data)
    cube = cube.copy()
    cube["counts"] = cube["counts"].copy(data=counts)
    cube["control_counts"] = cube["control_counts"].copy(data=control)
    sf, csf = size_factor_values(counts, control, groups, option)
    cube["size_factor"] = cube["size_factor"].copy(data=sf)
    cube["control_size_factor"] = cube["control_size_factor"].copy(data=csf)
    cube.attrs["size_factors"] = _option_name(option)
    return cube


def _string_encodings(cube: xr.Dataset, encoding: dict) -> dict:
    """Text variables: one plain chunk each (the sharding codec is for the numeric arrays)."""
    for name, var in cube.variables.items():
        if var.dtype.kind in "UO" and name not in cube.dims:
            encoding[name] = {"chunks": tuple(max(1, n) for n in var.shape)}
    return encoding


def write(cube: xr.Dataset, url: str, groups: Groups, option, *, overwrite: bool = False,
          storage_options: Mapping | None = None, client=None) -> xr.Dataset:
    """Write ``cube`` (lazy pseudobulk) to ``url``, then its size factors, then mark it complete.

    Shards are the dask chunks of ``counts``. The pseudobulk is computed once, on ``client``
    (else the active client, else a LocalCluster started for the call), straight into the
    shards; the size factors are then computed from the stored counts. Returns the cube opened
    from the store.
    """
    import zarr

    from ..cluster import compute_client
    from ..errors import StoreError
    from ..io import (CUBE_CODEC, STATUS_ATTR, _clear_encoding, _encoding, _exists,
                      _is_store_failure, _mark_failed, make_store, open_cube, store_error)

    if not overwrite and _exists(url, storage_options):
        raise StoreError(f"{url}: a store already exists; pass overwrite=True (--overwrite) to "
                         f"replace it")
    cube = _clear_encoding(cube).assign_attrs({STATUS_ATTR: "incomplete"})
    shards = {d: c[0] for d, c in zip(cube["counts"].dims, cube["counts"].chunks)}
    encoding = _string_encodings(cube, _encoding(cube, shards, CUBE_CODEC))
    store = make_store(url, storage_options=storage_options)
    try:
        pending = cube.to_zarr(store, mode="w", zarr_format=3, consolidated=False,
                               compute=False, encoding=encoding)
    except Exception as err:  # only the destination is touched here
        if not _is_store_failure(err):
            raise
        raise store_error(url, err, storage_options) from None
    try:
        with compute_client(client=client) as active:
            active.compute(pending, sync=True)
            group = zarr.open_group(store, mode="r+")
            sf, csf = size_factor_values(
                *(da.from_zarr(group[name], chunks=cube[name].data.chunks)
                  for name in ("counts", "control_counts")), groups, option)
        group["size_factor"][...] = sf
        group["control_size_factor"][...] = csf
        group.attrs["size_factors"] = _option_name(option)
        group.attrs[STATUS_ATTR] = "complete"  # last: open_cube trusts nothing before this
    except BaseException as err:
        _mark_failed(url, storage_options, err)
        raise
    logger.info("nbdask: imported %s perturbations x %s features -> %s", *cube["counts"].shape[:2], url)
    return open_cube(url, storage_options=storage_options)

"""Assemble an imported cube and write it so that an interrupted import never looks complete.

The store's group attribute ``nbdask_status`` says ``"incomplete"`` from the first byte written
(the template: metadata, coordinates, provenance) through the pseudobulk shards and the size
factors, and ``"complete"`` only after all of them; a failed import leaves ``"failed"``.
``open_cube`` refuses a cube whose status is present and not complete. An attribute rather than
a temporary sibling renamed into place, because object stores (S3) have no atomic rename.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ..errors import SourceError
from ..schema import (CONTROL_REPLICATE, FEATURE, INPUTS, LABELS, PERTURBATION, PROVENANCE,
                      REPLICATE)
from . import size_factors as sfmod
from .groups import Groups

logger = logging.getLogger("nbdask")


@dataclass
class Pending:
    """A lazy import: ``cube`` (lazy pseudobulk, NaN size factors), its ``groups``, the
    size-factor ``option`` (method name or values), and the per-chunk value checks
    (``problems``: a Delayed list of ``Problem``) with ``describe`` to put them in words."""

    cube: xr.Dataset
    groups: Groups
    option: object
    problems: object
    describe: Callable[[list], str | None]

    def check(self, problems: list) -> None:
        message = self.describe(problems)
        if message:
            raise SourceError(message)


def assemble(groups: Groups, counts, control_counts, features, attrs: Mapping, *,
             feature_names=None) -> xr.Dataset:
    """The cube Dataset (design §2) with NaN size factors, provenance variables, ``attrs`` and,
    given ``feature_names``, the ``feature_name`` coordinate."""
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
    if feature_names is not None:
        spec = LABELS["feature_name"]
        cube = cube.assign_coords({spec.name: (spec.dims, np.asarray(feature_names, dtype=str),
                                               spec.attrs())})
    return cube


def size_factor_values(counts, control_counts, groups: Groups, option):
    """(size_factor [P, R], control_size_factor [C]) for ``option``: a method of
    ``size_factors.METHODS`` (from the counts: NumPy, computed here, or dask, computed on the
    active scheduler) or the per-cell/sample values."""
    if isinstance(option, str):
        local = not isinstance(counts, da.Array)
        return sfmod.compute(_dask(counts), _dask(control_counts), groups.present, option,
                             scheduler="threads" if local else None,
                             names=(groups.perturbation, groups.replicate_sample,
                                    groups.control_sample))
    return sfmod.from_values(option, groups.row, groups.present, groups.shape[2])


def _dask(data) -> da.Array:
    return data if isinstance(data, da.Array) else da.from_array(data)


def _option_name(option) -> str:
    return option if isinstance(option, str) else "given"


def in_memory(pending: Pending, *, scheduler=None) -> xr.Dataset:
    """Compute the pseudobulk (on ``scheduler``, default the active one) and the size
    factors; NumPy-backed."""
    cube = pending.cube
    counts, control, problems = dask.compute(cube["counts"].data, cube["control_counts"].data,
                                             pending.problems, scheduler=scheduler)
    pending.check(problems)
    cube = cube.copy()
    cube["counts"] = cube["counts"].copy(data=counts)
    cube["control_counts"] = cube["control_counts"].copy(data=control)
    sf, csf = size_factor_values(counts, control, pending.groups, pending.option)
    cube["size_factor"] = cube["size_factor"].copy(data=sf)
    cube["control_size_factor"] = cube["control_size_factor"].copy(data=csf)
    cube.attrs["size_factors"] = _option_name(pending.option)
    return cube


def _string_encodings(cube: xr.Dataset, encoding: dict, shards: Mapping[str, int]) -> dict:
    """Text variables: plain chunks on the shard grid (sharding is for the numeric arrays)."""
    for name, var in cube.variables.items():
        if var.dtype.kind in "UO" and name not in cube.dims:
            encoding[name] = {"chunks": tuple(max(1, min(shards.get(d, n), n))
                                              for d, n in zip(var.dims, var.shape))}
    return encoding


def check_destination(url: str, *, overwrite: bool, storage_options: Mapping | None) -> None:
    """Refuse to replace an existing store unless ``overwrite``."""
    from ..errors import StoreError
    from ..io import _exists

    if not overwrite and _exists(url, storage_options):
        raise StoreError(f"{url}: a store already exists; pass overwrite=True (--overwrite) to "
                         f"replace it")


def write(source: Pending | xr.Dataset, url: str, *, shards: tuple[int, int] | None = None,
          overwrite: bool = False, storage_options: Mapping | None = None, client=None,
          progress: bool = False) -> xr.Dataset:
    """Write a cube to ``url``, marked complete last; returns it opened from the store.

    A ``Pending`` import is computed once, on ``client`` (else the active client, else a
    LocalCluster started for the call), straight into shards = the dask chunks of its
    pseudobulk; its size factors are then computed from the stored counts. A cube already in
    memory (size factors filled in) is chunked to ``shards`` (perturbation, feature) and written.
    """
    import zarr

    from ..cluster import compute_client, show_progress
    from ..io import (CUBE_CODEC, STATUS_ATTR, _clear_encoding, _encoding, _is_store_failure,
                      _mark_failed, make_store, open_cube, store_error)

    check_destination(url, overwrite=overwrite, storage_options=storage_options)
    pending = source if isinstance(source, Pending) else None
    cube = _clear_encoding(source.cube if pending else source)
    cube = cube.assign_attrs({STATUS_ATTR: "incomplete"})
    if cube["counts"].chunks is None:
        cube = cube.chunk(dict(zip((PERTURBATION, FEATURE), shards)))
    grid = {d: c[0] for d, c in zip(cube["counts"].dims, cube["counts"].chunks)}
    encoding = _string_encodings(cube, _encoding(cube, grid, CUBE_CODEC), grid)
    store = make_store(url, storage_options=storage_options)
    try:
        written = cube.to_zarr(store, mode="w", zarr_format=3, consolidated=False,
                               compute=False, encoding=encoding)
    except Exception as err:  # only the destination is touched here
        if not _is_store_failure(err):
            raise
        raise store_error(url, err, storage_options) from None
    try:
        group = zarr.open_group(store, mode="r+")
        if pending is None:
            dask.compute(written)
        else:
            with compute_client(client=client) as active:
                # One graph: the cell chunks are read once for the shards and the checks.
                futures = active.compute([written, pending.problems])
                if progress:
                    show_progress(futures)
                pending.check(active.gather(futures)[1])
                sf, csf = size_factor_values(
                    *(da.from_zarr(group[name], chunks=cube[name].data.chunks)
                      for name in ("counts", "control_counts")), pending.groups, pending.option)
            group["size_factor"][...] = sf
            group["control_size_factor"][...] = csf
            group.attrs["size_factors"] = _option_name(pending.option)
        group.attrs[STATUS_ATTR] = "complete"  # last: open_cube trusts nothing before this
    except BaseException as err:
        _mark_failed(url, storage_options, err)
        raise
    logger.info("nbdask: imported %s perturbations x %s features -> %s", *cube["counts"].shape[:2], url)
    return open_cube(url, storage_options=storage_options)

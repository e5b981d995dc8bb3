"""False discovery rate adjustment: exact Benjamini–Hochberg with R's ``p.adjust`` semantics.

q(p) = min over observed t >= p of (m / rank(t)) * t, capped at 1, where m counts the non-NaN
p-values in scope; NaN p-values stay NaN and are not counted. Ties get equal q.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import OptionError
from .schema import FEATURE

FDR_METHODS = ("bh", "none")
FDR_SCOPES = ("global", "perturbation")


def bh(p: np.ndarray, *, axis: int | None = None) -> np.ndarray:
    """Benjamini–Hochberg q-values of a NumPy array, over all of it or along ``axis``.

    Matches R's ``p.adjust(p, "BH")`` applied to the non-NaN values, with the same operation
    order, ``(m / i) * p``.
    """
    p = np.asarray(p, dtype=np.float64)
    if axis is None:
        return bh(p.reshape(-1), axis=0).reshape(p.shape)
    p = np.moveaxis(p, axis, -1)
    order = np.argsort(p, axis=-1, kind="stable")  # NaN sorts last
    p_sorted = np.take_along_axis(p, order, axis=-1)
    m = np.sum(~np.isnan(p), axis=-1, keepdims=True).astype(np.float64)
    rank = np.arange(1, p.shape[-1] + 1, dtype=np.float64)
    q_sorted = (m / rank) * p_sorted
    # Running minimum from the largest p down; fmin skips the trailing NaNs.
    q_sorted = np.fmin.accumulate(q_sorted[..., ::-1], axis=-1)[..., ::-1]
    q_sorted = np.minimum(q_sorted, 1.0)
    q = np.empty_like(q_sorted)
    np.put_along_axis(q, order, q_sorted, axis=-1)
    return np.moveaxis(q, -1, axis)


def _bh_block(block: np.ndarray, axis: int | None) -> np.ndarray:
    return bh(block, axis=axis)


def adjust(p_value: xr.DataArray, *, method: str = "bh", scope: str = "global") -> xr.DataArray:
    """FDR-adjust a (perturbation, feature) p-value array; lazy in, lazy out.

    With dask, the p-values of the scope are gathered into one task on a worker (the whole
    array for ``"global"``, one row block for ``"perturbation"``), adjusted exactly, and split
    back into the input's chunks.
    """
    if method not in FDR_METHODS or method == "none":
        raise OptionError(f"fdr={method!r}: choose one of {[m for m in FDR_METHODS if m != 'none']}")
    if scope not in FDR_SCOPES:
        raise OptionError(f"fdr_scope={scope!r}: choose one of {list(FDR_SCOPES)}")
    axis = None if scope == "global" else p_value.dims.index(FEATURE)
    data = p_value.data
    if p_value.chunks is None:
        q = bh(data, axis=axis)
    else:
        gathered = data.rechunk(-1 if axis is None else {axis: -1})
        q = gathered.map_blocks(_bh_block, axis, dtype=np.float64).rechunk(data.chunks)
    return p_value.copy(data=q).rename("q_value")

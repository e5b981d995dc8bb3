"""Dimension names, variable specifications and validation of the count cube.

Every public variable, input or output, is declared here once: its dims, dtype kind and doc.
``validate_structure`` checks what can be checked without reading counts; ``check_small_values``
reads the small per-sample arrays; ``check_count_block`` is run on every counts block by the
pipeline, so bad counts fail the run without an extra pass over the cube.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from .errors import CubeError

PERTURBATION = "perturbation"
FEATURE = "feature"
FEATURE_NAME = "feature_name"
REPLICATE = "replicate"
CONTROL_REPLICATE = "control_replicate"
#: Quantile nodes of a feature's dispersion posterior (``feature_dispersion_nodes``).
NODE = "dispersion_node"

MIN_CONTROL_REPLICATES = 2


@dataclass(frozen=True)
class Variable:
    """A declared variable: name, dims, allowed dtype kinds (numpy ``dtype.kind``), doc."""

    name: str
    dims: tuple[str, ...]
    kinds: str
    doc: str
    dtype: str | None = None  # dtype outputs are written with

    def attrs(self) -> dict[str, str]:
        return {"comment": self.doc}


def labels(ds: xr.Dataset, name: str) -> np.ndarray:
    """A coordinate's values as NumPy text (fixed-width, whatever width or kind it was stored
    as: Zarr's variable-length strings read back as NumPy's StringDType, which does not cast
    to ``str``); a dimension without one is labelled 0, 1, ..."""
    if name not in ds.coords:
        return np.arange(ds.sizes[name]).astype(str)
    return np.asarray(ds[name].values).astype(object).astype(str)


def feature_names(ds: xr.Dataset) -> np.ndarray | None:
    """The features' names (``feature_name``) as text, or None where the cube carried none."""
    return labels(ds, FEATURE_NAME) if FEATURE_NAME in ds.coords else None


def _declare(*variables: Variable) -> dict[str, Variable]:
    return {v.name: v for v in variables}


INPUTS = _declare(
    Variable("counts", (PERTURBATION, FEATURE, REPLICATE), "iuf",
             "Treated-group counts, >= 0 (integers; float only if integral, NaN only in absent replicates)."),
    Variable("size_factor", (PERTURBATION, REPLICATE), "f",
             "Size factor (library size) of each treated sample, > 0; NaN marks an absent replicate."),
    Variable("control_counts", (FEATURE, CONTROL_REPLICATE), "iuf",
             "Control-group counts shared by every perturbation, >= 0."),
    Variable("control_size_factor", (CONTROL_REPLICATE,), "f",
             "Size factor of each control sample, > 0."),
)

TRUTH = _declare(
    Variable("true_log_base_mean", (FEATURE,), "f",
             "Simulation truth: natural log of the control rate per unit size factor.", "float32"),
    Variable("true_log_fold_change", (PERTURBATION, FEATURE), "f",
             "Simulation truth: natural-log fold change, treated vs control (0 = null).", "float32"),
    Variable("true_log_dispersion", (FEATURE,), "f",
             "Simulation truth: log NB2 dispersion (Var = m + phi m^2).", "float32"),
)

#: Where an imported cube's replicates came from (nbdask.from_anndata / from_table).
PROVENANCE = _declare(
    Variable("replicate_sample", (PERTURBATION, REPLICATE), "UO",
             "Imported cubes: the sample each treated replicate was summed from; empty where absent.",
             "str"),
    Variable("replicate_cells", (PERTURBATION, REPLICATE), "i",
             "Imported single-cell cubes: cells summed into each treated replicate; 0 where absent.",
             "int64"),
    Variable("control_sample", (CONTROL_REPLICATE,), "UO",
             "Imported cubes: the sample each control replicate was summed from.", "str"),
    Variable("control_cells", (CONTROL_REPLICATE,), "i",
             "Imported single-cell cubes: control cells summed into each control replicate.", "int64"),
)

#: Names beside the labels: a coordinate of the cube that ``nbdask.test`` carries into the results.
LABELS = _declare(
    Variable(FEATURE_NAME, (FEATURE,), "UOT",
             "Imported cubes: each feature's name (gene symbol) where the feature labels are ids; "
             "shown beside them in hit tables and reports.", "str"),
)

_PF = (PERTURBATION, FEATURE)
OUTPUTS = _declare(
    Variable("log_base_mean", _PF, "f",
             "Natural log of the control rate per unit size factor (mu hat).", "float32"),
    Variable("log_fold_change", _PF, "f",
             "Natural-log fold change, treated vs control (beta hat).", "float32"),
    Variable("log_dispersion", _PF, "f",
             "Log NB2 dispersion (alpha hat = log phi hat; Var = m + phi m^2).", "float32"),
    Variable("standard_error", _PF, "f", "Standard error of the log fold change.", "float32"),
    Variable("statistic", _PF, "f", "Wald z; where the conditional exact test gave p, the signed "
             "normal quantile with that p; or likelihood-ratio chi-square (1 df).", "float32"),
    Variable("p_value", _PF, "f",
             "Two-sided p-value; NaN = untestable (e.g. both groups all zero).", "float64"),
    Variable("q_value", _PF, "f",
             "FDR-adjusted p-value over all non-NaN p-values in the FDR scope; NaN where p is NaN.",
             "float64"),
    Variable("feature_log_dispersion", (FEATURE,), "f",
             "Log NB2 dispersion of the feature (dispersion='feature' or 'shrunk'): the posterior mean "
             "under the trend prior (dispersion_prior='trend'), or the pooled moment estimate.",
             "float32"),
    Variable("feature_log_dispersion_sd", (FEATURE,), "f",
             "Posterior standard deviation of the feature's log dispersion (0 without a prior).",
             "float32"),
    Variable("feature_log_dispersion_trend", (FEATURE,), "f",
             "The prior's centre: the mean-dispersion trend across features at the feature's mean "
             "count (log NB2 dispersion).", "float32"),
    Variable("feature_base_mean", (FEATURE,), "f",
             "Mean normalised count of the feature over every sample (counts at the geometric "
             "mean size factor).", "float64"),
    Variable("feature_dispersion_nodes", (FEATURE, NODE), "f",
             "Nodes of the feature's posterior of log dispersion (cell means over its support); "
             "the p-values average over them.", "float32"),
    Variable("feature_dispersion_weights", (FEATURE, NODE), "f",
             "Posterior mass of each node of feature_dispersion_nodes (they sum to 1).", "float64"),
    Variable("feature_dispersion_spread", (FEATURE,), "f",
             "Between-perturbation variance tau^2 of the feature's dispersion (moment estimate).",
             "float64"),
    Variable("feature_outlier_groups", (FEATURE,), "i",
             "Treated groups left out of the feature's pool as grossly over-dispersed.", "int64"),
    Variable("converged", _PF, "b", "Whether the iterative fit converged (iterative methods).", "bool"),
    Variable("iterations", _PF, "i", "Iterations the fit used (iterative methods).", "int8"),
)


def _fail(msg: str) -> None:
    raise CubeError(msg)


def validate_structure(ds: xr.Dataset) -> None:
    """Check variables, dims, dtypes, coordinates and replicate chunking; reads no counts."""
    if not isinstance(ds, xr.Dataset):
        _fail(f"cube: expected an xarray.Dataset, got {type(ds).__name__}; open it with nbdask.open_cube")
    for name, spec in INPUTS.items():
        if name not in ds:
            _fail(f"{name}: missing from the cube (it has {sorted(ds.data_vars)}); "
                  f"add it with dims {spec.dims} (see the cube schema in the README)")
        var = ds[name]
        if var.dims != spec.dims:
            _fail(f"{name}: has dims {var.dims}, expected {spec.dims}; "
                  f"rename or transpose it, e.g. ds['{name}'].transpose{spec.dims}")
        if var.dtype.kind not in spec.kinds:
            allowed = {"i": "signed integer", "u": "unsigned integer", "f": "float"}
            _fail(f"{name}: has dtype {var.dtype}, expected "
                  f"{' or '.join(allowed[k] for k in spec.kinds)}; cast it with .astype(...)")
    n_control = ds.sizes[CONTROL_REPLICATE]
    if n_control < MIN_CONTROL_REPLICATES:
        _fail(f"control_counts: the control group has {n_control} replicate(s), at least "
              f"{MIN_CONTROL_REPLICATES} are needed to estimate dispersion; add control samples")
    if ds.sizes[REPLICATE] < 1:
        _fail("counts: the replicate dimension is empty; each perturbation needs treated samples")
    for dim in (PERTURBATION, FEATURE):
        if dim in ds.coords:
            index = ds[dim].to_index()
            if not index.is_unique:
                dup = index[index.duplicated()][:3].tolist()
                _fail(f"{dim}: coordinate labels are not unique (e.g. {dup}); "
                      f"give every {dim} a distinct label")
    for name, spec in LABELS.items():
        if name in ds.variables and (ds[name].dims != spec.dims or ds[name].dtype.kind not in spec.kinds):
            _fail(f"{name}: has dims {ds[name].dims} and dtype {ds[name].dtype}, expected text "
                  f"along {spec.dims}; give every feature its name as a string, or drop it")
    for name in INPUTS:
        chunks = ds[name].chunks
        if chunks is None:
            continue
        _check_storage_alignment(name, ds[name])
        for dim in (REPLICATE, CONTROL_REPLICATE):
            if dim in ds[name].dims:
                axis_chunks = chunks[ds[name].dims.index(dim)]
                if len(axis_chunks) > 1:
                    _fail(f"{name}: the {dim} axis is split into {len(axis_chunks)} chunks; "
                          f"keep it whole, e.g. cube.chunk({{'{dim}': -1}})")


def _check_storage_alignment(name: str, var: xr.DataArray) -> None:
    """Dask chunk boundaries must fall on the Zarr shard (or chunk) grid the variable came from."""
    grid = var.encoding.get("shards") or var.encoding.get("chunks")
    if not grid or len(grid) != var.ndim:
        return
    for dim, axis_chunks, step in zip(var.dims, var.chunks, grid):
        bounds = np.cumsum(axis_chunks)[:-1]
        if (bounds % step).any():
            _fail(f"{name}: dask chunks {axis_chunks[:4]}... along {dim!r} are not whole multiples "
                  f"of the stored Zarr shard/chunk size {step}; misaligned chunks re-read (and on "
                  f"write, corrupt) whole shards. Open with nbdask.open_cube(..., chunks=...) using "
                  f"multiples of {step}, or rechunk with cube.chunk({{{dim!r}: {step}}})")


def host_values(var: xr.DataArray) -> np.ndarray:
    """A variable's values as a NumPy array, whether NumPy-, dask- or CuPy-backed."""
    return host_arrays(var)[0]


def host_arrays(*variables) -> list[np.ndarray]:
    """``host_values`` of several variables (DataArrays or arrays), the dask-backed ones in one
    compute (one round trip to a cluster instead of one each)."""
    import dask

    from .kernels.backend import to_host  # here: the schema module stays free of the kernels

    datas = [v.data if isinstance(v, xr.DataArray) else v for v in variables]
    lazy = [i for i, d in enumerate(datas) if hasattr(d, "compute")]
    for i, values in zip(lazy, dask.compute(*(datas[i] for i in lazy))):
        datas[i] = values
    return [to_host(d) for d in datas]


def check_small_values(ds: xr.Dataset) -> dict[str, int]:
    """Check size factors and control counts (small arrays, loaded); return design counts."""
    sf, csf, cc = host_arrays(ds["size_factor"], ds["control_size_factor"], ds["control_counts"])
    sf = sf.astype(np.float64)
    bad = ~np.isnan(sf) & ~(np.isfinite(sf) & (sf > 0))
    if bad.any():
        i, r = np.argwhere(bad)[0]
        _fail(f"size_factor: {int(bad.sum())} value(s) are zero, negative or infinite "
              f"(first at perturbation {_label(ds, PERTURBATION, i)!r}, replicate {r}: {sf[i, r]}); "
              f"size factors must be finite and > 0, use NaN to mark an absent replicate")
    csf = csf.astype(np.float64)
    if not (np.isfinite(csf) & (csf > 0)).all():
        _fail(f"control_size_factor: values must be finite and > 0, found {csf.tolist()}; "
              f"drop control samples without a size factor")
    _check_count_values("control_counts", cc, np.ones(cc.shape, bool),
                        lambda i: f"feature {_label(ds, FEATURE, i[0])!r}")
    present = np.isfinite(sf).sum(axis=1)
    return {
        "n_perturbations": int(sf.shape[0]),
        "n_features": int(cc.shape[0]),
        "n_control_replicates": int(csf.shape[0]),
        "n_perturbations_without_replicates": int((present == 0).sum()),
        "min_replicates": int(present.min()) if present.size else 0,
        "max_replicates": int(present.max()) if present.size else 0,
    }


def _label(ds: xr.Dataset, dim: str, i: int) -> object:
    if dim in ds.coords:
        return ds[dim].values[i].item() if hasattr(ds[dim].values[i], "item") else ds[dim].values[i]
    return int(i)


def _check_count_values(name: str, y: np.ndarray, present: np.ndarray, locate) -> None:
    """Raise if counts at present positions are negative, non-integer or not finite.

    ``locate`` turns the index of the first bad value into words for the message.
    """
    if y.dtype.kind == "u" or y.size == 0:
        return

    def where(mask):
        return f"(first at {locate(tuple(int(i) for i in np.argwhere(mask)[0]))})"

    if y.dtype.kind == "i":
        neg = y < 0
        if neg.any():
            _fail(f"{name}: {int(neg.sum())} negative count(s) {where(neg)}; counts must be >= 0")
        return
    finite = np.isfinite(y)
    nan = present & ~finite
    if nan.any() and name == "control_counts":
        _fail(f"control_counts: {int(nan.sum())} NaN/inf value(s) {where(nan)}; "
              f"if the cube was assembled from arrays with different feature labels, xarray aligned "
              f"them and filled NaN: give control_counts exactly the feature coordinate of counts")
    if nan.any():
        _fail(f"{name}: {int(nan.sum())} NaN/inf count(s) in present replicates "
              f"{where(nan)}; fill them, or mark the replicate absent with a NaN size factor")
    neg = present & finite & (y < 0)
    if neg.any():
        _fail(f"{name}: {int(neg.sum())} negative count(s) {where(neg)}; counts must be >= 0")
    frac = present & finite & (y != np.floor(np.where(finite, y, 0)))
    if frac.any():
        ex = y[frac].flat[0]
        _fail(f"{name}: {int(frac.sum())} non-integer count(s), e.g. {ex} "
              f"{where(frac)}; pass raw integer counts, not normalised values")


def check_count_block(counts: np.ndarray, size_factor: np.ndarray,
                      perturbation: np.ndarray | None = None,
                      feature: np.ndarray | None = None) -> None:
    """Validate one host-side counts block [P_b, G_b, R] against its size factors [P_b, R].

    ``perturbation`` and ``feature`` are the block's labels, used only to name the first bad
    comparison in the error.
    """
    present = np.broadcast_to(np.isfinite(size_factor)[:, None, :], counts.shape)

    def locate(index):
        if perturbation is None or feature is None:
            return f"block index {index}"
        return f"perturbation {str(perturbation[index[0]])!r}, feature {str(feature[index[1]])!r}"

    _check_count_values("counts", counts, present, locate)


def _check_block_ufunc(counts, size_factor, perturbation, feature):
    p_b, g_b, r = counts.shape
    check_count_block(counts, size_factor.reshape(p_b, r), perturbation.reshape(p_b),
                      feature.reshape(g_b))
    return np.zeros((p_b, g_b), dtype=bool)


def validate(ds: xr.Dataset, *, values: bool = True) -> dict[str, int]:
    """Full validation: structure, size factors, control counts, and (``values``) every count.

    Returns the design counts of ``check_small_values``. Scanning the counts reads the whole cube;
    ``nbdask.test`` does the same checks block by block as it runs, so this is for ``nbdask info``
    and for checking a cube before a long run.
    """
    validate_structure(ds)
    design = check_small_values(ds)
    if values:
        labels = [xr.DataArray(ds[d].values if d in ds.coords else np.arange(ds.sizes[d]), dims=d)
                  for d in (PERTURBATION, FEATURE)]
        side = [ds["size_factor"].drop_vars(list(ds["size_factor"].coords)), *labels]
        if ds["counts"].chunks is not None:
            chunks = dict(zip(ds["counts"].dims, ds["counts"].chunks))
            side = [v.chunk({d: chunks[d] for d in v.dims}) for v in side]
        ok = xr.apply_ufunc(_check_block_ufunc, ds["counts"].drop_vars(list(ds.coords)), *side,
                            input_core_dims=[[REPLICATE], [REPLICATE], [], []],
                            dask="parallelized", output_dtypes=[bool])
        ok.data.sum().compute() if ok.chunks is not None else None
    return design

"""Perturb-seq AnnData into a count cube: ``nbdask.from_anndata`` (``nbdask import anndata``).

A file (``.h5ad``, or an AnnData Zarr store) is read lazily with anndata's
``anndata.experimental.read_elem_lazy``: X (or a layer) becomes a dask array of row chunks of
cells (CSR or dense) whose tasks open the file themselves on the workers, so no worker ever
holds more than a few chunks. Only the two obs columns named and the var index (or the var
column named by ``feature_key``) are read on the client. An in-memory AnnData goes through the
same chunked pseudobulk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import SourceError
from . import cube as cubemod
from .groups import assign_groups
from .pseudobulk import describe_problems, find_problem, pseudobulk
from .size_factors import check_option

#: Groups with fewer cells than this are absent replicates (NaN size factor).
DEFAULT_MIN_CELLS = 10
#: Float64 bytes of one chunk of cells when ``chunk_cells`` is not given (dense X; sparse X
#: takes 8x the cells, which is the same memory at 1/8 density or less).
CHUNK_BYTES = 64 * 2**20
#: Default shard (= dask chunk) of the cube along perturbation and feature.
DEFAULT_SHARDS = 1024


def _anndata():
    try:
        import anndata
    except ImportError:
        raise SourceError("from_anndata needs the anndata package: pip install 'nbdask[anndata]'") from None
    return anndata


@dataclass
class Source:
    """What the import needs from an AnnData, wherever it lives."""

    name: str                 # for messages
    element: str              # "X" or "layers['counts']"
    columns: list[str]        # obs columns
    obs: object               # obs DataFrame, or the stored obs group
    var_names: np.ndarray
    var_columns: list[str]    # var columns
    var: object               # var DataFrame, or the stored var group
    matrix: object            # cells x genes: NumPy, SciPy sparse, dask array or stored element
    sparse: bool
    stored: bool = False      # obs and matrix are elements of an open file

    def close(self) -> None:
        """Close the client's handle on an .h5ad file (tasks open their own)."""
        close = getattr(getattr(self.obs, "file", None), "close", None)
        if self.stored and close is not None:
            close()

    def obs_column(self, key: str):
        return _anndata().io.read_elem(self.obs[key]) if self.stored else self.obs[key]

    def var_column(self, key: str) -> pd.Index:
        return pd.Index(_anndata().io.read_elem(self.var[key]) if self.stored else self.var[key])

    @property
    def shape(self) -> tuple[int, int]:
        shape = self.matrix.attrs["shape"] if self.stored and self.sparse else self.matrix.shape
        return int(shape[0]), int(shape[1])

    def chunks(self, chunk_cells: int | None) -> tuple[list, list[int]]:
        """Delayed row chunks of cells and their first cells."""
        n_obs, n_vars = self.shape
        if chunk_cells is None:
            chunk_cells = max(1, CHUNK_BYTES // (8 * max(n_vars, 1))) * (8 if self.sparse else 1)
        chunk_cells = int(min(chunk_cells, max(n_obs, 1)))
        if isinstance(self.matrix, da.Array):
            lazy = self.matrix.rechunk({0: chunk_cells, 1: -1})
        elif self.stored:
            lazy = _anndata().experimental.read_elem_lazy(self.matrix, chunks=(chunk_cells, n_vars))
        elif sparse.issparse(self.matrix):
            matrix = sparse.csr_matrix(self.matrix)
            lazy = da.from_array(matrix, chunks=(chunk_cells, n_vars), asarray=False,
                                 meta=matrix[:0])
        else:
            lazy = da.from_array(np.asarray(self.matrix), chunks=(chunk_cells, n_vars))
        starts = np.r_[0, np.cumsum(lazy.chunks[0])[:-1]].astype(int).tolist()
        return list(lazy.to_delayed().ravel()), starts


def _open_file(path: Path):
    """The root group of an AnnData file or store, checked to be AnnData."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory; pass an .h5ad file or an AnnData "
                          f".zarr store")
    try:
        if path.is_dir():
            import zarr

            root = zarr.open_group(str(path), mode="r")
        else:
            import h5py

            root = h5py.File(path, "r")
    except Exception as err:
        raise SourceError(f"{path}: not an AnnData file ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:120]}); pass an .h5ad file or an "
                          f"AnnData .zarr store (adata.write_h5ad / adata.write_zarr)") from None
    kind = root.attrs.get("encoding-type")
    if kind != "anndata":
        raise SourceError(f"{path}: not an AnnData file (its root's encoding-type is {kind!r}, "
                          f"AnnData writes 'anndata'); write it with adata.write_h5ad(...) or "
                          f"adata.write_zarr(...)")
    return root


def _stored_element(root, layer: str | None, name: str):
    if layer is None:
        if "X" not in root:
            raise SourceError(f"{name}: has no X; pass the layer that holds the counts "
                              f"(layer=..., --layer ...)")
        return root["X"], "X"
    layers = sorted(root["layers"].keys()) if "layers" in root else []
    if layer not in layers:
        raise SourceError(f"layer {layer!r}: not in {name} (its layers: {layers or 'none'}); pass "
                          f"one of them, or no layer to use X")
    return root["layers"][layer], f"layers[{layer!r}]"


def open_source(adata, *, layer: str | None = None) -> Source:
    """A ``Source`` for an AnnData object (in memory or backed) or a path to one."""
    anndata = _anndata()
    if isinstance(adata, anndata.AnnData) and adata.isbacked:
        if adata.is_view:
            raise SourceError("adata: a view of a backed AnnData cannot be streamed; import the "
                              "whole file, or load the view with adata.to_memory()")
        adata = adata.filename
    if isinstance(adata, (str, Path)):
        path = Path(adata)
        root = _open_file(path)
        element, label = _stored_element(root, layer, str(path))
        kind = element.attrs.get("encoding-type", "array")
        if kind == "csc_matrix":
            raise SourceError(f"{path}: {label} is stored as CSC (by gene), which cannot be read "
                              f"in chunks of cells; rewrite it as CSR (adata.X = adata.X.tocsr(); "
                              f"adata.write_h5ad(...))")
        obs = root["obs"]
        var = root["var"]
        var_names = np.asarray(anndata.io.read_elem(var[var.attrs["_index"]])).astype(str)
        return Source(str(path), label, _stored_columns(obs), obs, var_names,
                      _stored_columns(var), var, element, kind == "csr_matrix", stored=True)
    if not isinstance(adata, anndata.AnnData):
        raise SourceError(f"adata: expected an AnnData or a path to one, got {type(adata).__name__}")
    if layer is None:
        matrix, label = adata.X, "X"
    elif layer in adata.layers:
        matrix, label = adata.layers[layer], f"layers[{layer!r}]"
    else:
        raise SourceError(f"layer {layer!r}: not in adata (its layers: "
                          f"{sorted(adata.layers.keys()) or 'none'}); pass one of them, or no "
                          f"layer to use X")
    if matrix is None:
        raise SourceError("adata: X is empty; pass the layer that holds the counts (layer=...)")
    return Source("adata", label, list(adata.obs.columns), adata.obs,
                  np.asarray(adata.var_names).astype(str), list(adata.var.columns), adata.var, matrix,
                  sparse.issparse(matrix) or getattr(matrix, "format", None) == "csr")


def _stored_columns(group) -> list[str]:
    """The dataframe columns of a stored obs or var group, in order."""
    return [str(c) for c in group.attrs.get("column-order", []) if str(c) in group]


def feature_labels(source: Source, feature_key: str | None) -> pd.Index:
    """The cube's feature labels: the var index, or the var column ``feature_key``; unique and
    complete, else a SourceError naming the var columns that would do."""
    if feature_key is None:
        labels, what = pd.Index(source.var_names), "var_names"
    elif feature_key not in source.var_columns:
        raise SourceError(f"feature_key={feature_key!r}: not a column of {source.name}'s var (its "
                          f"columns: {source.var_columns[:12] or 'none'}); pass the var column "
                          f"that holds each feature's id, or none to use var_names")
    else:
        labels, what = source.var_column(feature_key), f"var column {feature_key!r}"
        missing = int(labels.isna().sum())
        if missing:
            raise SourceError(f"feature_key={feature_key!r}: {missing} feature(s) have no value in "
                              f"{source.name}'s {what}; pass a var column with an id for every "
                              f"feature")
    if labels.is_unique:
        return labels.astype(str)
    dup = labels[labels.duplicated()].unique()[:3].tolist()
    others = [c for c in source.var_columns
              if c != feature_key and _unique_labels(source.var_column(c))]
    instead = (f"pass a var column of unique ids as feature_key (--feature-key; here: "
               f"{others[:4]}), or " if others else "")
    raise SourceError(f"{source.name}: {what} are not unique (e.g. {dup}); {instead}make them "
                      f"unique (adata.var_names_make_unique()) so every feature has its own label")


def _unique_labels(values: pd.Index) -> bool:
    """Whether a var column could label the features: text, unique, none missing."""
    dtype = values.categories.dtype if isinstance(values, pd.CategoricalIndex) else values.dtype
    return dtype.kind in "OUS" and values.is_unique and not values.isna().any()


def _check_key(source: Source, key: str, option: str) -> None:
    if key not in source.columns:
        raise SourceError(f"{option}={key!r}: not a column of {source.name}'s obs (its columns: "
                          f"{source.columns[:12] or 'none'}); pass the obs column that holds the "
                          f"{option.removesuffix('_key')} of each cell")


def from_anndata(adata, *, perturbation_key: str, sample_key: str, control,
                 layer: str | None = None, feature_key: str | None = None,
                 min_cells: int = DEFAULT_MIN_CELLS, size_factors="ratio", store: str | None = None,
                 shards: int | tuple[int, int] = DEFAULT_SHARDS, chunk_cells: int | None = None,
                 overwrite: bool = False, storage_options: Mapping | None = None, client=None,
                 progress: bool = False):
    """Pseudobulk a Perturb-seq AnnData into a count cube (design §2).

    Parameters
    ----------
    adata
        An ``AnnData`` (in memory, or backed: then its file is streamed) or a path to an
        ``.h5ad`` file or an AnnData ``.zarr`` store. Counts come from X or ``layer``, dense or
        CSR, integers or integral floats.
    perturbation_key, sample_key
        obs columns: each cell's perturbation (guide, gene) and sample (donor, lane, batch).
    feature_key
        A var column of unique feature ids to label the features with (e.g. ``"gene_ids"``
        where var_names are gene symbols with duplicates); default: var_names. The var names
        then become the cube's ``feature_name`` coordinate.
    control
        The control label, or several (pooled into one control group per sample).
    min_cells
        Groups with fewer cells are absent replicates (NaN size factor); counted in the attrs.
    size_factors
        ``"ratio"`` (DESeq2 median of ratios, the default), ``"poscounts"``, ``"total"``, or one
        value per cell (a replicate's factor is the sum over its cells).
    store
        Write the cube there (sharded Zarr v3) streaming cells through the cluster, and return
        it opened from the store; without it the cube is computed into memory.
    shards
        Shard (= dask chunk) size along perturbation and feature (one int for both, or a pair).
    chunk_cells
        Cells per chunk read by one task (default: about 64 MiB of float64 for dense X).
    overwrite, storage_options, client, progress
        With ``store``: replace an existing store; fsspec options for it; where to compute
        (default: the active client, else a LocalCluster for the call); a progress bar.

    Returns
    -------
    Dataset with ``counts`` [P, G, R], ``size_factor`` [P, R], ``control_counts`` [G, C],
    ``control_size_factor`` [C] (int64 counts), provenance ``replicate_sample``,
    ``replicate_cells``, ``control_sample``, ``control_cells``, and attrs summarising the import
    (cells used, groups dropped below ``min_cells``).
    """
    pending = prepare(adata, perturbation_key=perturbation_key, sample_key=sample_key,
                      control=control, layer=layer, feature_key=feature_key, min_cells=min_cells,
                      size_factors=size_factors, shards=shards, chunk_cells=chunk_cells)
    if store is None:
        # Cells already in this process are summed here, not shipped to a cluster.
        local = isinstance(adata, _anndata().AnnData) and not adata.isbacked
        return cubemod.in_memory(pending, scheduler="threads" if local else None)
    return cubemod.write(pending, store, overwrite=overwrite, storage_options=storage_options,
                         client=client, progress=progress)


def prepare(adata, *, perturbation_key: str, sample_key: str, control, layer: str | None = None,
            feature_key: str | None = None, min_cells: int = DEFAULT_MIN_CELLS,
            size_factors="ratio", shards: int | tuple[int, int] = DEFAULT_SHARDS,
            chunk_cells: int | None = None) -> cubemod.Pending:
    """Check everything that can be checked without reading all counts (the first chunk of
    cells is read and checked here, so a normalised X fails at once) and lay out the lazy
    pseudobulk."""
    source = open_source(adata, layer=layer)
    try:
        _check_key(source, perturbation_key, "perturbation_key")
        _check_key(source, sample_key, "sample_key")
        groups = assign_groups(source.obs_column(perturbation_key), source.obs_column(sample_key),
                               control=control, min_cells=min_cells,
                               perturbation_key=perturbation_key, sample_key=sample_key)
        option = check_option(size_factors, source.shape[0], "cell")
        var_names = feature_labels(source, feature_key)
        p_shard, g_shard = (shards, shards) if isinstance(shards, int) else shards
        cells, starts = source.chunks(chunk_cells)
    finally:
        source.close()  # the read tasks open the file themselves

    def describe(problems, scanned=None):
        return describe_problems(problems, source=f"{source.name}: {source.element}",
                                 columns=var_names, scanned=scanned)

    if cells:
        first = find_problem(cells[0].compute(scheduler="sync"))[1]
        if first is not None:
            raise SourceError(describe([first], scanned=starts[1] if len(starts) > 1 else None))
    counts, control_counts, problems = pseudobulk(cells, starts, groups,
                                                  n_features=len(var_names),
                                                  shards=(p_shard, g_shard))
    attrs = {"source": source.name, "source_element": source.element,
             "perturbation_key": perturbation_key, "sample_key": sample_key, **groups.summary}
    if feature_key is not None:
        attrs.update(feature_ids_from=f"var column {feature_key}", feature_names_from="var_names")
    # With ids as labels, the var index (gene symbols, as scanpy reads 10x files) names them.
    names = None if feature_key is None else source.var_names
    cube = cubemod.assemble(groups, counts, control_counts, var_names, attrs, feature_names=names)
    return cubemod.Pending(cube, groups, option, problems, describe)

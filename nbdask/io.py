"""Zarr v3 stores: open and write count cubes, open results, the completion marker.

Store access only: stores from paths and URLs, sharded encodings, the status attribute that
marks a store complete, and one-line errors for storage failures. Results are written by the
two-pass distributed writer in ``nbdask.writer`` (``save_results``, ``--resume``).
"""

from __future__ import annotations

from collections.abc import Mapping

import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from .errors import CubeError, MissingStoreError, ResultsError, StoreError
from .schema import (CONTROL_REPLICATE, FEATURE, INPUTS, PERTURBATION, REPLICATE, TRUTH,
                     check_small_values, validate_structure)

#: Group attribute that marks a results store (and an imported cube); "complete" is written
#: last, after all data.
STATUS_ATTR = "nbdask_status"
#: Target side of an inner (independently readable) chunk within a shard, per 2-D axis.
INNER_CHUNK = 512


def make_store(url: str, *, storage_options: Mapping | None = None, read_only: bool = False):
    """A Zarr store for a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://`` ...)."""
    url = str(url)
    if "://" in url and not url.startswith("file://"):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(url, storage_options=dict(storage_options or {}),
                                    read_only=read_only)
    from zarr.storage import LocalStore

    return LocalStore(url.removeprefix("file://"), read_only=read_only)


_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def redact(text: str, storage_options: Mapping | None) -> str:
    """``text`` with every credential-like value of ``storage_options`` replaced by ***."""
    def secrets(obj, name=""):
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                yield from secrets(v, str(k))
        elif isinstance(obj, str) and len(obj) >= 4 and any(w in name.lower() for w in _SECRET_WORDS):
            yield obj

    for value in secrets(storage_options or {}):
        text = text.replace(value, "***")
    return text


def store_error(url: str, err: BaseException, storage_options) -> StoreError:
    """One line naming the store, the failure and what to check; credentials redacted."""
    kind = type(err).__name__
    text = " ".join(str(err).split())[:300]
    if isinstance(err, PermissionError):
        hint = "check the credentials (key/secret) and the bucket policy"
    elif isinstance(err, FileNotFoundError):
        hint = "check the path or URL and that the bucket exists"
    else:
        hint = "check the endpoint URL and that the store is reachable"
    return StoreError(redact(f"{url}: {kind}: {text}; {hint}", storage_options))


def _is_store_failure(err: BaseException) -> bool:
    """An error of the storage layer (reported as StoreError), not of nbdask's own checks."""
    if isinstance(err, (CubeError, ResultsError, StoreError)):
        return False
    module = type(err).__module__.split(".")[0]
    return isinstance(err, (OSError, TimeoutError)) or module in (
        "botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp", "gcsfs", "adlfs", "obstore")


def consolidate(store) -> None:
    """Write the store's consolidated metadata, so ``xr.open_zarr(path)`` reads one document.

    zarr warns that consolidated metadata is not yet part of the Zarr v3 spec; zarr-python and
    xarray read it (and fall back without it), so the warning says nothing to nbdask's users.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(store)


def _consolidated(group) -> bool:
    return group.metadata.consolidated_metadata is not None


def _open_group(url: str, storage_options, mode: str = "r"):
    store = make_store(url, storage_options=storage_options, read_only=(mode == "r"))
    try:
        return zarr.open_group(store, mode=mode)
    except FileNotFoundError:
        raise MissingStoreError(f"{url}: no Zarr store there; check the path or URL (and that "
                                f"the bucket exists)") from None
    except Exception as err:
        if not _is_store_failure(err):
            raise
        raise store_error(url, err, storage_options) from None


def _exists(url: str, storage_options) -> bool:
    try:
        _open_group(url, storage_options, "r")
    except MissingStoreError:
        return False
    return True


def _storage_grid(array) -> tuple[int, ...]:
    """The write unit of a stored array: its shard shape, or its chunk shape without sharding."""
    return tuple(array.shards or array.chunks)


def open_cube(url: str, *, chunks: Mapping[str, int] | None = None,
              storage_options: Mapping | None = None) -> xr.Dataset:
    """Open a count cube from Zarr as a lazy, validated, dask-backed Dataset.

    Dask chunks default to whole shards of ``counts``; ``chunks`` overrides them per dimension
    (``perturbation``, ``feature``) and must be whole multiples of the shard. Replicate axes are
    never split. Raises ``CubeError`` naming the variable when the cube breaks the schema.
    """
    group = _open_group(url, storage_options)
    if "counts" not in group:
        raise CubeError(f"counts: missing from {url} (it has {sorted(group.array_keys())}); "
                        f"is this a count cube? See the cube schema in the README")
    status = group.attrs.get(STATUS_ATTR)
    if status is not None and status != "complete":
        raise CubeError(f"{url}: the cube is {status}, not complete (the import that wrote it "
                        f"failed or was interrupted); rerun the import with --overwrite")
    counts = group["counts"]
    if counts.ndim != 3:
        raise CubeError(f"counts: has {counts.ndim} dims, expected 3 "
                        f"({PERTURBATION}, {FEATURE}, {REPLICATE})")
    grid = dict(zip((PERTURBATION, FEATURE), _storage_grid(counts)[:2]))
    dask_chunks = {PERTURBATION: grid[PERTURBATION], FEATURE: grid[FEATURE],
                   REPLICATE: -1, CONTROL_REPLICATE: -1}
    for dim, size in (chunks or {}).items():
        if dim not in grid:
            raise CubeError(f"chunks: {dim!r} cannot be chosen; only {list(grid)} are chunked "
                            f"(replicate axes stay whole)")
        if size % grid[dim]:
            raise CubeError(f"chunks: {dim}={size} is not a whole multiple of the counts shard "
                            f"size {grid[dim]} along {dim!r}; use a multiple such as {grid[dim] * max(1, size // grid[dim])}")
        dask_chunks[dim] = size
    _check_shapes(group, url)
    store = make_store(url, storage_options=storage_options, read_only=True)
    try:
        ds = xr.open_zarr(store, chunks=dask_chunks, consolidated=_consolidated(group), zarr_format=3)
    except ValueError as err:
        raise CubeError(f"{url}: cannot be read as one Dataset ({err}); its arrays disagree on "
                        f"dimension sizes") from None
    validate_structure(ds)
    check_small_values(ds)
    return ds


def _check_shapes(group, url: str) -> None:
    """Name the variable whose length along a shared dimension disagrees with counts."""
    sizes: dict[str, tuple[int, str]] = {}
    for name, spec in {**INPUTS, **TRUTH}.items():
        if name not in group:
            continue
        arr = group[name]
        dims = arr.metadata.dimension_names or ()
        for dim, n in zip(dims, arr.shape):
            if dim in sizes and sizes[dim][0] != n:
                other, first = sizes[dim][1], sizes[dim][0]
                raise CubeError(
                    f"{name}: has {n} entries along {dim!r} but {other} has {first}; the "
                    f"{dim} coordinates of {name} and {other} do not match, rewrite the cube with "
                    f"both on the same {dim} labels in the same order")
            sizes.setdefault(dim, (n, name))


def _inner(shard: int) -> int:
    """Largest divisor of ``shard`` not above INNER_CHUNK (the whole shard if that is small)."""
    if shard <= INNER_CHUNK:
        return shard
    for d in range(INNER_CHUNK, 0, -1):
        if shard % d == 0 and d >= INNER_CHUNK // 4:
            return d
    return shard


#: Counts (small integers) compress ~4x better with zstd; results (floats that barely
#: compress) are written ~5x faster with lz4 at the same ratio.
CUBE_CODEC = {"cname": "zstd", "clevel": 3}
RESULTS_CODEC = {"cname": "lz4", "clevel": 5}


def _encoding(ds: xr.Dataset, shards: Mapping[str, int], codec: Mapping = RESULTS_CODEC, *,
              shard_by_chunks: bool = True) -> dict:
    """Sharded Zarr v3 encodings: each variable's shard = its dask chunk (or ``shards``, always
    with ``shard_by_chunks=False``)."""
    enc = {}
    for name, var in ds.variables.items():
        if name in ds.dims and var.ndim == 1:
            enc[name] = {"chunks": (var.shape[0],)}
            continue
        if var.ndim == 0:
            continue
        shard = []
        for axis, dim in enumerate(var.dims):
            if var.chunks is not None and shard_by_chunks:
                size = var.chunks[axis][0]
            else:
                size = min(shards.get(dim, var.shape[axis]), var.shape[axis])
            shard.append(max(1, size))
        inner = tuple(_inner(s) if d in (PERTURBATION, FEATURE) else s for s, d in zip(shard, var.dims))
        enc[name] = {
            "chunks": inner,
            "shards": tuple(shard),
            "compressors": [BloscCodec(shuffle="shuffle", **codec)],
        }
    return enc


def _check_uniform_chunks(ds: xr.Dataset) -> None:
    """Every dask chunk but the last along an axis must have the same size (= the shard)."""
    for name, var in ds.data_vars.items():
        if var.chunks is None:
            continue
        for dim, axis_chunks in zip(var.dims, var.chunks):
            if len(set(axis_chunks[:-1])) > 1 or (len(axis_chunks) > 1 and axis_chunks[-1] > axis_chunks[0]):
                raise CubeError(f"{name}: irregular dask chunks {axis_chunks[:5]}... along {dim!r} "
                                f"cannot map onto whole Zarr shards; rechunk to a uniform size, "
                                f"e.g. .chunk({{{dim!r}: {axis_chunks[0]}}})")


def _clear_encoding(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    for var in ds.variables.values():
        var.encoding = {}
    return ds


def save_cube(cube: xr.Dataset, url: str, *, overwrite: bool = False,
              storage_options: Mapping | None = None) -> None:
    """Write a count cube as sharded Zarr v3: one shard per dask chunk of ``counts``."""
    if not overwrite and _exists(url, storage_options):
        raise StoreError(f"{url}: a store already exists; pass overwrite=True (--overwrite) to replace it")
    validate_structure(cube)
    cube = _clear_encoding(cube)
    _check_uniform_chunks(cube)
    counts = cube["counts"]
    shards = {}
    if counts.chunks is not None:
        shards = {d: c[0] for d, c in zip(counts.dims, counts.chunks)}
    store = make_store(url, storage_options=storage_options)
    try:
        cube.to_zarr(store, mode="w", zarr_format=3, consolidated=False,
                     encoding=_encoding(cube, shards, CUBE_CODEC))
        consolidate(store)
    except Exception as err:
        if not _is_store_failure(err):
            raise
        raise store_error(url, err, storage_options) from None


#: Per-block completion flags of the writer's pass 1, (perturbation blocks, feature blocks), one
#: chunk each; ``open_results`` leaves them out.
DONE_ARRAY = "nbdask_done_blocks"


def results_status(url: str, *, storage_options: Mapping | None = None) -> str | None:
    """The ``nbdask_status`` of a results store ("incomplete", "failed", "complete"), None when
    there is no store."""
    try:
        return _open_group(url, storage_options).attrs.get(STATUS_ATTR)
    except MissingStoreError:
        return None


def _mark_failed(url, storage_options, err: BaseException) -> None:
    try:
        group = _open_group(url, storage_options, "r+")
        group.attrs.update({STATUS_ATTR: "failed", "nbdask_error": type(err).__name__})
    except Exception:  # the store may never have been created; it is not complete either way
        pass


def open_results(url: str, *, storage_options: Mapping | None = None,
                 allow_incomplete: bool = False) -> xr.Dataset:
    """Open a results store; refuse one that is not marked complete."""
    group = _open_group(url, storage_options)
    status = group.attrs.get(STATUS_ATTR)
    if status is None:
        raise ResultsError(f"{url}: not an nbdask results store (no {STATUS_ATTR!r} attribute)")
    if status != "complete" and not allow_incomplete:
        raise ResultsError(f"{url}: results are {status}, not complete (the run that wrote them "
                           f"failed or was interrupted); rerun `nbdask test ... --overwrite`")
    store = make_store(url, storage_options=storage_options, read_only=True)
    grid = _storage_grid(group["p_value"])
    return xr.open_zarr(store, consolidated=_consolidated(group), zarr_format=3,
                        drop_variables=[DONE_ARRAY],
                        chunks={PERTURBATION: grid[0], FEATURE: grid[1]})


def describe(url: str, *, storage_options: Mapping | None = None) -> dict:
    """Shapes, dtypes, shards and chunks of every array in a store (no data read)."""
    group = _open_group(url, storage_options)
    out = {"url": url, "attrs": dict(group.attrs), "arrays": {}}
    for name, arr in sorted(group.arrays()):
        out["arrays"][name] = {
            "dims": tuple(arr.metadata.dimension_names or ()),
            "shape": arr.shape, "dtype": str(arr.dtype),
            "shards": arr.shards, "chunks": arr.chunks,
        }
    return out


#: The results writer's names that lived here before ``nbdask.writer``: still importable from
#: ``nbdask.io``, loaded on first use (an import at the top would tie the two modules in a cycle).
_WRITER_NAMES = ("save_results", "stored_pooling", "RESUME_COMPLETE", "FDR_CHUNK_VALUES")


def __getattr__(name: str):
    if name in _WRITER_NAMES:
        from . import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

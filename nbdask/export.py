"""Tidy hit tables: one row per kept comparison, as a DataFrame or streamed to Parquet/CSV.

Filtering runs block by block on the workers (``nbdask.blocks``); only the kept rows travel to
the client. Files are written as blocks arrive, in store order (perturbation blocks outer,
then feature blocks; row-major within a block), so a 4e8-comparison result exports its hits in
the memory of a few blocks' hits. Parquet goes through one ``pyarrow.parquet.ParquetWriter``
into a single file with row groups of ``row_group_size`` rows: one file opens in pandas,
polars, DuckDB or R's arrow without a dataset directory (dask.dataframe's ``to_parquet`` writes
a directory of part files).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import OptionError, ResultsError
from .schema import FEATURE, PERTURBATION, feature_names, labels

logger = logging.getLogger("nbdask")

#: Columns of a hit table, in order, with their meaning (README "Exporting hits").
COLUMNS = {
    "perturbation": "perturbation label",
    "feature": "feature label",
    "feature_name": "the feature's name (gene symbol), where the cube carries feature_name",
    "log_fold_change": "natural-log fold change, treated vs control (beta hat)",
    "log2_fold_change": "log_fold_change / ln 2",
    "standard_error": "standard error of log_fold_change",
    "statistic": "Wald z, or the signed normal quantile of an exact-test p, or LRT chi-square",
    "p_value": "two-sided p-value (NaN: untestable)",
    "q_value": "FDR-adjusted p-value (absent when the run used fdr='none')",
    "base_mean": "exp(log_base_mean): the control rate per unit size factor",
    "dispersion": "exp(log_dispersion): NB2 dispersion phi (Var = m + phi m^2)",
}
#: Result variables a hit table reads.
SOURCES = ("log_fold_change", "standard_error", "statistic", "p_value", "q_value",
           "log_base_mean", "log_dispersion")
#: Rows per Parquet row group (and per CSV write).
ROW_GROUP_SIZE = 1 << 20
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def _block_rows(arrays: dict, origin: tuple[int, int], *, q_max: float | None) -> dict:
    """The kept comparisons of one block: global row/column positions and the column values."""
    p = arrays["p_value"]
    keep = np.ones(p.shape, bool) if q_max is None else arrays["q_value"] <= q_max
    rows, cols = np.nonzero(keep)
    out = {"_row": rows.astype(np.int64) + origin[0], "_col": cols.astype(np.int64) + origin[1]}
    for name, block in arrays.items():
        out[name] = np.asarray(block)[rows, cols]
    return out


def _columns(part: dict, p_labels: np.ndarray, f_labels: np.ndarray, f_names: np.ndarray | None):
    """A block's kept rows as a DataFrame with labels and derived columns (COLUMNS order)."""
    import pandas as pd

    lfc = part["log_fold_change"]
    cols = {
        "perturbation": p_labels[part["_row"]],
        "feature": f_labels[part["_col"]],
    }
    if f_names is not None:
        cols["feature_name"] = f_names[part["_col"]]
    cols |= {
        "log_fold_change": lfc,
        "log2_fold_change": (lfc / np.float32(np.log(2))).astype(np.float32),
        "standard_error": part["standard_error"],
        "statistic": part["statistic"],
        "p_value": part["p_value"],
    }
    if "q_value" in part:
        cols["q_value"] = part["q_value"]
    with np.errstate(over="ignore"):
        cols["base_mean"] = np.exp(part["log_base_mean"])
        cols["dispersion"] = np.exp(part["log_dispersion"])
    return pd.DataFrame(cols)


def _select(results: xr.Dataset, dim: str, chosen) -> xr.Dataset:
    if chosen is None:
        return results
    wanted = [chosen] if isinstance(chosen, str) else list(chosen)
    index = results.indexes.get(dim)
    known = set(index) if index is not None else set()
    names = feature_names(results) if dim == FEATURE else None
    if names is not None and index is not None:
        # a feature may be asked for by its name (a gene symbol) as well as its label
        wanted = [x for w in wanted
                  for x in ([w] if w in known else index[names == w].tolist() or [w])]
    missing = [x for x in wanted if x not in known]
    if missing:
        raise OptionError(f"{dim}s: {missing[:5]} not in the results ({results.sizes[dim]} "
                          f"{dim}s, e.g. {list(index[:3]) if index is not None else []}); "
                          f"pass labels of the {dim} coordinate")
    return results.sel({dim: wanted})


def _prepare(results: xr.Dataset, q_max, perturbations, features):
    missing = [n for n in SOURCES if n not in results and n != "q_value"]
    if missing:
        raise ResultsError(f"{missing[0]}: missing from the results (they have "
                           f"{sorted(results.data_vars)}); pass a results Dataset from nbdask.test "
                           f"or nbdask.open_results")
    if q_max is not None:
        if "q_value" not in results:
            raise OptionError(f"q_max={q_max}: the results have no q_value (the run used "
                              f"fdr='none'); rerun nbdask test with --fdr bh, or drop q_max")
        if not 0 <= float(q_max) <= 1:
            raise OptionError(f"q_max={q_max}: must lie in [0, 1], e.g. 0.1")
    results = _select(_select(results, PERTURBATION, perturbations), FEATURE, features)
    names = [n for n in SOURCES if n in results]
    p_labels = labels(results, PERTURBATION)
    f_labels = labels(results, FEATURE)
    return {n: results[n] for n in names}, p_labels, f_labels, feature_names(results)


def _parts(results, *, q_max, perturbations, features, client) -> Iterator:
    """(labelled DataFrame, its row/column positions) per block, in store order."""
    from .blocks import block_tasks, in_memory, stream

    arrays, p_labels, f_labels, f_names = _prepare(results, q_max, perturbations, features)
    tasks = block_tasks(arrays, _block_rows, q_max=None if q_max is None else float(q_max))
    for part in stream(tasks, client=client, local=in_memory(arrays)):
        yield _columns(part, p_labels, f_labels, f_names), part["_row"], part["_col"]


def to_dataframe(results: xr.Dataset, *, q_max: float | None = None,
                 perturbations: Iterable[str] | str | None = None,
                 features: Iterable[str] | str | None = None, client=None):
    """The results as a tidy ``pandas.DataFrame``: one row per comparison kept.

    Columns (``nbdask.export.COLUMNS``): perturbation, feature, feature_name (where the cube
    carries names: ``from_table``'s gene_name column, ``from_anndata``'s var names with
    ``feature_key``), log_fold_change, log2_fold_change, standard_error, statistic, p_value,
    q_value, base_mean (exp of log_base_mean: the control rate per unit size factor) and
    dispersion (exp of log_dispersion). ``q_max`` keeps comparisons with q_value <= q_max
    (untestable ones, NaN q, never pass); ``perturbations``/``features`` keep those labels (a
    feature also by its name). Without ``q_max`` every
    comparison is a row, untestable ones (NaN p) included. Rows are ordered by perturbation,
    then feature, as in the results. Lazy results are filtered block by block on ``client``
    (default: the active client, else dask's threads); only kept rows reach the client.
    """
    import pandas as pd

    frames, rows, cols = [], [], []
    for frame, row, col in _parts(results, q_max=q_max, perturbations=perturbations,
                                  features=features, client=client):
        frames.append(frame)
        rows.append(row)
        cols.append(col)
    df = pd.concat(frames, ignore_index=True)
    order = np.lexsort((np.concatenate(cols), np.concatenate(rows)))
    return df.iloc[order].reset_index(drop=True)


def export_hits(results: xr.Dataset, path: str | os.PathLike, *, q_max: float | None = None,
                perturbations: Iterable[str] | str | None = None,
                features: Iterable[str] | str | None = None, overwrite: bool = False,
                row_group_size: int = ROW_GROUP_SIZE, client=None) -> int:
    """Stream a hit table (``to_dataframe``'s rows and columns) to ``path``; returns rows written.

    The format follows the suffix: ``.parquet``/``.pq`` (pyarrow; row groups of
    ``row_group_size`` rows) or ``.csv``. Rows arrive block by block in store order (sort after
    reading if you need another order). The file is written under ``<path>.partial`` and
    renamed when complete, so an interrupted export leaves no file that looks finished.
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OptionError(f"output {str(path)!r}: unknown format {path.suffix!r}; name the file "
                          f"*.parquet or *.csv")
    if path.exists() and not overwrite:
        raise OptionError(f"output {str(path)!r}: already exists; pass overwrite=True (--overwrite) "
                          f"to replace it")
    writer_cls = _ParquetRows if fmt == "parquet" else _CsvRows
    partial = path.with_name(path.name + ".partial")
    n = 0
    try:
        with writer_cls(partial, row_group_size) as writer:
            for frame, _, _ in _parts(results, q_max=q_max, perturbations=perturbations,
                                      features=features, client=client):
                writer.add(frame)
                n += len(frame)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    logger.info("nbdask: wrote %s rows to %s", n, path)
    return n


class _Rows:
    """Buffers frames and writes them ``row_group_size`` rows at a time."""

    def __init__(self, path: Path, row_group_size: int):
        self.path, self.size = path, max(1, int(row_group_size))
        self.buffer: list = []
        self.buffered = 0
        self.header = None  # the first frame, kept (empty) for the schema of an empty table

    def add(self, frame) -> None:
        if self.header is None:
            self.header = frame.iloc[:0]
        if len(frame):
            self.buffer.append(frame)
            self.buffered += len(frame)
        while self.buffered >= self.size:
            self._flush(self.size)

    def _flush(self, limit: int | None = None) -> None:
        import pandas as pd

        if not self.buffer:
            return
        frame = pd.concat(self.buffer, ignore_index=True)
        head = frame if limit is None else frame.iloc[:limit]
        rest = frame.iloc[len(head):]
        self.write(head)
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self._flush()
            if self.header is not None:
                self.finish()
        self.close()


class _ParquetRows(_Rows):
    def __init__(self, path, row_group_size):
        super().__init__(path, row_group_size)
        try:
            import pyarrow  # noqa: F401
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise OptionError("parquet output needs pyarrow; pip install 'nbdask[export]' "
                              "(or write .csv)") from None
        self.writer = None

    def write(self, frame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self.writer.write_table(table, row_group_size=self.size)

    def finish(self) -> None:
        if self.writer is None:  # nothing kept: an empty table with the full schema
            self.write(self.header)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _CsvRows(_Rows):
    def __init__(self, path, row_group_size):
        super().__init__(path, row_group_size)
        self.file = open(path, "w", newline="")
        self.started = False

    def write(self, frame) -> None:
        frame.to_csv(self.file, header=not self.started, index=False)
        self.started = True

    def finish(self) -> None:
        if not self.started:
            self.write(self.header)

    def close(self) -> None:
        self.file.close()

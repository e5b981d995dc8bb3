"""Bulk RNA-seq counts + sample sheet into a count cube: ``nbdask.from_table`` (one genes x
samples table) and ``nbdask.from_files`` (one count file per sample, named in the sheet).

The table is genes x samples (first column: gene ids; header: sample ids), the sheet one row per
sample (first column, or ``sample_column``: sample ids) with a group column. The count tools'
own layouts load as they come (``_load``): featureCounts' comment line, annotation columns and
BAM paths as column names, nf-core/rnaseq's gene_name column, htseq-count's and STAR's rows of
reads assigned to no gene. Every non-control group becomes a perturbation whose replicates are
its samples; the control group's samples are the control replicates. The same layout code as
single-cell pseudobulk runs with one "cell" per sample, so the two doors cannot drift apart.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import dask
import numpy as np
import pandas as pd

from ..errors import SourceError
from . import cube as cubemod
from .groups import assign_groups
from .pseudobulk import describe_problems, find_problem, pseudobulk
from .size_factors import check_option

#: Default shard (= dask chunk) of the cube along perturbation and feature.
DEFAULT_SHARDS = 1024
TABLE_FIX = "the table must hold raw read counts (not TPM, FPKM or normalised values)"
#: The fix for a table of estimated counts (salmon, kallisto, RSEM): non-integer, but counts.
ROUND_FIX = ("; estimated counts (salmon, kallisto, RSEM) can be rounded to integers: "
             "round_counts=True, --round")
#: featureCounts' annotation columns, between the gene ids and the samples.
FEATURECOUNTS_COLUMNS = ("Chr", "Start", "End", "Strand", "Length")
#: Rows of reads that a count tool assigned to no gene: STAR's ReadsPerGene rows; and every id
#: that starts with "__" (htseq-count's ``__no_feature``, ``__ambiguous``, ...), as DESeq2's
#: ``DESeqDataSetFromHTSeqCount`` drops them.
STAR_ROWS = ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous")
#: Text columns taken for the genes' names (lower case), in the order tried.
NAME_COLUMNS = ("gene_name", "gene_symbol", "symbol", "external_gene_name")
#: Suffixes of alignment files, whose paths featureCounts writes as sample column names.
ALIGNMENT_SUFFIXES = (".bam", ".sam", ".cram")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _read(path, what: str, **kwargs) -> pd.DataFrame:
    path = Path(path)
    name = path.name.removesuffix(".gz").removesuffix(".bz2").removesuffix(".xz")
    sep = "," if name.endswith(".csv") else "\t"
    try:
        return pd.read_csv(path, sep=sep, skiprows=_comment_lines(path, sep), **kwargs)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file; pass the {what}") from None
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: cannot be read as a {'comma' if sep == ',' else 'tab'}-separated "
                          f"{what} ({' '.join(str(err).split())[:120]}); use .csv for commas and "
                          f".tsv/.txt for tabs") from None


def _comment_lines(path: Path, sep: str) -> int:
    """How many leading lines are comments: they start with "#" and hold no separator (the
    program and command line featureCounts writes first; a "#gene_id<TAB>..." header stays)."""
    n = 0
    with _OPENERS.get(path.suffix, open)(path, "rt", errors="replace") as lines:
        for line in lines:
            if not line.startswith("#") or sep in line:
                break
            n += 1
    return n


def _tool_layout(table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """``table`` without featureCounts' annotation columns and the rows of reads assigned to no
    gene; the attrs that say what was dropped."""
    table, notes = _annotation_columns(table)
    special = _no_gene(table.index)
    if special.any():
        notes["dropped_rows"] = table.index[special].tolist()
        table = table[~special]
    return table, notes


def _no_gene(index: pd.Index) -> np.ndarray:
    """Which rows count reads assigned to no gene (``STAR_ROWS``, "__*")."""
    return np.asarray(index.str.startswith("__") | index.isin(STAR_ROWS))


def _annotation_columns(table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """``table`` without featureCounts' annotation columns (some numeric: dropped by name)."""
    if tuple(table.columns[:len(FEATURECOUNTS_COLUMNS)]) != FEATURECOUNTS_COLUMNS:
        return table, {}
    return (table.iloc[:, len(FEATURECOUNTS_COLUMNS):],
            {"dropped_columns": list(FEATURECOUNTS_COLUMNS)})


def _file_name(column: str) -> str:
    """A column named by an alignment file's path, as a sample id: /data/s1.bam -> s1."""
    name = PurePosixPath(column.replace("\\", "/")).name
    for suffix in ALIGNMENT_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _by_file_name(table: pd.DataFrame, samples: pd.Index) -> pd.DataFrame | None:
    """``table`` with its columns renamed by ``_file_name`` when that names every sample in
    ``samples`` and no two columns alike, else None."""
    names = [_file_name(c) for c in table.columns]
    if len(set(names)) < len(names) or not set(samples) <= set(names) or names == list(table.columns):
        return None
    return table.set_axis(names, axis=1)


def _duplicates(index: pd.Index) -> list:
    return index[index.duplicated()].unique()[:3].tolist()


def _check_genes(index: pd.Index, name) -> None:
    """Every gene id of a table or count file (``name``) once."""
    if not index.is_unique:
        raise SourceError(f"{name}: gene id(s) {_duplicates(index)} appear more than once; "
                          f"give every row its own gene id (sum or drop the duplicates)")


def _sheet(samples, sample_column: str | None) -> tuple[pd.DataFrame, str]:
    """(the sample sheet indexed by sample id, its name for messages)."""
    path = isinstance(samples, (str, Path))
    sheet = _read(samples, "sample sheet", dtype=str) if path else samples
    if not isinstance(sheet, pd.DataFrame):
        raise SourceError("samples: pass the path to the sample sheet or a pandas DataFrame")
    sheet_name = str(samples) if path else sheet.attrs.get("source", "samples")
    if path or sample_column is not None:
        column = sample_column or sheet.columns[0]
        if column not in sheet.columns:
            raise SourceError(f"sample_column={column!r}: not a column of {sheet_name} (its "
                              f"columns: {list(sheet.columns)})")
        sheet = sheet.set_index(column)
    sheet.index = sheet.index.astype(str)
    if not sheet.index.is_unique:
        raise SourceError(f"{sheet_name}: sample id(s) {_duplicates(sheet.index)} appear more than "
                          f"once; give every sample one row")
    return sheet, sheet_name


def _load(counts, samples, *, group_column: str, sample_column: str | None,
          name_column: str | None = None):
    """(table genes x samples, sheet indexed by sample id, name of the table for messages, attrs
    saying what of a count tool's layout was dropped or renamed, gene names or None)."""
    name = str(counts) if isinstance(counts, (str, Path)) else "counts"
    table = _read(counts, "count table", index_col=0) if isinstance(counts, (str, Path)) else counts
    if not isinstance(table, pd.DataFrame):
        raise SourceError("counts: pass the path to the table or a pandas DataFrame")
    table.index = table.index.astype(str)
    table.columns = table.columns.astype(str)
    table, notes = _tool_layout(table)
    _check_genes(table.index, name)
    sheet, sheet_name = _sheet(samples, sample_column)
    if group_column not in sheet.columns:
        raise SourceError(f"group_column={group_column!r}: not a column of {sheet_name} (its "
                          f"columns: {list(sheet.columns)}); pass the column that holds each "
                          f"sample's condition")
    missing = [s for s in sheet.index if s not in table.columns]
    renamed = _by_file_name(table, sheet.index) if missing else None
    if renamed is not None:
        notes["sample_ids_from"] = f"file names ({table.columns[0]} -> {renamed.columns[0]})"
        table, missing = renamed, []
    if missing:
        raise SourceError(f"{sheet_name}: sample(s) {missing[:5]} are not columns of {name} (its "
                          f"columns: {list(table.columns)[:8]}); fix the sample ids or drop those "
                          f"rows from the sheet")
    extra = [s for s in table.columns if s not in sheet.index]
    # Text columns beside the counts are gene annotation (nf-core/rnaseq's gene_name), not
    # samples; a numeric one is more likely a sample the sheet lacks, which stays an error.
    text = [s for s in extra if not pd.api.types.is_numeric_dtype(table[s])]
    names = _gene_names(table, text, name_column, name)
    kept = [] if names is None else [names.name]
    if names is not None:
        notes["feature_names_from"] = f"column {names.name}"
        notes["feature_ids_from"] = (f"column {table.index.name}" if table.index.name
                                     else "the first column")
    dropped = [s for s in text if s not in kept]
    if dropped:
        notes["dropped_columns"] = notes.get("dropped_columns", []) + dropped
    extra = [s for s in extra if s not in text and s not in kept]
    if extra:
        raise SourceError(f"{name}: column(s) {extra[:5]} are not samples in {sheet_name}; add them "
                          f"to the sheet or drop the columns (the first column must be the gene ids)")
    return table[list(sheet.index)], sheet, name, notes, names


def _gene_names(table: pd.DataFrame, text: list[str], name_column: str | None, name: str):
    """The genes' names beside their ids (the cube's ``feature_name``): column ``name_column``,
    else the first text column called one of NAME_COLUMNS; a gene without a name keeps its id."""
    if name_column is None:
        found = [c for c in text if c.lower() in NAME_COLUMNS]
        if not found:
            return None
        name_column = found[0]
    elif name_column not in table.columns:
        raise SourceError(f"name_column={name_column!r}: not a column of {name} (its columns: "
                          f"{list(table.columns)[:8]}); pass the column of gene names, or none")
    names = table[name_column]
    named = names.notna() & (names.astype(str).str.strip() != "")
    return names.astype(str).where(named, table.index.to_series()).rename(name_column)


def from_table(counts, samples, *, group_column: str, control, size_factors="ratio",
               sample_column: str | None = None, name_column: str | None = None,
               round_counts: bool = False, store: str | None = None,
               shards: int | tuple[int, int] = DEFAULT_SHARDS, overwrite: bool = False,
               storage_options: Mapping | None = None):
    """A bulk count table and its sample sheet as a count cube (design §2).

    Parameters
    ----------
    counts
        Genes x samples: a path (``.tsv``/``.txt`` tab-, ``.csv`` comma-separated, optionally
        compressed; first column gene ids, header sample ids) or a DataFrame indexed by gene.
        featureCounts, htseq-count and nf-core/rnaseq output loads as written: leading "#"
        comment lines, featureCounts' annotation columns, text columns that are not samples
        (``gene_name``) and the rows of reads assigned to no gene ("__*", STAR's ``N_*``) are
        dropped, and columns named by alignment files (``/data/s1.bam``) match the sheet's
        sample ids by file name (``s1``) when the names match no sample.
    samples
        The sample sheet: a path (first column sample ids, or ``sample_column``) or a DataFrame
        indexed by sample id, with ``group_column``.
    group_column, control
        The condition column and the control group's label (or several, pooled). Every other
        group becomes one perturbation (in sorted order); its samples are its replicates.
    size_factors
        ``"ratio"`` (DESeq2 median of ratios, default), ``"poscounts"``, ``"total"``, or one
        value per sample (in sheet order, or a Series indexed by sample id).
    name_column
        The table's column of gene names (symbols) beside the ids, kept as the cube's
        ``feature_name`` coordinate (hit tables and reports show it); by default the first text
        column called ``gene_name``, ``gene_symbol``, ``symbol`` or ``external_gene_name``
        (nf-core/rnaseq writes ``gene_name``), if any. A gene without a name keeps its id.
    round_counts
        Round non-integer values to the nearest integer (half to even), as DESeq2's
        ``DESeqDataSetFromTximport`` does for the estimated counts of salmon, kallisto or RSEM;
        ``n_rounded`` in the attrs says how many values changed. Off by default: a non-integer
        value is an error (it is usually TPM or normalised data, which rounding does not fix).
    store
        Write the cube there (sharded Zarr v3, marked complete last) and return it reopened.

    Returns
    -------
    Dataset with ``counts`` [P, G, R] (R: the largest group), NaN size factors where a group has
    fewer samples, ``control_counts`` [G, C], provenance ``replicate_sample``/``control_sample``.
    """
    table, sheet, name, notes, names = _load(counts, samples, group_column=group_column,
                                             sample_column=sample_column, name_column=name_column)
    if isinstance(size_factors, pd.Series):
        size_factors = size_factors.set_axis(size_factors.index.astype(str)).reindex(sheet.index)
    option = check_option(size_factors, len(sheet), "sample")
    groups = assign_groups(sheet[group_column], sheet.index, control=control, min_cells=1,
                           perturbation_key=group_column, sample_key="sample id", unit="sample")
    values = table.to_numpy().T
    if round_counts and values.dtype.kind == "f":
        rounded = np.round(values)
        notes["n_rounded"] = int((np.isfinite(values) & (rounded != values)).sum())
        values = rounded
    matrix, problem = find_problem(values)
    if problem is not None:
        fix = TABLE_FIX + (ROUND_FIX if problem.what == "non-integer" else "")
        raise SourceError(describe_problems([problem], source=name, columns=table.index,
                                            unit="sample", rows=sheet.index, fix=fix))
    p_shard, g_shard = (shards, shards) if isinstance(shards, int) else shards
    counts_, control_, problems = pseudobulk([dask.delayed(matrix)], [0], groups,
                                             n_features=len(table), shards=(p_shard, g_shard))
    summary = {k: v for k, v in groups.summary.items() if k != "min_cells"}
    attrs = {"source": name, "group_column": group_column, "unit": "sample", **summary, **notes}
    cube = cubemod.in_memory(cubemod.Pending(
        cubemod.assemble(groups, counts_, control_, table.index, attrs, feature_names=names),
        groups, option, problems, lambda found: None), scheduler="threads")
    if store is None:
        return cube
    return cubemod.write(cube, store, shards=(p_shard, g_shard), overwrite=overwrite,
                         storage_options=storage_options)


def from_files(samples, *, file_column: str, directory=None, count_column: int | None = None,
               sample_column: str | None = None, **options):
    """A count cube from one count file per sample, named in the sample sheet (as DESeq2's
    ``DESeqDataSetFromHTSeqCount``): ``from_table`` of the table the files make.

    Parameters
    ----------
    samples
        The sample sheet: a path (first column sample ids, or ``sample_column``) or a DataFrame
        indexed by sample id, with ``file_column`` and the group column.
    file_column
        The sheet's column of count files: htseq-count output (gene id, count; no header), STAR's
        ``ReadsPerGene.out.tab`` (with ``count_column``), or any table of this importer's
        layouts with one count column (a featureCounts run on one sample). Every file must list
        the same genes (rows of reads assigned to no gene aside).
    directory
        Where relative file names are found: by default the sheet's folder (the current one for
        a DataFrame).
    count_column
        For files with several count columns: the one to take, 1-based as ``cut -f`` counts
        (column 1 holds the gene ids). STAR's ``ReadsPerGene.out.tab``: 2 unstranded, 3 forward
        (htseq-count ``-s yes``), 4 reverse strand (``-s reverse``), as the library was made.
    options
        ``group_column``, ``control`` and the other keyword options of ``from_table``.
    """
    sheet, sheet_name = _sheet(samples, sample_column)
    if file_column not in sheet.columns:
        raise SourceError(f"file_column={file_column!r}: not a column of {sheet_name} (its "
                          f"columns: {list(sheet.columns)}); pass the column that names each "
                          f"sample's count file")
    if directory is not None:
        folder = Path(directory)
    else:
        folder = Path(samples).parent if isinstance(samples, (str, Path)) else Path(".")
    columns = {sample: _sample_file(folder / str(file), count_column)
               for sample, file in sheet[file_column].items()}
    genes = {sample: set(c.index[~_no_gene(c.index)]) for sample, c in columns.items()}
    first = next(iter(genes), "")
    for sample, names in genes.items():
        if names != genes[first]:
            differ = sorted(names ^ genes[first])
            raise SourceError(f"{sheet_name}: the files of samples {first!r} and {sample!r} list "
                              f"different genes ({len(differ)} in one only, e.g. {differ[:3]}); "
                              f"count every sample against the same annotation")
    # the first file's gene order; rows of no gene that only some files have are 0 in the
    # others (from_table drops them all)
    order = list(dict.fromkeys(name for c in columns.values() for name in c.index))
    table = pd.DataFrame(columns).reindex(order)
    special = _no_gene(table.index)
    table.loc[special] = table.loc[special].fillna(0)
    sheet = sheet.drop(columns=file_column)
    sheet.attrs["source"] = sheet_name  # from_table's messages name the file, not "samples"
    return from_table(table, sheet, **options)


def _sample_file(path: Path, count_column: int | None = None) -> pd.Series:
    """One sample's counts (by gene id) from its own file: two columns without a header, a
    table of this importer's layouts with one count column, or column ``count_column`` (1-based,
    as ``cut -f``; the gene ids are column 1) of a file with several."""
    raw = _read(path, "count file", header=None, dtype=str, index_col=0)
    if count_column is not None:
        if not 2 <= count_column <= raw.shape[1] + 1:
            raise SourceError(f"count_column={count_column}: {path} has columns 1-{raw.shape[1] + 1} "
                              f"(1: gene ids); pass one of 2-{raw.shape[1] + 1}")
        raw = raw.iloc[:, [count_column - 2]]
    if len(raw) and pd.to_numeric(raw.iloc[:1, -1], errors="coerce").isna().all():
        raw = raw.iloc[1:].set_axis(raw.iloc[0].astype(str).tolist(), axis=1)  # its header
    raw.index = raw.index.astype(str)
    raw, _ = _annotation_columns(raw)  # its rows of no gene go when the table is loaded
    if raw.shape[1] != 1:
        raise SourceError(f"{path}: {raw.shape[1]} count columns; pick one with count_column "
                          f"(--count-column; STAR's ReadsPerGene.out.tab: 2 unstranded, 3 forward, "
                          f"4 reverse strand, as the library was made)")
    _check_genes(raw.index, path)
    text = raw.iloc[:, 0]
    counts = pd.to_numeric(text, errors="coerce")
    bad = counts.isna()
    if bad.any():
        raise SourceError(f"{path}: {text[bad].iloc[0]!r} at gene {text[bad].index[0]!r} is not "
                          f"a number; {TABLE_FIX}")
    return counts

"""``nbdask import anndata | table | files``: the command line of the importers."""

from __future__ import annotations

import argparse
import textwrap
import time

import numpy as np

from .size_factors import METHODS

_FORMAT = argparse.RawDescriptionHelpFormatter
ANNDATA_CMD = ("nbdask import anndata screen.h5ad screen.zarr --perturbation-key guide "
               "--sample-key donor \\\n      --control NTC-1 --control NTC-2 --min-cells 10 --workers 2")
TABLE_CMD = ("nbdask import table counts.tsv bulk.zarr --samples samples.tsv "
             "--group-column condition \\\n      --control untreated")
FILES_CMD = ("nbdask import files samples.tsv bulk.zarr --file-column file "
             "--group-column condition \\\n      --control untreated")

BULK_CONTROL = "the control group's label (repeat to pool several)"


def _text(paragraph: str) -> str:
    return textwrap.fill(paragraph, width=88)


def add_parser(sub, storage_option) -> None:
    """The ``import`` command and its three sources, on the top-level subparsers ``sub``."""
    imp = sub.add_parser(
        "import", help="turn a Perturb-seq AnnData, a bulk count table or per-sample count files "
                       "into a count cube",
        description=_text("Turn real data into a count cube (sharded Zarr v3) for `nbdask test`: "
                    "single cells are summed per (perturbation, sample), bulk samples are "
                    "grouped by condition."),
        epilog=f"examples:\n  {ANNDATA_CMD}\n  {TABLE_CMD}\n  {FILES_CMD}", formatter_class=_FORMAT)
    kinds = imp.add_subparsers(dest="source", required=True, metavar="{anndata,table,files}")

    ad = _door(kinds, "anndata", "input", "an .h5ad file or an AnnData .zarr store",
               help="pseudobulk an .h5ad file or AnnData .zarr store, streamed on dask workers",
               description="Sum each (perturbation, sample) group of cells into one treated "
                           "replicate and the control cells of each sample into one control "
                           "replicate; groups below --min-cells are left out as absent replicates. "
                           "The cells are read in chunks on the workers and summed straight into "
                           "the cube's shards.",
               command=ANNDATA_CMD, control="control label; repeat it to pool several (e.g. "
                                            "non-targeting guides)")
    ad.add_argument("--perturbation-key", required=True, help="obs column of each cell's perturbation")
    ad.add_argument("--sample-key", required=True, help="obs column of each cell's sample")
    ad.add_argument("--layer", help="the layer holding raw counts (default: X)")
    ad.add_argument("--feature-key", metavar="COLUMN",
                    help="var column of unique feature ids to label features with (e.g. gene_ids "
                         "where var_names are gene symbols with duplicates; default: var_names)")
    ad.add_argument("--min-cells", type=int, default=10,
                    help="groups with fewer cells are absent replicates (default 10)")
    ad.add_argument("--chunk-cells", type=int, help="cells read per task (default: ~64 MiB of X)")
    ad.add_argument("--no-progress", action="store_true")
    where = ad.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="start a LocalCluster of N worker processes")
    where.add_argument("--scheduler", help="address of a running dask scheduler")
    _common(ad, storage_option)

    tab = _door(kinds, "table", "counts",
                "genes x samples count table (.tsv, .txt or .csv, may be gzipped)",
                help="a bulk genes x samples count table and its sample sheet",
                description="Every group of --group-column other than the control becomes one "
                            "perturbation tested against the control group; its samples are its "
                            "replicates. The table's first column holds gene ids, its header "
                            "sample ids (.csv: commas, .tsv/.txt: tabs); featureCounts and "
                            "htseq-count output load as written.",
                command=TABLE_CMD, control=BULK_CONTROL)
    tab.add_argument("--samples", required=True, help="sample sheet: one row per sample")
    tab.add_argument("--name-column", metavar="COLUMN",
                     help="the table's column of gene names beside the ids, shown in hit tables "
                          "and reports (default: gene_name, gene_symbol, symbol or "
                          "external_gene_name, if there is one)")
    _bulk(tab, storage_option)

    files = _door(kinds, "files", "samples",
                  "sample sheet: one row per sample, with a column naming its count file",
                  help="one count file per sample (htseq-count), named in the sample sheet",
                  description="The table of `nbdask import table`, made from one file per sample "
                              "(as DESeq2's DESeqDataSetFromHTSeqCount): htseq-count output (gene "
                              "id, count; no header), STAR's ReadsPerGene.out.tab (with "
                              "--count-column) or a featureCounts run on one sample. Every file "
                              "must list the same genes.",
                  command=FILES_CMD, control=BULK_CONTROL)
    files.add_argument("--file-column", required=True, help="the sheet's column of count files")
    files.add_argument("--directory", help="folder of the count files (default: the sheet's)")
    files.add_argument("--count-column", type=int, metavar="N",
                       help="the count column of files with several, 1-based as cut -f (STAR's "
                            "ReadsPerGene.out.tab: 2 unstranded, 3 forward, 4 reverse strand)")
    _bulk(files, storage_option)


def _door(kinds, name: str, source: str, source_help: str, *, help: str, description: str,
          command: str, control: str):
    """One ``nbdask import`` source: its parser, the input and output paths and --control."""
    parser = kinds.add_parser(name, help=help, description=_text(description),
                              epilog=f"example:\n  {command}", formatter_class=_FORMAT)
    parser.add_argument(source, help=source_help)
    parser.add_argument("cube", help="output Zarr path or URL")
    parser.add_argument("--control", action="append", required=True, help=control)
    return parser


def _bulk(parser, storage_option) -> None:
    """The sample sheet's options, shared by ``table`` and ``files``."""
    parser.add_argument("--group-column", required=True, help="the sheet's condition column")
    parser.add_argument("--sample-column", help="the sheet's sample id column (default: the first)")
    parser.add_argument("--round", action="store_true",
                        help="round estimated counts (salmon, kallisto, RSEM) to integers, as "
                             "DESeq2's tximport path does")
    _common(parser, storage_option)


def _common(parser, storage_option) -> None:
    parser.add_argument("--size-factors", default="ratio", choices=METHODS,
                        help="ratio: DESeq2 median of ratios (default); poscounts: its variant for "
                             "sparse data; total: library sizes")
    parser.add_argument("--shards", type=int, default=1024,
                        help="shard (= dask chunk) size along perturbation and feature")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cube")
    storage_option(parser)


def run(args, storage_options: dict) -> int:
    start = time.perf_counter()
    if args.source == "anndata":
        from ..cluster import compute_client
        from .anndata import prepare
        from .cube import check_destination, write

        # Everything checkable without reading counts fails before a cluster starts.
        pending = prepare(args.input, perturbation_key=args.perturbation_key,
                          sample_key=args.sample_key, control=args.control, layer=args.layer,
                          feature_key=args.feature_key,
                          min_cells=args.min_cells, size_factors=args.size_factors,
                          shards=args.shards, chunk_cells=args.chunk_cells)
        check_destination(args.cube, overwrite=args.overwrite, storage_options=storage_options)
        with compute_client(scheduler=args.scheduler, workers=args.workers) as client:
            cube = write(pending, args.cube, overwrite=args.overwrite,
                         storage_options=storage_options, client=client,
                         progress=not args.no_progress)
        source = args.input
    else:
        from .table import from_files, from_table

        options = dict(group_column=args.group_column, control=args.control,
                       size_factors=args.size_factors, sample_column=args.sample_column,
                       round_counts=args.round, store=args.cube, shards=args.shards,
                       overwrite=args.overwrite, storage_options=storage_options)
        if args.source == "table":
            cube = from_table(args.counts, args.samples, name_column=args.name_column, **options)
            source = args.counts
        else:
            cube = from_files(args.samples, file_column=args.file_column,
                              directory=args.directory, count_column=args.count_column, **options)
            source = args.samples
    print()
    for line in summary_lines(cube):
        print(line)
    print(f"wall time            {time.perf_counter() - start:.1f} s")
    print(f"{source} -> {args.cube}; next: nbdask test {args.cube} RESULTS.zarr")
    return 0


def summary_lines(cube) -> list[str]:
    """What the import made of the data, as a person reads it."""
    a = cube.attrs
    unit = "cell" if "replicate_cells" in cube else "sample"
    present = np.isfinite(cube["size_factor"].values)
    per = present.sum(axis=1)
    sf = np.r_[cube["size_factor"].values[present], cube["control_size_factor"].values]
    lines = [
        f"perturbations        {cube.sizes['perturbation']:,}",
        f"features             {cube.sizes['feature']:,}",
        f"treated replicates   {int(present.sum()):,} ({int(per.min())}-{int(per.max())} per "
        f"perturbation; replicate axis {cube.sizes['replicate']})",
        f"control replicates   {cube.sizes['control_replicate']} (samples "
        f"{', '.join(cube['control_sample'].values[:6].tolist())}"
        f"{', ...' if cube.sizes['control_replicate'] > 6 else ''}; control "
        f"{'labels' if len(a['control_labels']) > 1 else 'label'} {', '.join(a['control_labels'])})",
        f"{unit + 's used':<20} {a[f'n_{unit}s_used']:,} of {a[f'n_{unit}s']:,}"
        f" ({a[f'n_{unit}s_unlabelled']:,} without a label)",
    ]
    if a.get("sample_ids_from"):
        lines.append(f"sample ids           from {a['sample_ids_from']}")
    if a.get("feature_names_from"):
        lines.append(f"feature names        from {a['feature_names_from']} (ids from "
                     f"{a['feature_ids_from']})")
    if a.get("dropped_columns"):
        lines.append(f"dropped columns      {', '.join(a['dropped_columns'])} (gene annotation, not samples)")
    if "n_rounded" in a:
        lines.append(f"rounded              {a['n_rounded']:,} non-integer value(s) to the nearest integer")
    if a.get("dropped_rows"):
        rows = a["dropped_rows"]
        lines.append(f"dropped rows         {len(rows):,} of reads assigned to no gene "
                     f"({', '.join(rows[:5])}{', ...' if len(rows) > 5 else ''})")
    if unit == "cell":
        lines.append(f"dropped groups       {a['n_dropped_treated_groups']:,} treated, "
                     f"{a['n_dropped_control_groups']:,} control (< {a['min_cells']} cells: "
                     f"{a['n_cells_in_dropped_groups']:,} cells)")
    if a["n_perturbations_without_replicates"]:
        lines.append(f"untestable           {a['n_perturbations_without_replicates']:,} "
                     f"perturbation(s) left without a replicate")
    lines.append(f"size factors         {a['size_factors']}: {sf.min():.3g}-{sf.max():.3g}")
    return lines

"""Bulk RNA-seq, end to end on the command line: a count table and a sample sheet -> a cube ->
`nbdask test` -> the top hits.

    python examples/bulk.py                     # 2,000 genes, 3 untreated + 3 + 3 treated samples
    python examples/bulk.py --genes 300 --workdir /tmp/bulk

Writes counts.tsv (genes x samples) and samples.tsv (one row per sample, a `condition` column)
with known effects: drugA changes genes 0-99 by 2x up or down, drugB genes 100-149. Then runs

    nbdask import table counts.tsv bulk.zarr --samples samples.tsv --group-column condition --control untreated
    nbdask test bulk.zarr results.zarr --workers 2

and sorts the results by p-value with pandas.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import nbdask


def write_inputs(workdir: Path, genes: int, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    samples = pd.DataFrame({
        "sample": [f"{c}_{i}" for c in ("ctrl", "drugA", "drugB") for i in (1, 2, 3)],
        "condition": ["untreated"] * 3 + ["drugA"] * 3 + ["drugB"] * 3,
    })
    mean = np.exp(rng.normal(np.log(200), 1.5, genes)).clip(1, 50_000)
    effect = np.ones((genes, len(samples)))
    sign = rng.choice([0.5, 2.0], genes)
    effect[: min(100, genes), 3:6] = sign[: min(100, genes), None]
    effect[100:150, 6:9] = sign[100:150, None]
    depth = rng.uniform(0.7, 1.4, len(samples))
    phi = 0.05  # biological replicates of a cell line: little extra-Poisson spread
    m = mean[:, None] * effect * depth[None, :]
    counts = rng.poisson(rng.gamma(1 / phi, phi * m))
    table = pd.DataFrame(counts, index=pd.Index([f"gene{g:05d}" for g in range(genes)],
                                                 name="gene_id"), columns=samples["sample"])
    table.to_csv(workdir / "counts.tsv", sep="\t")
    samples.to_csv(workdir / "samples.tsv", sep="\t", index=False)
    return workdir / "counts.tsv", workdir / "samples.tsv"


def nbdask_cli(*args) -> None:
    print("$ nbdask", " ".join(map(str, args)), flush=True)
    subprocess.run([sys.executable, "-m", "nbdask.cli", *map(str, args)], check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=Path("bulk_example"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    counts, samples = write_inputs(args.workdir, args.genes, args.seed)
    cube, results = args.workdir / "bulk.zarr", args.workdir / "results.zarr"
    nbdask_cli("import", "table", counts, cube, "--samples", samples, "--group-column", "condition",
               "--control", "untreated", "--overwrite")
    nbdask_cli("test", cube, results, "--workers", args.workers, "--overwrite", "--no-progress")

    res = nbdask.open_results(str(results))
    table = res[["log_fold_change", "p_value", "q_value"]].to_dataframe().reset_index()
    top = table.sort_values("p_value").head(10)
    print("\ntop hits (natural-log fold changes; drugA moves gene00000-gene00099, drugB gene00100-gene00149):")
    print(top.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    hits = table[table["q_value"] < 0.05]
    for drug, lo, hi in (("drugA", 0, 100), ("drugB", 100, 150)):
        mine = hits[hits["perturbation"] == drug]["feature"].str[4:].astype(int)
        print(f"{drug}: {len(mine)} genes at q < 0.05, {int(((mine >= lo) & (mine < hi)).sum())} "
              f"of them among the {min(hi, args.genes) - lo} it changes")


if __name__ == "__main__":
    main()

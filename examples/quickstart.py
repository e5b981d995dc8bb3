"""Laptop quickstart: simulate a screen, test it on a local cluster, report and export the hits.

    python examples/quickstart.py                       # 400 x 400 comparisons into ./quickstart/
    python examples/quickstart.py --out /tmp/qs --perturbations 2000 --features 2000 --workers 4

Writes cube.zarr, results.zarr, report.html and hits.parquet (or hits.csv without pyarrow) under
--out. The same steps on the command line: nbdask simulate | test | report --html | export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbdask
from nbdask.cluster import local_cluster


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="quickstart", help="folder for the stores and files")
    parser.add_argument("--perturbations", type=int, default=400)
    parser.add_argument("--features", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. A simulated screen (5% true effects) as a sharded Zarr v3 cube; real data: `nbdask import`.
    shard = min(512, max(16, args.perturbations // 2))
    cube = nbdask.simulate(perturbations=args.perturbations, features=args.features,
                           effect_fraction=0.05, seed=1, chunks=shard)
    nbdask.save_cube(cube, out / "cube.zarr", overwrite=True)

    from distributed import Client

    with local_cluster(workers=args.workers) as cluster, Client(cluster) as client:
        # 2. Open lazily and test every comparison; the result is lazy until it is saved.
        cube = nbdask.open_cube(out / "cube.zarr")
        results = cube.nb.test()  # = nbdask.test(cube): MoM, pooled dispersion, exact BH
        results = nbdask.save_results(results, out / "results.zarr", overwrite=True, client=client)

        # 3. Look: the hit table as a DataFrame, the HTML report, a file for a spreadsheet.
        hits = results.nb.hits(q_max=0.1)
        report = results.nb.report(out / "report.html", truth=cube)
        try:
            import pyarrow  # noqa: F401

            table = out / "hits.parquet"
        except ImportError:
            table = out / "hits.csv"
        n = nbdask.export_hits(results, table, q_max=0.1, overwrite=True)

    summary = results.nb.summary()
    print(f"{summary['n_comparisons']:,} comparisons, {summary['n_tests']:,} tested, "
          f"{len(hits):,} hits at q <= 0.1")
    print(hits.sort_values("p_value").head(5).to_string(index=False))
    print(f"report: {report.path}")
    print(f"hits:   {table} ({n:,} rows)")


if __name__ == "__main__":
    main()

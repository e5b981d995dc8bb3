"""``nbdask`` command line: simulate | import | info | test | report | export | train | bench | calibrate."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time

from . import __version__
from .errors import NbdaskError

FDR_CHOICES = ("bh", "storey", "none")


def _storage_options(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise NbdaskError(f"--storage-option {pair!r}: expected KEY=VALUE")
        out[key] = _parse_value(value)
    return out


def _parse_value(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def _range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


#: The example that ends each subcommand's --help.
EXAMPLES = {
    "simulate": "nbdask simulate screen.zarr --perturbations 2000 --features 2000 --seed 1",
    "info": "nbdask info screen.zarr",
    "test": "nbdask test screen.zarr results.zarr --workers 2\n"
            "  nbdask test s3://bucket/screen.zarr s3://bucket/results.zarr --scheduler tcp://scheduler:8786 \\\n"
            "      --storage-option key=$AWS_ACCESS_KEY_ID --storage-option secret=$AWS_SECRET_ACCESS_KEY",
    "report": "nbdask report results.zarr\n"
              "  nbdask report results.zarr --html report.html --truth screen.zarr",
    "export": "nbdask export results.zarr hits.parquet --q-max 0.1\n"
              "  nbdask export results.zarr hits.csv --perturbation P0001 --perturbation P0002",
    "train": "nbdask train --out weights.npz --seed 1 --steps 40000",
}


def _add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          epilog=f"example{'s' if chr(10) in EXAMPLES[name] else ''}:\n  {EXAMPLES[name]}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_where(parser: argparse.ArgumentParser, default: str) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="start a LocalCluster of N worker processes")
    where.add_argument("--scheduler", help="address of a running dask scheduler, e.g. "
                       f"tcp://127.0.0.1:8786 (default: {default})")


#: The positional arguments' help, the same in every command.
CUBE_HELP = "count cube: Zarr path or URL (nbdask simulate or nbdask import)"
RESULTS_HELP = "results store: Zarr path or URL written by nbdask test"
#: What ``nbdask --help`` says first.
DESCRIPTION = ("Negative-binomial tests of every perturbation x feature comparison of a count "
               "cube, on Dask.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdask", description=DESCRIPTION,
        epilog="example (five minutes on a laptop):\n"
               "  nbdask simulate screen.zarr --perturbations 500 --features 500 --seed 1\n"
               "  nbdask test screen.zarr results.zarr --workers 2\n"
               "  nbdask report results.zarr --html report.html\n"
               "  nbdask export results.zarr hits.parquet --q-max 0.1\n"
               "run `nbdask COMMAND --help` for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nbdask {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = _add_command(sub, "simulate", "simulate an NB2 count cube with known truth into Zarr")
    sim.add_argument("cube", help="output Zarr path or URL")
    sim.add_argument("--perturbations", type=int, default=1000)
    sim.add_argument("--features", type=int, default=1000)
    sim.add_argument("--replicates", type=int, default=4, help="treated replicates (max per perturbation)")
    sim.add_argument("--control-replicates", type=int, default=8)
    sim.add_argument("--effect-fraction", type=float, default=0.1)
    sim.add_argument("--ragged-fraction", type=float, default=0.1)
    sim.add_argument("--base-mean", type=_range, metavar="LO,HI",
                     help="log-uniform range of expected counts (default: log-normal, median 4)")
    sim.add_argument("--dispersion", type=_range, metavar="LO,HI",
                     help="log-uniform range of NB2 dispersions (default: log-normal, median 0.1)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--shards", type=int, default=1024,
                     help="shard (= dask chunk) size along perturbation and feature")
    sim.add_argument("--overwrite", action="store_true")
    sim.add_argument("--storage-option", action="append", metavar="KEY=VALUE")

    from .importers.cli import add_parser as add_import

    add_import(sub, lambda p: p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                                             help="fsspec option of the output store"))

    info = _add_command(sub, "info", "dims, chunks/shards, dtypes and validation verdict of a cube")
    info.add_argument("cube", help=CUBE_HELP)
    info.add_argument("--quick", action="store_true", help="skip the full scan of counts values")
    info.add_argument("--storage-option", action="append", metavar="KEY=VALUE")

    tst = _add_command(sub, "test", "test every comparison of a cube and write results Zarr")
    tst.add_argument("cube", help=CUBE_HELP)
    tst.add_argument("results", help="results store to write: Zarr path or URL")
    tst.add_argument("--method", default="mom", choices=["mom", "irls", "transformer"],
                     help="mom: method of moments (default); irls: batched maximum likelihood; "
                          "transformer: the pre-trained pair-set transformer")
    tst.add_argument("--transformer-weights", metavar="NPZ",
                     help="transformer: weights from `nbdask train` (default: the shipped ones)")
    tst.add_argument("--test", default="auto", choices=["auto", "exact", "wald", "lrt"],
                     help="auto (default: conditional exact test where a comparison's total count "
                          "is <= 32, Wald elsewhere), exact (everywhere), wald, or lrt (irls only)")
    tst.add_argument("--dispersion", default="feature", choices=["feature", "comparison", "shrunk"],
                     help="pooled per feature (default), per comparison (the paper's), or shrunk")
    tst.add_argument("--dispersion-prior", default="trend", choices=["trend", "none"],
                     help="pooled modes: borrow across features too, through a prior around the "
                          "mean-dispersion trend (default), or not (none)")
    tst.add_argument("--no-independent-filtering", dest="independent_filtering", action="store_false",
                     help="keep every feature in the FDR step (default: leave out those whose mean "
                          "count is too low to reach significance, as DESeq2 does)")
    tst.add_argument("--dispersion-fit", default="ml", choices=["ml", "cox-reid"],
                     help="irls: maximum-likelihood or Cox-Reid adjusted dispersion")
    tst.add_argument("--max-iter", type=int, default=50, help="irls: iteration cap (<= 127)")
    tst.add_argument("--tol", type=float, default=1e-6, help="irls: convergence tolerance")
    tst.add_argument("--engine", default="auto", choices=["auto", "numba", "array"],
                     help="kernels: fused numba on CPU blocks (auto), or the array-API ones")
    tst.add_argument("--fdr", default="bh", choices=FDR_CHOICES)
    tst.add_argument("--fdr-scope", default="global", choices=["global", "perturbation"])
    tst.add_argument("--fdr-backend", default="auto", choices=["auto", "gather", "buckets"],
                     help="exact BH on one worker (gather), across workers (buckets), or by memory")
    _add_where(tst, "the active client, else a LocalCluster of one worker per core")
    tst.add_argument("--chunks", type=int, nargs=2, metavar=("P", "G"),
                     help="dask chunk sizes (multiples of the cube's shards)")
    tst.add_argument("--overwrite", action="store_true", help="replace an existing results store")
    tst.add_argument("--resume", action="store_true",
                     help="finish an interrupted run (only the blocks its store lacks; its pooled "
                          "dispersion is reused), start one if there is no store, do nothing if it "
                          "is complete: safe in a retry loop")
    tst.add_argument("--no-progress", action="store_true")
    tst.add_argument("--storage-option", action="append", metavar="KEY=VALUE")

    rep = _add_command(sub, "report", "summary of a results store (and accuracy vs a simulated "
                                      "truth); --html writes the full report with plots")
    rep.add_argument("results", help=RESULTS_HELP)
    rep.add_argument("--truth", help="the simulated cube the results came from")
    rep.add_argument("--json", action="store_true", help="print JSON")
    rep.add_argument("--html", metavar="PATH", help="write the self-contained HTML report "
                     "(p-values, QQ, volcano, screen view, top hits) to PATH")
    rep.add_argument("--q-max", type=float, default=0.1,
                     help="--html: hits are comparisons with q <= Q_MAX (default 0.1)")
    _add_where(rep, "threads in this process")
    rep.add_argument("--storage-option", action="append", metavar="KEY=VALUE")

    exp = _add_command(sub, "export", "write a tidy hit table (one row per comparison kept) "
                                      "as Parquet or CSV")
    exp.add_argument("results", help=RESULTS_HELP)
    exp.add_argument("output", help="*.parquet or *.csv (written whole, or not at all)")
    exp.add_argument("--q-max", type=float,
                     help="keep comparisons with q <= Q_MAX (default: every comparison)")
    exp.add_argument("--perturbation", action="append", metavar="LABEL",
                     help="keep only this perturbation (repeatable)")
    exp.add_argument("--feature", action="append", metavar="LABEL",
                     help="keep only this feature, by label or by name where the results have "
                          "feature names (repeatable)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_where(exp, "threads in this process")
    exp.add_argument("--storage-option", action="append", metavar="KEY=VALUE")

    trn = _add_command(sub, "train", "train the pair-set transformer (needs PyTorch)")
    from .train.cli import add_arguments

    add_arguments(trn)
    _bench_parsers(sub)
    return parser


def _bench_parsers(sub) -> None:
    from .bench import STUDIES

    raw = argparse.RawDescriptionHelpFormatter
    ben = sub.add_parser(
        "bench", formatter_class=raw,
        help="the paper's study: accuracy, calibration, power and speed of every estimator",
        description="Simulate from one documented generator and compare mom, irls (ML and Cox-Reid), "
                    "the transformer and statsmodels' NegativeBinomial, each with the paper's "
                    "per-comparison dispersion and Wald test, and nbdask's defaults beside them. "
                    "Writes CSV tables, PNG figures and summary.md into --out.",
        epilog="example:\n  nbdask bench all --out bench-out --n-tests 1000 --workers 2")
    ben.add_argument("study", choices=[*STUDIES, "all"],
                     help="which study to run (all: every one, in that order)")
    ben.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    ben.add_argument("--n-tests", type=int, default=1000,
                     help="comparisons per design (per design and beta for power; default 1000)")
    ben.add_argument("--seed", type=int, default=0)
    ben.add_argument("--workers", type=int, default=2,
                     help="LocalCluster worker processes for the statsmodels fits and the pipeline "
                          "timings (0: everything in this process)")
    ben.add_argument("--no-progress", action="store_true")

    cal = sub.add_parser(
        "calibrate", formatter_class=raw,
        help="simulate a cube's own design and check every method/option on it",
        description="Fit the design of CUBE (feature means, pooled dispersions and their trend, size "
                    "factors, present replicates), simulate null and alternative cubes like it, run every "
                    "method/option combination through the pipeline, and report FPR per mean-count bin, "
                    "FDP and power at q < 0.05 and 0.1, and a recommendation. Writes CSV tables, PNG "
                    "figures and summary.md into --out.",
        epilog="example:\n  nbdask calibrate screen.zarr --out calibration --workers 2")
    cal.add_argument("cube", help=CUBE_HELP)
    cal.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--perturbations", type=int,
                     help="perturbations to simulate (default: the cube's, at most 100)")
    cal.add_argument("--features-per-bin", type=int,
                     help="features per mean-count bin (default: enough for SE 0.005 on the FPR)")
    cal.add_argument("--methods", nargs="+", metavar="METHOD",
                     help="only these methods (default: every one nbdask offers)")
    cal.add_argument("--tests", nargs="+", metavar="TEST",
                     help="only these tests, e.g. auto wald (default: every one)")
    where = cal.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="start a LocalCluster of N worker processes")
    where.add_argument("--scheduler", help="address of a running dask scheduler")
    cal.add_argument("--no-progress", action="store_true")
    cal.add_argument("--storage-option", action="append", metavar="KEY=VALUE")


def _progress(label: str, quiet: bool):
    from .bench.progress import Progress, StderrBar

    return Progress() if quiet else StderrBar(label)


def _bench(args) -> int:
    from .bench.methods import statsmodels_available
    from .bench.plots import available
    from .bench import STUDIES
    from .bench.study import run_studies

    if args.n_tests < 10:
        raise NbdaskError(f"--n-tests {args.n_tests}: too few; use at least 10 comparisons per design "
                          "(1000 for the paper's study)")
    studies = STUDIES if args.study == "all" else (args.study,)
    if not statsmodels_available():
        print("nbdask bench: statsmodels is not installed: skipping its column "
              "(pip install 'nbdask[bench]')", file=sys.stderr)
    if not available():
        print("nbdask bench: matplotlib is not installed: tables and summary only, no figures "
              "(pip install 'nbdask[bench]')", file=sys.stderr)
    bar = _progress(f"bench {args.study}", args.no_progress)
    command = "nbdask " + " ".join(args.argv)
    start = time.perf_counter()
    try:
        if args.workers:
            from .cluster import compute_client

            with compute_client(workers=args.workers) as client:
                run_studies(studies, args.out, n_tests=args.n_tests, seed=args.seed, client=client,
                            progress=bar, command=command)
        else:
            run_studies(studies, args.out, n_tests=args.n_tests, seed=args.seed, progress=bar,
                        command=command)
    finally:
        bar.close()
    print(f"nbdask bench {args.study}: {time.perf_counter() - start:.0f} s; tables, figures and "
          f"summary.md in {args.out}")
    return 0


def _calibrate(args) -> int:
    from .bench.calibrate import calibrate, headline
    from .bench.methods import all_combinations
    from .cluster import compute_client
    from .io import open_cube

    so = _storage_options(args.storage_option)
    settings = all_combinations()
    for flag, chosen, key in (("--methods", args.methods, "method"), ("--tests", args.tests, "test")):
        known = sorted({s.method if key == "method" else s.opts["test"] for s in settings})
        unknown = [m for m in chosen or () if m not in known]
        if unknown:
            raise NbdaskError(f"{flag} {' '.join(unknown)}: not an nbdask {key}; choose from {known}")
        if chosen:
            settings = [s for s in settings if (s.method if key == "method" else s.opts["test"]) in chosen]
    cube = open_cube(args.cube, storage_options=so)  # a bad cube fails before a cluster starts
    bar = _progress("calibrate", args.no_progress)
    try:
        with compute_client(scheduler=args.scheduler, workers=args.workers) as client:
            workers = len(client.scheduler_info().get("workers", {})) or 1
            result = calibrate(cube, args.out, seed=args.seed, perturbations=args.perturbations,
                               features_per_bin=args.features_per_bin, settings=settings,
                               workers=workers, progress=bar)
    finally:
        bar.close()
    for line in headline(result["recommendation"]):
        print(line)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"tables, figures and summary.md in {args.out}")
    return 0


def _train(args) -> int:
    from .train.cli import run

    return run(args)


def _import(args) -> int:
    from .importers.cli import run

    return run(args, _storage_options(args.storage_option))


def _simulate(args) -> int:
    from .io import save_cube
    from .simulate import simulate

    so = _storage_options(args.storage_option)
    start = time.perf_counter()
    cube = simulate(perturbations=args.perturbations, features=args.features,
                    replicates=args.replicates, control_replicates=args.control_replicates,
                    effect_fraction=args.effect_fraction, ragged_fraction=args.ragged_fraction,
                    base_mean=args.base_mean, dispersion=args.dispersion, seed=args.seed,
                    chunks=args.shards)
    save_cube(cube, args.cube, overwrite=args.overwrite, storage_options=so)
    n = args.perturbations * args.features
    print(f"simulated {args.perturbations} perturbations x {args.features} features "
          f"({n:,} comparisons, {args.replicates} treated vs {args.control_replicates} control "
          f"replicates) -> {args.cube} in {time.perf_counter() - start:.1f} s")
    return 0


def _info(args) -> int:
    from .io import describe, open_cube
    from .schema import validate

    so = _storage_options(args.storage_option)
    desc = describe(args.cube, storage_options=so)
    print(f"{args.cube}")
    for name, a in desc["arrays"].items():
        dims = ", ".join(f"{d}={n}" for d, n in zip(a["dims"], a["shape"]))
        print(f"  {name:<22} ({dims})  {a['dtype']:<8} shards={a['shards']} chunks={a['chunks']}")
    if "p_value" in desc["arrays"] and "counts" not in desc["arrays"]:
        return _results_info(args.cube, so)
    try:
        cube = open_cube(args.cube, storage_options=so)
        validate(cube, values=not args.quick)
    except NbdaskError as err:
        print(f"validation: FAILED: {err}")
        return 1
    scope = "structure" if args.quick else "structure and all values"
    print(f"validation: OK ({scope}); {cube.sizes['perturbation'] * cube.sizes['feature']:,} comparisons")
    return 0


def _results_info(url: str, storage_options) -> int:
    """``nbdask info`` of a results store: what it is, whether it is complete, what reads it."""
    from .io import results_status

    status = results_status(url, storage_options=storage_options)
    if status == "complete":
        print(f"a results store of nbdask test (complete): `nbdask report {url}` summarises it, "
              f"`nbdask export {url} hits.csv --q-max 0.1` writes its hits")
        return 0
    print(f"a results store of nbdask test, {status or 'unmarked'}, not complete: finish it with "
          f"`nbdask test CUBE {url} --resume`")
    return 1


def _test(args) -> int:
    from .cluster import compute_client
    from .io import open_cube, open_results, results_status
    from .pipeline import test
    from .summary import line, summarize, text_lines
    from .writer import RESUME_COMPLETE, save_results, stored_pooling

    so = _storage_options(args.storage_option)
    start = time.perf_counter()
    chunks = dict(zip(("perturbation", "feature"), args.chunks)) if args.chunks else None
    if args.resume and results_status(args.results, storage_options=so) == "complete":
        logging.getLogger("nbdask").warning(RESUME_COMPLETE, args.results)
        saved = open_results(args.results, storage_options=so)
        start = None  # nothing computed: no wall time or rate to report
    else:
        # A resumed run takes the pooled dispersion from its store instead of a pass over the cube.
        pooled = stored_pooling(args.results, storage_options=so) if args.resume else None
        cube = open_cube(args.cube, chunks=chunks, storage_options=so)  # a bad cube: before a cluster
        with compute_client(scheduler=args.scheduler, workers=args.workers) as client, \
                _held_counts(cube, client, pooled is None and args.dispersion != "comparison") as cube:
            results = test(cube, method=args.method, test=args.test, fdr=args.fdr,
                           fdr_scope=args.fdr_scope, dispersion=args.dispersion,
                           dispersion_prior=args.dispersion_prior,
                           independent_filtering=args.independent_filtering,
                           dispersion_fit=args.dispersion_fit, max_iter=args.max_iter, tol=args.tol,
                           fdr_backend=args.fdr_backend, engine=args.engine,
                           transformer_weights=args.transformer_weights, pooled=pooled)
            saved = save_results(results, args.results, overwrite=args.overwrite,
                                 resume=args.resume, storage_options=so, client=client,
                                 progress=not args.no_progress)
    summary = summarize(saved)
    print()
    for row in text_lines(summary, timing=False):
        print(row)
    if start is not None:
        wall = time.perf_counter() - start
        print(line("wall time", wall, "wall_seconds"))
        print(line("comparisons/s", summary["n_comparisons"] / wall, "comparisons_per_second"))
    print(f"results              {args.results}")
    return 0


def _held_counts(cube, client, twice: bool):
    """The cube with its counts held in the workers when the run reads them twice (a pooling
    pass, then the estimates: ``nbdask.cache``)."""
    from contextlib import nullcontext

    from .cache import cached_counts

    return cached_counts(cube, client=client) if twice else nullcontext(cube)


def _reading_client(args):
    """A client for report/export: --workers or --scheduler, else none (dask's threads here)."""
    from contextlib import nullcontext

    from .cluster import compute_client

    if args.workers is None and args.scheduler is None:
        return nullcontext(None)
    return compute_client(scheduler=args.scheduler, workers=args.workers)


def _report(args) -> int:
    from .io import open_cube, open_results
    from .summary import summarize, text_lines

    so = _storage_options(args.storage_option)
    results = open_results(args.results, storage_options=so)
    truth = open_cube(args.truth, storage_options=so) if args.truth else None
    if truth is not None and "true_log_fold_change" not in truth:
        raise NbdaskError(f"--truth {args.truth}: the cube has no true_log_fold_change; pass a simulated cube")
    if args.html:
        from .report import render

        start = time.perf_counter()
        with _reading_client(args) as client:
            report = render(results, truth=truth, q_max=args.q_max, source=args.results,
                            client=client)
        report.save(args.html)
    summary = summarize(results, truth=truth)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for row in text_lines(summary):
            print(row)
    if args.html:
        print(f"HTML report ({report.overview.n_hits:,} hits at q <= {args.q_max:g}) written to "
              f"{args.html} in {time.perf_counter() - start:.1f} s; open it in a browser",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def _export(args) -> int:
    from .export import export_hits
    from .io import open_results

    so = _storage_options(args.storage_option)
    results = open_results(args.results, storage_options=so)
    start = time.perf_counter()
    with _reading_client(args) as client:
        n = export_hits(results, args.output, q_max=args.q_max, perturbations=args.perturbation,
                        features=args.feature, overwrite=args.overwrite, client=client)
    kept = "" if args.q_max is None else f" with q <= {args.q_max:g}"
    print(f"wrote {n:,} comparisons{kept} (of {results['p_value'].size:,}) to {args.output} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


COMMANDS = {"simulate": _simulate, "import": _import, "info": _info, "test": _test, "report": _report,
            "export": _export, "train": _train, "bench": _bench, "calibrate": _calibrate}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    if args.command in ("test", "simulate", "import", "info", "report", "export", "bench", "calibrate"):
        importlib.import_module("distributed")  # its import sets its loggers' levels; ours go after
    for name in ("distributed", "nbdask"):
        logging.getLogger(name).setLevel(level)
    try:
        return COMMANDS[args.command](args)
    except NbdaskError as err:
        print(f"nbdask {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nbdask {args.command}: interrupted; any results store is left marked incomplete",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

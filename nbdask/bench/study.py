"""The paper's study: accuracy, calibration, power and speed of every estimator, side by side.

Each study draws its cubes from ``generator.paper_cube`` (one seeded stream per study), runs
every setting of ``methods.study_settings`` on the same comparisons, and returns its tables
(pandas DataFrames) for ``report`` to write, plot and summarise.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import STUDIES, metrics
from .generator import SCREEN_WIDTH, paper_cube
from .methods import (STATSMODELS, Setting, cube_arrays, default_settings, gather_blocks, run_nbdask,
                      statsmodels_block, study_settings, submit_statsmodels)
from .progress import Progress
#: Designs of the accuracy study (n vs n) and of the calibration and power studies.
ACCURACY_DESIGNS = tuple(range(2, 11))
TEST_DESIGNS = (3, 5, 7, 9)
POWER_BETAS = tuple(float(b) for b in np.linspace(0.0, 2.5, 10))
#: Speed: nbdask is timed on this many times the comparisons statsmodels fits (capped), since a
#: vectorised run of a few hundred comparisons measures only its fixed costs.
SPEED_SCALE, SPEED_MAX = 50, 100_000
SPEED_DESIGN = 5


@dataclass
class Context:
    """What every study needs: size, seed, an optional dask client for the statsmodels fits."""

    n_tests: int = 1000
    seed: int = 0
    client: object = None
    statsmodels: bool = True
    progress: Progress = field(default_factory=Progress)

    def rng(self, study: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, STUDIES.index(study)])


def design_name(n: int) -> str:
    return f"{n}v{n}"


def _columns(s: Setting) -> dict:
    o = s.opts
    return {"setting": s.label, "estimator": s.estimator, "role": s.role,
            "dispersion": o.get("dispersion", "comparison" if s.method is None else None),
            "test": o.get("test", "wald" if s.method is None else None)}


def evaluate(cube, settings: list[Setting], ctx: Context, note: str) -> dict[str, dict]:
    """Run every setting on ``cube``: ``{setting.label: {estimates, p_value, success}}``.

    statsmodels' fits go to the client's workers first, and nbdask's settings run here in the
    meantime; without a client everything runs in this process.
    """
    sm = [s for s in settings if s.estimator == STATSMODELS]
    jobs = submit_statsmodels(cube, ctx.client, rows=1) if sm else []
    out = {}
    for s in settings:
        if s.estimator != STATSMODELS:
            out[s.label] = run_nbdask(cube, s)
            ctx.progress.step(f"{note}: {s.label}")
    if sm:
        blocks = []
        for job in jobs:
            blocks.append(job() if callable(job) else job.result())
            ctx.progress.step(f"{note}: statsmodels")
        out[sm[0].label] = gather_blocks(blocks)
    return out


def planned_work(study: str, ctx: Context) -> int:
    """Progress steps a study will take: a step per nbdask setting and per statsmodels task."""
    settings = study_settings(statsmodels=ctx.statsmodels)
    nb = sum(s.estimator != STATSMODELS for s in settings)
    per_cube = nb + (SCREEN_WIDTH if ctx.statsmodels else 0)
    if study == "speed":
        return 2 * nb + int(ctx.statsmodels) + (len(default_settings()) if ctx.client is not None else 0)
    return len(ACCURACY_DESIGNS if study == "accuracy" else TEST_DESIGNS) * per_cube


def _truth(cube) -> dict[str, np.ndarray]:
    shape = cube["counts"].shape[:2]
    return {"log_base_mean": np.broadcast_to(cube["true_log_base_mean"].values[None, :], shape).astype(float),
            "log_fold_change": cube["true_log_fold_change"].values.astype(float),
            "log_dispersion": np.broadcast_to(cube["true_log_dispersion"].values[None, :], shape).astype(float)}


def mean_counts(cube) -> np.ndarray:
    """[G] expected count per sample at the geometric mean of the present size factors."""
    sf = np.concatenate([cube["size_factor"].values.ravel(), cube["control_size_factor"].values])
    sf = sf[np.isfinite(sf)]
    return np.exp(cube["true_log_base_mean"].values.astype(float) + np.mean(np.log(sf)))


def _grid(cube):
    """(feature index [P, G], mean-count bin [P, G]) of every comparison."""
    p, g = cube["counts"].shape[:2]
    feature = np.broadcast_to(np.arange(g)[None, :], (p, g))
    return feature, np.broadcast_to(metrics.mean_count_bins(mean_counts(cube))[None, :], (p, g))


# --------------------------------------------------------------------------------------------
def accuracy(ctx: Context) -> dict[str, pd.DataFrame]:
    """Success rate, MAE and bias of mu, beta, alpha hats per setting: overall (each method's
    own successes, and the comparisons where every method succeeded), per design, per bin."""
    rng = ctx.rng("accuracy")
    settings = study_settings(statsmodels=ctx.statsmodels)
    pooled = {s.label: [] for s in settings}
    for n in ACCURACY_DESIGNS:
        cube = paper_cube(rng, replicates=n, comparisons=ctx.n_tests)
        res = evaluate(cube, settings, ctx, f"accuracy {design_name(n)}")
        truth = _truth(cube)
        _, bins = _grid(cube)
        common = np.logical_and.reduce([r["success"] for r in res.values()])
        for s in settings:
            pooled[s.label].append((n, res[s.label], truth, bins, common))
    overall, by_design, by_bin = [], [], []
    for s in settings:
        parts = pooled[s.label]
        est = {k: np.concatenate([r[k].ravel() for _, r, _, _, _ in parts])
               for k in ("log_base_mean", "log_fold_change", "log_dispersion", "success")}
        tru = {k: np.concatenate([t[k].ravel() for _, _, t, _, _ in parts]) for k in parts[0][2]}
        common = np.concatenate([c.ravel() for *_, c in parts])
        bins = np.concatenate([b.ravel() for _, _, _, b, _ in parts])
        design = np.concatenate([np.full(r["success"].size, n) for n, r, *_ in parts])
        ok = est["success"]
        for subset, mask in (("own", ok), ("common", common)):
            overall.append({**_columns(s), "subset": subset, "comparisons": int(mask.sum()),
                            "success_rate": float(ok.mean()), **metrics.errors(est, tru, mask)})
        for n in ACCURACY_DESIGNS:
            sel = design == n
            by_design.append({**_columns(s), "design": design_name(n), "replicates": n,
                              "comparisons": int(sel.sum()), "success_rate": float(ok[sel].mean()),
                              **metrics.errors(est, tru, ok & sel)})
        for label in metrics.BIN_LABELS:
            sel = bins == label
            if sel.any():
                by_bin.append({**_columns(s), "mean_count_bin": label, "comparisons": int(sel.sum()),
                               "success_rate": float(ok[sel].mean()), **metrics.errors(est, tru, ok & sel)})
    return {"accuracy": pd.DataFrame(overall), "accuracy_by_design": pd.DataFrame(by_design),
            "accuracy_by_bin": pd.DataFrame(by_bin)}


# --------------------------------------------------------------------------------------------
def _rates(p, cluster) -> dict:
    out = {}
    for level in metrics.LEVELS:
        tag = f"{level:g}".replace("0.", "")
        out[f"fpr_{tag}"], out[f"se_{tag}"] = metrics.rejection(p, level, cluster)
    return out


def calibration(ctx: Context) -> dict[str, pd.DataFrame]:
    """Null (beta = 0) rejection rates at p < 0.05 and 0.01 with SEs, KS distance from uniform
    and QQ points, per design and per mean-count bin."""
    rng = ctx.rng("calibration")
    settings = study_settings(statsmodels=ctx.statsmodels)
    rows, bin_rows, qq = [], [], []
    for n in TEST_DESIGNS:
        cube = paper_cube(rng, replicates=n, comparisons=ctx.n_tests, beta=0.0)
        res = evaluate(cube, settings, ctx, f"calibration {design_name(n)}")
        feature, bins = _grid(cube)
        for s in settings:
            p = res[s.label]["p_value"]
            rows.append({**_columns(s), "design": design_name(n), "comparisons": p.size,
                         "tested": float(np.isfinite(p).mean()), **_rates(p, feature),
                         "ks": metrics.ks_uniform(p)})
            for label in metrics.BIN_LABELS:
                sel = bins == label
                if sel.any():
                    bin_rows.append({**_columns(s), "design": design_name(n), "mean_count_bin": label,
                                     "comparisons": int(sel.sum()), **_rates(p[sel], feature[sel])})
            x, y = metrics.qq_points(p)
            qq += [{**_columns(s), "design": design_name(n), "expected": a, "observed": b}
                   for a, b in zip(x, y)]
    return {"calibration": pd.DataFrame(rows), "calibration_by_bin": pd.DataFrame(bin_rows),
            "calibration_qq": pd.DataFrame(qq)}


# --------------------------------------------------------------------------------------------
def power(ctx: Context) -> dict[str, pd.DataFrame]:
    """Rejection rate at p < 0.05 for beta in linspace(0, 2.5, 10), and at the p cut that gives
    each setting an empirical FPR of 0.05 on the same design's beta = 0 comparisons."""
    rng = ctx.rng("power")
    settings = study_settings(statsmodels=ctx.statsmodels)
    rows = []
    for n in TEST_DESIGNS:
        cube = paper_cube(rng, replicates=n, comparisons=ctx.n_tests, beta=np.asarray(POWER_BETAS))
        res = evaluate(cube, settings, ctx, f"power {design_name(n)}")
        feature, _ = _grid(cube)
        beta = cube["true_log_fold_change"].values
        for s in settings:
            p = res[s.label]["p_value"]
            cut = metrics.matched_threshold(p[beta == 0.0])
            for b in POWER_BETAS:
                sel = np.isclose(beta, b)
                nominal, se = metrics.rejection(p[sel], 0.05, feature[sel])
                matched, se_m = metrics.rate(np.isfinite(p[sel]) & (p[sel] <= cut), feature[sel])
                rows.append({**_columns(s), "design": design_name(n), "beta": b,
                             "comparisons": int(sel.sum()), "power_05": nominal, "se_05": se,
                             "power_matched": matched, "se_matched": se_m, "matched_cut": cut})
    return {"power": pd.DataFrame(rows)}


# --------------------------------------------------------------------------------------------
def speed(ctx: Context) -> dict[str, pd.DataFrame]:
    """Seconds per comparison of every setting in this process (one core), side by side, and
    through the pipeline (Zarr -> results Zarr on the client's cluster) for nbdask's defaults."""
    rng = ctx.rng("speed")
    settings = study_settings(statsmodels=ctx.statsmodels)
    small = paper_cube(rng, replicates=SPEED_DESIGN, comparisons=ctx.n_tests)
    big_n = min(max(SPEED_SCALE * ctx.n_tests, 1000), SPEED_MAX)
    big = paper_cube(rng, replicates=SPEED_DESIGN, comparisons=big_n)
    warm = small.isel(perturbation=slice(0, 2))
    nbdask_settings = [s for s in settings if s.estimator != STATSMODELS]
    pipeline_settings = default_settings() if ctx.client is not None else []
    rows = []
    if ctx.statsmodels:
        p, g = small["counts"].shape[:2]
        start = time.perf_counter()
        statsmodels_block(*cube_arrays(small))
        secs = time.perf_counter() - start
        rows.append({**_columns(Setting(STATSMODELS, None)), "where": "in memory, 1 process",
                     "comparisons": p * g, "seconds": secs})
        ctx.progress.step("speed: statsmodels")
    for s in nbdask_settings:
        run_nbdask(warm, s)  # compile numba, load weights
        ctx.progress.step(f"speed: warm {s.label}")
        n = big["counts"].shape[0] * big["counts"].shape[1]
        start = time.perf_counter()
        run_nbdask(big, s)
        rows.append({**_columns(s), "where": "in memory, 1 process", "comparisons": n,
                     "seconds": time.perf_counter() - start})
        ctx.progress.step(f"speed: {s.label}")
    if pipeline_settings:
        rows += _pipeline_rows(big, pipeline_settings, ctx)
    df = pd.DataFrame(rows)
    df["us_per_comparison"] = df["seconds"] / df["comparisons"] * 1e6
    sm = df.loc[df["estimator"] == STATSMODELS, "us_per_comparison"]
    df["speedup_vs_statsmodels"] = (float(sm.iloc[0]) / df["us_per_comparison"]) if len(sm) else math.nan
    return {"speed": df}


def _pipeline_rows(cube, settings, ctx) -> list[dict]:
    from ..io import open_cube, save_cube
    from ..pipeline import test
    from ..writer import save_results

    workers = len(ctx.client.scheduler_info().get("workers", {}))
    tmp = tempfile.mkdtemp(prefix="nbdask-bench-")
    rows = []
    try:
        path = f"{tmp}/cube.zarr"
        p, g = cube["counts"].shape[:2]
        save_cube(cube.chunk({"perturbation": p, "feature": max(1, -(-g // max(workers, 1)))}), path)
        ctx.client.run(_quiet_workers)
        for k, s in enumerate(settings):
            # Warm up through the whole path (numba kernels, FDR sort, transformer weights).
            save_results(test(open_cube(path).isel(perturbation=slice(0, 1)), method=s.method, **s.opts),
                         f"{tmp}/warm{k}.zarr", client=ctx.client)
            start = time.perf_counter()
            save_results(test(open_cube(path), method=s.method, **s.opts), f"{tmp}/r{k}.zarr",
                         client=ctx.client)
            rows.append({**_columns(s), "where": f"pipeline Zarr -> Zarr, {workers} workers",
                         "comparisons": p * g, "seconds": time.perf_counter() - start})
            ctx.progress.step(f"speed: pipeline {s.label}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _quiet_workers() -> None:
    """The speed cube's top counts lie past the transformer's training range, and its warning
    would print from every worker; the accuracy study reports that method's errors instead."""
    import warnings

    from ..errors import NbdaskWarning

    warnings.filterwarnings("ignore", category=NbdaskWarning)


RUNNERS = {"accuracy": accuracy, "calibration": calibration, "power": power, "speed": speed}


def run_studies(studies, out, *, n_tests: int = 1000, seed: int = 0, client=None,
                progress: Progress | None = None, statsmodels: bool | None = None,
                command: str = "") -> dict[str, dict[str, pd.DataFrame]]:
    """Run ``studies`` and write their CSV tables, PNG figures and ``summary.md`` into ``out``.

    ``summary.md`` is removed first and written last, so a directory holding one holds a
    finished run. Returns the tables by study.
    """
    import os
    import platform
    from pathlib import Path

    from .. import __version__
    from . import generator, plots, report
    from .methods import statsmodels_available

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").unlink(missing_ok=True)
    ctx = Context(n_tests=n_tests, seed=seed, client=client,
                  statsmodels=statsmodels_available() if statsmodels is None else statsmodels,
                  progress=progress or Progress())
    draw = plots.available()
    ctx.progress.add(sum(planned_work(name, ctx) for name in studies))
    tables, sections, seconds = {}, [], {}
    for name in studies:
        start = time.perf_counter()
        tables[name] = RUNNERS[name](ctx)
        seconds[name] = time.perf_counter() - start
        report.write_tables(tables[name], out)
        sections.append(report.SECTIONS[name](tables[name], out, draw))
    workers = len(client.scheduler_info().get("workers", {})) if client is not None else 0
    head = [f"# nbdask bench: {', '.join(studies)}", "",
            f"`{command}`" if command else "", "",
            f"nbdask {__version__}, seed {seed}, {n_tests:,} comparisons per design (and per β for "
            f"power); {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
            f"{f', {workers} dask workers for the statsmodels fits' if workers else ''}. Wall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".", "",
            "Settings: each estimator with the paper's per-comparison dispersion and Wald test "
            "(`comparison/wald`), statsmodels' discrete `NegativeBinomial` with its defaults (the paper's "
            "ML baseline; a fit fails on an exception, non-finite parameters or no convergence), and "
            "each nbdask estimator with nbdask's defaults beside them."
            + ("" if ctx.statsmodels else " **statsmodels is not installed: its column is skipped.**"),
            "", "### Generator", "", generator.__doc__.split("\n\n", 1)[1].strip(), ""]
    if not draw:
        head.append("matplotlib is not installed: no figures (pip install 'nbdask[bench]').\n")
    (out / "summary.md").write_text("\n".join(head) + "\n" + "\n".join(sections))
    return tables

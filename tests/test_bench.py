"""nbdask bench and nbdask calibrate: every file written with sane contents, the option roster
read from nbdask, the metrics against closed forms, and the calibration machinery judged on a
method known to be anti-conservative (a Poisson test on overdispersed counts, scipy)."""

import inspect
import math
import sys

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats

import nbdask
from nbdask.bench import calibrate as cal
from nbdask.bench import metrics
from nbdask.bench.methods import Setting, all_combinations, default_settings
from nbdask.bench.methods import test_defaults as nbdask_defaults
from nbdask.cli import main
from nbdask.dispersion import DISPERSIONS
from nbdask.kernels import KERNELS
from nbdask.kernels.exact import CONDITIONAL_TESTS
from nbdask.simulate import simulate

DESIGNS = ["3v3", "5v5", "7v7", "9v9"]


def _png_ok(path):
    """A PNG that opens, of plausible size, with more than a blank canvas in it."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, path
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique(np.round(rgb, 2), axis=0)) > 20, f"{path}: almost no distinct colours"
    assert (rgb.std(axis=0) > 0.05).any(), f"{path}: nearly uniform"


def _rates_ok(df, columns):
    for c in columns:
        v = df[c].to_numpy(float)
        assert np.all((v >= 0) & (v <= 1)), (c, v[(v < 0) | (v > 1)])


def test_public_simulate_survives_its_module_import():
    import nbdask.bench.generator  # noqa: F401  (imports the nbdask.simulate module)

    assert callable(nbdask.simulate) and nbdask.simulate is sys.modules["nbdask.simulate"].simulate
    assert "true_log_fold_change" in nbdask.simulate(perturbations=2, features=3, seed=1)


def test_roster_comes_from_nbdask():
    d = nbdask_defaults()
    assert d == {k: p.default for k, p in inspect.signature(nbdask.test).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY}
    combos = all_combinations()
    methods = {s.method for s in combos}
    assert methods == set(KERNELS)
    for m, spec in KERNELS.items():
        tests = {s.opts["test"] for s in combos if s.method == m}
        assert tests == set(spec.tests) | set(CONDITIONAL_TESTS)
        assert {s.opts["dispersion"] for s in combos if s.method == m} == set(DISPERSIONS)
    defaults = [s for s in combos if s.role == "default"]
    assert len(defaults) == 1 and defaults[0].method == d["method"]
    assert defaults[0].opts["dispersion"] == d["dispersion"] and defaults[0].opts["test"] == d["test"]
    assert all(s.opts["dispersion"] == d["dispersion"] for s in default_settings())


def test_metrics_against_closed_forms():
    rng = np.random.default_rng(0)
    hits = rng.random(400) < 0.1
    r, se = metrics.rate(hits, np.arange(400))  # one comparison per cluster: binomial SE
    p = hits.mean()
    assert r == p and se == pytest.approx(math.sqrt(p * (1 - p) / 399), rel=1e-12)
    # Clusters of identical outcomes: the SE is that of the cluster means.
    cl = np.repeat(np.arange(50), 8)
    h = np.repeat(rng.random(50) < 0.3, 8)
    r, se = metrics.rate(h, cl)
    m = h[::8].mean()
    assert se == pytest.approx(math.sqrt(m * (1 - m) / 49), rel=1e-12)
    p = rng.random(1000)
    assert metrics.ks_uniform(p) == pytest.approx(stats.kstest(p, "uniform").statistic)
    cut = metrics.matched_threshold(np.concatenate([p, [np.nan] * 100]), 0.05)
    assert np.sum(p <= cut) == 55  # 5% of all 1,100 comparisons, untestable ones included
    assert cal.null_sample_size(0.005) == 1900
    assert list(metrics.mean_count_bins(np.array([0.2, 1.0, 2.9, 50, 1e4]))) == ["0-1", "1-3", "1-3", "30-100", ">=100"]


def test_bench_all_cli(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "all", "--out", str(out), "--n-tests", "10", "--workers", "0", "--seed", "3"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip().startswith("nbdask bench all:") and str(out) in cap.out
    assert "bench all [" in cap.err and "speed:" in cap.err  # the progress line
    assert "Traceback" not in cap.err and "statsmodels is not installed" not in cap.err
    files = {p.name for p in out.iterdir()}
    tables = ["accuracy", "accuracy_by_design", "accuracy_by_bin", "calibration", "calibration_by_bin",
              "calibration_qq", "power", "speed"]
    figures = ["accuracy_by_design", "accuracy_by_bin", "calibration_qq", "calibration_fpr",
               "calibration_fpr_by_bin", "power", "speed"]
    assert files == {f"{t}.csv" for t in tables} | {f"{f}.png" for f in figures} | {"summary.md"}
    for f in figures:
        _png_ok(out / f"{f}.png")
    t = {name: pd.read_csv(out / f"{name}.csv") for name in tables}
    settings = set(t["accuracy"]["setting"])
    assert "statsmodels" in settings and {"mom comparison/wald", "mom feature/auto"} <= settings
    assert len(settings) == len({s.label for s in default_settings()}) + len(KERNELS) + 1 + 1  # irls x2 fits
    acc = t["accuracy_by_design"]
    assert set(acc["design"]) == {f"{n}v{n}" for n in range(2, 11)}
    assert len(acc) == len(settings) * 9
    _rates_ok(t["accuracy"], ["success_rate"])
    ok = t["accuracy"][t["accuracy"]["subset"] == "own"]
    assert (ok["mae_beta"] > 0).all() and (ok["mae_mu"] < 5).all()
    calib = t["calibration"]
    assert sorted(set(calib["design"])) == DESIGNS and len(calib) == 4 * len(settings)
    _rates_ok(calib, ["fpr_05", "fpr_01", "ks", "tested"])
    assert (calib["fpr_01"] <= calib["fpr_05"]).all() and (calib["se_05"] >= 0).all()
    assert set(t["calibration_by_bin"]["mean_count_bin"]) <= set(metrics.BIN_LABELS)
    pw = t["power"]
    assert len(pw) == 4 * 10 * len(settings) and np.allclose(sorted(set(pw["beta"])), np.linspace(0, 2.5, 10))
    _rates_ok(pw, ["power_05", "power_matched"])
    assert pw.groupby(["setting", "design"])["power_matched"].first().le(0.05 + 1e-12).all()  # beta = 0
    assert pw.loc[pw["beta"] == 2.5, "power_05"].mean() > pw.loc[pw["beta"] == 0, "power_05"].mean() + 0.2
    sp = t["speed"]
    assert set(sp["setting"]) == settings and (sp["us_per_comparison"] > 0).all()
    assert sp.loc[sp["setting"] == "statsmodels", "speedup_vs_statsmodels"].iloc[0] == pytest.approx(1.0)
    summary = (out / "summary.md").read_text()
    for heading in ("## Accuracy", "## Calibration", "## Power", "## Speed", "### Generator"):
        assert heading in summary
    assert "0.289" in summary and "98.7%" in summary  # the paper's v13 table beside ours
    assert summary.count("**agrees**") + summary.count("**disagrees**") >= 5


def test_bench_without_statsmodels(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "statsmodels" or m.startswith("statsmodels.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "statsmodels", None)  # import statsmodels raises ImportError
    out = tmp_path / "b"
    assert main(["bench", "calibration", "--out", str(out), "--n-tests", "10", "--workers", "0",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["nbdask bench: statsmodels is not installed: skipping its column "
                     "(pip install 'nbdask[bench]')"]
    calib = pd.read_csv(out / "calibration.csv")
    assert "statsmodels" not in set(calib["setting"]) and len(calib) == 4 * len(default_settings()) * 2
    assert "statsmodels is not installed" in (out / "summary.md").read_text()


def _poisson_p(cube: xr.Dataset) -> xr.Dataset:
    """Two-sided Poisson exact test (scipy's binomial, conditional on the total): right for
    Poisson counts, anti-conservative on overdispersed ones."""
    cube = cube.load()
    sf = cube["size_factor"].values
    present = np.isfinite(sf)
    t = np.where(present[:, None, :], cube["counts"].values, 0).sum(-1)
    c = cube["control_counts"].values.sum(-1)[None, :]
    lt = np.where(present, sf, 0).sum(-1)[:, None]
    lc = cube["control_size_factor"].values.sum()
    n = t + c
    prob = np.broadcast_to(lt / (lt + lc), n.shape)
    p = np.minimum(1.0, 2 * np.minimum(stats.binom.cdf(t, n, prob), stats.binom.sf(t - 1, n, prob)))
    p = np.where(n > 0, p, np.nan)
    return xr.Dataset({"p_value": (("perturbation", "feature"), p)})


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cal") / "cube.zarr")
    nbdask.save_cube(simulate(perturbations=60, features=240, replicates=4, control_replicates=6,
                                     effect_fraction=0.1, seed=5, chunks=60), path)
    return path


def test_calibrate_flags_poisson_and_passes_defaults(screen, client, tmp_path):
    out = tmp_path / "cal"
    default = [s for s in all_combinations() if s.role == "default"]
    poisson = Setting("poisson-exact", None, (), "option", fn=_poisson_p)
    res = cal.calibrate(nbdask.open_cube(screen), out, seed=1, perturbations=30, features_per_bin=10,
                        settings=default, extra=[poisson], workers=2)
    v = res["verdicts"].set_index("setting")
    assert v.loc["poisson-exact", "verdict"] == "anti-conservative"
    assert v.loc[default[0].label, "verdict"] in ("calibrated", "conservative")
    rec = res["recommendation"]
    assert rec["recommended"]["setting"] == default[0].label and rec["default"]["setting"] == default[0].label
    files = {p.name for p in out.iterdir()}
    assert files == {"summary.md", "calibrate_fpr.csv", "calibrate_fdr.csv", "calibrate_verdicts.csv",
                     "calibrate_design.csv", "calibrate_dispersion_trend.png", "calibrate_fpr.png",
                     "calibrate_fdr_power.png"}
    for f in ("calibrate_dispersion_trend.png", "calibrate_fpr.png", "calibrate_fdr_power.png"):
        _png_ok(out / f)
    fpr = pd.read_csv(out / "calibrate_fpr.csv")
    _rates_ok(fpr, ["fpr_05", "fpr_01"])
    bins = [b for b in metrics.BIN_LABELS if b in set(fpr["mean_count_bin"])]
    assert bins == res["plan"]["bins"] and len(bins) >= 3
    for s in (default[0].label, "poisson-exact"):  # a row per bin and overall for every setting
        assert set(fpr.loc[fpr["setting"] == s, "mean_count_bin"]) == {"all", *bins}
    assert (fpr.loc[fpr["mean_count_bin"] != "all", "comparisons"] == 30 * 10).all()
    fdr = pd.read_csv(out / "calibrate_fdr.csv")
    _rates_ok(fdr, ["fdp_05", "fdp_1", "power_05", "power_1"])
    hot = fpr[(fpr["setting"] == "poisson-exact") & (fpr["mean_count_bin"] == "all")].iloc[0]
    assert hot["fpr_05"] > 0.1
    text = (out / "summary.md").read_text()
    assert f"recommended: {default[0].label} " in text and "poisson-exact" in text
    assert "WARNING" not in text
    # The same evidence with the Poisson test standing as the default: the warning.
    swapped = res["verdicts"].assign(role=lambda d: np.where(d["setting"] == "poisson-exact", "default", "option"))
    head = cal.headline(cal.recommend(swapped, 100))
    assert head[0].startswith("WARNING: this design is outside what nbdask's defaults are calibrated for")
    assert "poisson-exact" in head[0]


def test_calibrate_cli(screen, client, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["calibrate", screen, "--out", str(out), "--methods", "mom", "--tests", "auto",
                 "--perturbations", "20", "--features-per-bin", "8", "--scheduler",
                 client.scheduler.address, "--no-progress"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    lines = cap.out.strip().splitlines()
    verdicts = pd.read_csv(out / "calibrate_verdicts.csv").set_index("setting")
    assert list(verdicts.index) == [f"mom {d}/auto" for d in DISPERSIONS]
    default = verdicts.loc["mom feature/auto", "verdict"]
    first = ("WARNING: this design is outside what nbdask's defaults are calibrated for: mom feature/auto"
             if default == "anti-conservative" else f"defaults (mom feature/auto): {default}")
    assert lines[0].startswith(first)
    assert lines[1].startswith("recommended: mom ")
    assert lines[-1] == f"tables, figures and summary.md in {out}"
    assert cap.err.strip() == ""
    code = main(["calibrate", screen, "--out", str(out), "--methods", "glm"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nbdask calibrate: error: --methods glm: not an nbdask method; choose from ")
    assert "\n" not in err


def test_calibrate_cli_missing_cube(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "o")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("nbdask calibrate: error: ") and cap.err.count("\n") == 1
    assert "nope.zarr" in cap.err and not (tmp_path / "o").exists()

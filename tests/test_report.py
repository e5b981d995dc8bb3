"""The HTML report: its block reductions against NumPy/SciPy on the full arrays, and the page
itself opened in headless Chromium, screenshotted and checked."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import nbdask
from nbdask.overview import LOG_STEP, overview, qq_points
from nbdask.report import SECTIONS

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def stored(tmp_path_factory, client):
    """Results (3 x 3 blocks, 20% effects, ragged, one perturbation untestable) and the simulated cube they came from."""
    root = tmp_path_factory.mktemp("report")
    cube = nbdask.simulate(perturbations=48, features=40, replicates=3, control_replicates=4,
                           effect_fraction=0.2, ragged_fraction=0.3, seed=12, chunks=16)
    # P02 loses all its replicates: its comparisons are untestable (NaN p).
    cube["size_factor"] = cube["size_factor"].where(cube["perturbation"] != "P02")
    cube_path, out = str(root / "cube.zarr"), str(root / "results.zarr")
    nbdask.save_cube(cube, cube_path)
    nbdask.save_results(nbdask.test(nbdask.open_cube(cube_path)), out, client=client)
    return out, cube_path


def test_overview_equals_numpy_on_the_full_arrays(stored, client):
    out, cube_path = stored
    res, truth = nbdask.open_results(out), nbdask.open_cube(cube_path)
    ov = overview(res, truth=truth, q_max=0.1, top=25, max_hits=30, sample=50)
    p, q = res["p_value"].values, res["q_value"].values
    lfc = res["log_fold_change"].values
    tested, hit = np.isfinite(p), q <= 0.1
    assert (ov.n_comparisons, ov.n_tested, ov.n_hits) == (p.size, tested.sum(), hit.sum())
    assert ov.n_up == (hit & (lfc > 0)).sum() and ov.n_untestable == (~tested).sum() > 0
    np.testing.assert_array_equal(ov.p_hist, np.histogram(p[tested], bins=40, range=(0, 1))[0])
    assert ov.log_hist.sum() == tested.sum()
    np.testing.assert_array_equal(ov.top["p_value"], np.sort(p[tested])[:25])
    np.testing.assert_array_equal(p[ov.top["row"], ov.top["col"]], ov.top["p_value"])
    np.testing.assert_array_equal(lfc[ov.top["row"], ov.top["col"]], ov.top["log_fold_change"])
    assert hit.sum() > 30
    np.testing.assert_array_equal(ov.hits["p_value"], np.sort(p[hit])[:30])
    s = ov.sample
    assert len(s["p_value"]) == 50 and len(set(zip(s["row"], s["col"]))) == 50
    assert (q[s["row"], s["col"]] > 0.1).all() and np.isfinite(p[s["row"], s["col"]]).all()
    np.testing.assert_array_equal(ov.hits_per_perturbation, hit.sum(axis=1))
    np.testing.assert_array_equal(ov.hits_per_feature, hit.sum(axis=0))
    np.testing.assert_array_equal(ov.up_per_feature, (hit & (lfc > 0)).sum(axis=0))
    ref = nbdask.summarize(res.load(), truth=truth.load())
    for level, tag in ((0.05, "q05"), (0.1, "q10")):
        assert ov.truth[f"fdp@{level}"] == pytest.approx(ref[f"fdp_{tag}"], abs=1e-12)
        assert ov.truth[f"power@{level}"] == pytest.approx(ref[f"power_{tag}"], abs=1e-12)
    assert ov.truth["fpr_p05_nulls"] == pytest.approx(ref["fpr_p05_nulls"], abs=1e-12)
    for key in ("mae_log_fold_change", "mae_log_base_mean"):
        assert ov.truth[key] == pytest.approx(ref[key], rel=1e-5)
    one_block = overview(res.load(), q_max=0.1, top=25, max_hits=30, sample=50)
    np.testing.assert_array_equal(one_block.log_hist, ov.log_hist)
    for name in ("row", "col", "p_value"):
        np.testing.assert_array_equal(one_block.top[name], ov.top[name])


def uniform_results(m_side: int, seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    p = rng.random((m_side, m_side))
    zeros = np.zeros(p.shape, np.float32)
    return xr.Dataset({"p_value": (("perturbation", "feature"), p),
                       "q_value": (("perturbation", "feature"), np.minimum(p * p.size, 1.0)),
                       "log_fold_change": (("perturbation", "feature"), zeros),
                       "log_base_mean": (("perturbation", "feature"), zeros)}).chunk(25)


def test_qq_points_and_null_band_against_exact_order_statistics():
    res = uniform_results(100)  # 10,000 p-values in 16 blocks
    ov = overview(res, top=50)
    pts = qq_points(ov, n_points=300)
    m = 10_000
    ranks = np.unique(np.round(np.logspace(0, 4, 300)).astype(int))
    np.testing.assert_allclose(pts["expected"], -np.log10((ranks - 0.5) / m))
    exact = -np.log10(np.sort(res["p_value"].values.ravel()))[ranks - 1]
    assert np.abs(pts["observed"] - exact).max() <= LOG_STEP  # histogram ranks: within a bin
    np.testing.assert_allclose(pts["observed"][ranks <= 50], exact[ranks <= 50], rtol=1e-12)
    # Closed forms: the smallest of m uniforms has P(U(1) <= x) = 1 - (1 - x)^m, the largest
    # P(U(m) <= x) = x^m; the band is their 2.5% and 97.5% quantiles on the -log10 scale.
    assert pts["upper"][0] == pytest.approx(-np.log10(1 - 0.975 ** (1 / m)), rel=1e-9)
    assert pts["lower"][0] == pytest.approx(-np.log10(1 - 0.025 ** (1 / m)), rel=1e-9)
    assert pts["upper"][-1] == pytest.approx(-np.log10(0.025 ** (1 / m)), rel=1e-9)
    assert pts["lower"][-1] == pytest.approx(-np.log10(0.975 ** (1 / m)), rel=1e-9)
    inside = (exact >= pts["lower"]) & (exact <= pts["upper"])
    assert inside.mean() > 0.9  # uniform p-values sit in their band


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def chromium(page: Path, tmp_path: Path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (.ci/run "
                    "installs Debian's chromium; apt-get install chromium)")
def test_html_report_in_headless_chromium(stored, tmp_path):
    from PIL import Image

    out, cube_path = stored
    page = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "nbdask.cli", "report", out, "--html", str(page),
                        "--truth", cube_path], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert re.search(rf"HTML report \(\d+ hits at q <= 0.1\) written to {re.escape(str(page))}", r.stdout)
    # the text summary is still printed, as a person reads it
    from nbdask.summary import summarize

    summary = summarize(nbdask.open_results(out), truth=nbdask.open_cube(cube_path))
    assert re.search(rf"^tested +{summary['n_tests']:,}$", r.stdout, re.M), r.stdout
    assert re.search(rf"^FDP, q < 0.05 +{summary['fdp_q05']:.4f}$", r.stdout, re.M), r.stdout
    assert "n_tests" not in r.stdout and "fdp_q05" not in r.stdout
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch
    dom = chromium(page, tmp_path, "--dump-dom", "--virtual-time-budget=5000").stdout
    for section in (*SECTIONS, "truth"):
        assert f'<section id="{section}">' in dom, section
    n_images = dom.count("<img ")
    assert n_images == 4 and f'data-images-decoded="{n_images}/{n_images}"' in dom
    assert 'data-clipped="0"' in dom  # no card or cell shows less than its text
    shot = tmp_path / "report.png"
    chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,6000")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (6000, 1280)
    assert pixels.std() > 20  # not blank
    ink = pixels < 235
    assert 0.03 < ink.mean() < 0.5
    rows = np.flatnonzero(ink.any(axis=1))
    assert rows[-1] < 5900  # the whole page fits the window: every section is in the picture
    band = np.array_split(ink[:rows[-1]], 6)
    assert all(part.mean() > 0.005 for part in band)  # no empty stretch down the page


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_a_bulk_experiment_report_shows_its_counts_whole(tmp_path):
    """One treatment against its controls with thousands of hits (as airway: 1,653 up / 1,395
    down): the count cards hold their numbers (they were cut at "1,653 / 1,39"), and the screen
    view, one bar and a tie of every hit feature at one perturbation, gives way to a line."""
    from nbdask.report import render

    cube = nbdask.simulate(perturbations=1, features=40000, replicates=4, control_replicates=4,
                           effect_fraction=0.3, seed=3)
    report = render(nbdask.test(cube.load()), q_max=0.1)
    assert report.overview.n_up > 1000 and report.overview.n_down > 1000
    page = report.save(tmp_path / "bulk.html")
    dom = chromium(page, tmp_path, "--dump-dom", "--virtual-time-budget=5000").stdout
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom, section
    assert "One perturbation: its hits are the volcano plot above" in dom
    assert dom.count("<img ") == 3 and 'data-images-decoded="3/3"' in dom
    assert 'data-clipped="0"' in dom
    assert f"{report.overview.n_up:,}</span> / <span class=\"down\">{report.overview.n_down:,}" in dom

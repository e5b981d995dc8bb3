"""The ``.nb`` accessor: registered by ``import nbdask`` alone, thin over the public functions."""

import subprocess
import sys

import dask
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import nbdask


def test_import_registers_the_accessor_and_loads_nothing_heavy():
    code = ("import sys, nbdask, xarray as xr; assert isinstance(xr.Dataset().nb, object); "
            "print(sorted(m for m in ('dask', 'zarr', 'distributed', 'matplotlib', 'numba', "
            "'scipy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def cube():
    return nbdask.simulate(perturbations=24, features=20, seed=8, chunks=8, effect_fraction=0.3)


def test_test_hits_and_card(cube):
    lazy = cube.nb.test(dispersion="comparison")
    assert lazy["p_value"].chunks is not None  # lazy in, lazy out
    res = lazy.compute()
    ref = nbdask.test(cube.load(), dispersion="comparison")
    xr.testing.assert_identical(res.drop_attrs(), ref.drop_attrs())
    hits = res.nb.hits(q_max=0.1)
    pd.testing.assert_frame_equal(hits, nbdask.to_dataframe(res, q_max=0.1))
    assert len(hits) == int((ref["q_value"].values <= 0.1).sum()) > 0
    html = res.nb._repr_html_()
    best = hits.sort_values("p_value").iloc[0]
    assert "nbdask results" in html and "mom" in html and f"{24 * 20:,}" in html
    assert best["perturbation"] in html and f"{best['p_value']:.2e}" in html
    assert "<th>name</th>" not in html
    named = res.assign_coords(feature_name=("feature", [f"SYM{j}" for j in range(20)]))
    card = named.nb._repr_html_()
    name = f"SYM{list(res.feature.values).index(best['feature'])}"
    assert "<th>feature</th><th>name</th>" in card
    assert f"<td>{best['perturbation']}</td><td>{best['feature']}</td><td>{name}</td>" in card
    assert "count cube" in cube.nb._repr_html_()


def test_card_of_a_stored_result_reads_attributes_only(tmp_path, client):
    path = str(tmp_path / "c.zarr")
    nbdask.save_cube(nbdask.simulate(perturbations=16, features=16, seed=2, chunks=8), path)
    out = str(tmp_path / "r.zarr")
    nbdask.save_results(nbdask.test(nbdask.open_cube(path), dispersion="comparison"), out)
    res = nbdask.open_results(out)

    def refuse(*args, **kwargs):
        raise AssertionError("the card computed something")

    with dask.config.set(scheduler=refuse):
        html = res.nb._repr_html_()
    assert f"{int(res.attrs['n_significant_q10']):,}" in html and "complete" in html
    report = res.nb.report(tmp_path / "r.html", q_max=0.2)
    assert (tmp_path / "r.html").read_text() == report.document
    assert 'id="volcano"' in report._repr_html_() and "<script" not in report._repr_html_()
    assert report.overview.n_hits == int((res["q_value"].values <= 0.2).sum())

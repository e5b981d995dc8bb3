"""Tidy hit tables: to_dataframe and `nbdask export`, against pandas on the full arrays."""

import os
import re
import subprocess
import sys

import dask.array as da
import numpy as np
import pandas as pd
import pytest

import nbdask
from nbdask.export import export_hits, to_dataframe

pq = pytest.importorskip("pyarrow.parquet")
#: A hit table's columns for results without feature names (a simulated cube has none).
UNNAMED = [c for c in nbdask.export.COLUMNS if c != "feature_name"]


@pytest.fixture(scope="module")
def stored(tmp_path_factory, client):
    """A results store of 3 x 3 blocks (48 x 40, shards 16) from a cube with ragged designs."""
    root = tmp_path_factory.mktemp("export")
    cube = nbdask.simulate(perturbations=48, features=40, replicates=3, control_replicates=4,
                           effect_fraction=0.2, ragged_fraction=0.3, seed=11, chunks=16)
    nbdask.save_cube(cube, str(root / "cube.zarr"))
    out = str(root / "results.zarr")
    nbdask.save_results(nbdask.test(nbdask.open_cube(str(root / "cube.zarr"))), out, client=client)
    return out


def pandas_reference(res, q_max=None):
    """The hit table computed independently: pandas on the whole arrays, perturbation-major."""
    loaded = res.load()
    p_lab, f_lab = loaded["perturbation"].values, loaded["feature"].values
    rows, cols = np.meshgrid(np.arange(p_lab.size), np.arange(f_lab.size), indexing="ij")
    flat = {name: loaded[name].values.ravel() for name in
            ("log_fold_change", "standard_error", "statistic", "p_value", "q_value",
             "log_base_mean", "log_dispersion")}
    df = pd.DataFrame({"perturbation": p_lab[rows.ravel()].astype(str),
                       "feature": f_lab[cols.ravel()].astype(str), **flat})
    if q_max is not None:
        df = df[df["q_value"] <= q_max]
    df.insert(3, "log2_fold_change", (df["log_fold_change"] / np.log(2)).astype(np.float32))
    df["base_mean"] = np.exp(df.pop("log_base_mean"))
    df["dispersion"] = np.exp(df.pop("log_dispersion"))
    return df.reset_index(drop=True)


def test_to_dataframe_equals_pandas_on_the_full_arrays(stored, client):
    res = nbdask.open_results(stored)
    for q_max in (None, 0.1):
        got = to_dataframe(res, q_max=q_max)
        ref = pandas_reference(res, q_max)
        assert list(got.columns) == UNNAMED
        assert len(ref) > (0 if q_max else 1900)
        pd.testing.assert_frame_equal(got, ref, check_dtype=False, rtol=1e-6)
        assert got["p_value"].dtype == np.float64 and got["log_fold_change"].dtype == np.float32
    assert res["p_value"].isnull().any()  # untestable rows are in the unfiltered table
    assert to_dataframe(res)["p_value"].isna().sum() == int(res["p_value"].isnull().sum())


def test_selection_by_labels_and_in_memory_results(stored):
    res = nbdask.open_results(stored).load()  # NumPy-backed: one block, no cluster needed
    chosen_p, chosen_f = ["P03", "P40", "P17"], ["G01", "G39"]
    got = to_dataframe(res, perturbations=chosen_p, features=chosen_f)
    ref = pandas_reference(res)
    ref = ref[ref["perturbation"].isin(chosen_p) & ref["feature"].isin(chosen_f)]
    key = ["perturbation", "feature"]
    pd.testing.assert_frame_equal(got.sort_values(key).reset_index(drop=True),
                                  ref.sort_values(key).reset_index(drop=True), check_dtype=False)
    assert len(got) == 6
    with pytest.raises(nbdask.OptionError, match=r"^perturbations: \['nope'\] not in the results"):
        to_dataframe(res, perturbations=["P03", "nope"])
    with pytest.raises(nbdask.OptionError, match="^q_max=.*no q_value"):
        to_dataframe(res.drop_vars("q_value"), q_max=0.1)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nbdask.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_export_parquet_and_csv(stored, tmp_path):
    ref = pandas_reference(nbdask.open_results(stored), 0.1)
    parquet, csv = str(tmp_path / "hits.parquet"), str(tmp_path / "hits.csv")
    r = run_cli("export", stored, parquet, "--q-max", "0.1")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"wrote {len(ref):,} comparisons with q <= 0.1 (of 1,920) to {parquet}")
    key = ["perturbation", "feature"]
    got = pd.read_parquet(parquet).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, ref, check_dtype=False)
    r = run_cli("export", stored, csv)
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(csv, keep_default_na=True)
    full = pandas_reference(nbdask.open_results(stored))
    assert len(got) == 1920 and list(got.columns) == list(full.columns)
    got = got.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[key], full[key])
    np.testing.assert_allclose(got["p_value"], full["p_value"], rtol=1e-15)
    np.testing.assert_allclose(got["log2_fold_change"], full["log2_fold_change"], rtol=1e-6)
    r = run_cli("export", stored, csv)
    assert r.returncode == 2 and r.stderr.startswith("nbdask export: error: output") \
        and "--overwrite" in r.stderr and r.stderr.count("\n") == 1
    with pytest.raises(nbdask.OptionError, match=r"^output .*hits.xlsx.*name the file \*.parquet or \*.csv"):
        export_hits(nbdask.open_results(stored), tmp_path / "hits.xlsx")


def test_parquet_row_groups_stream_and_an_empty_table_keeps_its_schema(stored, tmp_path):
    res = nbdask.open_results(stored)
    path = tmp_path / "all.parquet"
    assert export_hits(res, path, row_group_size=300) == 1920
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 7 and meta.num_rows == 1920
    empty = tmp_path / "none.parquet"
    assert export_hits(res, empty, q_max=0.0) == 0
    table = pd.read_parquet(empty)
    assert len(table) == 0 and list(table.columns) == UNNAMED


def test_an_interrupted_export_leaves_no_file(stored, tmp_path):
    res = nbdask.open_results(stored)

    def fail_late(block, block_info=None):
        if block_info[0]["chunk-location"] == (2, 1):
            raise RuntimeError("disk vanished")
        return block

    res["p_value"] = res["p_value"].copy(data=da.map_blocks(fail_late, res["p_value"].data, dtype=np.float64))
    path = tmp_path / "hits.parquet"
    with pytest.raises(RuntimeError, match="disk vanished"):
        export_hits(res, path)
    assert os.listdir(tmp_path) == []


def test_feature_names_travel_from_the_cube_to_hit_tables_and_the_report(tmp_path, client):
    """A cube with feature_name (ids as labels, gene symbols beside them, one symbol twice):
    the stored results carry the names, the hit table has them in its feature_name column, a
    feature can be selected by its name, and the report's top hits show them."""
    cube = nbdask.simulate(perturbations=32, features=40, replicates=3, control_replicates=4,
                           effect_fraction=0.3, seed=5, chunks=16)
    names = np.array([f"SYM{j}" for j in range(40)], dtype=object)
    names[[3, 30]] = "TBCE"
    cube = cube.assign_coords(feature_name=("feature", names))
    nbdask.save_cube(cube, str(tmp_path / "cube.zarr"))
    out = str(tmp_path / "results.zarr")
    nbdask.save_results(nbdask.test(nbdask.open_cube(str(tmp_path / "cube.zarr"))), out,
                        client=client)
    res = nbdask.open_results(out)
    assert [str(x) for x in res["feature_name"].values] == names.tolist()

    got = to_dataframe(res, q_max=0.2)
    assert list(got.columns) == list(nbdask.export.COLUMNS) and len(got) > 20
    by_label = dict(zip(res["feature"].values.astype(str), names))
    assert got["feature_name"].tolist() == [by_label[f] for f in got["feature"]]
    picked = to_dataframe(res, features=["TBCE", "G07"])
    assert sorted(set(picked["feature"])) == ["G03", "G07", "G30"] and len(picked) == 96
    with pytest.raises(nbdask.OptionError, match=r"^features: \['NOPE'\] not in the results"):
        to_dataframe(res, features=["NOPE"])

    csv = str(tmp_path / "hits.csv")
    r = run_cli("export", out, csv, "--feature", "TBCE")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    table = pd.read_csv(csv)
    assert set(table["feature_name"]) == {"TBCE"} and len(table) == 64

    from nbdask.report import render

    page = render(res, q_max=0.2, client=client).fragment
    assert "<th>feature</th><th>name</th>" in page
    top = re.findall(r"<tr><td>\d+</td><td>P\d+</td><td>(G\d+)</td><td>([^<]*)</td>", page)
    assert len(top) >= 10 and all(name == by_label[f] for f, name in top)

"""Perturb-seq AnnData into count cubes: pseudobulk, size factors, streaming, errors."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import sparse, stats

import nbdask
from conftest import NANNY, deseq2_size_factors

ad = pytest.importorskip("anndata")

GUIDES = ["NTC-1", "NTC-2", "KO-A", "KO-B", "KO-C", "KO-D"]
DONORS = ["d1", "d2", "d3", "d4"]
CONTROLS = ["NTC-1", "NTC-2"]
KEYS = dict(perturbation_key="guide", sample_key="donor", control=CONTROLS)


def synthetic(n_cells=1600, n_genes=24, seed=0):
    """Cells with known counts: KO-D only in donor d1, KO-C nearly absent from d4 (dropped at
    min_cells=10), 2% of cells without a donor, gene means 0.3-8 per cell."""
    rng = np.random.default_rng(seed)
    guide = rng.choice(GUIDES, n_cells, p=[0.2, 0.15, 0.2, 0.2, 0.2, 0.05])
    donor = rng.choice(DONORS, n_cells).astype(object)
    donor[guide == "KO-D"] = "d1"
    ko_c_d4 = np.flatnonzero((guide == "KO-C") & (donor == "d4"))
    donor[ko_c_d4[4:]] = "d3"
    donor[rng.random(n_cells) < 0.02] = np.nan
    mean = np.exp(rng.uniform(np.log(0.3), np.log(8), n_genes))
    x = rng.poisson(rng.gamma(2.0, mean / 2.0, (n_cells, n_genes))).astype(np.float32)
    obs = pd.DataFrame({"guide": pd.Categorical(guide), "donor": donor},
                       index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=sparse.csr_matrix(x), obs=obs,
                      var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]))


def groupby_pseudobulk(adata, min_cells):
    """Independent reference: pandas group sums and sizes (treated by guide x donor, controls
    pooled by donor), keeping groups with >= min_cells cells."""
    df = pd.DataFrame(adata.X.toarray(), columns=adata.var_names)
    guide = adata.obs["guide"].astype(str).to_numpy()
    donor = adata.obs["donor"].to_numpy()
    is_control = np.isin(guide, CONTROLS)
    treated = df[~is_control].groupby([guide[~is_control], donor[~is_control]])
    control = df[is_control].groupby(donor[is_control])
    t_sum, t_n = treated.sum(), treated.size()
    c_sum, c_n = control.sum(), control.size()
    return t_sum[t_n >= min_cells], t_n, c_sum[c_n >= min_cells], c_n


def test_pseudobulk_equals_a_pandas_groupby_sum():
    adata = synthetic()
    cube = nbdask.from_anndata(adata, **KEYS, min_cells=10, size_factors="total",
                               chunk_cells=170, shards=(2, 8))
    t_sum, t_n, c_sum, c_n = groupby_pseudobulk(adata, 10)
    kept = t_sum.index
    assert list(cube.perturbation.values) == ["KO-A", "KO-B", "KO-C", "KO-D"]
    n_rep = max(sum(1 for p, _ in kept if p == q) for q in cube.perturbation.values)
    assert cube.sizes["replicate"] == n_rep == 4
    for i, p in enumerate(cube.perturbation.values):
        donors = sorted(s for q, s in kept if q == p)
        samples = cube.replicate_sample.values[i]
        assert list(samples[:len(donors)]) == donors and set(samples[len(donors):]) <= {""}
        for r, s in enumerate(donors):
            np.testing.assert_array_equal(cube.counts.values[i, :, r], t_sum.loc[(p, s)].values)
            assert cube.replicate_cells.values[i, r] == t_n.loc[(p, s)]
        absent = slice(len(donors), None)
        assert np.isnan(cube.size_factor.values[i, absent]).all()
        assert (cube.counts.values[i, :, absent] == 0).all()
        assert np.isfinite(cube.size_factor.values[i, :len(donors)]).all()
    assert list(cube.control_sample.values) == list(c_sum.index)
    np.testing.assert_array_equal(cube.control_counts.values, c_sum.to_numpy().T)
    np.testing.assert_array_equal(cube.control_cells.values, c_n.loc[c_sum.index].values)
    assert cube.attrs["n_dropped_treated_groups"] == int(((t_n > 0) & (t_n < 10)).sum()) == 1
    assert cube.attrs["n_cells_unlabelled"] == int(adata.obs["donor"].isna().sum())
    assert cube.attrs["n_cells_used"] == int(t_n[t_n >= 10].sum() + c_n[c_n >= 10].sum())
    assert cube.counts.dtype == np.int64


def test_backed_zarr_and_in_memory_give_identical_cubes(tmp_path, client):
    adata = synthetic(seed=1)
    adata.layers["counts"] = adata.X.toarray()  # dense layer
    h5ad, store = tmp_path / "screen.h5ad", tmp_path / "screen.zarr"
    adata.write_h5ad(h5ad)
    adata.write_zarr(store)
    opts = dict(KEYS, min_cells=10, chunk_cells=250, shards=(3, 8))
    reference = nbdask.from_anndata(adata, **opts)
    backed = ad.read_h5ad(h5ad, backed="r")
    try:
        cubes = {
            "backed AnnData": nbdask.from_anndata(backed, **opts),
            "streamed .h5ad": nbdask.from_anndata(str(h5ad), store=str(tmp_path / "a.zarr"),
                                                  client=client, **opts),
            ".zarr, CSR X, on the cluster": nbdask.from_anndata(str(store), **opts),
            "streamed .zarr, dense layer": nbdask.from_anndata(
                str(store), layer="counts", store=str(tmp_path / "b.zarr"), client=client, **opts),
        }
    finally:
        backed.file.close()
    for name, cube in cubes.items():
        for var in ("counts", "control_counts", "replicate_sample", "control_sample",
                    "replicate_cells", "control_cells"):
            np.testing.assert_array_equal(cube[var].values, reference[var].values, err_msg=name)
        for var in ("size_factor", "control_size_factor"):
            np.testing.assert_allclose(cube[var].values, reference[var].values, rtol=1e-12,
                                       err_msg=name)
        assert list(cube.feature.values) == list(adata.var_names)
    assert cubes["streamed .h5ad"]["counts"].encoding["shards"] == (3, 8, 4)


@pytest.mark.parametrize("method", ["ratio", "poscounts", "total", "given"])
def test_size_factors_match_an_independent_computation(method):
    adata = synthetic(seed=2)
    per_cell = np.random.default_rng(5).uniform(0.5, 2.0, adata.n_obs)
    cube = nbdask.from_anndata(adata, **KEYS, min_cells=10,
                               size_factors=per_cell if method == "given" else method)
    t_sum, _, c_sum, _ = groupby_pseudobulk(adata, 10)
    k = np.concatenate([t_sum.to_numpy().T, c_sum.to_numpy().T], axis=1).astype(float)
    if method in ("ratio", "poscounts"):
        expected = deseq2_size_factors(k, method)
    elif method == "total":
        expected = k.sum(axis=0) / stats.gmean(k.sum(axis=0))
    else:
        guide = adata.obs["guide"].astype(str).to_numpy()
        donor = adata.obs["donor"].to_numpy()
        sums = pd.Series(per_cell).groupby([np.where(np.isin(guide, CONTROLS), "ctrl", guide),
                                            donor]).sum()
        expected = np.r_[[sums.loc[key] for key in t_sum.index],
                         [sums.loc[("ctrl", s)] for s in c_sum.index]]
    got = {(p, s): cube.size_factor.values[i, r]
           for i, p in enumerate(cube.perturbation.values)
           for r, s in enumerate(cube.replicate_sample.values[i]) if s}
    np.testing.assert_allclose([got[key] for key in t_sum.index], expected[:len(t_sum)], rtol=1e-10)
    np.testing.assert_allclose(cube.control_size_factor.values, expected[len(t_sum):], rtol=1e-10)


def test_an_anndata_split_from_a_cube_imports_back_to_it():
    truth = nbdask.simulate(perturbations=7, features=20, replicates=4, control_replicates=5,
                            ragged_fraction=0.6, seed=3, chunks=4).compute()
    rng = np.random.default_rng(0)
    cells, guides, donors, sf_cells = [], [], [], []

    def split(y, label, sample, sf):
        n = int(rng.integers(1, 6))
        parts = np.stack([rng.multinomial(v, np.full(n, 1 / n)) for v in y], axis=1)  # n x G
        cells.append(parts)
        guides.extend([label] * n)
        donors.extend([sample] * n)
        sf_cells.extend([sf / n] * n)

    for i, p in enumerate(truth.perturbation.values):
        for r in range(truth.sizes["replicate"]):
            if np.isfinite(truth.size_factor.values[i, r]):
                split(truth.counts.values[i, :, r], p, f"s{r}", truth.size_factor.values[i, r])
    for c in range(truth.sizes["control_replicate"]):
        split(truth.control_counts.values[:, c], "NTC", f"s{c}", truth.control_size_factor.values[c])
    order = rng.permutation(len(guides))  # cells in no particular order
    adata = ad.AnnData(X=sparse.csr_matrix(np.concatenate(cells)[order].astype(np.float32)),
                       obs=pd.DataFrame({"guide": np.array(guides)[order],
                                         "donor": np.array(donors)[order]},
                                        index=[f"c{i}" for i in range(len(order))]),
                       var=pd.DataFrame(index=truth.feature.values))
    back = nbdask.from_anndata(adata, perturbation_key="guide", sample_key="donor",
                               control="NTC", min_cells=1, chunk_cells=37, shards=(3, 6),
                               size_factors=np.array(sf_cells)[order])
    np.testing.assert_array_equal(back.perturbation.values, truth.perturbation.values)
    np.testing.assert_array_equal(back.feature.values, truth.feature.values)
    np.testing.assert_array_equal(back.counts.values, truth.counts.values)
    np.testing.assert_array_equal(back.control_counts.values, truth.control_counts.values)
    np.testing.assert_allclose(back.size_factor.values, truth.size_factor.values, rtol=1e-12)
    np.testing.assert_allclose(back.control_size_factor.values, truth.control_size_factor.values,
                               rtol=1e-12)


def test_a_streamed_import_larger_than_a_worker_stays_within_its_memory(tmp_path):
    """X (dense float32) is 1.28 GB; each of 2 workers may hold 600 MiB, with spilling off."""
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster
    from distributed.diagnostics import MemorySampler

    n_cells, n_genes, limit = 160_000, 2_000, 600 * 2**20
    block = np.random.default_rng(0).poisson(1.0, (5_000, n_genes)).astype(np.float32)
    x = da.concatenate([da.from_array(block, chunks=(5_000, n_genes))] * (n_cells // 5_000))
    obs = pd.DataFrame({"guide": np.tile(["NTC", "A", "B", "C", "D"], n_cells // 5),
                        "donor": np.repeat(["d1", "d2", "d3", "d4", "d5"], n_cells // 5)},
                       index=np.arange(n_cells).astype(str))
    h5ad = tmp_path / "big.h5ad"
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
               ).write_h5ad(h5ad)
    assert h5ad.stat().st_size > 2 * limit
    config = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
              "distributed.worker.memory.pause": False}
    with dask.config.set(config), LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=":0", memory_limit=limit) as cluster, Client(cluster) as client:
        workers = set(client.scheduler_info()["workers"])
        sampler = MemorySampler()
        with sampler.sample("import", client=client, measure="process", interval=0.1):
            cube = nbdask.from_anndata(str(h5ad), perturbation_key="guide", sample_key="donor",
                                       control="NTC", store=str(tmp_path / "big.zarr"),
                                       client=client)
        assert set(client.scheduler_info()["workers"]) == workers  # none was killed
    peak = sampler.to_pandas()["import"].max()
    assert peak < 2 * limit < n_cells * n_genes * 4, peak
    # Reference: how often each row of the block lands in each (donor, guide) group, times block.
    cell = np.arange(n_cells)
    times = np.bincount(((cell // (n_cells // 5)) * 5 + cell % 5) * 5_000 + cell % 5_000,
                        minlength=25 * 5_000).reshape(5, 5, 5_000)
    expected = (times.reshape(25, 5_000) @ block.astype(np.float64)).reshape(5, 5, n_genes)
    np.testing.assert_array_equal(cube.counts.values, expected[:, 1:].transpose(1, 2, 0))
    np.testing.assert_array_equal(cube.control_counts.values, expected[:, 0].T)


def test_a_failure_mid_import_leaves_a_cube_that_does_not_look_complete(tmp_path, client):
    """The counts are written, then the size factors fail ('ratio' with a zero in every gene):
    the store is marked failed, and open_cube and `nbdask test` refuse it."""
    adata = synthetic(seed=4)
    x = adata.X.toarray()
    guide, donor = adata.obs["guide"].astype(str).to_numpy(), adata.obs["donor"].to_numpy()
    for j in range(x.shape[1]):  # each gene is zero in one of KO-A's replicates
        x[(guide == "KO-A") & (donor == DONORS[j % 4]), j] = 0
    adata.X = sparse.csr_matrix(x)
    url = str(tmp_path / "cube.zarr")
    with pytest.raises(nbdask.SourceError, match="size_factors='ratio': every feature has a zero"):
        nbdask.from_anndata(adata, **KEYS, store=url, client=client, shards=(2, 8))
    import zarr

    group = zarr.open_group(url, mode="r")
    assert group.attrs["nbdask_status"] == "failed" and group["counts"][...].sum() > 0
    with pytest.raises(nbdask.CubeError, match="the cube is failed, not complete"):
        nbdask.open_cube(url)
    r = subprocess.run([sys.executable, "-m", "nbdask.cli", "test", url, str(tmp_path / "r.zarr")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"nbdask test: error: {url}: the cube is failed, not complete (the import that wrote it "
        f"failed or was interrupted); rerun the import with --overwrite"], r.stderr
    cube = nbdask.from_anndata(adata, **KEYS, store=url, client=client, overwrite=True,
                               size_factors="poscounts")
    assert cube.attrs["nbdask_status"] == "complete" and cube.attrs["size_factors"] == "poscounts"


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "nbdask.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_import_error_is_one_line_with_its_fix(tmp_path, nbdask_main):
    """The cases found on the workers mid-run, and one found before a cluster starts, through
    the console's process (its whole stderr); the other cases through the CLI's main() here."""
    adata = synthetic(n_cells=600)
    x = adata.X.toarray()
    adata.layers["normalised"] = x / np.maximum(x.sum(axis=1, keepdims=True), 1) * 1e4
    negative = x.copy()
    negative[450, 3] = -1
    adata.layers["negative"] = negative
    adata.obs["donor_of_treated"] = adata.obs["donor"].where(
        ~adata.obs["guide"].isin(CONTROLS).to_numpy())
    h5ad = tmp_path / "screen.h5ad"
    adata.write_h5ad(h5ad)
    (tmp_path / "notes.h5ad").write_text("not an HDF5 file\n")
    import h5py

    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["X"] = np.zeros((2, 2))
    done = tmp_path / "done.zarr"
    done.mkdir()
    (done / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    base = ["import", "anndata", h5ad, tmp_path / "out.zarr", "--sample-key", "donor"]
    ok = ["--perturbation-key", "guide", "--control", "NTC-1", "--control", "NTC-2"]
    in_process = {
        "control absent": (base + ["--perturbation-key", "guide", "--control", "NTC"],
                           "control: 'NTC' is not a value of 'guide'", "--control NTC-1"),
        "control in no sample": (
            ["import", "anndata", h5ad, tmp_path / "out.zarr", "--sample-key", "donor_of_treated",
             *ok], "have no 'donor_of_treated' label, so they are present in no sample",
            "label them with their sample"),
        "fewer than 2 controls": (base + ok + ["--min-cells", "1000"],
                                  "only 0 sample(s) have >= 1000 control cells",
                                  "lower min_cells (--min-cells)"),
        "missing layer": (base + ok + ["--layer", "raw"], "layer 'raw': not in",
                          "its layers: ['negative', 'normalised']"),
        "not HDF5": (["import", "anndata", tmp_path / "notes.h5ad", tmp_path / "o.zarr",
                      "--sample-key", "donor", *ok], "notes.h5ad: not an AnnData file",
                     "pass an .h5ad file or an AnnData .zarr store"),
        "HDF5, not AnnData": (["import", "anndata", tmp_path / "plain.h5", tmp_path / "o.zarr",
                               "--sample-key", "donor", *ok],
                              "plain.h5: not an AnnData file (its root's encoding-type is None",
                              "adata.write_h5ad"),
        "no such file": (["import", "anndata", tmp_path / "missing.h5ad", tmp_path / "o.zarr",
                          "--sample-key", "donor", *ok], "no such file or directory",
                         "pass an .h5ad file"),
        "output exists": (["import", "anndata", h5ad, done, "--sample-key", "donor", *ok],
                          "done.zarr: a store already exists", "--overwrite"),
    }
    in_a_process = {
        "missing key": (base + ["--perturbation-key", "sgRNA", "--control", "NTC-1"],
                        "perturbation_key='sgRNA': not a column of", "pass the obs column"),
        "non-integer": (["import", "anndata", h5ad, tmp_path / "out_ni.zarr", "--sample-key",
                         "donor", *ok, "--layer", "normalised"],
                        "non-integer value(s), e.g. ", "pass raw integer counts"),
        "negative, in a later chunk": (
            base + ok + ["--layer", "negative", "--chunk-cells", "100", "--workers", "1",
                         "--no-progress"],
            "1 negative value(s), e.g. -1 at cell 450 (0-based row), feature 'gene3'",
            "pass raw integer counts"),
    }
    runs = {name: _cli(*args) for name, (args, *_) in in_a_process.items()}
    results = {name: nbdask_main(*args) for name, (args, *_) in in_process.items()}
    for name, run in runs.items():
        out, err = run.communicate(timeout=600)
        results[name] = (run.returncode, out, err)
    for name, (args, problem, fix) in {**in_process, **in_a_process}.items():
        code, out, err = results[name]
        lines = [line for line in err.splitlines() if not line.startswith(NANNY)]
        assert code == 2 and out == "", (name, out, err)
        assert len(lines) == 1 and lines[0].startswith("nbdask import: error: "), (name, err)
        assert problem in lines[0] and fix in lines[0], (name, lines[0])
    import zarr

    for store in ("out.zarr", "out_ni.zarr", "o.zarr"):  # none that looks complete
        path = tmp_path / store
        assert not path.exists() or zarr.open_group(path, mode="r").attrs["nbdask_status"] == "failed"


def test_features_take_their_ids_from_a_var_column(tmp_path, nbdask_main):
    """10x-style var: gene symbols as var_names with duplicates, unique Ensembl ids in
    var["gene_ids"]. feature_key labels the cube by the ids (in memory, .h5ad, .zarr, the CLI),
    with the same counts as an import whose var_names are the ids; without it, or with a
    column that cannot label features, one line names the column to pass."""
    adata = synthetic(n_cells=600, seed=2)
    ids = [f"ENSG{j:011d}" for j in range(adata.n_vars)]
    symbols = [f"SYM{j}" for j in range(adata.n_vars)]
    symbols[5] = symbols[9] = "TBCE"
    adata.var_names = symbols
    adata.var["gene_ids"] = ids
    adata.var["feature_types"] = "Gene Expression"
    adata.var["gene_symbol_or_na"] = pd.Series([*ids[:-1], None], index=adata.var_names,
                                               dtype=object)
    by_id = adata.copy()
    by_id.var_names = ids
    h5ad, store = tmp_path / "screen.h5ad", tmp_path / "screen.zarr"
    adata.write_h5ad(h5ad)
    adata.write_zarr(store)
    opts = dict(KEYS, min_cells=10, chunk_cells=200, shards=(3, 8))
    reference = nbdask.from_anndata(by_id, **opts)
    for source in (adata, str(h5ad), str(store)):
        cube = nbdask.from_anndata(source, feature_key="gene_ids", **opts)
        assert list(cube.feature.values) == ids, source
        assert list(cube.feature_name.values) == symbols, source  # the var names name them
        np.testing.assert_array_equal(cube.counts.values, reference.counts.values)
        np.testing.assert_array_equal(cube.control_counts.values, reference.control_counts.values)

    out = tmp_path / "cli.zarr"
    code, stdout, err = nbdask_main("import", "anndata", h5ad, out, "--perturbation-key", "guide",
                                    "--sample-key", "donor", "--control", "NTC-1", "--control",
                                    "NTC-2", "--feature-key", "gene_ids", "--workers", "1",
                                    "--no-progress")
    assert code == 0, err
    assert "feature names        from var_names (ids from var column gene_ids)" in stdout
    assert list(nbdask.open_cube(str(out)).feature.values) == ids

    cases = {
        None: ["var_names are not unique (e.g. ['TBCE'])",
               "pass a var column of unique ids as feature_key (--feature-key; here: ['gene_ids'])",
               "adata.var_names_make_unique()"],
        "gene_id": ["feature_key='gene_id': not a column of",
                    "its columns: ['gene_ids', 'feature_types', 'gene_symbol_or_na']"],
        "feature_types": ["var column 'feature_types' are not unique (e.g. ['Gene Expression'])",
                          "here: ['gene_ids']"],
        "gene_symbol_or_na": ["1 feature(s) have no value in",
                              "pass a var column with an id for every feature"],
    }
    for key, parts in cases.items():
        for source in (adata, str(h5ad)):
            with pytest.raises(nbdask.SourceError) as err:
                nbdask.from_anndata(source, feature_key=key, **opts)
            assert all(part in str(err.value) for part in parts), (key, str(err.value))
    code, stdout, err = nbdask_main("import", "anndata", h5ad, out, "--perturbation-key", "guide",
                                    "--sample-key", "donor", "--control", "NTC-1", "--overwrite")
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
    assert err.startswith("nbdask import: error: ") and "--feature-key" in err, err

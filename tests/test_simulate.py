"""The simulator: reproducible, ragged as asked, NB2 moments as specified, sharded on disk."""

import numpy as np
import zarr

import nbdask


def test_reproducible_by_seed():
    a = nbdask.simulate(perturbations=30, features=20, seed=4, chunks=10).load()
    b = nbdask.simulate(perturbations=30, features=20, seed=4, chunks=10).load()
    c = nbdask.simulate(perturbations=30, features=20, seed=5, chunks=10).load()
    assert a.identical(b)
    assert not np.array_equal(a["counts"].values, c["counts"].values)


def test_ragged_replicates_and_effects():
    cube = nbdask.simulate(perturbations=400, features=50, replicates=10, effect_fraction=0.2,
                           ragged_fraction=0.5, seed=1, chunks=100).load()
    present = np.isfinite(cube["size_factor"].values).sum(axis=1)
    assert present.min() >= 2 and present.max() == 10
    assert 0.35 < (present < 10).mean() < 0.6
    absent = ~np.isfinite(cube["size_factor"].values)
    assert (cube["counts"].values[np.broadcast_to(absent[:, None, :], cube["counts"].shape)] == 0).all()
    lfc = cube["true_log_fold_change"].values
    assert 0.17 < (lfc != 0).mean() < 0.23
    assert np.abs(lfc[lfc != 0]).min() >= 0.5


def test_nb2_moments_match_truth():
    """Control counts of many features: mean l*exp(mu) and Var = m + phi m^2 per feature."""
    cube = nbdask.simulate(perturbations=2, features=4, control_replicates=20000,
                           base_mean=(5, 5), dispersion=(0.5, 0.5), seed=2, chunks=2).load()
    y = cube["control_counts"].values.astype(float)
    sf = cube["control_size_factor"].values
    q = y / sf
    assert np.allclose(q.mean(axis=1), 5.0, rtol=0.03)
    # Var(q) = mean/l + phi * mean^2, averaged over samples
    expected_var = 5.0 * np.mean(1 / sf) + 0.5 * 25.0
    assert np.allclose(q.var(axis=1), expected_var, rtol=0.08)


def test_default_base_means_have_mass_on_1_to_10():
    cube = nbdask.simulate(perturbations=2, features=5000, seed=3, chunks=1000)
    mean = np.exp(cube["true_log_base_mean"].values)
    assert mean.min() >= 0.1 - 1e-6 and mean.max() <= 1000 + 1e-3
    assert 0.5 < ((mean >= 1) & (mean <= 10)).mean() < 0.8


def test_written_as_sharded_zarr_v3(tmp_path):
    path = str(tmp_path / "c.zarr")
    nbdask.save_cube(nbdask.simulate(perturbations=40, features=30, seed=0, chunks=16), path)
    group = zarr.open_group(path, mode="r")
    assert group.metadata.zarr_format == 3
    assert group["counts"].shards == (16, 16, 4)
    assert group["counts"].dtype == np.int32
    assert "true_log_fold_change" in group

"""The fused numba kernels equal the array-API kernels they accelerate."""

import math

import numpy as np
import pytest

import nbdask
from nbdask.kernels.exact import conditional_outputs, max_total
from nbdask.kernels.irls import irls_kernel
from nbdask.kernels.mom import mom_kernel
from conftest import edge_case_cube

mom_fused = pytest.importorskip("nbdask.kernels.mom.fused").mom_fused
irls_fused = pytest.importorskip("nbdask.kernels.irls.fused").irls_fused
INPUTS = ("counts", "size_factor", "control_counts", "control_size_factor")


def arrays(cube):
    return [cube[v].values for v in INPUTS]


def pooled_options(mode, g, seed):
    """The kernel options of a dispersion mode, with random per-feature values for g features."""
    rng = np.random.default_rng(seed)
    return {"comparison": {},
            "feature": {"feature_dispersion": rng.uniform(0.01, 1.0, g)},
            "shrunk": {"feature_dispersion": rng.uniform(0.01, 1.0, g),
                       "dispersion_spread": rng.uniform(0.0, 0.5, g)}}[mode]


@pytest.mark.parametrize("mode", ["comparison", "feature", "shrunk"])
@pytest.mark.parametrize("seed", [3, 4])
def test_mom_fused_equals_array_kernel(seed, mode):
    a = arrays(edge_case_cube(seed=seed))
    pooled = pooled_options(mode, a[2].shape[0], seed)
    ref, got = mom_kernel(*a, **pooled), mom_fused(*a, **pooled)
    for k in ref:
        assert got[k].dtype == ref[k].dtype
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12 if k == "p_value" else 1e-6, err_msg=k)
        assert np.array_equal(np.isnan(got[k]), np.isnan(ref[k])), k


@pytest.mark.parametrize("mode", ["comparison", "feature", "shrunk"])
@pytest.mark.parametrize("test", ["auto", "exact"])
def test_mom_fused_runs_the_exact_test_as_its_own_pass_does(mode, test):
    """``max_exact_total`` (what ``nbdask.test`` passes the twin) gives, bit for bit, the
    outputs of the Wald kernel followed by the separate exact pass, and those of the array-API
    kernel and exact test to rounding."""
    cube = nbdask.simulate(perturbations=40, features=60, ragged_fraction=0.3, seed=11, chunks=60,
                           base_mean=(0.2, 20)).load()
    a = arrays(cube)
    pooled = pooled_options(mode, a[2].shape[0], 11)
    wald = mom_fused(*a, **pooled)
    passes = conditional_outputs(wald, *a, test=test, engine="numba")
    got = mom_fused(*a, **pooled, max_exact_total=max_total(test))
    for k in passes:
        assert got[k].dtype == passes[k].dtype, k
        np.testing.assert_array_equal(got[k], passes[k], err_msg=k)
    replaced = np.isfinite(wald["p_value"]) & (got["p_value"] != wald["p_value"])
    assert replaced.mean() > (0.3 if test == "auto" else 0.9)
    definition = conditional_outputs(mom_kernel(*a, **pooled), *a, test=test, engine="array")
    np.testing.assert_allclose(got["p_value"], definition["p_value"], rtol=1e-9)
    np.testing.assert_allclose(got["statistic"], definition["statistic"], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"test": "lrt"}, {"dispersion_fit": "cox-reid"}])
def test_irls_fused_equals_array_kernel(options):
    cube = nbdask.simulate(perturbations=60, features=80, ragged_fraction=0.4, seed=9, chunks=80).load()
    a = arrays(cube)
    ref, got = irls_kernel(*a, **options), irls_fused(*a, **options)
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        assert np.array_equal(np.isnan(got[k].astype(float)), np.isnan(ref[k].astype(float))), k
    # Where the profile likelihood has a well-defined interior optimum the fits agree closely;
    # below phi = 1e-4 the profile is flat and both stop at slightly different near-Poisson points.
    interior = (ref["log_dispersion"] > math.log(1e-4)) & ref["converged"]
    assert interior.sum() > 1000
    np.testing.assert_allclose(got["log_fold_change"][interior], ref["log_fold_change"][interior], atol=1e-5)
    np.testing.assert_allclose(got["log_base_mean"][interior], ref["log_base_mean"][interior], atol=1e-5)
    np.testing.assert_allclose(got["log_dispersion"][interior], ref["log_dispersion"][interior], atol=1e-3)
    np.testing.assert_allclose(got["p_value"][interior], ref["p_value"][interior], rtol=1e-3, atol=1e-8)
    assert (got["converged"] == ref["converged"]).mean() > 0.999
    assert np.isfinite(got["log_fold_change"][np.isfinite(got["p_value"])]).all()


def test_irls_fused_edge_cases_match():
    a = arrays(edge_case_cube())
    ref, got = irls_kernel(*a), irls_fused(*a)
    np.testing.assert_array_equal(np.isnan(got["p_value"]), np.isnan(ref["p_value"]))
    np.testing.assert_array_equal(got["converged"], ref["converged"])
    np.testing.assert_allclose(got["log_fold_change"], ref["log_fold_change"], atol=1e-4)


def test_pipeline_engines_agree():
    cube = nbdask.simulate(perturbations=40, features=40, seed=2, chunks=20)
    for mode in ("comparison", "feature", "shrunk"):
        a = nbdask.test(cube, method="mom", engine="numba", dispersion=mode).compute()
        b = nbdask.test(cube, method="mom", engine="array", dispersion=mode).compute()
        np.testing.assert_allclose(a["p_value"].values, b["p_value"].values, rtol=1e-12)
    with pytest.raises(nbdask.OptionError, match="^engine="):
        nbdask.test(cube, engine="gpu")

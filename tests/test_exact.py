"""Conditional exact test (``test="exact"|"auto"``) against closed forms computed here with scipy."""

import numpy as np
import pytest
from scipy import special, stats

import nbdask
from nbdask.kernels.exact import AUTO_MAX_TOTAL, conditional_outputs
from nbdask.kernels.mom import mom_kernel

from conftest import edge_case_cube
from test_mom import BACKENDS, host, to_backend

ENGINES = ["numba", "array"]


def doubled_midp(logpmf, t):
    """Two-sided mid-p by doubling the smaller tail (edgeR's "doubletail"), in log space."""
    half = logpmf[t] + np.log(0.5)
    lower = special.logsumexp(np.append(logpmf[:t], half))
    upper = special.logsumexp(np.append(logpmf[t + 1:], half))
    return min(1.0, float(2.0 * np.exp(min(lower, upper) - special.logsumexp(logpmf))))


def random_block(seed, p=5, g=40, r=4, c=6, *, equal=False, mean=3.0):
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(2, 2 / (2 + mean), (p, g, r)).astype(np.int32)
    control = rng.negative_binomial(2, 2 / (2 + mean), (g, c)).astype(np.int32)
    sf = np.ones((p, r)) if equal else np.exp(rng.normal(0, 0.4, (p, r)))
    csf = np.ones(c) if equal else np.exp(rng.normal(0, 0.4, c))
    sf[0, -1] = np.nan  # a ragged perturbation
    counts[0, :, -1] = 0
    return counts, sf, control, csf


def wald_like(p, g, log_phi):
    """A stand-in kernel output: finite Wald p-values and the dispersion the test should use."""
    return {"p_value": np.full((p, g), 0.5), "statistic": np.zeros((p, g), np.float32),
            "log_dispersion": np.broadcast_to(np.float32(log_phi), (p, g))}


def run(backend, engine, out, *arrays, test="exact"):
    if backend == "cupy" and engine == "numba":
        pytest.skip("the numba walk takes host arrays only")
    arrays = to_backend(backend, *arrays)
    out = dict(zip(out, to_backend(backend, *out.values())))
    return {k: host(v) for k, v in conditional_outputs(out, *arrays, test=test, engine=engine).items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("phi", [0.05, 0.7, 3.0])
def test_equal_size_factors_match_the_beta_binomial(backend, engine, phi):
    """Two NB totals with one success probability: S_T | s is beta-binomial(s, n_T/phi, n_C/phi)."""
    counts, sf, control, csf = random_block(1, equal=True)
    p, g, _ = counts.shape
    got = run(backend, engine, wald_like(p, g, np.log(phi)), counts, sf, control, csf)["p_value"]
    phi32 = float(np.exp(np.float64(np.float32(np.log(phi)))))
    for i in range(p):
        n_t = int(np.isfinite(sf[i]).sum())
        for j in range(g):
            t = int(counts[i, j, :n_t].sum())
            s = t + int(control[j].sum())
            if s == 0:
                assert np.isnan(got[i, j]) or got[i, j] == 0.5  # untestable: kernel p kept
                continue
            logpmf = stats.betabinom.logpmf(np.arange(s + 1), s, n_t / phi32, len(csf) / phi32)
            assert got[i, j] == pytest.approx(doubled_midp(logpmf, t), rel=1e-9), (i, j)


@pytest.mark.parametrize("engine", ENGINES)
def test_poisson_limit_is_the_binomial_test_even_far_in_the_tail(engine):
    """phi -> 0 with unequal size factors: S_T | s ~ binomial(s, L_T / (L_T + L_C)); the walk
    rescales past 1e280, so p-values near 1e-290 come out right."""
    counts, sf, control, csf = random_block(2)
    counts[1, 0, :] = [300, 300, 300, 300]  # far upper tail
    control[0, :] = 0
    counts[2, 1, :] = 0  # lower tail: everything in the control
    control[1, :] = 120
    p, g, _ = counts.shape
    got = run("numpy", engine, wald_like(p, g, np.log(1e-12)), counts, sf, control, csf)["p_value"]
    checked = 0
    for i in range(p):
        present = np.isfinite(sf[i])
        share = sf[i, present].sum() / (sf[i, present].sum() + csf.sum())
        for j in range(g):
            t = int(counts[i, j, present].sum())
            s = t + int(control[j].sum())
            if s == 0:
                continue
            expected = doubled_midp(stats.binom.logpmf(np.arange(s + 1), s, share), t)
            assert got[i, j] == pytest.approx(expected, rel=1e-6), (i, j, expected)
            checked += 1
    assert got[1, 0] < 1e-250 and got[2, 1] < 1e-100 and checked > 150


@pytest.mark.parametrize("engine", ENGINES)
def test_unequal_size_factors_use_moment_matched_group_totals(engine):
    """The documented approximation: NB(r L_g, L_g^2 / (phi sum l^2)) per group, r = s / (L_T + L_C)."""
    counts, sf, control, csf = random_block(3, mean=6.0)
    p, g, _ = counts.shape
    phi = 0.4
    got = run("numpy", engine, wald_like(p, g, np.log(phi)), counts, sf, control, csf)["p_value"]
    phi = float(np.exp(np.float64(np.float32(np.log(phi)))))
    for i in (0, 3):
        present = np.isfinite(sf[i])
        lt, lc = sf[i, present], csf
        for j in range(g):
            t = int(counts[i, j, present].sum())
            s = t + int(control[j].sum())
            r = s / (lt.sum() + lc.sum())
            k = np.arange(s + 1)

            def nb(x, ell):
                size = ell.sum() ** 2 / (phi * (ell ** 2).sum())
                return stats.nbinom.logpmf(x, size, size / (size + r * ell.sum()))

            assert got[i, j] == pytest.approx(doubled_midp(nb(k, lt) + nb(s - k, lc), t), rel=1e-9)


def test_auto_changes_only_small_totals_and_the_statistic_matches_p():
    cube = edge_case_cube()
    arrays = [cube[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")]
    wald = mom_kernel(*arrays)
    auto = conditional_outputs(wald, *arrays, test="auto")
    exact = conditional_outputs(wald, *arrays, test="exact")
    counts, sf = arrays[0], arrays[1]
    total = np.where(np.isfinite(sf)[:, None, :], counts, 0).sum(-1) + arrays[2].sum(-1)[None, :]
    small = total <= AUTO_MAX_TOTAL
    np.testing.assert_array_equal(auto["p_value"][~small], wald["p_value"][~small])
    np.testing.assert_array_equal(auto["p_value"][small], exact["p_value"][small])
    np.testing.assert_array_equal(np.isnan(exact["p_value"]), np.isnan(wald["p_value"]))
    ok = np.isfinite(exact["p_value"])
    np.testing.assert_allclose(2 * stats.norm.sf(np.abs(exact["statistic"][ok].astype(float))),
                               exact["p_value"][ok], rtol=2e-5, atol=1e-7)
    # the sign follows the direction of the treated total against its expectation
    lt = np.where(np.isfinite(sf), sf, 0).sum(-1)[:, None]
    obs = np.where(np.isfinite(sf)[:, None, :], counts, 0).sum(-1)
    direction = np.sign(obs * arrays[3].sum() - (total - obs) * lt)
    moved = ok & (np.abs(exact["statistic"]) > 1e-3)
    np.testing.assert_array_equal(np.sign(exact["statistic"][moved]), direction[moved])


def test_engines_agree_on_a_cube():
    cube = nbdask.simulate(perturbations=60, features=80, seed=9, chunks=60).load()
    a = [cube[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")]
    wald = mom_kernel(*a)
    fused = conditional_outputs(wald, *a, test="exact", engine="numba")
    array = conditional_outputs(wald, *a, test="exact", engine="array")
    np.testing.assert_allclose(fused["p_value"], array["p_value"], rtol=1e-10)
    # the numba path's normal quantile (Acklam) against scipy's ndtri, at float32 precision
    np.testing.assert_allclose(fused["statistic"], array["statistic"], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["mom", "irls", "transformer"])
def test_every_method_offers_the_conditional_tests(method):
    cube = nbdask.simulate(perturbations=12, features=20, seed=10, base_mean=(0.3, 4), chunks=12).load()
    # Without the trend prior the p-values are the plug-in ones (no averaging over a posterior).
    res = nbdask.test(cube, method=method, fdr="none", dispersion_prior="none")
    assert res.attrs["test"] == "auto"
    wald = nbdask.test(cube, method=method, test="wald", fdr="none", dispersion_prior="none")
    a = [cube[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")]
    expected = conditional_outputs({k: wald[k].values for k in wald.data_vars}, *a, test="auto")
    np.testing.assert_allclose(res["p_value"].values, expected["p_value"], rtol=1e-12)
    assert np.mean(res["p_value"].values != wald["p_value"].values) > 0.5  # low counts: mostly exact

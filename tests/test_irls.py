"""Batched ML (IRLS) against statsmodels, R/verified optima, and a direct scipy Cox–Reid fit."""

import csv
import math
import warnings
from collections import defaultdict

import numpy as np
import pytest
from scipy import optimize, stats

from nbdask.kernels.irls import MAX_LOG_FOLD_CHANGE, irls_kernel
from nbdask.kernels.mom import MIN_DISPERSION
from conftest import SHARED
from test_mom import BACKENDS, host, to_backend

LOG_FLOOR = math.log(MIN_DISPERSION)


def regime_blocks(seed=7):
    """Blocks spanning 2–10 control and 2–10 treated replicates, means 0.5–50, phi 0.01–2.

    Returns a list of (counts, size_factor, control_counts, control_size_factor) blocks of
    12 perturbations x 10 features each (600 comparisons), with zeros and ragged replicates.
    """
    rng = np.random.default_rng(seed)
    blocks = []
    for c in (2, 3, 5, 8, 10):
        p, g, r = 12, 10, 10
        mean = np.exp(rng.uniform(np.log(0.5), np.log(50), g))
        phi = np.exp(rng.uniform(np.log(0.01), np.log(2), g))
        sf = np.exp(rng.normal(0, 0.4, (p, r)))
        n_present = rng.integers(2, r + 1, p)
        sf[np.arange(r)[None, :] >= n_present[:, None]] = np.nan
        csf = np.exp(rng.normal(0, 0.4, c))
        lfc = np.where(rng.random((p, g)) < 0.5, rng.normal(0, 1, (p, g)), 0.0)
        m = np.nan_to_num(sf)[:, None, :] * (mean * np.exp(lfc))[:, :, None]
        y = rng.poisson(rng.gamma(1 / phi[None, :, None], phi[None, :, None] * np.maximum(m, 1e-12)))
        yc = rng.poisson(rng.gamma(1 / phi[:, None], phi[:, None] * mean[:, None] * csf))
        blocks.append((y.astype(np.int64), sf, yc.astype(np.int64), csf))
    return blocks


def comparisons(block):
    y, sf, yc, csf = block
    for i in range(y.shape[0]):
        keep = np.isfinite(sf[i])
        for j in range(y.shape[1]):
            yield i, j, yc[j].astype(float), csf, y[i, j][keep].astype(float), sf[i][keep]


def nb_loglik(y, m, log_phi):
    """NB2 log-likelihood by scipy.stats.nbinom (n = 1/phi, p = 1/(1 + phi m))."""
    phi = math.exp(log_phi)
    return float(stats.nbinom.logpmf(y, 1 / phi, 1 / (1 + phi * m)).sum())


def statsmodels_fit(y, X, exposure):
    from statsmodels.discrete.discrete_model import NegativeBinomial

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit = NegativeBinomial(y, X, exposure=exposure).fit(method="newton", maxiter=200, disp=0)
        except Exception:
            return None
    ok = fit.mle_retvals.get("converged", False) and np.all(np.isfinite(fit.params))
    return fit if ok else None


@pytest.fixture(scope="module")
def regime():
    blocks = regime_blocks()
    wald = [irls_kernel(*b) for b in blocks]
    lrt = [irls_kernel(*b, test="lrt") for b in blocks]
    return blocks, wald, lrt


def test_matches_statsmodels_across_the_regime(regime):
    blocks, wald, lrt = regime
    n = checked = failed = failed_finite = 0
    worst = defaultdict(float)
    for block, out, out_lrt in zip(blocks, wald, lrt):
        for i, j, yc, csf, yt, sft in comparisons(block):
            n += 1
            y = np.concatenate([yc, yt])
            x = np.concatenate([np.zeros(len(yc)), np.ones(len(yt))])
            ex = np.concatenate([csf, sft])
            if yc.sum() == 0 or yt.sum() == 0:
                continue  # no finite ML estimate: covered by the boundary tests
            fit = statsmodels_fit(y, np.column_stack([np.ones_like(x), x]), ex)
            if fit is None:
                failed += 1
                failed_finite += all(np.isfinite(out[k][i, j]) for k in
                                     ("log_fold_change", "log_dispersion", "standard_error", "p_value"))
                continue
            phi_sm = fit.params[2]
            if phi_sm <= 1e-4:
                assert out["log_dispersion"][i, j] < math.log(1e-3)
                continue
            checked += 1
            mu, beta, la = (float(out[k][i, j]) for k in ("log_base_mean", "log_fold_change", "log_dispersion"))
            diffs = {"mu": abs(mu - fit.params[0]), "beta": abs(beta - fit.params[1]),
                     "log_phi": abs(la - math.log(phi_sm)),
                     "se_rel": abs(float(out["standard_error"][i, j]) / fit.bse[1] - 1)}
            # Log-likelihood at nbdask's estimates (float32 outputs) equals statsmodels' optimum.
            ll = nb_loglik(y, ex * np.exp(mu + beta * x), la)
            diffs["llf"] = abs(ll - fit.llf)
            for k, v in diffs.items():
                worst[k] = max(worst[k], v)
            # LRT against statsmodels fits of both models.
            fit0 = statsmodels_fit(y, np.ones((len(y), 1)), ex)
            if fit0 is not None and fit0.params[1] > 1e-4:
                lr = 2 * (fit.llf - fit0.llf)
                worst["lrt"] = max(worst["lrt"], abs(float(out_lrt["statistic"][i, j]) - lr) / max(1.0, lr))
    print(f"\n{n} comparisons, {checked} checked against statsmodels, statsmodels failed on {failed} "
          f"(nbdask finite there: {failed_finite}); worst differences: {dict(worst)}")
    assert failed_finite == failed
    assert n >= 500 and checked >= 250
    assert worst["mu"] < 1e-4 and worst["beta"] < 1e-4 and worst["log_phi"] < 1e-3
    assert worst["se_rel"] < 1e-3
    assert worst["llf"] < 1e-6
    assert worst["lrt"] < 1e-4


def test_full_precision_loglik_matches_statsmodels():
    """At float64 precision the fitted optimum equals statsmodels' to 1e-6 in log-likelihood."""
    from nbdask.kernels.irls.array import _Group, fit_nb
    import scipy.special as sp

    blocks = regime_blocks(seed=8)
    worst = 0.0
    for y, sf, yc, csf in blocks[2:4]:
        present = np.isfinite(sf)
        groups = [_Group(np, yc[None], csf[None, None], np.ones((1, 1, len(csf)), bool)),
                  _Group(np, y, sf[:, None, :], present[:, None, :])]
        (tc, tt), alpha, conv, _, capped = fit_nb(np, sp, groups, [0, 1], tol=1e-10)
        tc = np.broadcast_to(tc, alpha.shape)
        for i in range(y.shape[0]):
            keep = present[i]
            for j in range(y.shape[1]):
                if capped[i, j] or yc[j].sum() == 0:
                    continue
                yy = np.concatenate([yc[j], y[i, j][keep]]).astype(float)
                x = np.concatenate([np.zeros(len(csf)), np.ones(keep.sum())])
                ex = np.concatenate([csf, sf[i][keep]])
                fit = statsmodels_fit(yy, np.column_stack([np.ones_like(x), x]), ex)
                if fit is None or fit.params[2] <= 1e-4:
                    continue
                ll = nb_loglik(yy, ex * np.exp(tc[i, j] + (tt[i, j] - tc[i, j]) * x), alpha[i, j])
                worst = max(worst, abs(ll - fit.llf))
    assert worst < 1e-6, worst


def load_fixture():
    inputs = defaultdict(lambda: ([], [], [], []))
    with open(SHARED / "fixtures" / "nb_two_group_input.csv") as fh:
        for r in csv.DictReader(fh):
            yc, sc, yt, st = inputs[int(r["comparison"])]
            (yt if r["treated"] == "1" else yc).append(int(r["count"]))
            (st if r["treated"] == "1" else sc).append(float(r["size_factor"]))
    with open(SHARED / "fixtures" / "nb_two_group_reference_fits.csv") as fh:
        fits = {int(r["comparison"]): r for r in csv.DictReader(fh)}
    return inputs, fits


@pytest.mark.parametrize("mode,prefix", [("ml", "ml"), ("cox-reid", "cr")])
def test_matches_verified_optima_fixture(mode, prefix):
    """R/verified ML and Cox–Reid optima of 2,100 comparisons (fixtures/README.md)."""
    inputs, fits = load_fixture()
    worst = defaultdict(float)
    worst["boundary_log_dispersion"] = -math.inf
    n_checked = n_boundary = 0
    # Control size factors differ per comparison here, so each comparison is its own block.
    for cid, (yc, sc, yt, st) in sorted(inputs.items()):
        out = irls_kernel(np.array([[yt]]), np.array([st]), np.array([yc]), np.array(sc),
                          dispersion_fit=mode)
        f = fits[cid]
        if not f[f"{prefix}_log_dispersion"]:
            assert not out["converged"][0, 0]
            continue
        if float(f[f"{prefix}_log_dispersion"]) < math.log(1e-4):
            n_boundary += 1
            worst["boundary_log_dispersion"] = max(worst["boundary_log_dispersion"],
                                                   float(out["log_dispersion"][0, 0]))
            continue
        n_checked += 1
        for name in ("log_base_mean", "log_fold_change", "log_dispersion"):
            worst[name] = max(worst[name], abs(float(out[name][0, 0]) - float(f[f"{prefix}_{name}"])))
        assert out["converged"][0, 0]
    print(f"\n{mode}: {n_checked} interior optima checked, {n_boundary} at the Poisson boundary; {dict(worst)}")
    assert n_checked > 1000
    assert worst["log_base_mean"] < 1e-5 and worst["log_fold_change"] < 1e-5
    assert worst["log_dispersion"] < 1e-4
    assert worst["boundary_log_dispersion"] < math.log(1e-3)


def cox_reid_direct(yc, sc, yt, st):
    """Maximise l(mu_hat(phi), beta_hat(phi), phi) - 1/2 log det(X'WX) with scipy.optimize."""
    y = np.concatenate([yc, yt])
    x = np.concatenate([np.zeros(len(yc)), np.ones(len(yt))])
    ex = np.concatenate([sc, st])
    X = np.column_stack([np.ones_like(x), x])

    def inner(log_phi):
        phi = math.exp(log_phi)

        def nll(b):
            m = ex * np.exp(X @ b)
            return -stats.nbinom.logpmf(y, 1 / phi, 1 / (1 + phi * m)).sum()

        start = np.array([math.log(yc.sum() / sc.sum()), math.log(yt.sum() / st.sum() * sc.sum() / yc.sum())])
        return optimize.minimize(nll, start, method="BFGS", options={"gtol": 1e-10}).x, nll

    def objective(log_phi):
        b, nll = inner(log_phi)
        m = ex * np.exp(X @ b)
        w = m / (1 + math.exp(log_phi) * m)
        return nll(b) + 0.5 * np.linalg.slogdet(X.T @ (w[:, None] * X))[1]

    res = optimize.minimize_scalar(objective, bounds=(-12, 6), method="bounded", options={"xatol": 1e-7})
    return res.x


def test_cox_reid_against_direct_scipy_maximisation():
    rng = np.random.default_rng(21)
    checked = 0
    for _ in range(40):
        nc, nt = rng.integers(2, 8, 2)
        phi, mean = math.exp(rng.uniform(-3, 0.5)), math.exp(rng.uniform(0.5, 3))
        sc, st = np.exp(rng.normal(0, 0.3, nc)), np.exp(rng.normal(0, 0.3, nt))
        yc = rng.negative_binomial(1 / phi, 1 / (1 + phi * mean * sc)).astype(float)
        yt = rng.negative_binomial(1 / phi, 1 / (1 + phi * 2 * mean * st)).astype(float)
        if yc.sum() == 0 or yt.sum() == 0:
            continue
        out = irls_kernel(yt[None, None, :].astype(np.int64), st[None, :], yc[None, :].astype(np.int64), sc,
                          dispersion_fit="cox-reid")
        direct = cox_reid_direct(yc, sc, yt, st)
        if direct < math.log(1e-4):
            # scipy's nbinom.logpmf loses ~1e-4 at phi < 1e-4, so the direct optimum there is
            # noise; the profile is flat and nbdask must report (near) the Poisson boundary.
            assert out["log_dispersion"][0, 0] < math.log(1e-3)
            continue
        checked += 1
        assert abs(float(out["log_dispersion"][0, 0]) - direct) < 1e-3, (yc, yt)
    assert checked >= 25


def test_boundary_cases():
    # treated all zero (beta diverges), both zero, Poisson-like data, a normal comparison
    yt = np.array([[[0, 0, 0], [0, 0, 0], [5, 5, 5], [3, 9, 1]]])
    yc = np.array([[4, 7, 5, 6], [0, 0, 0, 0], [5, 5, 5, 5], [2, 8, 0, 6]])
    out = irls_kernel(np.stack([yt[0]]).reshape(1, 4, 3), np.ones((1, 3)), yc, np.ones(4))
    beta, p = out["log_fold_change"][0], out["p_value"][0]
    assert not out["converged"][0, 0] and beta[0] == pytest.approx(-MAX_LOG_FOLD_CHANGE, abs=1e-5)
    assert np.isfinite(out["standard_error"][0, 0]) and p[0] > 0.05
    assert np.isnan(p[1])
    assert out["log_dispersion"][0, 2] == pytest.approx(LOG_FLOOR) and out["converged"][0, 2]
    assert beta[2] == pytest.approx(0.0, abs=1e-6)
    assert out["converged"][0, 3] and np.isfinite(p[3])
    lrt = irls_kernel(np.stack([yt[0]]).reshape(1, 4, 3), np.ones((1, 3)), yc, np.ones(4), test="lrt")
    # LRT with a zero group: finite statistic, a genuine (not spurious) likelihood gain
    assert np.isfinite(lrt["statistic"][0, 0]) and lrt["statistic"][0, 0] > 0
    assert np.isnan(lrt["p_value"][0, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend):
    block = regime_blocks(seed=3)[1]
    ref = irls_kernel(*block)
    got = {k: host(v) for k, v in irls_kernel(*to_backend(backend, *block)).items()}
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6, err_msg=k)

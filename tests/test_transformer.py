"""The pair-set transformer: forward-pass properties, kernel, accuracy against ML, pipeline."""

import json
import warnings

import numpy as np
import pytest

import nbdask
from nbdask.errors import NbdaskWarning, OptionError
from nbdask.kernels import transformer as T
from nbdask.train import prior

from conftest import make_cube
from test_mom import BACKENDS, host, to_backend

PARAMS, META = T.load_weights()
CONFIG = META["config"]


def encoded(n, seed):
    batch = prior.draw(np.random.default_rng(seed), n)
    return batch, prior.encode(batch)


def run(enc, params=PARAMS):
    return T.forward(np, params, CONFIG, enc["tokens_c"], enc["mask_c"], enc["tokens_t"],
                     enc["mask_t"], enc["summary"])


def test_shipped_weights_carry_their_record():
    assert set(META) >= {"config", "encoding", "prior", "training", "parameters", "nbdask_version"}
    t = META["training"]
    assert t["steps"] > 0 and t["examples"] == t["steps"] * t["batch"] and t["seed"] is not None
    assert np.isfinite(t["best_validation_loss"]) and t["curve"]
    assert META["prior"] == json.loads(json.dumps(prior.PRIOR))
    assert sum(v.size for v in PARAMS.values()) == META["parameters"]
    assert all(v.dtype == np.float32 for v in PARAMS.values())


def test_forward_is_invariant_to_order_within_each_set():
    _, enc = encoded(300, seed=11)
    rng = np.random.default_rng(0)
    out = run(enc)
    shuffled = dict(enc)
    for side in ("c", "t"):
        # permute each comparison's present elements among themselves (pads stay at the end)
        tokens, mask = enc[f"tokens_{side}"].copy(), enc[f"mask_{side}"]
        for i in range(len(tokens)):
            k = int(mask[i].sum())
            tokens[i, :k] = tokens[i, rng.permutation(k)]
        shuffled[f"tokens_{side}"] = tokens
    np.testing.assert_allclose(run(shuffled), out, atol=1e-5, rtol=0)
    assert not np.allclose(run({**enc, "tokens_t": shuffled["tokens_c"]}), out, atol=1e-3)


def test_padding_is_invisible():
    """Masked pads (holding garbage) give the same outputs as the unpadded sets."""
    _, enc = encoded(400, seed=12)
    n_c, n_t = 4, 3
    rows = (enc["mask_c"].sum(1) >= n_c) & (enc["mask_t"].sum(1) >= n_t)
    sub = {k: v[rows] for k, v in enc.items()}
    exact = {**sub, "tokens_c": sub["tokens_c"][:, :n_c], "mask_c": np.ones((rows.sum(), n_c), bool),
             "tokens_t": sub["tokens_t"][:, :n_t], "mask_t": np.ones((rows.sum(), n_t), bool)}
    rng = np.random.default_rng(1)
    padded = dict(exact)
    for side, n in (("c", n_c), ("t", n_t)):
        garbage = rng.normal(0, 5, (rows.sum(), 10 - n, T.TOKEN_FEATURES)).astype(np.float32)
        padded[f"tokens_{side}"] = np.concatenate([exact[f"tokens_{side}"], garbage], axis=1)
        padded[f"mask_{side}"] = np.arange(10)[None, :] < n
        padded[f"mask_{side}"] = np.broadcast_to(padded[f"mask_{side}"], (rows.sum(), 10))
    np.testing.assert_allclose(run(padded), run(exact), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_equals_the_network_on_each_comparison(backend):
    """The block kernel (shared control encoding, batching, ragged sets) = one comparison at a time."""
    rng = np.random.default_rng(5)
    p, g, r, c = 7, 5, 4, 6
    sf = np.exp(rng.normal(0, 0.3, (p, r)))
    sf[0, 2:] = np.nan
    sf[3, 3] = np.nan
    csf = np.exp(rng.normal(0.5, 0.3, c))
    counts = rng.poisson(rng.gamma(2.0, 2.0, (p, g, r)))
    ctrl = rng.poisson(rng.gamma(2.0, 2.0, (g, c)))
    arrays = to_backend(backend, counts, sf, ctrl, csf)
    old = T.BATCH
    T.BATCH = 10  # several batches per block
    try:
        out = {k: host(v) for k, v in T.transformer_kernel(*arrays).items()}
    finally:
        T.BATCH = old
    for i in range(p):
        for j in range(g):
            present = np.isfinite(sf[i])
            batch = {"y_c": ctrl[j][None], "l_c": csf[None], "y_t": counts[i, j][present][None],
                     "l_t": sf[i][present][None]}
            enc = prior.encode(batch)
            mu, beta, alpha = T.estimates(np, run(enc), enc["log_rate_c"], enc["beta_mom"], CONFIG)
            assert out["log_base_mean"][i, j] == pytest.approx(mu[0], abs=2e-5)
            assert out["log_fold_change"][i, j] == pytest.approx(beta[0], abs=2e-5)
            assert out["log_dispersion"][i, j] == pytest.approx(alpha[0], abs=2e-5)
    # the plug-in Wald test at the network's estimates (design §6), computed here
    phi, mu, beta = np.exp(out["log_dispersion"]), out["log_base_mean"], out["log_fold_change"]
    m_c = np.exp(mu)[..., None] * csf
    m_t = np.exp(mu + beta)[..., None] * np.nan_to_num(sf)[:, None, :]
    a = (m_c / (1 + phi[..., None] * m_c)).sum(-1)
    b = (m_t / (1 + phi[..., None] * m_t)).sum(-1)
    np.testing.assert_allclose(out["standard_error"], np.sqrt(1 / a + 1 / b), rtol=1e-4)
    from scipy import stats

    np.testing.assert_allclose(out["p_value"], 2 * stats.norm.sf(np.abs(beta / np.sqrt(1 / a + 1 / b))),
                               rtol=1e-3)


def _statsmodels_fits(batch):
    """statsmodels' NegativeBinomial ML (nb2, exposure = size factors) per comparison."""
    from statsmodels.discrete.discrete_model import NegativeBinomial

    est, ok = np.full((len(batch["mu"]), 3), np.nan), np.zeros(len(batch["mu"]), bool)
    for i in range(len(batch["mu"])):
        pc, pt = np.isfinite(batch["l_c"][i]), np.isfinite(batch["l_t"][i])
        y = np.concatenate([batch["y_c"][i][pc], batch["y_t"][i][pt]]).astype(float)
        x = np.concatenate([np.zeros(pc.sum()), np.ones(pt.sum())])
        exposure = np.concatenate([batch["l_c"][i][pc], batch["l_t"][i][pt]])
        model = NegativeBinomial(y, np.column_stack([np.ones_like(x), x]), exposure=exposure,
                                 loglike_method="nb2")
        for method, maxiter in (("newton", 100), ("bfgs", 500)):  # newton, else statsmodels' default
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    fit = model.fit(method=method, maxiter=maxiter, disp=0)
                except Exception:
                    continue
            params = np.asarray(fit.params)
            if fit.mle_retvals.get("converged", False) and np.all(np.isfinite(params)) and params[2] > 0:
                est[i], ok[i] = [params[0], params[1], np.log(params[2])], True
                break
    return est, ok


def test_accuracy_beats_maximum_likelihood_on_fresh_prior_draws(capsys):
    """Held-out draws (a seed training never used): beta MAE below ML's, mu and alpha no worse."""
    batch, enc = encoded(2000, seed=987_654_321)
    mu, beta, alpha = T.estimates(np, run(enc), enc["log_rate_c"], enc["beta_mom"], CONFIG)
    ml, ok = _statsmodels_fits(batch)
    truth = np.stack([batch["mu"], batch["beta"], batch["alpha"]], axis=1)
    net = np.stack([mu, beta, alpha], axis=1)
    # ML has no finite optimum when a group is all zero: compare there too, and without them
    signal = (batch["y_c"].sum(1) > 0) & (batch["y_t"].sum(1) > 0)
    rows = {"ML converged": ok, "ML converged, no all-zero group": ok & signal}
    with capsys.disabled():
        print(f"\n  MAE on {len(ok)} fresh prior draws; statsmodels ML converged on {ok.sum()}, "
              f"{(ok & signal).sum()} of them without an all-zero group")
        print(f"  {'subset':<34}{'method':<13}{'mu':>8}{'beta':>8}{'alpha':>8}")
        for label, sel in rows.items():
            for name, est in (("transformer", net), ("ML", ml)):
                mae = np.abs(est[sel] - truth[sel]).mean(0)
                print(f"  {label:<34}{name:<13}" + "".join(f"{v:8.3f}" for v in mae))
        print(f"  {'all draws':<34}{'transformer':<13}" + "".join(f"{v:8.3f}" for v in np.abs(net - truth).mean(0)))
    assert ok.sum() > 0.6 * len(ok) and np.all(np.isfinite(net))
    for sel in rows.values():
        mae_net, mae_ml = np.abs(net[sel] - truth[sel]).mean(0), np.abs(ml[sel] - truth[sel]).mean(0)
        assert mae_net[1] < mae_ml[1]
        assert mae_net[0] <= mae_ml[0] and mae_net[2] <= mae_ml[2]


def test_pipeline_on_a_cluster_and_through_the_cli(client, tmp_path):
    cube = nbdask.simulate(perturbations=32, features=48, replicates=4, control_replicates=6,
                           effect_fraction=0.2, seed=4, chunks=16)
    path = tmp_path / "cube.zarr"
    nbdask.save_cube(cube, path)
    lazy = nbdask.test(nbdask.open_cube(path), method="transformer", dispersion="comparison", test="wald")
    saved = nbdask.save_results(lazy, tmp_path / "res.zarr", client=client)
    direct = T.transformer_kernel(cube.counts.values, cube.size_factor.values,
                                  cube.control_counts.values, cube.control_size_factor.values)
    # float32 network: other block shapes change BLAS summation order, not the results
    for name in ("log_base_mean", "log_fold_change", "log_dispersion", "p_value"):
        np.testing.assert_allclose(saved[name].values, direct[name], rtol=1e-4, atol=1e-6, equal_nan=True)
    assert saved.attrs["method"] == "transformer" and saved.attrs["n_tests"] > 0
    from scipy.stats import false_discovery_control

    p = saved.p_value.values.ravel()
    np.testing.assert_allclose(saved.q_value.values.ravel()[np.isfinite(p)],
                               false_discovery_control(p[np.isfinite(p)]), rtol=1e-12)
    # more accurate fold changes than per-comparison MoM on the same cube
    mom = nbdask.test(cube, method="mom", dispersion="comparison")
    err = {k: float(np.abs(v.log_fold_change - cube.true_log_fold_change).mean())
           for k, v in (("transformer", saved), ("mom", mom))}
    assert err["transformer"] < err["mom"]

    from nbdask.cli import main

    assert main(["test", str(path), str(tmp_path / "cli.zarr"), "--method", "transformer",
                 "--dispersion", "feature", "--scheduler", client.scheduler.address, "--no-progress"]) == 0
    res = nbdask.open_results(tmp_path / "cli.zarr")
    assert res.attrs["method"] == "transformer" and res.attrs["dispersion"] == "feature"
    # the pooled mode tests at the feature's dispersion, whatever the network says
    np.testing.assert_allclose(res.log_dispersion.values,
                               np.broadcast_to(res.feature_log_dispersion.values, res.log_dispersion.shape),
                               rtol=1e-6)


def test_designs_outside_the_prior_warn_and_bad_weights_fail(tmp_path):
    rng = np.random.default_rng(0)
    cube = make_cube(rng.poisson(3, (4, 5, 3)), np.ones((4, 3)), rng.poisson(3, (5, 12)), np.ones(12))
    with pytest.warns(NbdaskWarning, match="2-10 per group"):
        nbdask.test(cube, method="transformer", dispersion="comparison")
    big = make_cube(rng.poisson(20000, (2, 2, 3)), np.ones((2, 3)), rng.poisson(20000, (2, 4)), np.ones(4))
    with pytest.warns(NbdaskWarning, match="mean counts up to"):
        nbdask.test(big, method="transformer", dispersion="comparison")
    with pytest.raises(OptionError, match="not found"):
        nbdask.test(big, method="transformer", transformer_weights=tmp_path / "missing.npz")


def test_edge_cases_are_finite_where_mom_is_and_untestable_where_it_is():
    """All-zero groups, one or no present replicate, size factors 0.01-100 (design §6 rules)."""
    from conftest import edge_case_cube
    from nbdask.kernels.mom import mom_kernel

    cube = edge_case_cube()
    arrays = [cube[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")]
    with pytest.warns(NbdaskWarning, match="mean counts"):  # the 0.01-100 size factors
        out = T.transformer_kernel(*arrays)
    ref = mom_kernel(*arrays)
    for name in out:
        assert np.array_equal(np.isnan(out[name]), np.isnan(ref[name])), name
        assert not np.isinf(out[name]).any()

"""Dispersion borrowed across features (``dispersion_prior="trend"``): calibration on cubes drawn
around a mean-dispersion trend, the sparse-gene defect, the trend and prior against the truth,
and independent filtering against independent computations."""

import math

import numpy as np
import pytest
from scipy import stats

import nbdask
from nbdask import filtering
from nbdask.bench.generator import TREND, TREND_SCATTER, trended_cube
from nbdask.dispersion import feature_dispersion
from nbdask.kernels.exact import conditional_outputs
from nbdask.kernels.mom import DISPERSION_CEILING, mom_kernel
from nbdask.moderation import PLUG_IN_DOF

from conftest import make_cube

#: design -> (perturbations, features, treated, control replicates)
DESIGNS = {"bulk 2v2": (1, 20000, 2, 2), "bulk 3v3": (1, 20000, 3, 3), "bulk 5v5": (1, 20000, 5, 5),
           "10 perturbations 3v3": (10, 2000, 3, 3), "screen 1000 x 3v6": (1000, 200, 3, 6)}
#: Mean-count bins (expected count at size factor 1). Below 3 counts no test reaches 5%: the
#: oracle (the exact test at the true dispersion) rejects 1-4% there (printed, and held below).
BINS = ((0.5, 1), (1, 3), (3, 10), (10, 100), (100, 1000), (1000, math.inf))
LOW = 3.0


def cube_arrays(cube):
    return [cube[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")]


def per_feature_rates(p, mean, lo, hi):
    """Mean and SE of the rejection rate at 0.05 over the features of a mean-count bin (the
    comparisons of one feature share its control group and dispersion: features are the units)."""
    sel = (mean >= lo) & (mean < hi)
    tested = np.isfinite(p[:, sel]).sum(axis=0)
    rate = (np.where(np.isfinite(p[:, sel]), p[:, sel], 1.0) < 0.05).sum(axis=0)[tested > 0] / tested[tested > 0]
    return float(rate.mean()), float(rate.std(ddof=1) / math.sqrt(rate.size)), rate.size


@pytest.mark.parametrize("design", list(DESIGNS))
def test_null_rate_holds_in_every_design_and_mean_count_bin(design):
    """All-null cubes whose features scatter log-normally around a trend, with estimated size
    factors: from 3 counts up the default rejects 0.04-0.06 at p < 0.05 in every bin (within 2 SE
    of the band); below, at least what the exact test at the true dispersion gets, less 2 SE."""
    p_, g, r, c = DESIGNS[design]
    cube = trended_cube(np.random.default_rng(17), perturbations=p_, features=g, replicates=r,
                        control_replicates=c)
    mean = np.exp(cube["true_log_base_mean"].values)
    p = nbdask.test(cube, fdr="none")["p_value"].values
    arrays = cube_arrays(cube)
    truth = mom_kernel(*arrays, feature_dispersion=np.exp(cube["true_log_dispersion"].values.astype(float)))
    oracle = conditional_outputs(truth, *arrays, test="auto")["p_value"]
    print(f"\n{design}: bin  default (SE)  oracle")
    for lo, hi in BINS:
        rate, se, n = per_feature_rates(p, mean, lo, hi)
        if n < 30:
            continue
        floor, _, _ = per_feature_rates(oracle, mean, lo, hi)
        print(f"  [{lo}, {hi}) {rate:.4f} ({se:.4f})  {floor:.4f}  n={n}")
        assert rate <= 0.06 + 2 * se, (lo, rate, se)
        assert rate >= (0.04 if lo >= LOW else min(floor, 0.04)) - 2 * se, (lo, rate, se, floor)


def test_false_discovery_proportion_with_effects():
    """10% true effects, bulk 3v3 and a 10-perturbation screen: FDP at q < 0.1 at most 0.1."""
    for p_, g, r, c in ((1, 20000, 3, 3), (10, 2000, 3, 3)):
        cube = trended_cube(np.random.default_rng(5), perturbations=p_, features=g, replicates=r,
                            control_replicates=c, effect_fraction=0.1)
        q = nbdask.test(cube)["q_value"].values
        hit = q < 0.1
        null = cube["true_log_fold_change"].values == 0
        fdp = (hit & null).sum() / max(hit.sum(), 1)
        power = (hit & ~null).sum() / (~null).sum()
        print(f"\n{p_} x {g}, {r}v{c}: FDP {fdp:.4f}, power {power:.3f}, {hit.sum()} hits")
        assert fdp <= 0.1
        assert power > 0.2


def test_trend_and_prior_recover_the_simulated_ones():
    """The fitted trend follows a0 + a1 / mean (the prior's centre within 25% of the truth's
    median at 5-1000 counts) and the prior's spread is the simulated log-normal scatter (+/- 25%)."""
    cube = trended_cube(np.random.default_rng(2), perturbations=1, features=20000, replicates=4,
                        control_replicates=4)
    pooled = feature_dispersion(cube)
    mean = np.exp(cube["true_log_base_mean"].values)
    centre = np.exp(pooled["feature_log_dispersion_trend"].values)
    truth = TREND[0] + TREND[1] / mean
    sel = (mean > 5) & (mean < 1000)
    ratio = centre[sel] / truth[sel]
    scale, df = pooled.attrs["dispersion_prior_scale"], pooled.attrs["dispersion_prior_df"]
    sd = scale * math.sqrt(df / (df - 2)) if df > 2 else math.inf
    print(f"\ncentre / truth median {np.median(ratio):.3f}, 2-98% {np.quantile(ratio, [0.02, 0.98])}, "
          f"prior scale {scale:.3f} df {df} (sd {sd:.3f}; truth {TREND_SCATTER})")
    assert 0.75 <= np.median(ratio) <= 1.25
    assert 0.6 <= np.quantile(ratio, 0.02) and np.quantile(ratio, 0.98) <= 1.6
    assert 0.75 * TREND_SCATTER <= sd <= 1.25 * TREND_SCATTER


def test_with_many_perturbations_the_data_decide():
    """500 perturbations at 5-50 counts: each feature's posterior mean lies within its posterior
    sd of the pooled moment estimate (the prior no longer pulls), and it is at least as close to
    the truth as the pooled estimate."""
    cube = nbdask.simulate(perturbations=500, features=300, replicates=3, control_replicates=6,
                           effect_fraction=0.05, base_mean=(5, 50), seed=4, chunks=500).load()
    trend = feature_dispersion(cube)
    none = feature_dispersion(cube, prior="none")
    post, pooled = trend["feature_log_dispersion"].values, none["feature_log_dispersion"].values
    sd = trend["feature_log_dispersion_sd"].values
    truth = cube["true_log_dispersion"].values
    ratio = np.abs(post - pooled) / sd
    error_post, error_pooled = np.median(np.abs(post - truth)), np.median(np.abs(pooled - truth))
    print(f"\n|posterior - pooled| / sd: median {np.median(ratio):.3f}, 95% {np.quantile(ratio, 0.95):.3f}; "
          f"median |error| posterior {error_post:.4f}, pooled {error_pooled:.4f}")
    assert np.quantile(ratio, 0.95) < 1.0
    assert error_post <= error_pooled + 0.01


def sparse_technical_cube():
    """Technical replicates (Poisson) with the sparse patterns of the defect: feature 0 counts
    1 0 0 | 0 4, feature 1 2 0 0 | 2 0, feature 2 0 0 0 | 5 0."""
    rng = np.random.default_rng(8)
    g = 2000
    mean = np.exp(rng.uniform(np.log(0.2), np.log(500), g))
    control = rng.poisson(mean[:, None] * np.ones(3))
    treated = rng.poisson(mean[None, :, None] * np.ones((1, 1, 2)))
    control[:3] = [[1, 0, 0], [2, 0, 0], [0, 0, 0]]
    treated[0, :3] = [[0, 4], [2, 0], [5, 0]]
    return make_cube(treated, np.ones((1, 2)), control, np.ones(3))


@pytest.mark.parametrize("prior", ["trend", "none"])
def test_sparse_genes_get_a_finite_dispersion_and_no_tiny_p(prior):
    """The defect: the pooled moment ratio came out near 1e17 for such genes, and the exact test
    at that dispersion gave p ~ 1e-17. Every dispersion stays within [1e-8, ceiling]; none of
    these genes (nor any other, on Poisson data) is called at q < 0.1."""
    res = nbdask.test(sparse_technical_cube(), dispersion_prior=prior)
    phi = np.exp(res["feature_log_dispersion"].values.astype(float))
    p, q = res["p_value"].values[0], res["q_value"].values[0]
    print(f"\n{prior}: phi of the sparse genes {phi[:3]}, p {p[:3]}, calls {(q < 0.1).sum()}")
    assert np.all(np.isfinite(phi)) and phi.max() <= DISPERSION_CEILING * (1 + 1e-6)
    assert np.all(p[:2] > 0.05)
    assert np.nansum(q < 0.1) == 0


def test_the_exact_test_never_turns_a_large_dispersion_into_a_small_p():
    """At dispersions past the replicate count the conditional distribution is U-shaped; the
    doubled tail keeps an even split unremarkable: p grows with phi for these patterns."""
    patterns = [([1, 0, 0], [0, 4]), ([2, 0, 0], [2, 0]), ([3, 0, 0], [0, 0])]
    for ctrl, trt in patterns:
        cube = make_cube(np.array([[trt]]), np.ones((1, 2)), np.array([ctrl]), np.ones(3))
        arrays = cube_arrays(cube)
        ps = []
        for phi in (1e-8, 0.1, 1.0, 10.0, 100.0, 1e17):
            out = {"p_value": np.full((1, 1), 0.5), "statistic": np.zeros((1, 1), np.float32),
                   "log_dispersion": np.full((1, 1), math.log(phi))}
            ps.append(float(conditional_outputs(out, *arrays, test="exact")["p_value"][0, 0]))
        print(ctrl, trt, np.round(ps, 4))
        assert all(b >= a - 1e-12 for a, b in zip(ps, ps[1:])), ps
        assert ps[-1] > 0.2


def wald_average(nodes, weights, mu, beta, sf, csf):
    """The Wald p [P, G] averaged over nodes [G, K] with weights [G, K], from the estimates mu,
    beta [P, G] and size factors sf [P, R], csf [R_c] (expected information, scipy's normal)."""
    expected = np.zeros_like(mu)
    for j in range(nodes.shape[1]):
        phi = np.exp(nodes[:, j])[None, :, None]
        mc = np.exp(mu)[..., None] * csf[None, None, :]
        mt = np.exp(mu + beta)[..., None] * sf[:, None, :]
        se = np.sqrt(1 / np.sum(mc / (1 + phi * mc), -1) + 1 / np.nansum(mt / (1 + phi * mt), -1))
        expected += weights[None, :, j] * 2 * stats.norm.sf(np.abs(beta) / se)
    return expected


def test_posterior_averaged_p_matches_direct_integration():
    """On one bulk comparison, the p-value equals the Wald p averaged over the posterior nodes
    with their weights, computed here from the stored nodes (scipy's normal; expected
    information at the estimates)."""
    cube = trended_cube(np.random.default_rng(9), perturbations=1, features=3000, replicates=3,
                        control_replicates=3)
    res = nbdask.test(cube, fdr="none", test="wald")
    y, sf, yc, csf = cube_arrays(cube)
    mu = res["log_base_mean"].values.astype(float)
    beta = res["log_fold_change"].values.astype(float)
    expected = wald_average(res["feature_dispersion_nodes"].values.astype(float),
                            res["feature_dispersion_weights"].values, mu, beta, sf, csf)[0]
    got = res["p_value"].values[0]
    ok = np.isfinite(got) & (yc.sum(1) + y[0].sum(1) > 100)
    np.testing.assert_allclose(got[ok], expected[ok], rtol=2e-5)


def test_well_evidenced_features_are_tested_at_their_posterior_mean():
    """600 perturbations of 3 vs 3, means 0.05-50: a feature with at least PLUG_IN_DOF degrees
    of freedom (sum of n - 1 over its groups with two present replicates and a nonzero mean,
    counted here from the counts) has one node, its posterior mean, and its p-values are the
    plug-in Wald test there; the others (sparse features) keep their spread nodes and the
    averaged p. Both against scipy, in one block where both kinds of feature are mixed."""
    cube = nbdask.simulate(perturbations=600, features=120, replicates=3, control_replicates=3,
                           base_mean=(0.02, 50), seed=12, chunks=600).load()
    res = nbdask.test(cube, fdr="none", test="wald")
    y, sf, yc, csf = cube_arrays(cube)
    groups_t = (np.isfinite(sf).sum(1)[:, None] - 1) * (np.nansum(y, -1) > 0)
    dof = groups_t.sum(0) + (yc.shape[1] - 1) * (yc.sum(1) > 0)
    nodes = res["feature_dispersion_nodes"].values.astype(float)
    weights = res["feature_dispersion_weights"].values
    plug_in = dof >= PLUG_IN_DOF
    print(f"\n{plug_in.sum()} of {plug_in.size} features at the plug-in (dof {dof.min()}-{dof.max()})")
    assert 0 < plug_in.sum() < plug_in.size
    np.testing.assert_array_equal(weights[plug_in, 0], 1.0)
    assert np.all(np.ptp(nodes[~plug_in], axis=1) > 0.01)
    centre = res["feature_log_dispersion"].values.astype(float)
    np.testing.assert_allclose(nodes[plug_in, 0], centre[plug_in], rtol=1e-5, atol=1e-5)
    mu = res["log_base_mean"].values.astype(float)
    beta = res["log_fold_change"].values.astype(float)
    expected = wald_average(nodes, weights, mu, beta, sf, csf)
    got = res["p_value"].values
    ok = np.isfinite(got) & (expected > 1e-12)
    np.testing.assert_allclose(got[ok], expected[ok], rtol=1e-4)


def test_filter_rejections_match_bh_at_each_threshold():
    """The grid counts of BH rejections per candidate threshold equal scipy's BH on the kept
    features (to the grid's 10% spacing, from below), and the lowess is statsmodels'."""
    rng = np.random.default_rng(3)
    g = 4000
    base = np.exp(rng.normal(2, 2, g))
    signal = (base > 5) & (rng.random(g) < 0.2)
    p = np.where(signal, rng.beta(0.05, 20, g), rng.random(g))[None, :]
    cuts = filtering.thresholds(base)
    level = filtering.levels(base, cuts)
    got = filtering.rejections(filtering.histogram(p, level))
    for j, cut in enumerate(cuts):
        keep = base >= cut
        exact = int((stats.false_discovery_control(p[0, keep]) < filtering.FILTER_ALPHA).sum())
        assert 0.9 * exact - 2 <= got[j] <= exact, (j, got[j], exact)
    from statsmodels.nonparametric.smoothers_lowess import lowess as sm_lowess

    y = got.astype(float)
    ref = sm_lowess(y, filtering.FILTER_QUANTILES, frac=0.2, it=3, delta=0.0, return_sorted=False)
    np.testing.assert_allclose(filtering.lowess(filtering.FILTER_QUANTILES, y), ref, rtol=1e-8, atol=1e-8)


def test_independent_filtering_leaves_q_nan_below_the_threshold_and_gains_power():
    cube = trended_cube(np.random.default_rng(6), perturbations=1, features=20000, replicates=3,
                        control_replicates=3, effect_fraction=0.1)
    on = nbdask.test(cube)
    off = nbdask.test(cube, independent_filtering=False)
    base = on["feature_base_mean"].values
    q = on["q_value"].values[0]
    kept = base >= on.attrs["filter_threshold"]
    assert np.all(np.isnan(q[~kept]))
    np.testing.assert_array_equal(on["p_value"].values, off["p_value"].values)
    assert on.attrs["n_filtered"] == int(np.isfinite(on["p_value"].values[0][~kept]).sum())
    assert (q < 0.1).sum() >= (off["q_value"].values < 0.1).sum()
    print(f"\nfilter at mean {on.attrs['filter_threshold']:.2f} (quantile {on.attrs['filter_quantile']:.2f}): "
          f"{(q < 0.1).sum()} vs {(off['q_value'].values < 0.1).sum()} hits")


def test_stored_results_filter_like_the_in_memory_ones(client, tmp_path):
    """The two-pass writer (filter histogram counted in pass 1) gives the in-memory q-values
    (blocks of whole perturbation rows: the pooling's outlier screen works per block)."""
    cube = trended_cube(np.random.default_rng(6), perturbations=8, features=1200, replicates=3,
                        control_replicates=3, effect_fraction=0.1)
    memory = nbdask.test(cube)
    lazy = nbdask.test(cube.chunk({"perturbation": 8, "feature": 400}))
    saved = nbdask.save_results(lazy, str(tmp_path / "r.zarr"), client=client)
    np.testing.assert_allclose(saved["q_value"].values, memory["q_value"].values, rtol=1e-9)
    assert np.isnan(saved["q_value"].values).sum() == np.isnan(memory["q_value"].values).sum()
    for key in ("filter_threshold", "n_filtered"):
        assert saved.attrs[key] == memory.attrs[key]

"""Screen-aware dispersion: calibration on null cubes, robustness, power, and the pooled value."""

import math

import numpy as np
import pytest
from scipy import stats

import nbdask
from nbdask.dispersion import OUTLIER_LEVEL, feature_dispersion

DESIGNS = {"3v3": (3, 3, 0.0), "5v5": (5, 5, 0.0), "3v8": (3, 8, 0.0), "ragged 2-6 v 4": (6, 4, 1.0)}


def null_cube(replicates, controls, ragged, *, seed=3, base_mean=(2, 20)):
    return nbdask.simulate(perturbations=200, features=1000, replicates=replicates,
                           control_replicates=controls, effect_fraction=0.0, ragged_fraction=ragged,
                           base_mean=base_mean, dispersion=(0.02, 1.0), seed=seed, chunks=500).load()


@pytest.mark.parametrize("design", list(DESIGNS))
def test_pooled_modes_are_calibrated_on_null_cubes(design):
    """Fraction of p < 0.05 on an all-null cube, mean counts 2–20, phi 0.02–1.

    200 x 1000 comparisons, but those of one feature share its control group and (in the pooled
    modes) its dispersion, so the standard error of the rate comes from the spread of the 1000
    independent per-feature rates (about 0.0025). Band: 0.05 +/- 4 SE (about [0.039, 0.061]).
    """
    cube = null_cube(*DESIGNS[design])
    rates = {}
    for mode in ("comparison", "feature", "shrunk"):
        p = nbdask.test(cube, dispersion=mode, fdr="none")["p_value"].values
        per_feature = np.nanmean(p < 0.05, axis=0)
        se = np.nanstd(per_feature, ddof=1) / math.sqrt(per_feature.size)
        rates[mode] = (float(np.nanmean(p < 0.05)), se)
    print(f"\n{design}: " + ", ".join(f"{m} {r:.4f} (SE {s:.4f})" for m, (r, s) in rates.items()))
    for mode in ("feature", "shrunk"):
        rate, se = rates[mode]
        assert abs(rate - 0.05) <= 4 * se, (mode, rate, se)
    # The per-comparison estimate runs hot on the same data.
    assert rates["comparison"][0] > rates["feature"][0]


@pytest.mark.parametrize("design", list(DESIGNS))
def test_low_counts_are_calibrated_with_the_default_test(design):
    """Mean counts 0.5–20 (a third of the features below 2 counts).

    The Wald test is conservative there even at the true dispersion (the oracle, printed): its
    normal approximation fails when the total count is small. The default ``test="auto"`` uses
    the conditional exact test (mid-p) at those totals, and the pooled modes must reject within
    0.05 +/- 4 SE (SE from the 1000 per-feature rates, about 0.0025-0.003); the per-comparison
    dispersion runs hot above them.
    """
    from nbdask.kernels.mom import mom_kernel

    cube = null_cube(*DESIGNS[design], base_mean=(0.5, 20), seed=4)
    arrays = [cube[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")]
    oracle = mom_kernel(*arrays, feature_dispersion=np.exp(cube["true_log_dispersion"].values.astype(float)))
    rate_oracle = float(np.nanmean(oracle["p_value"] < 0.05))
    rates = {}
    for mode in ("feature", "shrunk", "comparison"):
        p = nbdask.test(cube, dispersion=mode, fdr="none")["p_value"].values
        per_feature = np.nanmean(p < 0.05, axis=0)
        rates[mode] = (float(np.nanmean(p < 0.05)), np.nanstd(per_feature, ddof=1) / math.sqrt(per_feature.size))
    print(f"\n{design}, means 0.5-20: Wald at the true dispersion {rate_oracle:.4f}; test='auto': " +
          ", ".join(f"{m} {r:.4f} (SE {se:.4f})" for m, (r, se) in rates.items()))
    for mode in ("feature", "shrunk"):
        rate, se = rates[mode]
        assert abs(rate - 0.05) <= 4 * se, (mode, rate, se)
        assert abs(rate - 0.05) < abs(rate_oracle - 0.05)
    assert rates["comparison"][0] > rates["feature"][0] + 2 * rates["comparison"][1]


def effect_cube(seed=5):
    """20% true effects, and 2% of perturbations whose treated groups are 20x more dispersed."""
    cube = nbdask.simulate(perturbations=400, features=400, replicates=4, control_replicates=6,
                           effect_fraction=0.2, ragged_fraction=0.2, base_mean=(2, 30),
                           dispersion=(0.05, 1.0), seed=seed, chunks=400).load()
    rng = np.random.default_rng(seed)
    wild = rng.random(400) < 0.02
    phi = np.exp(cube["true_log_dispersion"].values.astype(float))
    sf = cube["size_factor"].values
    rate = np.exp(cube["true_log_base_mean"].values[None, :] + cube["true_log_fold_change"].values)
    m = rate[wild][:, :, None] * np.nan_to_num(sf[wild])[:, None, :]
    phi_w = 20 * phi[None, :, None]
    counts = cube["counts"].values.copy()
    draws = rng.poisson(rng.gamma(1 / phi_w, phi_w * np.maximum(m, 1e-12)))
    counts[wild] = np.where(np.isfinite(sf[wild])[:, None, :], draws, 0)
    return cube.assign(counts=(cube["counts"].dims, counts)), wild


def test_pooled_dispersion_resists_effects_and_outliers():
    cube, wild = effect_cube()
    pooled = feature_dispersion(cube)
    ratio = np.exp(pooled["feature_log_dispersion"].values - cube["true_log_dispersion"].values)
    print(f"\npooled/true dispersion: median {np.median(ratio):.3f}, "
          f"10-90% [{np.quantile(ratio, 0.1):.3f}, {np.quantile(ratio, 0.9):.3f}]; "
          f"outlier groups dropped {int(pooled['feature_outlier_groups'].sum())}")
    # Tolerance: the median within 10% of the truth and 80% of features within 35%.
    assert 0.9 <= np.median(ratio) <= 1.1
    assert np.mean(np.abs(np.log(ratio)) < math.log(1.35)) >= 0.8


def power_at_matched_fpr(p, truth, level=0.05):
    null = truth == 0
    ok = np.isfinite(p)
    threshold = np.quantile(p[null & ok], level)
    return float(np.mean(p[~null & ok] <= threshold))


def test_power_at_matched_fpr_is_at_least_the_comparison_modes():
    cube, _ = effect_cube(seed=6)
    truth = cube["true_log_fold_change"].values
    power = {m: power_at_matched_fpr(nbdask.test(cube, dispersion=m, fdr="none")["p_value"].values, truth)
             for m in ("comparison", "feature", "shrunk")}
    print(f"\npower at matched FPR 0.05: {power}")
    assert power["feature"] >= power["comparison"] - 0.005
    assert power["shrunk"] >= power["comparison"] - 0.005


def test_pooled_value_equals_an_independent_computation():
    """Plain loops over groups: bias-corrected ratio of sums with the 99.9% chi-square screen."""
    cube = nbdask.simulate(perturbations=30, features=8, replicates=4, control_replicates=5,
                           ragged_fraction=0.5, effect_fraction=0.3, seed=12, chunks=30).load()
    y, sf = cube["counts"].values.astype(float), cube["size_factor"].values
    yc, sfc = cube["control_counts"].values.astype(float), cube["control_size_factor"].values
    got = np.exp(feature_dispersion(cube, prior="none")["feature_log_dispersion"].values.astype(float))

    def parts(q, l):
        n = len(q)
        qbar, s2 = q.mean(), q.var(ddof=1)
        return (n - 1) * (s2 - qbar * np.mean(1 / l)), (n - 1) * (qbar ** 2 - s2 / n)

    for g in range(y.shape[1]):
        qc = yc[g] / sfc
        nc_, dc_ = parts(qc, sfc)
        groups = []
        for p in range(y.shape[0]):
            keep = np.isfinite(sf[p])
            if keep.sum() < 2:
                continue
            q, l = y[p, g, keep] / sf[p, keep], sf[p, keep]
            if q.mean() > 0:
                groups.append((q, l))
        kept = groups
        for _ in range(2):
            num = nc_ + sum(parts(q, l)[0] for q, l in kept)
            den = dc_ + sum(parts(q, l)[1] for q, l in kept)
            est = max(num / den, 1e-8) if den > 0 else 1e-8
            kept = [(q, l) for q, l in groups
                    if np.sum((q - q.mean()) ** 2 / (q.mean() / l + est * q.mean() ** 2))
                    <= stats.chi2.ppf(OUTLIER_LEVEL, len(q) - 1)]
        num = nc_ + sum(parts(q, l)[0] for q, l in kept)
        den = dc_ + sum(parts(q, l)[1] for q, l in kept)
        expected = max(num / den, 1e-8) if den > 0 else 1e-8
        assert got[g] == pytest.approx(expected, rel=1e-6), g


def test_pooled_modes_in_results_and_irls(tmp_path, client):
    cube = nbdask.simulate(perturbations=40, features=30, seed=8, chunks=16)
    path = str(tmp_path / "c.zarr")
    nbdask.save_cube(cube, path)
    res = nbdask.save_results(nbdask.test(nbdask.open_cube(path), method="irls", test="lrt",
                                          dispersion="feature"), str(tmp_path / "r.zarr"))
    assert res.attrs["dispersion"] == "feature"
    fld = res["feature_log_dispersion"].values
    assert fld.shape == (30,)
    tested = np.isfinite(res["p_value"].values)
    # IRLS with a feature dispersion: phi is fixed at the pooled value for every comparison
    np.testing.assert_allclose(res["log_dispersion"].values[tested],
                               np.broadcast_to(fld, tested.shape)[tested], rtol=1e-6)


@pytest.mark.parametrize("kind", ["ragged", "wild"])
def test_pooling_sums_fused_equal_array(monkeypatch, kind):
    """The numba moments/Pearson/screen helpers give the array-API pooling pass's sums, with
    perturbations the screen flags as over-dispersed (``"wild"``) too."""
    from nbdask import dispersion

    if kind == "wild":
        cube, wild = effect_cube()
    else:
        cube = nbdask.simulate(perturbations=120, features=90, replicates=5, control_replicates=4,
                               ragged_fraction=0.4, effect_fraction=0.2, seed=21, chunks=120).load()
    arrays = [cube[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")]
    fused = dispersion.feature_sums(*arrays)
    if kind == "wild":  # the screen leaves out whole perturbations here, not only single groups
        with monkeypatch.context() as m:
            m.setattr(dispersion, "WILD_MADS", math.inf)
            groups_only = dispersion.feature_sums(*arrays)
        row = dispersion.SUMS.index("outliers")
        print(f"\noutlier groups: {fused[row].sum():.0f}, without the perturbation screen "
              f"{groups_only[row].sum():.0f}")
        assert fused[row].sum() > groups_only[row].sum() + 500
    monkeypatch.setattr(dispersion, "_fused", lambda xp: None)
    np.testing.assert_allclose(fused, dispersion.feature_sums(*arrays), rtol=1e-12, atol=0)

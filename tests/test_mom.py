"""MoM kernel against an independent per-comparison computation of design §6."""

import math

import numpy as np
import pytest
from scipy import stats

from nbdask.kernels.mom import mom_kernel
from conftest import edge_case_cube


def reference_mom(y_t, sf_t, y_c, sf_c):
    """One comparison, plain Python from the §6 formulas. Returns a dict of floats."""
    keep = np.isfinite(sf_t)
    y_t, sf_t = np.asarray(y_t, float)[keep], np.asarray(sf_t, float)[keep]
    y_c, sf_c = np.asarray(y_c, float), np.asarray(sf_c, float)
    nan = float("nan")
    groups = []
    for y, sf in ((y_c, sf_c), (y_t, sf_t)):
        n = len(y)
        q = y / sf if n else np.array([])
        qbar = q.mean() if n else 0.0
        s2 = q.var(ddof=1) if n >= 2 else 0.0
        phi_g = (s2 - qbar * np.mean(1 / sf)) / qbar**2 if (n >= 2 and qbar > 0) else None
        rate = qbar if qbar > 0 else 0.5 / sf.sum() if n else nan
        groups.append(dict(n=n, qbar=qbar, phi=phi_g, rate=rate, sf=sf))
    c, t = groups
    if t["n"] == 0:
        return dict(log_base_mean=math.log(c["rate"]), log_fold_change=nan, log_dispersion=nan,
                    standard_error=nan, statistic=nan, p_value=nan)
    num = sum((g["n"] - 1) * g["phi"] for g in groups if g["phi"] is not None)
    den = sum((g["n"] - 1) for g in groups if g["phi"] is not None)
    phi = max(num / den, 1e-8) if den > 0 else 1e-8
    mu = math.log(c["rate"])
    beta = math.log(t["rate"]) - mu
    a = sum(m / (1 + phi * m) for m in c["sf"] * c["rate"])
    b = sum(m / (1 + phi * m) for m in t["sf"] * t["rate"])
    se = math.sqrt(1 / a + 1 / b)
    z = beta / se
    p = 2 * stats.norm.sf(abs(z))
    if c["qbar"] == 0 and t["qbar"] == 0:
        z = p = nan
    return dict(log_base_mean=mu, log_fold_change=beta, log_dispersion=math.log(phi),
                standard_error=se, statistic=z, p_value=p)


BACKENDS = [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]


def to_backend(name, *arrays):
    if name == "numpy":
        return arrays
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception:
        pytest.skip("CuPy is installed but no CUDA device is available")
    return tuple(cupy.asarray(a) for a in arrays)


def host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mom_matches_reference_on_edge_cases(backend):
    cube = edge_case_cube()
    arrays = [cube[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")]
    out = {k: host(v) for k, v in mom_kernel(*to_backend(backend, *arrays)).items()}
    counts, sf, ctrl, csf = arrays
    p, g = counts.shape[:2]
    for name in ("log_base_mean", "log_fold_change", "log_dispersion", "standard_error", "statistic"):
        assert out[name].dtype == np.float32 and out[name].shape == (p, g)
    assert out["p_value"].dtype == np.float64
    for i in range(p):
        for j in range(g):
            ref = reference_mom(counts[i, j], sf[i], ctrl[j], csf)
            for name, value in ref.items():
                got = out[name][i, j]
                rtol = 1e-12 if name == "p_value" else 2e-6
                np.testing.assert_allclose(got, value, rtol=rtol, atol=1e-300 if name == "p_value" else 1e-6,
                                           err_msg=f"{name} at ({i}, {j})")


def test_special_cases_are_flagged():
    cube = edge_case_cube()
    out = mom_kernel(*(cube[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")))
    p = out["p_value"]
    assert np.isnan(p[:, 0]).all(), "both groups all zero must be untestable"
    assert np.isnan(p[2]).all(), "a perturbation without replicates is untestable"
    counts, sf, ctrl = cube["counts"].values, cube["size_factor"].values, cube["control_counts"].values
    treated_zero = (np.where(np.isfinite(sf)[:, None, :], counts, 0) == 0).all(axis=2)
    expected_nan = (treated_zero & (ctrl == 0).all(axis=1)[None, :]) | ~np.isfinite(sf).any(axis=1)[:, None]
    np.testing.assert_array_equal(np.isnan(p), expected_nan)
    assert np.isfinite(out["log_base_mean"]).all()
    assert np.isfinite(out["log_fold_change"][0, 2]) and out["log_fold_change"][0, 2] < 0


def test_closed_form_two_by_two():
    """A hand-computable comparison: control [2, 4] (l = 1, 2), treated [6, 6] (l = 1, 1)."""
    out = mom_kernel(np.array([[[6, 6]]]), np.array([[1.0, 1.0]]), np.array([[2, 4]]), np.array([1.0, 2.0]))
    # control rates 2, 2: qbar 2, s2 0 -> phi_C = (0 - 2 * 0.75) / 4 = -0.375
    # treated rates 6, 6: qbar 6, s2 0 -> phi_T = (0 - 6 * 1) / 36 = -1/6; pooled < 0 -> floor 1e-8
    assert out["log_base_mean"][0, 0] == pytest.approx(math.log(2))
    assert out["log_fold_change"][0, 0] == pytest.approx(math.log(3))
    assert out["log_dispersion"][0, 0] == pytest.approx(math.log(1e-8))
    phi = 1e-8
    a = 2 / (1 + 2 * phi) + 4 / (1 + 4 * phi)
    b = 2 * 6 / (1 + 6 * phi)
    se = math.sqrt(1 / a + 1 / b)
    assert out["standard_error"][0, 0] == pytest.approx(se, rel=1e-6)
    assert out["p_value"][0, 0] == pytest.approx(2 * stats.norm.sf(math.log(3) / se), rel=1e-10)

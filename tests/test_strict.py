"""The CuPy path proven on the CPU: every array-API kernel runs on ``array_api_strict`` arrays.

The arrays live on array-api-strict's "device1", where, as with CuPy, an implicit conversion to
NumPy raises; boolean indexing and data-dependent shapes are switched off; and turning a device
array into a Python value (``bool``, ``float``, ``int``, an index) fails unless it comes from
``backend.any_true`` / ``backend.host_scalar``, the kernels' sanctioned syncs, which are counted.
Each kernel's outputs must equal the same kernel on NumPy arrays exactly.
"""

import sys
from collections import Counter

import numpy as np
import pytest

import nbdask
from nbdask import dispersion
from nbdask.errors import NbdaskWarning
from nbdask.kernels import backend, exact, irls, mom, transformer, wald
from nbdask.kernels.integrate import integrated_outputs
from conftest import edge_case_cube
from test_exact import random_block

xs = pytest.importorskip("array_api_strict")
from array_api_strict._array_object import Array  # noqa: E402  (the class, to guard its conversions)

DEVICE = xs.Device("device1")
SANCTIONED = {backend.any_true.__code__, backend.host_scalar.__code__}
INPUTS = ("counts", "size_factor", "control_counts", "control_size_factor")


@pytest.fixture
def syncs(monkeypatch):
    """Strict flags for the test, and a Counter of sanctioned syncs by caller."""
    counter = Counter()
    for name in ("__bool__", "__float__", "__int__", "__index__"):
        original = getattr(Array, name)

        def guarded(self, original=original, name=name):
            frame = sys._getframe(1)
            if frame.f_code not in SANCTIONED:
                raise AssertionError(f"{name} of a device array at {frame.f_code.co_filename}:"
                                     f"{frame.f_lineno}: a data-dependent host sync in a kernel")
            counter[sys._getframe(2).f_code.co_name] += 1
            return original(self)

        monkeypatch.setattr(Array, name, guarded)
    with xs.ArrayAPIStrictFlags(boolean_indexing=False, data_dependent_shapes=False):
        yield counter


def on_device(*arrays):
    return [xs.asarray(np.asarray(a), device=DEVICE) for a in arrays]


def assert_same(strict_out, numpy_out):
    assert set(strict_out) == set(numpy_out)
    for name, value in numpy_out.items():
        got = strict_out[name]
        assert isinstance(got, Array) and got.device == DEVICE, name
        host = backend.to_host(got)
        assert host.dtype == np.asarray(value).dtype, name
        np.testing.assert_array_equal(host, value, err_msg=name)


def cube_arrays():
    cube = edge_case_cube()
    return [cube[v].values for v in INPUTS]


def pooled_values(arrays):
    g = arrays[0].shape[1]
    rng = np.random.default_rng(2)
    return {"feature_dispersion": np.exp(rng.normal(-2, 1, g)), "dispersion_spread": rng.uniform(0, 0.05, g)}


@pytest.mark.parametrize("mode", ["comparison", "feature", "shrunk"])
def test_mom(syncs, mode):
    arrays = cube_arrays()
    extra = {k: v for k, v in pooled_values(arrays).items()
             if mode == "shrunk" or mode == "feature" and k == "feature_dispersion"}
    assert_same(mom.mom_kernel(*on_device(*arrays), **dict(zip(extra, on_device(*extra.values())))),
                mom.mom_kernel(*arrays, **extra))
    assert not syncs


def test_wald(syncs):
    rng = np.random.default_rng(4)
    beta, a, b = rng.normal(0, 1, (3, 6, 5))
    a[0, 0] = 0.0  # a group without information: NaN
    xp, special = backend.namespaces(*on_device(beta))
    got = wald.wald_test(xp, special, *on_device(beta, np.abs(a), np.abs(b)))
    want = wald.wald_test(np, __import__("scipy.special").special, beta, np.abs(a), np.abs(b))
    assert_same(dict(zip("sep", got)), dict(zip("sep", want)))


@pytest.mark.parametrize("options", [{"test": "wald"}, {"test": "lrt", "dispersion_fit": "cox-reid"},
                                     {"test": "wald", "feature": True}])
def test_irls(syncs, options):
    arrays = cube_arrays()
    extra = {}
    if options.pop("feature", False):
        extra = {"feature_dispersion": pooled_values(arrays)["feature_dispersion"]}
    want = irls.irls_kernel(*arrays, **options, **extra)
    got = irls.irls_kernel(*on_device(*arrays), **options, **dict(zip(extra, on_device(*extra.values()))))
    assert_same(got, want)
    # The early exit checks every CHECK_EVERY iterations, at most max_iter / CHECK_EVERY times a fit.
    fits = 2 if options["test"] == "lrt" else 1
    assert set(syncs) <= {"fit_nb", "_fit_rates"} and sum(syncs.values()) <= fits * 50 // irls.CHECK_EVERY


def test_transformer(syncs):
    arrays = cube_arrays()
    old = transformer.BATCH
    transformer.BATCH = 64  # several batches per block
    try:
        with pytest.warns(NbdaskWarning, match="mean counts up to"):  # size factor 100
            want = transformer.transformer_kernel(*arrays)
        with pytest.warns(NbdaskWarning, match="mean counts up to"):
            got = transformer.transformer_kernel(*on_device(*arrays))
    finally:
        transformer.BATCH = old
    assert_same(got, want)
    assert syncs == {"_warn_out_of_range": 1}  # one per block: the warning on out-of-prior counts


@pytest.mark.parametrize("test", ["exact", "auto"])
def test_exact(syncs, test):
    counts, sf, control, csf = random_block(3, mean=2.0)
    base = mom.mom_kernel(counts, sf, control, csf)
    want = exact.conditional_outputs(base, counts, sf, control, csf, test=test, engine="array")
    on = on_device(counts, sf, control, csf)
    got = exact.conditional_outputs(dict(zip(base, on_device(*base.values()))), *on, test=test,
                                    engine="array")
    assert_same(got, want)
    assert set(syncs) <= {"_walk", "conditional_outputs"}
    assert syncs["conditional_outputs"] == (test == "exact")  # the walk's length from the largest total


def test_posterior_average_over_mixed_features(syncs):
    """The p averaged over posterior nodes, on a block where some features have one node (the
    plug-in) and the others spread ones: the columns are chosen on the host, no device array
    takes a data-dependent shape."""
    counts, sf, control, csf = random_block(5, mean=2.0)
    g = counts.shape[1]
    rng = np.random.default_rng(3)
    offsets = np.sort(rng.normal(0, 0.4, (g, 6)), axis=1)
    weights = rng.dirichlet(np.ones(6), g)
    offsets[::2], weights[::2] = 0.0, np.eye(1, 6)[0]
    base = mom.mom_kernel(counts, sf, control, csf)
    want = integrated_outputs(base, counts, sf, control, csf, offsets, weights, test="auto",
                              engine="array")
    assert not np.array_equal(want["p_value"][:, 1::2], base["p_value"][:, 1::2])
    np.testing.assert_array_equal(want["p_value"][:, ::2], base["p_value"][:, ::2])
    on = on_device(counts, sf, control, csf)
    got = integrated_outputs(dict(zip(base, on_device(*base.values()))), *on, offsets, weights,
                             test="auto", engine="array")
    assert_same(got, want)


def test_pooling_sums_and_combine(syncs, monkeypatch):
    cube = nbdask.simulate(perturbations=60, features=40, replicates=5, control_replicates=4,
                           ragged_fraction=0.4, effect_fraction=0.2, seed=21, chunks=60).load()
    arrays = [cube[v].values for v in INPUTS]
    got = dispersion.feature_sums(*on_device(*arrays))
    monkeypatch.setattr(dispersion, "_fused", lambda xp: None)  # the NumPy reference: array form
    want = dispersion.feature_sums(*arrays)
    assert_same({"sums": got}, {"sums": want})
    assert_same(dispersion.combine(got, *on_device(*arrays[2:])), dispersion.combine(want, *arrays[2:]))
    assert not syncs


def test_strict_arrays_refuse_implicit_host_conversion(syncs):
    """The harness bites: NumPy on a device array, and a Python branch on one, both fail."""
    x = on_device(np.arange(3.0))[0]
    with pytest.raises((RuntimeError, TypeError)):
        np.log(x)
    with pytest.raises(AssertionError, match="data-dependent host sync"):
        if xs.any(x > 1):
            pass


def test_gpu_verification_says_in_one_line_that_there_is_no_gpu():
    import subprocess
    from pathlib import Path

    from nbdask.gpu import cuda_available

    if cuda_available() is None:
        pytest.skip("a GPU is here: run benchmarks/gpu.py to verify it")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "benchmarks/gpu.py"], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("benchmarks/gpu.py: no GPU to verify: ") and r.stderr.count("\n") == 1

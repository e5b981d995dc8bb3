"""``test()``: validate a count cube, map an estimator over its blocks, attach FDR q-values."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import xarray as xr

from . import __version__
from .cache import widen
from .dispersion import DISPERSION_PRIORS, DISPERSIONS, feature_dispersion
from .errors import NbdaskWarning, OptionError
from .fdr import BACKENDS as FDR_BACKENDS
from .fdr import FDR_METHODS, FDR_SCOPES, adjust
from .filtering import filter_p
from .kernels import DISPERSION_FITS, ENGINES, KERNELS
from .kernels.backend import is_host, namespaces, to_host
from .kernels.exact import CONDITIONAL_TESTS, conditional_outputs, max_total
from .kernels.integrate import integrated_outputs
from .schema import (CONTROL_REPLICATE, FEATURE, NODE, OUTPUTS, PERTURBATION, REPLICATE,
                     check_count_block, check_small_values, validate_structure)

logger = logging.getLogger("nbdask")



def _check_option(name: str, value, allowed) -> None:
    if value not in allowed:
        raise OptionError(f"{name}={value!r} is not available; choose one of {list(allowed)}")


#: Per-feature inputs with a node axis: the posterior's nodes (as offsets) and weights.
_POSTERIOR = ("dispersion_offsets", "dispersion_weights")


def _block(counts, size_factor, control_counts, control_size_factor, perturbation, feature,
           *per_feature, method, engine, names, check, options, per_feature_names, conditional):
    """Run the method's kernel on one block as apply_ufunc hands it over (singleton axes)."""
    p_b, g_b, r = counts.shape
    counts = widen(counts)
    size_factor = size_factor.reshape(p_b, r)
    control_counts = control_counts.reshape(g_b, -1)
    xp, _ = namespaces(counts)
    spec = KERNELS[method]
    # Only some fused kernels implement the pooled dispersion modes.
    kernel = spec.select("array" if per_feature and not spec.fused_pooled else engine, is_host(xp))
    options = {**options, **{n: v.reshape(g_b, -1) if n in _POSTERIOR else v.reshape(g_b)
                             for n, v in zip(per_feature_names, per_feature)}}
    offsets, weights = (options.pop(n, None) for n in _POSTERIOR)
    if check:
        host_counts = counts if is_host(xp) else to_host(counts)
        check_count_block(host_counts, to_host(size_factor),
                          np.asarray(perturbation).reshape(p_b), np.asarray(feature).reshape(g_b))
    # A twin that runs the exact test in its own loop skips the Wald tail where the test replaces
    # it, and a second pass over the block (a 10^6-comparison block of a screen: 109 -> 91 ms).
    fused_exact = conditional is not None and spec.fused_exact and kernel is not spec.kernel
    if fused_exact:
        options["max_exact_total"] = max_total(conditional)
    out = kernel(counts, size_factor, control_counts, control_size_factor, **options)
    if conditional is not None and not fused_exact:
        out = conditional_outputs(out, counts, size_factor, control_counts, control_size_factor,
                                  test=conditional, engine=engine)
    if offsets is not None:
        out = integrated_outputs(out, counts, size_factor, control_counts, control_size_factor,
                                 offsets, weights, test=conditional or "wald", engine=engine)
    return tuple(out[name] for name in names)


#: ``_block``'s inputs in order (counts, size factors, control counts, control size factors,
#: perturbation labels, feature labels, then the per-feature variables): (loop dims, core dim).
_BLOCK_INPUTS = [((PERTURBATION, FEATURE), REPLICATE), ((PERTURBATION,), REPLICATE),
                 ((FEATURE,), CONTROL_REPLICATE), ((), CONTROL_REPLICATE), ((PERTURBATION,), None),
                 ((FEATURE,), None)]


def _block_inputs(per_feature) -> list[tuple[tuple[str, ...], str | None]]:
    """``_BLOCK_INPUTS`` followed by the per-feature variables' (loop dims, core dim)."""
    return _BLOCK_INPUTS + [((FEATURE,), NODE if NODE in v.dims else None) for v in per_feature]


def _lazy_outputs(counts, side, per_feature, names, block_options) -> list[xr.DataArray]:
    """The outputs of ``_block`` over a dask-backed cube, [perturbation, feature] each.

    One task per block returns all outputs as a tuple, and each output takes its item in a
    blockwise task, which save_results' writer fuses into its own per-block task. xarray's
    multi-output ``apply_ufunc`` splits the tuple in materialized tasks that dask cannot fuse:
    six more tasks per block. On the 2-core development VM, 400 blocks of six 4 MB outputs went
    from 3337 tasks in 4.3-5.0 s to 537 tasks in 2.0-2.3 s (3.3-4.4 CPU-s less).
    """
    import operator

    import dask.array as da

    letters = {PERTURBATION: "p", FEATURE: "f", REPLICATE: "r", CONTROL_REPLICATE: "c", NODE: "n"}
    pairs = []
    for var, (loop, core) in zip([counts, *side, *per_feature], _block_inputs(per_feature)):
        dims = loop + ((core,) if core else ())
        pairs += [var.transpose(*dims).data, "".join(letters[d] for d in dims)]
    blocks = da.blockwise(_block, "pf", *pairs, concatenate=True, dtype=object,
                          meta=np.empty((0, 0), object), **block_options)
    coords = {d: counts[d] for d in (PERTURBATION, FEATURE) if d in counts.coords}
    return [xr.DataArray(blocks.map_blocks(operator.getitem, i, dtype=OUTPUTS[n].dtype,
                                           meta=np.empty((0, 0), OUTPUTS[n].dtype)),
                         dims=(PERTURBATION, FEATURE), coords=coords)
            for i, n in enumerate(names)]


def test(cube: xr.Dataset, *, method: str = "mom", test: str = "auto", fdr: str = "bh",
         fdr_scope: str = "global", dispersion: str = "feature", dispersion_prior: str = "trend",
         dispersion_fit: str = "ml",
         max_iter: int = 50, tol: float = 1e-6, engine: str = "auto",
         fdr_backend: str = "auto", independent_filtering: bool = True, check_counts: bool = True,
         transformer_weights: str | None = None, pooled: xr.Dataset | None = None) -> xr.Dataset:
    """Test every (perturbation, feature) comparison of a count cube against the controls.

    Parameters
    ----------
    cube
        Count cube following the input schema (``nbdask.open_cube`` or ``nbdask.simulate``).
        Dask-backed cubes give a lazy result; NumPy-backed cubes are computed at once.
    method
        Estimator: ``"mom"`` (method of moments, the default), ``"irls"`` (maximum likelihood
        of the NB2 GLM, batched; adds ``converged`` and ``iterations``) or ``"transformer"`` (the
        pre-trained pair-set transformer, plug-in Wald test; see ``transformer_weights``).
    test
        ``"auto"`` (default): the conditional exact test (mid-p, at the comparison's dispersion;
        see ``nbdask.kernels.exact``) where the comparison's total count is at most 32, the
        method's Wald test elsewhere; ``"exact"``: the exact test everywhere; ``"wald"``; or
        ``"lrt"`` (likelihood ratio against beta = 0; ``"irls"`` only).
    independent_filtering
        With a pooled dispersion: leave the features whose mean count is too low to reach
        significance out of the FDR step, at the threshold (a quantile of the features' means)
        that rejects most at q < 0.1, as DESeq2 does (``nbdask.filtering``); their q-values are
        NaN, their p-values stay.
    fdr, fdr_scope, fdr_backend
        ``"bh"`` (exact Benjamini–Hochberg, R's ``p.adjust`` semantics), ``"storey"`` (pi0 x BH,
        global scope) or ``"none"``; over all comparisons (``"global"``) or within each
        perturbation (``"perturbation"``). ``save_results`` runs the FDR step on the stored
        p-values with ``fdr_backend``: ``"auto"`` (gather onto one worker while they fit, else
        exact bucketed BH across workers), ``"gather"`` or ``"buckets"``; the lazy ``q_value`` of
        the returned Dataset always gathers.
    dispersion
        Whose samples inform the dispersion: ``"feature"`` (default: one robust pooled value per
        feature from every perturbation and the control), ``"comparison"`` (this comparison's
        samples only, the paper's) or ``"shrunk"`` (empirical Bayes between the two); see
        ``nbdask.dispersion``. The pooled modes run their reduction pass over the cube when
        ``test`` is called (on the active client), since every p-value depends on it, and
        add ``feature_log_dispersion`` (and its spread and outlier counts) to the results.
    dispersion_prior
        How the pooled modes borrow across features: ``"trend"`` (default: an empirical-Bayes
        posterior per feature under a prior around the mean-dispersion trend, with the
        p-values averaged over that posterior; see ``nbdask.moderation``) or ``"none"`` (the
        pooled moment estimate alone, bounded, the trend where no group informs it). With many
        perturbations the two agree; with few only ``"trend"`` holds its level.
    dispersion_fit, max_iter, tol
        Iterative methods: ``"ml"`` or ``"cox-reid"`` (adjusted profile likelihood) dispersion,
        the iteration cap (<= 127) and the convergence tolerance on log-scale steps.
    engine
        ``"auto"`` runs the fused numba kernel on NumPy blocks and the array-API kernel on CuPy
        blocks; ``"numba"`` or ``"array"`` forces one (the results agree to rounding).
    transformer_weights
        ``method="transformer"``: an ``.npz`` written by ``nbdask train``; None = the weights
        shipped in ``nbdask/weights``. A design outside their training prior (more than 10
        or fewer than 2 replicates in a group) gets an ``NbdaskWarning``.
    pooled
        The per-feature variables an earlier pooling pass over this cube gave (e.g. read back by
        ``nbdask.writer.stored_pooling`` from an interrupted run's store), used instead of running
        the pass again; ignored with ``dispersion="comparison"``.
    check_counts
        Check every counts block for negative, non-integer and NaN values as it is processed
        (a bad block fails the run with a ``CubeError``).

    Returns
    -------
    Dataset with the results variables (perturbation × feature) chunked like the cube's
    (perturbation, feature) grid, and attrs recording the method and options.
    """
    _check_option("method", method, KERNELS)
    spec = KERNELS[method]
    _check_option("test", test, spec.tests + CONDITIONAL_TESTS)
    _check_option("dispersion_fit", dispersion_fit, DISPERSION_FITS)
    _check_option("engine", engine, ENGINES)
    _check_option("fdr_backend", fdr_backend, FDR_BACKENDS)
    if not 1 <= int(max_iter) <= 127 or not tol > 0:
        raise OptionError(f"max_iter={max_iter}, tol={tol}: need 1 <= max_iter <= 127 and tol > 0")
    given = {"test": test, "dispersion_fit": dispersion_fit, "max_iter": int(max_iter), "tol": float(tol),
             "weights": None if transformer_weights is None else str(transformer_weights)}
    kernel_options = {k: given[k] for k in spec.options}
    if len(spec.tests) > 1:
        # The conditional tests replace the kernel's Wald p-values after it runs (in _block).
        kernel_options["test"] = test if test in spec.tests else "wald"
    _check_option("fdr", fdr, FDR_METHODS)
    _check_option("fdr_scope", fdr_scope, FDR_SCOPES)
    _check_option("dispersion", dispersion, DISPERSIONS)
    _check_option("dispersion_prior", dispersion_prior, DISPERSION_PRIORS)
    validate_structure(cube)
    design = check_small_values(cube)
    if method == "transformer":
        _check_transformer_design(design, given["weights"])

    counts = cube["counts"]
    side = _aligned_side_inputs(cube)
    per_feature, per_feature_names = [], []
    if dispersion == "comparison":
        pooled = None
    else:
        pooled = (feature_dispersion(cube, prior=dispersion_prior) if pooled is None
                  else _check_pooled(pooled, cube, dispersion_prior))
        per_feature_names = ["feature_dispersion"] + (["dispersion_spread"] if dispersion == "shrunk" else [])
        log_phi = pooled["feature_log_dispersion"].values.astype(np.float64)
        values = {"feature_dispersion": xr.DataArray(np.exp(log_phi), dims=FEATURE),
                  "dispersion_spread": xr.DataArray(pooled["feature_dispersion_spread"].values, dims=FEATURE)}
        if "feature_dispersion_nodes" in pooled and test != "lrt":  # the LRT refits: no averaging
            per_feature_names += ["dispersion_offsets", "dispersion_weights"]
            nodes = pooled["feature_dispersion_nodes"].values.astype(np.float64)
            values["dispersion_offsets"] = xr.DataArray(nodes - log_phi[:, None], dims=(FEATURE, NODE))
            values["dispersion_weights"] = xr.DataArray(pooled["feature_dispersion_weights"].values,
                                                        dims=(FEATURE, NODE))
        chunks = dict(zip(counts.dims, counts.chunks)) if counts.chunks is not None else None
        for name in per_feature_names:
            arr = values[name]
            per_feature.append(arr.chunk({d: chunks[FEATURE] if d == FEATURE else -1 for d in arr.dims})
                               if chunks else arr)
    names = list(spec.outputs)
    block_options = {"method": method, "engine": engine, "names": names, "check": check_counts,
                     "options": kernel_options, "per_feature_names": per_feature_names,
                     "conditional": test if test in CONDITIONAL_TESTS else None}
    if counts.chunks is not None:
        outputs = _lazy_outputs(counts, side, per_feature, names, block_options)
    else:
        outputs = xr.apply_ufunc(
            _block, counts, *side, *per_feature,
            input_core_dims=[[core] if core else [] for _, core in _block_inputs(per_feature)],
            output_core_dims=[[] for _ in names], kwargs=block_options)
    coords = {d: cube[d] for d in (PERTURBATION, FEATURE) if d in cube.coords}
    results = xr.Dataset(
        {n: out.transpose(PERTURBATION, FEATURE).assign_attrs(OUTPUTS[n].attrs())
         for n, out in zip(names, outputs)},
        coords=coords,
    )
    if pooled is not None:
        for name in pooled.data_vars:
            results[name] = pooled[name].assign_attrs(OUTPUTS[name].attrs())
        results.attrs.update({k: v for k, v in pooled.attrs.items() if k.startswith("dispersion_prior_")})
    filtering = bool(independent_filtering) and pooled is not None
    if fdr != "none":
        p_fdr, info = results["p_value"], None
        if filtering:
            p_fdr, info = filter_p(p_fdr, pooled["feature_base_mean"].values)
        q = adjust(p_fdr, method=fdr, scope=fdr_scope, backend="gather")
        results["q_value"] = q.assign_attrs(OUTPUTS["q_value"].attrs())
        results.attrs.update(info or {})
    options = {"method": method, "fdr": fdr, "fdr_scope": fdr_scope, "fdr_backend": fdr_backend,
               "dispersion": dispersion, **kernel_options, "test": test}
    if dispersion != "comparison":
        options["dispersion_prior"] = dispersion_prior
    options["independent_filtering"] = filtering
    results.attrs.update(options)
    results.attrs.update({
        "options": json.dumps(options, sort_keys=True),
        "nbdask_version": __version__,
        "n_comparisons": int(counts.shape[0] * counts.shape[1]),
        **design,
    })
    if results["p_value"].chunks is None:
        results.attrs["n_tests"] = int(np.isfinite(results["p_value"].values).sum())
        results.attrs.update(results["q_value"].attrs if "q_value" in results else {})
    logger.info("nbdask.test: %s comparisons, method=%s, fdr=%s/%s", results.attrs["n_comparisons"],
                method, fdr, fdr_scope)
    return results


test.__test__ = False  # not a pytest test function


def _check_transformer_design(design: dict, weights) -> None:
    """Load the weights now (a bad path fails before any work) and warn on out-of-prior designs."""
    from .kernels.transformer import MAX_REPLICATES, load_weights

    load_weights(weights)
    largest = max(design["max_replicates"], design["n_control_replicates"])
    smallest = min(design["min_replicates"] or 2, design["n_control_replicates"])
    if largest > MAX_REPLICATES or smallest < 2:
        warnings.warn(f"method='transformer': groups of {smallest}-{largest} replicates, but the "
                      f"weights were trained on 2-{MAX_REPLICATES} per group, so their estimates "
                      "extrapolate there; method='mom' or 'irls' cover any design",
                      NbdaskWarning, stacklevel=3)


def _check_pooled(pooled: xr.Dataset, cube: xr.Dataset, prior: str) -> xr.Dataset:
    """``pooled`` if it covers the cube's features (same labels, same order) with ``prior``."""
    if pooled.attrs.get("dispersion_prior", prior) != prior:
        raise OptionError(f"pooled: made with dispersion_prior={pooled.attrs['dispersion_prior']!r}, "
                          f"this run has {prior!r}; pass the pooling of this run's options, or None")
    labels = cube[FEATURE].values if FEATURE in cube.coords else None
    if (pooled.sizes.get(FEATURE) != cube.sizes[FEATURE] or labels is not None and (
            FEATURE not in pooled.coords or not np.array_equal(pooled[FEATURE].values, labels))):
        raise OptionError(f"pooled: its {FEATURE} axis does not match the cube's "
                          f"({cube.sizes[FEATURE]} features); pass the pooling of this cube, or None")
    return pooled


def _aligned_side_inputs(cube: xr.Dataset) -> list[xr.DataArray]:
    """Size factors, controls and labels, chunked to match the counts' grid."""
    counts = cube["counts"]
    n_p, n_g = counts.sizes[PERTURBATION], counts.sizes[FEATURE]
    labels = [
        xr.DataArray(cube[PERTURBATION].values if PERTURBATION in cube.coords else np.arange(n_p),
                     dims=PERTURBATION),
        xr.DataArray(cube[FEATURE].values if FEATURE in cube.coords else np.arange(n_g), dims=FEATURE),
    ]
    side = [cube["size_factor"], cube["control_counts"], cube["control_size_factor"], *labels]
    side = [v.drop_vars(list(v.coords)) for v in side]
    if counts.chunks is None:
        return [v.compute() for v in side]
    chunks = dict(zip(counts.dims, counts.chunks))
    return [v.chunk({d: chunks.get(d, -1) for d in v.dims}) for v in side]

"""The roster of estimators the studies compare, read from nbdask itself, and how each is run.

Option lists come from the package (``KERNELS``, ``DISPERSIONS``, ``CONDITIONAL_TESTS``,
``DISPERSION_FITS``) and the defaults from ``nbdask.test``'s signature, so a new option or a new
default shows up in the benchmark without edits here.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from ..dispersion import DISPERSIONS
from ..kernels import DISPERSION_FITS, KERNELS
from ..kernels.exact import CONDITIONAL_TESTS

#: The paper's per-comparison setting: each comparison's own dispersion, Wald test.
PAPER = {"dispersion": "comparison", "test": "wald"}
STATSMODELS = "statsmodels"
ESTIMATES = ("log_base_mean", "log_fold_change", "log_dispersion")


def test_defaults() -> dict:
    """The keyword defaults of ``nbdask.test`` (method, dispersion, test, ...)."""
    from ..pipeline import test

    return {k: p.default for k, p in inspect.signature(test).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclass(frozen=True)
class Setting:
    """One column of a study: an estimator with its dispersion and test options."""

    estimator: str  # "mom", "irls-ml", "irls-cox-reid", "transformer", "statsmodels", ...
    method: str | None  # nbdask method, None for statsmodels or an injected method
    options: tuple = ()  # sorted (name, value) pairs passed to nbdask.test
    role: str = "paper"  # "paper" (the paper's setting), "default" (nbdask's) or "option"
    fn: object = field(default=None, compare=False, hash=False)  # injected: cube -> results

    @property
    def opts(self) -> dict:
        return dict(self.options)

    @property
    def label(self) -> str:
        if self.method is None:
            return self.estimator
        o = self.opts
        return f"{self.estimator} {o.get('dispersion')}/{o.get('test')}"


def estimators() -> list[tuple[str, str, dict]]:
    """``(name, method, options)`` of every nbdask estimator: irls once per dispersion fit."""
    out = []
    for method, spec in KERNELS.items():
        if "dispersion_fit" in spec.options:
            out += [(f"{method}-{fit}", method, {"dispersion_fit": fit}) for fit in DISPERSION_FITS]
        else:
            out.append((method, method, {}))
    return out


def _setting(name, method, extra, role, **options) -> Setting:
    return Setting(name, method, tuple(sorted({**extra, **options}.items())), role)


def paper_settings(*, statsmodels: bool = True) -> list[Setting]:
    """Every estimator with the paper's per-comparison dispersion and Wald test (+ statsmodels)."""
    out = [_setting(n, m, e, "paper", **PAPER) for n, m, e in estimators()]
    return out + ([Setting(STATSMODELS, None, (), "paper")] if statsmodels else [])


def default_settings() -> list[Setting]:
    """Every estimator with nbdask's default dispersion and test (from ``nbdask.test``)."""
    d = test_defaults()
    return [_setting(n, m, e, "default", dispersion=d["dispersion"], test=d["test"])
            for n, m, e in estimators()]


def study_settings(*, statsmodels: bool = True) -> list[Setting]:
    """The paper's settings, then nbdask's defaults beside them (duplicates dropped)."""
    out = paper_settings(statsmodels=statsmodels)
    seen = {(s.estimator, s.options) for s in out}
    return out + [s for s in default_settings() if (s.estimator, s.options) not in seen]


def all_combinations() -> list[Setting]:
    """Every method x dispersion x test (x dispersion fit) nbdask offers, defaults marked."""
    d = test_defaults()
    out = []
    for (name, method, extra), dispersion in itertools.product(estimators(), DISPERSIONS):
        for test in KERNELS[method].tests + tuple(t for t in CONDITIONAL_TESTS
                                                  if t not in KERNELS[method].tests):
            default = (method == d["method"] and dispersion == d["dispersion"] and test == d["test"]
                       and all(d.get(k) == v for k, v in extra.items()))
            out.append(_setting(name, method, extra, "default" if default else "option",
                                dispersion=dispersion, test=test))
    return out


def statsmodels_available() -> bool:
    try:
        import statsmodels.discrete.discrete_model  # noqa: F401
    except ImportError:
        return False
    return True


def run_nbdask(cube: xr.Dataset, setting: Setting) -> dict[str, np.ndarray]:
    """Estimates [P, G], ``p_value`` and ``success`` of one nbdask setting on an in-memory cube.

    ``success``: finite mu, beta and alpha hats, and converged where the method reports it.
    """
    from ..pipeline import test

    if setting.fn is not None:
        res = setting.fn(cube)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # out-of-prior warnings are the study's to report
            res = test(cube, method=setting.method, fdr="none", **setting.opts)
    out = {k: np.asarray(res[k].values, float) for k in ESTIMATES + ("p_value",) if k in res}
    ok = np.ones(out["p_value"].shape, bool)
    for k in ESTIMATES:
        ok &= np.isfinite(out[k]) if k in out else True
    if "converged" in res:
        ok &= np.asarray(res["converged"].values, bool)
    out["success"] = ok
    return out


def _comparison_rows(counts, sf, control, csf, i, j):
    keep = np.isfinite(sf[i])
    y = np.concatenate([control[j], counts[i, j][keep]]).astype(float)
    x = np.concatenate([np.zeros(len(csf)), np.ones(int(keep.sum()))])
    return y, np.column_stack([np.ones_like(x), x]), np.concatenate([csf, sf[i][keep]])


def statsmodels_block(counts, sf, control, csf) -> dict[str, np.ndarray]:
    """statsmodels' discrete ``NegativeBinomial`` fitted to every comparison of a block.

    The paper's fit as far as known (nb-paper.md §5): exog [1, x], ``exposure`` = size factors,
    ``fit(disp=0)`` with statsmodels' defaults (nb2, BFGS, maxiter 35, Poisson start). A fit
    fails on an exception, non-finite parameters or ``converged == False``; a failed fit has no
    estimates and no p-value (NaN). alpha hat = log of statsmodels' alpha.
    """
    from statsmodels.discrete.discrete_model import NegativeBinomial

    p_b, g = counts.shape[:2]
    out = {k: np.full((p_b, g), np.nan) for k in ESTIMATES + ("p_value",)}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for i, j in itertools.product(range(p_b), range(g)):
            y, X, exposure = _comparison_rows(counts, sf, control, csf, i, j)
            try:
                fit = NegativeBinomial(y, X, exposure=exposure).fit(disp=0)
                params, pv = np.asarray(fit.params, float), np.asarray(fit.pvalues, float)
                converged = bool(fit.mle_retvals.get("converged", False))
            except Exception:  # statsmodels raises a zoo of errors on degenerate data
                continue
            if not (converged and np.all(np.isfinite(params)) and params[2] > 0):
                continue
            out["log_base_mean"][i, j], out["log_fold_change"][i, j] = params[0], params[1]
            out["log_dispersion"][i, j] = math.log(params[2])
            out["p_value"][i, j] = pv[1] if np.isfinite(pv[1]) else np.nan
    out["success"] = np.isfinite(out["log_fold_change"])
    return out


def cube_arrays(cube: xr.Dataset) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(cube[v].values) for v in
                 ("counts", "size_factor", "control_counts", "control_size_factor"))


def submit_statsmodels(cube: xr.Dataset, client, *, rows: int = 1):
    """Futures (or thunks without a client) of statsmodels fits, ``rows`` perturbations each."""
    counts, sf, control, csf = cube_arrays(cube)
    parts = [(counts[s:s + rows], sf[s:s + rows], control, csf) for s in range(0, counts.shape[0], rows)]
    if client is None:
        return [lambda a=a: statsmodels_block(*a) for a in parts]
    return [client.submit(statsmodels_block, *a, pure=False) for a in parts]


def gather_blocks(blocks: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in blocks], axis=0) for k in blocks[0]}

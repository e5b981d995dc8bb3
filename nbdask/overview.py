"""A bounded-size overview of a results Dataset, reduced block by block on the workers.

Everything the HTML report draws comes from here, and its size does not grow with the number
of comparisons: counts, a p-value histogram, a fine histogram of -log10 p (the body of the QQ
plot), the exactly smallest p-values (its tail, and the top-hit table), hits per perturbation
and per feature, the volcano's points (the hits with the smallest p, at most ``max_hits``, and
a uniform random sample of ``sample`` other tested comparisons) and, against a simulated truth,
FDP, power and errors. Blocks are summarised where they live and merged in a tree
(``nbdask.blocks``), so a 4e8-comparison result is reported in the memory of a few blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from .errors import ResultsError
from .schema import FEATURE, PERTURBATION, feature_names, labels

#: p-value histogram: equal bins on [0, 1].
P_BINS = 40
#: -log10 p histogram: bins of LOG_STEP from 0 to LOG_MAX (p = 0 falls in the last bin). The
#: QQ plot reads quantiles off it (to within LOG_STEP) beyond the exactly kept smallest p.
LOG_STEP = 0.02
LOG_MAX = 330.0
N_LOG_BINS = int(LOG_MAX / LOG_STEP)
#: Rows kept exactly with the smallest p-values (QQ tail, top-hit table).
TOP = 1000
#: Volcano: at most this many hits (smallest p first), plus a random sample of the others.
MAX_HITS = 20_000
SAMPLE = 10_000
#: Significance levels the truth comparison reports besides ``q_max``.
TRUTH_LEVELS = (0.05, 0.1)
#: Columns of a kept row (top table, volcano points).
ROW_FIELDS = ("row", "col", "p_value", "q_value", "log_fold_change", "log_base_mean",
              "log_dispersion", "standard_error")


@dataclass
class Overview:
    """Reduced view of a results Dataset (see the module docstring). Rows are dicts of arrays."""

    q_max: float
    n_comparisons: int
    n_tested: int
    n_hits: int
    n_up: int
    n_down: int
    p_hist: np.ndarray
    log_hist: np.ndarray
    top: dict
    hits: dict
    sample: dict
    hits_per_perturbation: np.ndarray
    up_per_perturbation: np.ndarray
    hits_per_feature: np.ndarray
    up_per_feature: np.ndarray
    tested_per_perturbation: np.ndarray
    perturbations: np.ndarray
    features: np.ndarray
    truth: dict = field(default_factory=dict)
    feature_names: np.ndarray | None = None  # the cube's feature_name, where it has one

    @property
    def feature_display(self) -> np.ndarray:
        """What a person reads a feature by: its name where there is one, else its label."""
        return self.features if self.feature_names is None else self.feature_names

    @property
    def n_untestable(self) -> int:
        return self.n_comparisons - self.n_tested


def _take(rows: dict, index) -> dict:
    return {k: v[index] for k, v in rows.items()}


def _sorted(rows: dict, key: str) -> dict:
    """Rows sorted by ``key``, ties by position (so merges do not depend on block order)."""
    return _take(rows, np.lexsort((rows["col"], rows["row"], rows[key])))


def _smallest(rows: dict, key: str, k: int) -> dict:
    """The ``k`` rows with the smallest ``key``, sorted by it."""
    if len(rows[key]) > k:
        rows = _take(rows, np.argpartition(rows[key], k - 1)[:k])
    return _sorted(rows, key)


def _concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _pick(values: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """The entries of ``index`` (flat positions) with the ``k`` smallest ``values[index]``."""
    if index.size <= k:
        return index
    return index[np.argpartition(values[index], k - 1)[:k]]


def _rows_at(arrays: dict, index: np.ndarray, origin, n_cols: int) -> dict:
    """Kept rows at flat positions ``index`` of a block: global row/col and ROW_FIELDS values."""
    r, c = np.divmod(index, n_cols)
    out = {"row": r + origin[0], "col": c + origin[1]}
    for name in ROW_FIELDS[2:]:
        out[name] = (np.asarray(arrays[name]).reshape(-1)[index] if name in arrays
                     else np.full(index.size, np.nan))
    return out


def _summarise_block(arrays: dict, origin, *, q_max, top, max_hits, sample, seed) -> dict:
    p = np.asarray(arrays["p_value"], dtype=np.float64)
    lfc = np.asarray(arrays["log_fold_change"])
    tested = np.isfinite(p)
    hit = (np.asarray(arrays["q_value"]) <= q_max) if "q_value" in arrays else np.zeros(p.shape, bool)
    up = hit & (lfc > 0)
    with np.errstate(divide="ignore"):
        logp = -np.log10(p[tested])
    bins = np.minimum((logp / LOG_STEP).astype(np.int64), N_LOG_BINS - 1)
    flat_p = p.reshape(-1)
    n_cols = p.shape[1]
    tested_at = np.flatnonzero(tested)
    hit_at = np.flatnonzero(hit)
    rest_at = np.flatnonzero(tested & ~hit)
    # A uniform sample that merges exactly: every point draws a key, the smallest keys stay.
    keys = np.random.default_rng([seed, origin[0], origin[1]]).random(rest_at.size)
    keep = np.argpartition(keys, sample - 1)[:sample] if keys.size > sample else slice(None)
    out = {
        "n_comparisons": p.size, "n_tested": tested_at.size, "n_hits": hit_at.size,
        "n_up": int(up.sum()),
        "p_hist": np.histogram(p[tested], bins=P_BINS, range=(0.0, 1.0))[0],
        "log_hist": np.bincount(bins, minlength=N_LOG_BINS),
        "per_perturbation": (origin[0], hit.sum(axis=1), up.sum(axis=1), tested.sum(axis=1)),
        "per_feature": (origin[1], hit.sum(axis=0), up.sum(axis=0)),
        "top": _sorted(_rows_at(arrays, _pick(flat_p, tested_at, top), origin, n_cols), "p_value"),
        "hits": _sorted(_rows_at(arrays, _pick(flat_p, hit_at, max_hits), origin, n_cols), "p_value"),
        "sample": {**_rows_at(arrays, rest_at[keep], origin, n_cols), "key": keys[keep]},
    }
    if "true_log_fold_change" in arrays:
        out["truth"] = _truth_counts(arrays, p, tested, q_max)
    return out


def _truth_counts(arrays, p, tested, q_max) -> dict:
    """Sums for FDP, power, null FPR and mean absolute errors (as ``nbdask.summarize``)."""
    true_lfc = np.asarray(arrays["true_log_fold_change"])
    null = true_lfc == 0
    est = np.asarray(arrays["log_fold_change"], dtype=np.float64)
    ok = tested & np.isfinite(est)
    mu = np.asarray(arrays["log_base_mean"], dtype=np.float64)
    out = {"n_null_tested": int((null & tested).sum()),
           "n_null_p05": int((null & tested & (p < 0.05)).sum()),
           "n_effects": int((~null).sum()), "n_ok": int(ok.sum()),
           "abs_err_lfc": float(np.abs(est[ok] - true_lfc[ok]).sum()),
           "abs_err_lbm": float(np.abs(mu[ok] - np.asarray(arrays["true_log_base_mean"])[ok]).sum())}
    if "q_value" in arrays:
        q = np.asarray(arrays["q_value"])
        for level in sorted({*TRUTH_LEVELS, q_max}):
            hit = q < level if level in TRUTH_LEVELS else q <= level
            out[f"hits@{level}"] = int(hit.sum())
            out[f"false@{level}"] = int((hit & null).sum())
    return out


def _merge(*parts: dict, n_perturbations, n_features, top, max_hits, sample) -> dict:
    out = {}
    for key in ("n_comparisons", "n_tested", "n_hits", "n_up", "p_hist", "log_hist"):
        out[key] = sum(part[key] for part in parts)
    per_p = [np.zeros(n_perturbations, np.int64) for _ in range(3)]
    per_f = [np.zeros(n_features, np.int64) for _ in range(2)]
    for part in parts:
        for totals, key in ((per_p, "per_perturbation"), (per_f, "per_feature")):
            start, *vectors = part[key]
            for total, vec in zip(totals, vectors):
                total[start:start + len(vec)] += vec
    out["per_perturbation"] = (0, *per_p)
    out["per_feature"] = (0, *per_f)
    out["top"] = _smallest(_concat([part["top"] for part in parts]), "p_value", top)
    out["hits"] = _smallest(_concat([part["hits"] for part in parts]), "p_value", max_hits)
    out["sample"] = _smallest(_concat([part["sample"] for part in parts]), "key", sample)
    if "truth" in parts[0]:
        out["truth"] = {k: sum(part["truth"][k] for part in parts) for k in parts[0]["truth"]}
    return out


def _truth_metrics(counts: dict, q_max: float) -> dict:
    """FDP/power at q < 0.05, q < 0.1 and q <= q_max; null FPR at p < 0.05; MAE (as summarize)."""
    out = {"fpr_p05_nulls": counts["n_null_p05"] / counts["n_null_tested"]
           if counts["n_null_tested"] else float("nan")}
    for level in sorted({*TRUTH_LEVELS, q_max}):
        if f"hits@{level}" not in counts:
            continue
        hits, false = counts[f"hits@{level}"], counts[f"false@{level}"]
        out[f"fdp@{level}"] = false / max(hits, 1)
        out[f"power@{level}"] = (hits - false) / max(counts["n_effects"], 1)
    n_ok = counts["n_ok"]
    out["mae_log_fold_change"] = counts["abs_err_lfc"] / n_ok if n_ok else float("nan")
    out["mae_log_base_mean"] = counts["abs_err_lbm"] / n_ok if n_ok else float("nan")
    return out


def _truth_arrays(results: xr.Dataset, truth: xr.Dataset) -> dict:
    if "true_log_fold_change" not in truth:
        raise ResultsError("truth: the cube has no true_log_fold_change; pass the simulated cube "
                           "the results came from")
    for dim in (PERTURBATION, FEATURE):
        if truth.sizes.get(dim) != results.sizes[dim]:
            raise ResultsError(f"truth: has {truth.sizes.get(dim)} {dim}s, the results have "
                               f"{results.sizes[dim]}; pass the cube the results came from")
    lfc = xr.DataArray(truth["true_log_fold_change"].variable)  # positions, not labels, align
    lbm = xr.DataArray(truth["true_log_base_mean"].variable)
    return {"true_log_fold_change": lfc,
            "true_log_base_mean": lbm.broadcast_like(lfc).transpose(PERTURBATION, FEATURE)}


def overview(results: xr.Dataset, *, q_max: float = 0.1, truth: xr.Dataset | None = None,
             top: int = TOP, max_hits: int = MAX_HITS, sample: int = SAMPLE, seed: int = 0,
             client=None) -> Overview:
    """Reduce ``results`` (and, given a simulated cube, its ``truth``) to an ``Overview``.

    Hits are comparisons with q_value <= ``q_max``. Runs one pass over the stored blocks on
    ``client`` (default: the active client, else dask's threads); the client receives one
    merged summary whose size depends on ``top``, ``max_hits``, ``sample`` and the number of
    perturbations and features, not on the number of comparisons.
    """
    from .blocks import block_tasks, compute, in_memory, tree_reduce

    missing = [n for n in ("p_value", "log_fold_change", "log_base_mean") if n not in results]
    if missing:
        raise ResultsError(f"{missing[0]}: missing from the results; pass a results Dataset "
                           f"from nbdask.test or nbdask.open_results")
    names = [n for n in ROW_FIELDS[2:] if n in results]
    arrays = {n: results[n] for n in names}
    if truth is not None:
        arrays.update(_truth_arrays(results, truth))
    sizes = {"n_perturbations": results.sizes[PERTURBATION], "n_features": results.sizes[FEATURE]}
    bounds = {"top": top, "max_hits": max_hits, "sample": sample}
    tasks = block_tasks(arrays, _summarise_block, q_max=float(q_max), seed=seed, **bounds)
    merged = compute(tree_reduce(tasks, _merge, **sizes, **bounds), client=client,
                     local=in_memory(arrays))
    _, hits_p, up_p, tested_p = merged["per_perturbation"]
    _, hits_f, up_f = merged["per_feature"]
    return Overview(
        q_max=float(q_max), n_comparisons=int(merged["n_comparisons"]),
        n_tested=int(merged["n_tested"]), n_hits=int(merged["n_hits"]), n_up=int(merged["n_up"]),
        n_down=int(merged["n_hits"] - merged["n_up"]), p_hist=merged["p_hist"],
        log_hist=merged["log_hist"], top=merged["top"], hits=merged["hits"],
        sample=merged["sample"], hits_per_perturbation=hits_p, up_per_perturbation=up_p,
        hits_per_feature=hits_f, up_per_feature=up_f, tested_per_perturbation=tested_p,
        perturbations=labels(results, PERTURBATION), features=labels(results, FEATURE),
        truth=_truth_metrics(merged["truth"], float(q_max)) if "truth" in merged else {},
        feature_names=feature_names(results))


def qq_points(ov: Overview, *, n_points: int = 400, level: float = 0.95) -> dict:
    """Expected and observed -log10 p at ~``n_points`` ranks (log-spaced), with the pointwise
    ``level`` band of the i-th smallest of m uniform p-values, Beta(i, m - i + 1).

    Ranks within the exactly kept smallest p-values read them; beyond, the observed quantile is
    interpolated in the -log10 p histogram (within LOG_STEP).
    """
    from scipy.stats import beta

    m = ov.n_tested
    if m == 0:
        empty = np.zeros(0)
        return {"expected": empty, "observed": empty, "lower": empty, "upper": empty}
    ranks = np.unique(np.round(np.logspace(0, np.log10(m), n_points)).astype(np.int64))
    expected = -np.log10((ranks - 0.5) / m)
    alpha = (1 - level) / 2
    lower = -np.log10(beta.ppf(1 - alpha, ranks, m - ranks + 1))
    upper = -np.log10(beta.ppf(alpha, ranks, m - ranks + 1))
    observed = np.empty(ranks.size)
    top = ov.top["p_value"]
    exact = ranks <= top.size
    with np.errstate(divide="ignore"):
        observed[exact] = -np.log10(top[ranks[exact] - 1])
    # Histogram from the largest -log10 p down: the rank-i value lies in the bin where the
    # count from the top reaches i; interpolate linearly inside that bin.
    counts = ov.log_hist[::-1]
    cum = np.cumsum(counts)
    r = ranks[~exact]
    b = np.searchsorted(cum, r)  # index from the top
    before = np.where(b > 0, cum[np.maximum(b - 1, 0)], 0)
    frac = (r - before - 0.5) / np.maximum(counts[b], 1)
    upper_edge = (N_LOG_BINS - b) * LOG_STEP
    observed[~exact] = upper_edge - frac * LOG_STEP
    return {"expected": expected, "observed": np.minimum(observed, LOG_MAX), "lower": lower,
            "upper": upper}

"""``nbdask calibrate``: how every method and option behaves on a design like the user's cube.

1. **Fit the design** from the cube: per-feature rates (all present samples pooled) and pooled
   dispersions (``nbdask.dispersion.feature_dispersion``), a mean–dispersion trend (running
   medians of log phi over quantile bins of log mean) and the log-normal scatter around it
   (1.4826 MAD of the residuals, at least ``MIN_SCATTER``; it includes estimation noise, so the
   simulated dispersions are at least as heterogeneous as the cube's), the size factors and
   present replicates of a sample of its perturbations as they are, and its spread of means.
2. **Simulate** a null cube (beta = 0) and an alternative cube (``EFFECT_FRACTION`` of the
   comparisons with |beta| ~ U(0.5, 2.5), random sign) of that design with
   ``generator.nb_cube``: each mean-count bin gets ``features_per_bin`` features drawn from the
   cube's features of that bin, each with its own dispersion drawn around the trend, so the
   evidence does not rest on nbdask's own assumption of one dispersion per feature mean.
3. **Run** every method/option combination nbdask offers (``methods.all_combinations``) through
   the pipeline (Zarr -> ``nbdask.test`` on the client's cluster), then report the null
   rejection rate at p < 0.05 and 0.01 per mean-count bin (cluster-robust SEs), and the false
   discovery proportion and power at q < 0.05 and 0.1.
4. **Judge**: a setting is anti-conservative in a bin when its rejection rate exceeds the level
   by more than 3 SE and by more than a fifth of the level; its FDP fails likewise (SE: the
   larger of the binomial one at q and the feature-clustered one observed). The
   recommendation is the most powerful setting (q < 0.1) that is not anti-conservative anywhere.

Sample size: an FPR of 0.05 has binomial SE sqrt(0.05 x 0.95 / n), so SE 0.005 needs n = 1,900
null comparisons per bin; comparisons of one feature are correlated (shared control and pooled
dispersion), so the default doubles that (``DESIGN_EFFECT``) and reports the SE it achieved.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from . import metrics
from .generator import nb_cube
from .methods import Setting, all_combinations, test_defaults
from .progress import Progress

TARGET_SE = 0.005
DESIGN_EFFECT = 2.0
MAX_PERTURBATIONS = 100
EFFECT_FRACTION = 0.1
MIN_SCATTER = 0.1
Q_LEVELS = (0.05, 0.1)
#: A rate counts as too high when above level + 3 SE and above (1 + EXCESS) x level.
SIGMAS, EXCESS = 3.0, 0.2
#: Dispersions below this are treated as this when fitting the trend (the pooled estimate
#: floors at 1e-8 for Poisson-like features, which would drag a log-scale fit).
TREND_FLOOR = 1e-4


def null_sample_size(se: float = TARGET_SE, level: float = 0.05) -> int:
    """Null comparisons that give a binomial SE of ``se`` on a rejection rate of ``level``."""
    return math.ceil(level * (1 - level) / se ** 2)


@dataclass
class Design:
    """What ``calibrate`` takes from a cube: its features, trend, scatter and samples."""

    rate: np.ndarray  # [G] pooled rate per unit size factor
    log_dispersion: np.ndarray  # [G] pooled log phi (nbdask's feature dispersion)
    trend_x: np.ndarray  # knots: log mean count
    trend_y: np.ndarray  # median log phi at the knots
    scatter: float  # log-normal SD of phi around the trend
    size_factor: np.ndarray  # [P, R] with NaN for absent replicates
    control_size_factor: np.ndarray  # [C]

    @property
    def typical_size_factor(self) -> float:
        sf = np.concatenate([self.size_factor.ravel(), self.control_size_factor])
        return float(np.exp(np.mean(np.log(sf[np.isfinite(sf)]))))

    @property
    def mean_count(self) -> np.ndarray:
        return self.rate * self.typical_size_factor

    def trend(self, log_mean: np.ndarray) -> np.ndarray:
        return np.interp(log_mean, self.trend_x, self.trend_y)

    def summary(self) -> dict:
        present = np.isfinite(self.size_factor).sum(axis=1)
        return {"perturbations": int(self.size_factor.shape[0]), "features": int(self.rate.size),
                "control_replicates": int(self.control_size_factor.size),
                "treated_replicates_min": int(present.min()), "treated_replicates_max": int(present.max()),
                "ragged_fraction": float(np.mean(present < self.size_factor.shape[1])),
                "size_factor_log_sd": float(np.nanstd(np.log(self.size_factor))),
                "median_mean_count": float(np.median(self.mean_count)),
                "features_mean_below_1": float(np.mean(self.mean_count < 1)),
                "median_dispersion": float(np.exp(np.median(self.log_dispersion))),
                "dispersion_scatter_log_sd": self.scatter}


def fit_design(cube: xr.Dataset) -> Design:
    """Fit the design of a (validated) cube; runs two reductions on the active client."""
    from ..dispersion import feature_dispersion

    pooled = feature_dispersion(cube)
    sf = cube["size_factor"]
    present = np.isfinite(sf)
    treated = cube["counts"].where(present).sum(("perturbation", "replicate"))
    total = (treated + cube["control_counts"].sum("control_replicate")).values.astype(float)
    library = float(sf.where(present, 0.0).sum()) + float(cube["control_size_factor"].sum())
    rate = total / library
    log_phi = pooled["feature_log_dispersion"].values.astype(float)
    size_factor = np.asarray(sf.values, float)
    csf = np.asarray(cube["control_size_factor"].values, float)
    d = Design(rate, log_phi, np.zeros(1), np.zeros(1), 0.0, size_factor, csf)
    x, y = np.log(np.maximum(d.mean_count, 1e-12)), np.log(np.maximum(np.exp(log_phi), TREND_FLOOR))
    keep = rate > 0
    d.trend_x, d.trend_y = _running_median(x[keep], y[keep])
    resid = y[keep] - d.trend(x[keep])
    mad = float(np.median(np.abs(resid - np.median(resid)))) * 1.4826 if resid.size else 0.0
    d.scatter = max(mad, MIN_SCATTER)
    return d


def _running_median(x: np.ndarray, y: np.ndarray, bins: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Medians of y over quantile bins of x (at least 20 points each): knots for interpolation."""
    if x.size == 0:
        return np.zeros(1), np.log(np.full(1, 0.1))
    k = max(1, min(bins, x.size // 20))
    edges = np.quantile(x, np.linspace(0, 1, k + 1))
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, k - 1)
    kx = np.array([np.median(x[idx == i]) for i in range(k) if np.any(idx == i)])
    ky = np.array([np.median(y[idx == i]) for i in range(k) if np.any(idx == i)])
    return kx, ky


def plan(design: Design, *, perturbations: int | None = None, features_per_bin: int | None = None,
         se: float = TARGET_SE) -> dict:
    """Simulated perturbations and features per bin for an FPR SE of ``se`` per bin."""
    p = min(design.size_factor.shape[0], perturbations or MAX_PERTURBATIONS)
    need = math.ceil(DESIGN_EFFECT * null_sample_size(se))
    f = features_per_bin or max(8, math.ceil(need / p))
    bins = metrics.mean_count_bins(design.mean_count)
    present = [b for b in metrics.BIN_LABELS if np.any((bins == b) & (design.rate > 0))]
    return {"perturbations": p, "features_per_bin": f, "bins": present,
            "null_per_bin_needed": null_sample_size(se), "null_per_bin": p * f}


def simulate_like(design: Design, rng: np.random.Generator, *, perturbations: int,
                  features_per_bin: int, bins: list[str]) -> tuple[xr.Dataset, xr.Dataset]:
    """(null cube, alternative cube) of the design: the same features, dispersions and samples."""
    rows = np.sort(rng.choice(design.size_factor.shape[0], perturbations, replace=False))
    sf = design.size_factor[rows]
    labels = metrics.mean_count_bins(design.mean_count)
    picks = []
    for b in bins:
        pool = np.flatnonzero((labels == b) & (design.rate > 0))
        picks.append(rng.choice(pool, features_per_bin, replace=pool.size < features_per_bin))
    picks = np.concatenate(picks)
    rate = design.rate[picks]
    log_phi = design.trend(np.log(design.mean_count[picks])) + design.scatter * rng.standard_normal(picks.size)
    phi = np.exp(np.clip(log_phi, math.log(TREND_FLOOR), math.log(100.0)))
    shape = (perturbations, picks.size)
    from ..simulate import EFFECT_RANGE

    effect = rng.random(shape) < EFFECT_FRACTION
    lfc = np.where(effect, rng.uniform(*EFFECT_RANGE, shape) * rng.choice([-1.0, 1.0], shape), 0.0)
    kw = dict(rate=rate, dispersion=phi, size_factor=sf, control_size_factor=design.control_size_factor)
    return (nb_cube(rng, log_fold_change=np.zeros(shape), **kw), nb_cube(rng, log_fold_change=lfc, **kw))


def _store(cube: xr.Dataset, path: str, workers: int) -> None:
    from ..io import save_cube

    p, g = cube.sizes["perturbation"], cube.sizes["feature"]
    step = max(1, -(-g // max(2 * workers, 1)))
    save_cube(cube.chunk({"perturbation": p, "feature": step}), path)


def _run(setting: Setting, path: str) -> tuple[xr.Dataset | None, str]:
    """p and q of one setting on a stored cube (computed on the active client), and a note."""
    from ..errors import NbdaskError
    from ..fdr import adjust
    from ..io import open_cube
    from ..pipeline import test

    cube = open_cube(path)
    note = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if setting.fn is not None:
                res = setting.fn(cube)
            else:
                res = test(cube, method=setting.method, **setting.opts)
        except NbdaskError as err:
            return None, f"not run: {err}"
    if caught:
        note = str(caught[0].message).split(";")[0]
    res = res[[v for v in ("p_value", "q_value") if v in res]].compute()
    if "q_value" not in res:
        res["q_value"] = adjust(res["p_value"], method="bh")
    return res, note


def evaluate(null_path: str, alt_path: str, settings: list[Setting], truth: np.ndarray,
             bins: np.ndarray, progress: Progress) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-bin null rejection rates and FDP/power rows of every setting."""
    feature = np.broadcast_to(np.arange(truth.shape[1])[None, :], truth.shape)
    fpr_rows, fdr_rows = [], []
    for s in settings:
        null, note = _run(s, null_path)
        alt, note_alt = _run(s, alt_path) if null is not None else (None, note)
        progress.step(s.label)
        base = {"setting": s.label, "estimator": s.estimator, "role": s.role,
                "dispersion": s.opts.get("dispersion"), "test": s.opts.get("test"),
                "note": note or note_alt}
        if null is None or alt is None:
            fdr_rows.append({**base, "status": "not run"})
            continue
        p = null["p_value"].values
        for label in ["all", *dict.fromkeys(bins.ravel())]:
            sel = np.ones(p.shape, bool) if label == "all" else bins == label
            row = {**base, "mean_count_bin": label, "comparisons": int(sel.sum())}
            for level in metrics.LEVELS:
                tag = f"{level:g}".replace("0.", "")
                row[f"fpr_{tag}"], row[f"se_{tag}"] = metrics.rejection(p[sel], level, feature[sel])
            fpr_rows.append(row)
        q = alt["q_value"].values
        row = {**base, "status": "run"}
        for level in Q_LEVELS:
            tag = f"{level:g}".replace("0.", "")
            (row[f"fdp_{tag}"], row[f"power_{tag}"], row[f"discoveries_{tag}"],
             row[f"fdp_se_{tag}"]) = metrics.fdp_power(q, truth == 0, level, feature)
        fdr_rows.append(row)
    return pd.DataFrame(fpr_rows), pd.DataFrame(fdr_rows)


def too_high(value: float, se: float, level: float) -> bool:
    return bool(value > level + SIGMAS * se and value > (1 + EXCESS) * level)


def judge(fpr: pd.DataFrame, fdr: pd.DataFrame) -> pd.DataFrame:
    """One verdict row per setting: anti-conservative bins, FDP failures, conservative bins."""
    rows = []
    for _, r in fdr.iterrows():
        if r.get("status") != "run":
            rows.append({"setting": r["setting"], "role": r["role"], "verdict": "not run",
                         "problems": r.get("note", "")})
            continue
        f = fpr[(fpr["setting"] == r["setting"]) & (fpr["mean_count_bin"] != "all")]
        hot = [f"{b['mean_count_bin']} (FPR.05 {b['fpr_05']:.3f} ± {b['se_05']:.3f})" for _, b in f.iterrows()
               if too_high(b["fpr_05"], b["se_05"], 0.05)]
        hot += [f"{b['mean_count_bin']} (FPR.01 {b['fpr_01']:.3f} ± {b['se_01']:.3f})" for _, b in f.iterrows()
                if too_high(b["fpr_01"], b["se_01"], 0.01) and not too_high(b["fpr_05"], b["se_05"], 0.05)]
        for level in Q_LEVELS:
            tag = f"{level:g}".replace("0.", "")
            # The larger of the binomial SE at the nominal level and the clustered SE observed.
            n = max(int(r[f"discoveries_{tag}"]), 1)
            se = max(math.sqrt(level * (1 - level) / n), np.nan_to_num(r[f"fdp_se_{tag}"]))
            if too_high(r[f"fdp_{tag}"], se, level):
                hot.append(f"FDP {r[f'fdp_{tag}']:.3f} ± {se:.3f} at q < {level:g}")
        cold = [b["mean_count_bin"] for _, b in f.iterrows()
                if b["fpr_05"] < 0.05 - SIGMAS * b["se_05"] and b["fpr_05"] < (1 - EXCESS) * 0.05]
        verdict = "anti-conservative" if hot else ("conservative" if cold else "calibrated")
        rows.append({"setting": r["setting"], "role": r["role"], "verdict": verdict,
                     "problems": "; ".join(hot) if hot else (f"conservative in {', '.join(cold)}" if cold else ""),
                     "power_05": r["power_05"], "power_1": r["power_1"],
                     "fdp_05": r["fdp_05"], "fdp_1": r["fdp_1"]})
    return pd.DataFrame(rows)


def recommend(verdicts: pd.DataFrame, n_alternatives: int) -> dict:
    """The most powerful setting (q < 0.1, then 0.05) that is not anti-conservative; the
    default instead when it is not anti-conservative and its power at q < 0.1 is within 2 SE
    (binomial, over the ``n_alternatives`` true effects) of that setting's."""
    ok = verdicts[verdicts["verdict"].isin(["calibrated", "conservative"])]
    default = verdicts[verdicts["role"] == "default"]
    default = default.iloc[0].to_dict() if len(default) else None
    best, why = None, ""
    if len(ok):
        best = ok.sort_values(["power_1", "power_05"], ascending=False).iloc[0].to_dict()
        why = "the most powerful setting at q < 0.1 that is not anti-conservative"
        se = math.sqrt(max(best["power_1"] * (1 - best["power_1"]), 1e-12) / max(n_alternatives, 1))
        if (default is not None and default["setting"] != best["setting"]
                and default["verdict"] in ("calibrated", "conservative")
                and default["power_1"] >= best["power_1"] - 2 * se):
            why = (f"not anti-conservative, and its power at q < 0.1 is within 2 SE ({2 * se:.3f}) "
                   f"of the most powerful such setting ({best['setting']}, {best['power_1']:.3f})")
            best = default
        elif default is not None and default["setting"] == best["setting"]:
            why += " (nbdask's default)"
    return {"recommended": best, "default": default, "why": why}


def headline(rec: dict) -> list[str]:
    """The verdict on the defaults and the recommendation, one line each (CLI and summary)."""
    d, r = rec["default"], rec["recommended"]
    lines = []
    if d is not None and d["verdict"] == "anti-conservative":
        lines.append(f"WARNING: this design is outside what nbdask's defaults are calibrated for: "
                     f"{d['setting']} is anti-conservative here ({d['problems']})")
    elif d is not None:
        lines.append(f"defaults ({d['setting']}): {d['verdict']}" + (f" ({d['problems']})" if d["problems"] else ""))
    if r is None:
        lines.append("recommended: none: no setting is calibrated on this design; treat every q-value "
                     "with suspicion")
    else:
        lines.append(f"recommended: {r['setting']} (FDP {r['fdp_05']:.3f} / {r['fdp_1']:.3f} and power "
                     f"{r['power_05']:.3f} / {r['power_1']:.3f} at q < 0.05 / 0.1): {rec['why']}")
    return lines


def design_notes(design: Design) -> list[str]:
    """Where the cube's design lies outside what nbdask's defaults were checked on."""
    from ..kernels.transformer import MAX_REPLICATES

    s = design.summary()
    notes = []
    if s["perturbations"] < 20:
        notes.append(f"only {s['perturbations']} perturbations: the pooled dispersion modes borrow from "
                     "few groups (the defaults were checked on screens of hundreds)")
    if s["treated_replicates_max"] > MAX_REPLICATES or s["control_replicates"] > MAX_REPLICATES \
            or s["treated_replicates_min"] < 2:
        notes.append(f"groups of {s['treated_replicates_min']}-{max(s['treated_replicates_max'], s['control_replicates'])} "
                     f"replicates: outside the transformer's training prior (2-{MAX_REPLICATES})")
    if s["features_mean_below_1"] > 0.5:
        notes.append(f"{s['features_mean_below_1']:.0%} of features average below 1 count per sample")
    if s["size_factor_log_sd"] > 0.7:
        notes.append(f"size factors spread widely (log-SD {s['size_factor_log_sd']:.2f}); the exact "
                     "test's moment matching is exact only at equal size factors")
    return notes


def calibrate(cube: xr.Dataset, out, *, seed: int = 0, perturbations: int | None = None,
              features_per_bin: int | None = None, se: float = TARGET_SE,
              settings: list[Setting] | None = None, extra: list[Setting] = (),
              workers: int = 2, progress: Progress | None = None) -> dict:
    """Fit ``cube``'s design, simulate it, run every setting, write tables, figures and
    ``summary.md`` (last) into ``out``; returns the verdicts and the recommendation.

    Runs on the active dask client. ``extra``: settings with an ``fn(cube) -> results`` (e.g. a
    method under evaluation); they are judged like nbdask's own.
    """
    from . import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").unlink(missing_ok=True)
    progress = progress or Progress()
    settings = list(settings if settings is not None else all_combinations()) + list(extra)
    progress.add(2 + len(settings))
    design = fit_design(cube)
    progress.step("fitted the design")
    p = plan(design, perturbations=perturbations, features_per_bin=features_per_bin, se=se)
    null, alt = simulate_like(design, np.random.default_rng(seed), perturbations=p["perturbations"],
                              features_per_bin=p["features_per_bin"], bins=p["bins"])
    tmp = tempfile.mkdtemp(prefix="nbdask-calibrate-")
    try:
        _store(null, f"{tmp}/null.zarr", workers)
        _store(alt, f"{tmp}/alt.zarr", workers)
        progress.step("simulated null and alternative cubes")
        truth = alt["true_log_fold_change"].values
        from .study import mean_counts

        bins = np.broadcast_to(metrics.mean_count_bins(mean_counts(null))[None, :], truth.shape)
        fpr, fdr = evaluate(f"{tmp}/null.zarr", f"{tmp}/alt.zarr", settings, truth, bins, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verdicts = judge(fpr, fdr)
    rec = recommend(verdicts, int((truth != 0).sum()))
    features = pd.DataFrame({"mean_count": design.mean_count, "log_dispersion": design.log_dispersion,
                             "trend_log_dispersion": design.trend(np.log(np.maximum(design.mean_count, 1e-12)))})
    tables = {"calibrate_fpr": fpr, "calibrate_fdr": fdr, "calibrate_verdicts": verdicts,
              "calibrate_design": pd.DataFrame([{**design.summary(), **{k: v for k, v in p.items() if k != "bins"}}])}
    for name, df in tables.items():
        df.to_csv(out / f"{name}.csv", index=False, float_format="%.6g")
    draw = plots.available()
    if draw:
        plots.dispersion_trend(features, design.trend_x, design.trend_y, design.scatter,
                               out / "calibrate_dispersion_trend.png", floor=TREND_FLOOR)
        plots.fpr_heatmap(fpr, out / "calibrate_fpr.png")
        plots.fdp_power(fdr, out / "calibrate_fdr_power.png")
    (out / "summary.md").write_text(_summary(design, p, fpr, fdr, verdicts, rec, draw, seed))
    return {"verdicts": verdicts, "recommendation": rec, "fpr": fpr, "fdr": fdr, "plan": p,
            "notes": design_notes(design)}


def _summary(design, p, fpr, fdr, verdicts, rec, draw, seed) -> str:
    from .report import _md

    s = design.summary()
    defaults = test_defaults()
    lines = ["# nbdask calibrate", ""] + [f"**{h}**" if h.startswith("WARNING") else h
                                          for h in headline(rec)] + [""]
    notes = design_notes(design)
    if notes:
        lines += ["Design notes: " + "; ".join(notes) + ".", ""]
    lines += ["## The design, as fitted from the cube", "", _md(pd.DataFrame([s]).T.reset_index().rename(
        columns={"index": "quantity", 0: "value"}), "{:.4g}"), "",
              f"Simulated: {p['perturbations']} perturbations (sampled, size factors and present replicates "
              f"as in the cube) × {p['features_per_bin']} features per mean-count bin ({', '.join(p['bins'])}); "
              f"{p['null_per_bin']:,} null comparisons per bin (SE 0.005 at FPR 0.05 needs "
              f"{p['null_per_bin_needed']:,} independent ones). Dispersions: log-normal (SD "
              f"{design.scatter:.2f}) around the cube's mean–dispersion trend. Alternative cube: "
              f"{EFFECT_FRACTION:.0%} effects, |β| ~ U(0.5, 2.5). Seed {seed}. nbdask.test defaults: "
              + ", ".join(f"{k}={defaults[k]!r}" for k in ("method", "dispersion", "test", "fdr")) + ".", "",
              "## Verdicts", "", "Anti-conservative: a bin's rejection rate above the level by more than "
              f"{SIGMAS:g} SE and by more than {EXCESS:.0%}; or the FDP likewise above q.", "",
              _md(verdicts[["setting", "role", "verdict", "power_05", "power_1", "fdp_05", "fdp_1", "problems"]]
                  if "power_05" in verdicts else verdicts), "",
              "## Null rejection rate at p < 0.05 per mean-count bin (± SE)", ""]
    if len(fpr):
        f = fpr.assign(v=[f"{a:.3f} ± {b:.3f}" for a, b in zip(fpr["fpr_05"], fpr["se_05"])])
        lines += [_md(f.pivot_table(index="setting", columns="mean_count_bin", values="v",
                                    aggfunc="first", sort=False).reset_index()), ""]
        f = fpr.assign(v=[f"{a:.3f} ± {b:.3f}" for a, b in zip(fpr["fpr_01"], fpr["se_01"])])
        lines += ["## At p < 0.01", "", _md(f.pivot_table(index="setting", columns="mean_count_bin", values="v",
                                                          aggfunc="first", sort=False).reset_index()), ""]
    if not draw:
        lines.append("matplotlib is not installed: no figures (pip install 'nbdask[bench]').")
    return "\n".join(lines) + "\n"

"""Run summaries and, for simulated cubes, accuracy against the truth."""

from __future__ import annotations

import numpy as np
import xarray as xr


def summarize(results: xr.Dataset, *, truth: xr.Dataset | None = None) -> dict:
    """Counts of a results Dataset: comparisons, tested, untestable, significant at q < 0.05/0.1.

    Uses the counts recorded by ``save_results`` when present, else computes them. With
    ``truth`` (a simulated cube), adds false discovery proportion and power at q < 0.05 and
    0.1, the false-positive rate of the nulls at p < 0.05, and mean absolute errors.
    """
    attrs = results.attrs
    out = {"method": attrs.get("method"), "dispersion": attrs.get("dispersion"),
           "test": attrs.get("test"), "fdr": attrs.get("fdr"),
           "n_comparisons": int(attrs.get("n_comparisons", results["p_value"].size))}
    if "n_tests" in attrs and "n_significant_q05" in attrs:
        out["n_tests"] = int(attrs["n_tests"])
        out["n_significant_q05"] = int(attrs["n_significant_q05"])
        out["n_significant_q10"] = int(attrs["n_significant_q10"])
    else:
        p = results["p_value"].values
        out["n_tests"] = int(np.isfinite(p).sum())
        if "q_value" in results:
            q = results["q_value"].values
            out["n_significant_q05"] = int((q < 0.05).sum())
            out["n_significant_q10"] = int((q < 0.1).sum())
    out["n_untestable"] = out["n_comparisons"] - out["n_tests"]
    if "wall_seconds" in attrs:
        out["wall_seconds"] = float(attrs["wall_seconds"])
        out["comparisons_per_second"] = out["n_comparisons"] / max(out["wall_seconds"], 1e-9)
    if truth is not None:
        out.update(_against_truth(results, truth))
    return out


#: How ``nbdask report`` and ``nbdask test`` print a summary's keys, in this order (``--json``
#: keeps the keys).
TEXT = {
    "method": "method", "dispersion": "dispersion", "test": "test", "fdr": "fdr",
    "n_comparisons": "comparisons", "n_tests": "tested", "n_untestable": "untestable",
    "n_significant_q05": "q < 0.05", "n_significant_q10": "q < 0.10",
    "wall_seconds": "compute time", "comparisons_per_second": "comparisons/s",
    "fpr_p05_nulls": "null FPR, p < 0.05",
    "fdp_q05": "FDP, q < 0.05", "power_q05": "power, q < 0.05",
    "fdp_q10": "FDP, q < 0.10", "power_q10": "power, q < 0.10",
    "mae_log_fold_change": "MAE, log fold change", "mae_log_base_mean": "MAE, log base mean",
}
#: The keys that time a run (``nbdask test`` prints its own, from process start).
TIMING = ("wall_seconds", "comparisons_per_second")


def text_lines(summary: dict, *, timing: bool = True) -> list[str]:
    """``summarize``'s dict as aligned lines a person reads: labels from TEXT (then any other
    key as it is), counts with thousands separators, times in seconds."""
    keys = [k for k in TEXT if k in summary] + [k for k in summary if k not in TEXT]
    lines = []
    for key in keys:
        if key in TIMING and not timing:
            continue
        lines.append(line(TEXT.get(key, key), summary[key], key))
    return lines


def line(label: str, value, key: str = "") -> str:
    """One aligned summary line."""
    if key == "wall_seconds":
        text = f"{value:.1f} s"
    elif key == "comparisons_per_second":
        text = f"{value:,.0f}"
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        text = str(value)
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = f"{value:.4f}"
    return f"{label:<20} {text:>14}"


def _against_truth(results: xr.Dataset, truth: xr.Dataset) -> dict:
    lfc = truth["true_log_fold_change"].values
    null = lfc == 0
    p = results["p_value"].values
    tested = np.isfinite(p)
    out = {"fpr_p05_nulls": float((p[null & tested] < 0.05).mean()) if (null & tested).any() else float("nan")}
    if "q_value" in results:
        q = results["q_value"].values
        for level, tag in ((0.05, "q05"), (0.1, "q10")):
            hit = q < level
            out[f"fdp_{tag}"] = float((hit & null).sum() / max(hit.sum(), 1))
            out[f"power_{tag}"] = float((hit & ~null).sum() / max((~null).sum(), 1))
    est = results["log_fold_change"].values
    ok = tested & np.isfinite(est)
    out["mae_log_fold_change"] = float(np.abs(est[ok] - lfc[ok]).mean()) if ok.any() else float("nan")
    mu = results["log_base_mean"].values
    true_mu = np.broadcast_to(truth["true_log_base_mean"].values[None, :], mu.shape)
    out["mae_log_base_mean"] = float(np.abs(mu[ok] - true_mu[ok]).mean()) if ok.any() else float("nan")
    return out

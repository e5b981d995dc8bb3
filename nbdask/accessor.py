"""The ``.nb`` accessor on xarray Datasets, registered when ``nbdask`` is imported.

``cube.nb.test(...)`` tests a count cube (lazy when the cube is), ``results.nb.hits(q_max=0.1)``
gives the tidy hit table, ``results.nb.report(...)`` the HTML report, and ``results.nb`` shown
in Jupyter is a small card: method, counts and hits. Only xarray is imported here; each method
imports what it needs when called, so registering costs nothing more at ``import nbdask``.
"""

from __future__ import annotations

import html

import numpy as np
import xarray as xr


@xr.register_dataset_accessor("nb")
class NbAccessor:
    """nbdask on a Dataset: ``test`` for a count cube; ``hits``, ``report``, ``summary`` for results."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def test(self, **options) -> xr.Dataset:
        """``nbdask.test(cube, **options)``: the results Dataset, lazy when the cube is."""
        from .pipeline import test

        return test(self._ds, **options)

    def hits(self, q_max: float | None = 0.1, *, perturbations=None, features=None, client=None):
        """``nbdask.to_dataframe``: one row per comparison with q_value <= ``q_max`` (None: all)."""
        from .export import to_dataframe

        return to_dataframe(self._ds, q_max=q_max, perturbations=perturbations,
                            features=features, client=client)

    def report(self, path=None, *, truth: xr.Dataset | None = None, q_max: float = 0.1,
               client=None):
        """The HTML report (``nbdask.report.render``); written to ``path`` when given. The
        returned ``Report`` displays inline in Jupyter."""
        from .report import render

        report = render(self._ds, truth=truth, q_max=q_max, client=client,
                        source=None if path is None else str(path))
        if path is not None:
            report.save(path)
        return report

    def summary(self, *, truth: xr.Dataset | None = None) -> dict:
        """``nbdask.summarize``: counts of tested, untestable and significant comparisons."""
        from .summary import summarize

        return summarize(self._ds, truth=truth)

    def _repr_html_(self) -> str:
        return card(self._ds)


def _row(key: str, value) -> str:
    return f"<tr><th style='text-align:left;padding:1px 12px 1px 0;font-weight:500;color:#59636e'>" \
           f"{html.escape(key)}</th><td style='padding:1px 0'>{html.escape(str(value))}</td></tr>"


def card(ds: xr.Dataset, *, n_hits: int = 5) -> str:
    """A small HTML card for a results (or cube) Dataset. Reads attributes only, except for
    results held in memory, whose top ``n_hits`` hits it lists; it never computes a lazy one."""
    box = ("<div style='font:13px/1.4 system-ui,sans-serif;border:1px solid #d8dee4;"
           "border-radius:8px;padding:10px 14px;max-width:640px'>")
    sizes = f"{ds.sizes.get('perturbation', 0):,} perturbations × {ds.sizes.get('feature', 0):,} features"
    if "p_value" not in ds:
        kind = "count cube" if "counts" in ds else "Dataset"
        hint = ".nb.test() tests it (lazy)" if kind == "count cube" else "no nbdask variables"
        return f"{box}<b>nbdask {kind}</b> · {sizes}<br><span style='color:#59636e'>{hint}</span></div>"
    a = ds.attrs
    rows = [_row(k, a[k]) for k in ("method", "test", "dispersion", "fdr", "fdr_scope") if k in a]
    lazy = ds["p_value"].chunks is not None
    counts = _counts(ds, lazy)
    if counts:
        n = counts["n_comparisons"]
        rows += [_row("comparisons", f"{n:,}"), _row("tested", f"{counts['n_tests']:,}"),
                 _row("untestable", f"{n - counts['n_tests']:,}")]
        for key, label in (("n_significant_q05", "q < 0.05"), ("n_significant_q10", "q < 0.1")):
            if key in counts:
                rows.append(_row(label, f"{counts[key]:,}"))
    else:
        rows.append(_row("status", "lazy, not computed: nbdask.save_results or .compute()"))
    if "nbdask_status" in a:
        rows.append(_row("store", a["nbdask_status"]))
    top = ""
    if not lazy and "q_value" in ds:
        top = _top_hits(ds, n_hits)
    hint = ("<span style='color:#59636e'>.nb.hits(q_max=0.1) → DataFrame · "
            ".nb.report('report.html') → HTML report</span>")
    return (f"{box}<b>nbdask results</b> · {sizes}<table style='margin:6px 0'>{''.join(rows)}"
            f"</table>{top}{hint}</div>")


def _counts(ds: xr.Dataset, lazy: bool) -> dict:
    """Counts from the attributes save_results wrote, or from values already in memory."""
    a = ds.attrs
    n = int(a.get("n_comparisons", ds["p_value"].size))
    if "n_tests" in a:
        out = {"n_comparisons": n, "n_tests": int(a["n_tests"])}
        out.update({k: int(a[k]) for k in ("n_significant_q05", "n_significant_q10") if k in a})
        return out
    if lazy:
        return {}
    out = {"n_comparisons": n, "n_tests": int(np.isfinite(ds["p_value"].values).sum())}
    if "q_value" in ds:
        q = ds["q_value"].values
        out.update(n_significant_q05=int((q < 0.05).sum()), n_significant_q10=int((q < 0.1).sum()))
    return out


def _top_hits(ds: xr.Dataset, n: int) -> str:
    from .schema import FEATURE, PERTURBATION, feature_names, labels

    q = np.asarray(ds["q_value"].values)
    p = np.asarray(ds["p_value"].values)
    hit = np.flatnonzero(q.reshape(-1) <= 0.1)
    if hit.size == 0:
        return "<p style='margin:4px 0'>no hits at q ≤ 0.1</p>"
    best = hit[np.argsort(p.reshape(-1)[hit], kind="stable")[:n]]
    rows_i, cols_i = np.divmod(best, q.shape[1])
    lfc = np.asarray(ds["log_fold_change"].values)
    names = feature_names(ds)
    columns = [labels(ds, PERTURBATION), labels(ds, FEATURE)] + ([] if names is None else [names])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c[k])}</td>"
                                    for c, k in zip(columns, (i, j, j))) +
                   f"<td style='text-align:right'>{lfc[i, j] / np.log(2):+.2f}</td>"
                   f"<td style='text-align:right'>{p[i, j]:.2e}</td><td style='text-align:right'>{q[i, j]:.2e}</td></tr>"
                   for i, j in zip(rows_i, cols_i))
    name = "<th>name</th>" if len(columns) == 3 else ""
    return (f"<table style='margin:4px 0'><tr><th>perturbation</th><th>feature</th>{name}"
            f"<th>log2 FC</th><th>p</th><th>q</th></tr>{body}</table>")

"""A self-contained HTML report of a results Dataset (figures embedded as PNG, no network).

Sections (element ids): ``run`` (metadata and options), ``counts``, ``pvalues`` (histogram),
``qq`` (-log10 p against the uniform, with its null band), ``volcano``, ``screen`` (hits per
perturbation and per feature), ``top-hits`` and, given the simulated truth, ``truth`` (FDP,
power, null FPR, errors). Everything is drawn from ``nbdask.overview``: one bounded pass over
the blocks on the workers.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import OptionError
from .overview import Overview, overview

SECTIONS = ("run", "counts", "pvalues", "qq", "volcano", "screen", "top-hits")
#: Rows of the top-hit table.
TOP_ROWS = 50

CSS = """
.nbdask-report { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: #1f2328; max-width: 1080px; margin: 0 auto; padding: 8px 24px 40px; }
.nbdask-report h1 { font-size: 26px; margin: 18px 0 2px; }
.nbdask-report h2 { font-size: 18px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 1px solid #d8dee4; }
.nbdask-report .sub { color: #59636e; margin: 0 0 14px; }
.nbdask-report section { margin: 22px 0; }
.nbdask-report .cards { display: flex; flex-wrap: wrap; gap: 10px; }
.nbdask-report .card { flex: 0 0 auto; min-width: 110px; border: 1px solid #d8dee4; border-radius: 8px; padding: 10px 14px; background: #f6f8fa; }
.nbdask-report .card b { display: block; font-size: 21px; font-variant-numeric: tabular-nums; white-space: nowrap; }
.nbdask-report .card small { color: #59636e; font-size: 12px; }
.nbdask-report .card.hit { background: #fff4ec; border-color: #f0c2a0; }
.nbdask-report table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
.nbdask-report th, .nbdask-report td { padding: 3px 10px; border-bottom: 1px solid #eaeef2; text-align: left; }
.nbdask-report th { background: #f6f8fa; font-weight: 600; }
.nbdask-report td.num { text-align: right; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
.nbdask-report table.kv { width: auto; min-width: 55%; }
.nbdask-report table.kv td:first-child { color: #59636e; padding-right: 28px; }
.nbdask-report .grid { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; align-items: start; }
.nbdask-report figure { margin: 0; }
.nbdask-report figcaption { color: #59636e; font-size: 12.5px; margin-top: 4px; }
.nbdask-report img { max-width: 100%; height: auto; display: block; }
.nbdask-report pre { background: #f6f8fa; padding: 8px 12px; border-radius: 6px; overflow-x: auto; font-size: 12px; }
.nbdask-report .up { color: #b54708; } .nbdask-report .down { color: #0b5cad; }
.nbdask-report .note { color: #59636e; font-size: 12.5px; }
"""

#: Marks the document with how many of its images decoded and how many of its cards and table
#: cells show less than their text (the browser test reads both).
SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll(".nbdask-report img"));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.documentElement.setAttribute("data-images-decoded", ok + "/" + imgs.length);
  var boxes = Array.prototype.slice.call(document.querySelectorAll(
    ".nbdask-report .card, .nbdask-report .card b, .nbdask-report td"));
  var cut = boxes.filter(function (e) { return e.scrollWidth > e.clientWidth + 1; }).length;
  document.documentElement.setAttribute("data-clipped", String(cut));
});
</script>"""


def _n(x) -> str:
    return f"{int(x):,}"


def _g(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    x = float(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _run_section(results: xr.Dataset, source: str | None) -> str:
    a = results.attrs
    keys = [("method", "method"), ("test", "test"), ("dispersion", "dispersion"),
            ("FDR", "fdr"), ("FDR scope", "fdr_scope"), ("FDR backend", "fdr_backend"),
            ("Storey π₀", "storey_pi0"), ("perturbations", "n_perturbations"),
            ("features", "n_features"), ("control replicates", "n_control_replicates"),
            ("treated replicates", None), ("compute time", "wall_seconds"),
            ("nbdask version", "nbdask_version"), ("status", "nbdask_status")]
    rows = []
    if source:
        rows.append(("results", html.escape(source)))
    for label, key in keys:
        if key is None:
            if "min_replicates" in a:
                rows.append((label, f"{a['min_replicates']}–{a['max_replicates']} per perturbation"))
            continue
        if key not in a:
            continue
        value = a[key]
        if key == "wall_seconds":
            value = f"{float(value):,.1f} s"
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = _n(value)
        elif isinstance(value, (float, np.floating)):
            value = _g(value, 4)
        rows.append((label, html.escape(str(value))))
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    options = a.get("options")
    pretty = json.dumps(json.loads(options), indent=2, sort_keys=True) if options else "{}"
    return (f'<section id="run"><h2>Run</h2><div class="grid"><table class="kv">{body}</table>'
            f'<div><p class="note">options recorded with the results</p>'
            f"<pre>{html.escape(pretty)}</pre></div></div></section>")


def _counts_section(ov: Overview) -> str:
    n_p = int((ov.hits_per_perturbation > 0).sum())
    n_f = int((ov.hits_per_feature > 0).sum())
    cards = [
        (_n(ov.n_comparisons), "comparisons", ""),
        (_n(ov.n_tested), "tested", ""),
        (_n(ov.n_untestable), "untestable (NaN p)", ""),
        (_n(ov.n_hits), f"significant, q ≤ {ov.q_max:g}", "hit"),
        (f'<span class="up">{_n(ov.n_up)}</span> / <span class="down">{_n(ov.n_down)}</span>',
         "up / down", "hit"),
        (f"{n_p:,} / {ov.perturbations.size:,}", "perturbations with a hit", ""),
        (f"{n_f:,} / {ov.features.size:,}", "features with a hit", ""),
    ]
    body = "".join(f'<div class="card {cls}"><b>{v}</b><small>{k}</small></div>' for v, k, cls in cards)
    return f'<section id="counts"><h2>Counts</h2><div class="cards">{body}</div></section>'


def _figure_section(sid: str, title: str, png: bytes, caption: str) -> str:
    return (f'<section id="{sid}"><h2>{title}</h2><figure>{_img(png, title)}'
            f"<figcaption>{caption}</figcaption></figure></section>")


def _screen_section(ov: Overview) -> str:
    from . import plots

    if ov.perturbations.size < 2:
        # one bar against the controls, and every hit feature tied at one perturbation
        return ('<section id="screen"><h2>Screen view</h2><p class="note">One perturbation: '
                "its hits are the volcano plot above and the top hits below.</p></section>")
    return _figure_section("screen", "Screen view", plots.screen(ov),
                           "Which perturbations change many features, and which features "
                           f"respond to many perturbations (hits at q ≤ {ov.q_max:g}, split "
                           "up/down).")


def _volcano_hits(ov: Overview) -> str:
    shown = len(ov.hits["p_value"])
    if shown < ov.n_hits:
        return f"The {shown:,} hits (q ≤ {ov.q_max:g}) with the smallest p of {ov.n_hits:,}"
    return f"All {ov.n_hits:,} hits (q ≤ {ov.q_max:g}; orange up, blue down)"


def _top_section(ov: Overview, source: str | None) -> str:
    t = ov.top
    n = min(TOP_ROWS, len(t["p_value"]))
    named = ov.feature_names is not None
    head = ("<tr><th>#</th><th>perturbation</th><th>feature</th>"
            + ("<th>name</th>" if named else "")
            + "<th>log2 FC</th><th>base mean</th><th>dispersion</th><th>SE</th><th>p</th>"
              "<th>q</th></tr>")
    rows = []
    with np.errstate(over="ignore"):
        for i in range(n):
            lfc2 = float(t["log_fold_change"][i]) / np.log(2)
            cls = "up" if lfc2 > 0 else "down"
            q = t["q_value"][i]
            col = t["col"][i]
            name = f"<td>{html.escape(ov.feature_names[col])}</td>" if named else ""
            rows.append(
                f"<tr><td>{i + 1}</td><td>{html.escape(ov.perturbations[t['row'][i]])}</td>"
                f"<td>{html.escape(ov.features[col])}</td>{name}"
                f'<td class="num {cls}">{lfc2:+.2f}</td>'
                f'<td class="num">{_g(np.exp(float(t["log_base_mean"][i])))}</td>'
                f'<td class="num">{_g(np.exp(float(t["log_dispersion"][i])))}</td>'
                f'<td class="num">{_g(t["standard_error"][i])}</td>'
                f'<td class="num">{_g(t["p_value"][i])}</td><td class="num">{_g(q)}</td></tr>')
    note = (f'<p class="note">The {n} comparisons with the smallest p-values of {_n(ov.n_tested)} '
            f"tested. Base mean: the control rate per unit size factor; dispersion: NB2 φ. "
            f"Every hit: <code>nbdask export {html.escape(source or 'RESULTS')} hits.parquet "
            f"--q-max {ov.q_max:g}</code>.</p>")
    return f'<section id="top-hits"><h2>Top hits</h2>{note}<table>{head}{"".join(rows)}</table></section>'


def _truth_section(ov: Overview) -> str:
    t = ov.truth
    rows = [("false-positive rate of true nulls at p < 0.05", _g(t["fpr_p05_nulls"]))]
    for key in sorted(k for k in t if k.startswith("fdp@")):
        level = float(key[4:])
        sign = "≤" if level == ov.q_max and level not in (0.05, 0.1) else "<"
        rows.append((f"false discovery proportion at q {sign} {level:g}", _g(t[key])))
        rows.append((f"power at q {sign} {level:g}", _g(t[f"power@{level}"])))
    rows += [("mean absolute error of log fold change", _g(t["mae_log_fold_change"])),
             ("mean absolute error of log base mean", _g(t["mae_log_base_mean"]))]
    body = "".join(f'<tr><td>{k}</td><td class="num">{v}</td></tr>' for k, v in rows)
    return ('<section id="truth"><h2>Against the simulated truth</h2>'
            f'<table class="kv">{body}</table></section>')


def report_fragment(results: xr.Dataset, *, ov: Overview, source: str | None = None) -> str:
    """The report's body (scoped CSS, no script): for notebooks and for ``report_html``."""
    from . import plots

    parts = [f"<style>{CSS}</style>", '<div class="nbdask-report">',
             "<h1>nbdask report</h1>",
             f'<p class="sub">{html.escape(source or "results")} · '
             f'{html.escape(str(results.attrs.get("method", "?")))} · '
             f"generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>",
             _run_section(results, source), _counts_section(ov),
             '<div class="grid">',
             _figure_section("pvalues", "p-value histogram", plots.p_histogram(ov),
                             "Tested p-values in 40 bins. Nulls spread evenly (dashed line); "
                             "true effects pile up near 0; a slope or a bump elsewhere "
                             "suggests miscalibration."),
             _figure_section("qq", "QQ plot", plots.qq(ov),
                             "Observed against expected −log10 p under the uniform; the band "
                             "holds 95% of each order statistic of uniform p-values "
                             "(Beta(i, m − i + 1)). Points above the band at the right are "
                             "discoveries; points off the band at the left, miscalibration."),
             "</div>",
             _figure_section("volcano", "Volcano plot", plots.volcano(ov),
                             f"{_volcano_hits(ov)} over a uniform random sample of "
                             f"{len(ov.sample['p_value']):,} of the other tested comparisons "
                             f"(grey)."),
             _screen_section(ov),
             _top_section(ov, source)]
    if ov.truth:
        parts.append(_truth_section(ov))
    parts.append('<p class="note">Computed by nbdask from one pass of block reductions on the '
                 "workers (histograms, top-k, sampled points); no figure reads the whole result.</p>")
    parts.append("</div>")
    return "\n".join(parts)


class Report:
    """A rendered report: ``document`` (the self-contained page), ``fragment`` (its body with
    scoped styles, which is what a notebook shows) and the ``overview`` it was drawn from."""

    def __init__(self, document: str, fragment: str, overview: Overview, path: Path | None = None):
        self.document, self.fragment, self.overview, self.path = document, fragment, overview, path

    def save(self, path: str | os.PathLike) -> Path:
        """Write the document to ``path`` (whole, or not at all: via ``<path>.partial``)."""
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(self.document, encoding="utf-8")
        os.replace(partial, path)
        self.path = path
        return path

    def _repr_html_(self) -> str:
        return self.fragment

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return (f"<nbdask Report{where}: {self.overview.n_tested:,} tested, "
                f"{self.overview.n_hits:,} hits at q <= {self.overview.q_max:g}>")


def render(results: xr.Dataset, *, truth: xr.Dataset | None = None, q_max: float = 0.1,
           source: str | None = None, client=None) -> Report:
    """Render the report of ``results`` (see the module docstring) as a ``Report``.

    ``truth``: the simulated cube the results came from (adds FDP, power and errors).
    ``q_max``: hits are comparisons with q_value <= q_max. ``source``: a name for the header.
    One pass over the result's blocks on ``client`` (default: the active client, else dask's
    threads). Needs matplotlib (``pip install 'nbdask[report]'``).
    """
    _check_matplotlib()
    if not 0 < float(q_max) <= 1:
        raise OptionError(f"q_max={q_max}: must lie in (0, 1], e.g. 0.1")
    ov = overview(results, q_max=q_max, truth=truth, client=client)
    fragment = report_fragment(results, ov=ov, source=source)
    title = html.escape(f"nbdask report · {source or 'results'}")
    document = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{title}</title></head><body style=\"margin:0;background:#fff\">\n"
                f"{fragment}\n{SCRIPT}\n</body></html>\n")
    return Report(document, fragment, ov)


def report_html(results: xr.Dataset, *, path: str | os.PathLike | None = None, **kwargs) -> str:
    """The report (``render``'s options) as one self-contained HTML document; written to
    ``path`` when given."""
    report = render(results, **kwargs)
    if path is not None:
        report.save(path)
    return report.document


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OptionError("the HTML report needs matplotlib; pip install 'nbdask[report]'") from None

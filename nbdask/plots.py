"""Figures of an ``Overview`` (matplotlib, Agg canvas), returned as PNG bytes.

Each function draws from the bounded overview only, so no figure needs the whole result.
``matplotlib.figure.Figure`` is used without pyplot: no global state, no GUI backend, safe
in threads and on headless servers.
"""

from __future__ import annotations

import io

import numpy as np

from .overview import LOG_MAX, P_BINS, Overview, qq_points

#: Palette (colour-blind safe, Okabe-Ito): hits up, hits down, other points, bands, accents.
UP, DOWN, GREY, BAND, INK = "#D55E00", "#0072B2", "#9A9A9A", "#CFE3F3", "#333333"
DPI = 110


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=9, color="#777777")
    ax.grid(alpha=0.25, linewidth=0.6)
    ax.set_axisbelow(True)


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def p_histogram(ov: Overview) -> bytes:
    """Histogram of tested p-values with the level a uniform (all-null) screen would give."""
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    edges = np.linspace(0, 1, P_BINS + 1)
    ax.bar(edges[:-1], ov.p_hist, width=np.diff(edges), align="edge", color=DOWN, alpha=0.85,
           edgecolor="white", linewidth=0.5)
    if ov.n_tested:
        ax.axhline(ov.n_tested / P_BINS, color=INK, linestyle="--", linewidth=1,
                   label="all null (uniform)")
        ax.legend(frameon=False, fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("p-value", fontsize=10)
    ax.set_ylabel("comparisons", fontsize=10)
    _style(ax)
    return png(fig)


def qq(ov: Overview) -> bytes:
    """Observed against expected -log10 p, with the pointwise 95% band of uniform order statistics."""
    pts = qq_points(ov)
    fig = _figure(5.0, 4.4)
    ax = fig.add_subplot()
    if pts["expected"].size:
        e = pts["expected"]
        ax.fill_between(e, pts["lower"], pts["upper"], color=BAND, label="95% null band",
                        linewidth=0)
        lim = float(e.max()) * 1.05
        ax.plot([0, lim], [0, lim], color=INK, linewidth=0.8, linestyle="--")
        ax.scatter(e, pts["observed"], s=9, color=UP, label="observed", zorder=3, linewidth=0)
        ax.set_xlim(0, lim)
        ax.legend(frameon=False, fontsize=9, loc="upper left")
    ax.set_xlabel("expected −log₁₀ p", fontsize=10)
    ax.set_ylabel("observed −log₁₀ p", fontsize=10)
    _style(ax)
    return png(fig)


def _neg_log10(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.minimum(-np.log10(p), LOG_MAX)


def volcano(ov: Overview) -> bytes:
    """log2 fold change against -log10 p: every kept hit (up to the bound) over a random sample
    of the other tested comparisons."""
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot()
    s, h = ov.sample, ov.hits
    ln2 = np.log(2)
    ax.scatter(s["log_fold_change"] / ln2, _neg_log10(s["p_value"]), s=4, color=GREY, alpha=0.45,
               linewidth=0, rasterized=True, label=f"not significant (sample of {len(s['p_value']):,})")
    up = h["log_fold_change"] > 0
    for mask, colour, name in ((up, UP, "up"), (~up, DOWN, "down")):
        ax.scatter(h["log_fold_change"][mask] / ln2, _neg_log10(h["p_value"][mask]), s=7,
                   color=colour, alpha=0.8, linewidth=0, rasterized=True,
                   label=f"q ≤ {ov.q_max:g}, {name} ({int(mask.sum()):,})")
    if len(h["p_value"]) < ov.n_hits:
        ax.set_title(f"showing the {len(h['p_value']):,} smallest-p of {ov.n_hits:,} hits",
                     fontsize=9, color="#555555")
    ax.axvline(0, color=INK, linewidth=0.6)
    ax.set_xlabel("log₂ fold change (treated / control)", fontsize=10)
    ax.set_ylabel("−log₁₀ p", fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="upper left", markerscale=2)
    _style(ax)
    return png(fig)


def _ranked(ax, labels, hits, up, title: str, n: int) -> None:
    order = np.lexsort((np.arange(hits.size), -hits))[:n]
    order = order[hits[order] > 0]
    y = np.arange(order.size)[::-1]
    ax.barh(y, up[order], color=UP, label="up", height=0.75)
    ax.barh(y, hits[order] - up[order], left=up[order], color=DOWN, label="down", height=0.75)
    ax.set_yticks(y, [str(x)[:24] for x in labels[order]], fontsize=8)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("hits", fontsize=9)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if order.size:
        ax.legend(frameon=False, fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no hits", transform=ax.transAxes, ha="center", color="#777777")
        ax.set_yticks([])
    _style(ax)
    ax.grid(axis="y", visible=False)


def screen(ov: Overview, *, n: int = 20) -> bytes:
    """The screen view: perturbations with the most hits, and features hit by most perturbations."""
    rows = max(4, min(n, int(max((ov.hits_per_perturbation > 0).sum(), (ov.hits_per_feature > 0).sum()))))
    fig = _figure(10.0, 1.2 + 0.2 * rows)
    left, right = fig.subplots(1, 2)
    _ranked(left, ov.perturbations, ov.hits_per_perturbation, ov.up_per_perturbation,
            f"perturbations with the most hits (top {n})", n)
    _ranked(right, ov.feature_display, ov.hits_per_feature, ov.up_per_feature,
            f"features hit by the most perturbations (top {n})", n)
    return png(fig)

"""PNG figures of the studies and of ``calibrate`` (matplotlib, the ``bench`` extra).

Each function takes a study's table and a path and writes one PNG; ``available()`` says whether
matplotlib is installed (the studies still write their tables and summary without it).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(role: str) -> dict:
    return {"linestyle": "-" if role in ("paper", "option") else "--", "marker": "o", "markersize": 3}


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _facets(n: int, width: float = 4.2, height: float = 3.4):
    plt = _plt()
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes.ravel()


def accuracy_lines(df: pd.DataFrame, x: str, path, *, xlabel: str) -> None:
    """MAE of mu, beta and alpha hats against ``x`` (design or mean-count bin), a line per setting."""
    fig, axes = _facets(3)
    order = list(dict.fromkeys(df[x]))
    for ax, (key, name) in zip(axes, (("mae_mu", "mu"), ("mae_beta", "beta"), ("mae_alpha", "alpha = log phi"))):
        for label, part in df.groupby("setting", sort=False):
            part = part.set_index(x).reindex(order)
            ax.plot(range(len(order)), part[key].values, label=label, **_style(part["role"].dropna().iloc[0]))
        ax.set_xticks(range(len(order)), order, rotation=45 if x == "mean_count_bin" else 0)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"MAE of {name}")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def qq(df: pd.DataFrame, path) -> None:
    """QQ plots of -log10 p under the null, a panel per design, a line per setting."""
    designs = list(dict.fromkeys(df["design"]))
    fig, axes = _facets(len(designs))
    for ax, design in zip(axes, designs):
        part = df[df["design"] == design]
        top = 0.0
        for label, s in part.groupby("setting", sort=False):
            ax.plot(s["expected"], s["observed"], label=label, **{**_style(s["role"].iloc[0]), "markersize": 2})
            top = max(top, float(s["expected"].max()))
        ax.plot([0, top], [0, top], color="black", linewidth=0.8)
        ax.set_xlabel("expected -log10 p")
        ax.set_ylabel("observed -log10 p")
        ax.set_title(f"null p-values, {design}")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def rate_bars(df: pd.DataFrame, path, *, x: str, value: str, se: str | None, level: float | None,
              title: str, ylabel: str) -> None:
    """Grouped points with 2-SE bars: ``value`` per ``x`` category, a series per setting."""
    plt = _plt()
    order = list(dict.fromkeys(df[x]))
    settings = list(dict.fromkeys(df["setting"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(order) + 4), 4.2))
    width = 0.8 / max(len(settings), 1)
    for k, label in enumerate(settings):
        part = df[df["setting"] == label].set_index(x).reindex(order)
        pos = np.arange(len(order)) - 0.4 + width * (k + 0.5)
        err = 2 * part[se].values if se else None
        ax.errorbar(pos, part[value].values, yerr=err, fmt="o", markersize=3, label=label, capsize=2)
    if level is not None:
        ax.axhline(level, color="black", linewidth=0.8)
    ax.set_xticks(range(len(order)), order, rotation=30)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def power_curves(df: pd.DataFrame, path) -> None:
    """Power against beta, a panel per design; top row at p < 0.05, bottom at matched FPR 0.05."""
    designs = list(dict.fromkeys(df["design"]))
    fig, axes = _facets(2 * len(designs))
    for row, (key, what) in enumerate((("power_05", "p < 0.05"), ("power_matched", "matched FPR 0.05"))):
        for k, design in enumerate(designs):
            ax = axes[row * len(designs) + k]
            for label, s in df[df["design"] == design].groupby("setting", sort=False):
                ax.plot(s["beta"], s[key], label=label, **_style(s["role"].iloc[0]))
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("beta (log fold change)")
            ax.set_ylabel("rejection rate")
            ax.set_title(f"{design}, {what}")
    axes[0].legend(fontsize=6)
    _save(fig, path)


def speed_bars(df: pd.DataFrame, path) -> None:
    """Time per comparison (log scale), a bar per setting and place it ran."""
    plt = _plt()
    labels = [f"{s} ({w.split(',')[0]})" for s, w in zip(df["setting"], df["where"])]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(df) + 1.5))
    ax.barh(range(len(df)), df["us_per_comparison"].values, color="tab:blue")
    ax.set_yticks(range(len(df)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("microseconds per comparison (log scale)")
    ax.set_title("time per comparison")
    _save(fig, path)


def dispersion_trend(features: pd.DataFrame, knots_x, knots_y, scatter: float, path, *,
                     floor: float) -> None:
    """The cube's pooled dispersions against mean count, with the fitted trend and its scatter;
    estimates below ``floor`` (Poisson-like features) are drawn at it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    m = features["mean_count"].values
    keep = m > 0
    phi = np.maximum(np.exp(features["log_dispersion"].values[keep]), floor)
    ax.scatter(m[keep], phi, s=3, alpha=0.4, label=f"features (below {floor:g} drawn at it)")
    x = np.exp(np.asarray(knots_x))
    y = np.exp(np.asarray(knots_y))
    ax.plot(x, y, color="black", label="trend")
    ax.fill_between(x, y * math.exp(-scatter), y * math.exp(scatter), color="grey", alpha=0.3,
                    label=f"±1 SD (log {scatter:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean count per sample")
    ax.set_ylabel("pooled dispersion phi")
    ax.set_title("mean–dispersion relation of the cube")
    ax.legend(fontsize=7)
    _save(fig, path)


def fpr_heatmap(fpr: pd.DataFrame, path) -> None:
    """Null rejection rate at p < 0.05, setting x mean-count bin, centred on 0.05."""
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    table = fpr.pivot_table(index="setting", columns="mean_count_bin", values="fpr_05", sort=False)
    fig, ax = plt.subplots(figsize=(1.1 * table.shape[1] + 4, 0.28 * table.shape[0] + 1.6))
    top = max(0.1, float(np.nanmax(table.values)))
    im = ax.imshow(table.values, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.05, 0.0, top))
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=30)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=7)
    for (i, j), v in np.ndenumerate(table.values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="FPR at p < 0.05")
    ax.set_title("null rejection rate by mean count (blue: conservative, red: anti-conservative)")
    _save(fig, path)


def fdp_power(fdr: pd.DataFrame, path) -> None:
    """Power against FDP at q < 0.05 and 0.1, a point per setting."""
    plt = _plt()
    run = fdr[fdr.get("status", "run") == "run"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (tag, level) in zip(axes, (("05", 0.05), ("1", 0.1))):
        for _, r in run.iterrows():
            marker = "*" if r["role"] == "default" else "o"
            ax.scatter(r[f"fdp_{tag}"], r[f"power_{tag}"], marker=marker, s=60 if marker == "*" else 15)
            ax.annotate(r["setting"], (r[f"fdp_{tag}"], r[f"power_{tag}"]), fontsize=5)
        ax.axvline(level, color="black", linewidth=0.8)
        ax.set_xlabel(f"false discovery proportion at q < {level:g}")
        ax.set_ylabel("power")
        ax.set_title(f"q < {level:g} (star: nbdask's default)")
    _save(fig, path)

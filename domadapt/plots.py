"""Figures for the analysis commands (matplotlib, an optional dependency).

Figures are built with `matplotlib.figure.Figure` on an explicit Agg canvas: no pyplot, no
global backend switch, so they render headless and leave a user's interactive backend alone.
Every builder returns the Figure; `save_png` writes it atomically.
"""

from __future__ import annotations

import importlib
import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from domadapt.errors import UserError
from domadapt.io import atomic_write_bytes

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MISSING = "matplotlib is missing: pip install 'domadapt[plot]'"
MAX_ANNOTATED_CLASSES = 20  # beyond this, confusion cells are not annotated with counts
MAX_LEGEND_CLASSES = 20


def require_matplotlib() -> None:
    """UserError (one line, with the install command) unless matplotlib can be imported.
    Reports call this before their heavy work, not after it."""
    try:
        for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
            importlib.import_module(module)
    except ImportError:
        raise UserError(MISSING) from None


def new_figure(width: float, height: float) -> Figure:
    """A Figure bound to a fresh Agg canvas (headless)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Render `fig` to PNG at `path` (temp file + rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    if n <= 20:
        return [cmap(i) for i in range(n)]
    return [cmap(x) for x in np.linspace(0.05, 0.95, n)]


def gates_figure(values: Sequence[np.ndarray], layers: Sequence[str], title: str) -> Figure:
    """Per BIN layer (x = depth in network order): every channel's rho as a jittered point, a box
    (quartiles, median, whiskers at the 5th/95th percentiles) and the mean as a red diamond."""
    n = len(values)
    fig = new_figure(max(6.0, 0.28 * n + 2.5), 4.8)
    ax = fig.add_subplot()
    depth = np.arange(n)
    rng = np.random.default_rng(0)
    for d, rho in zip(depth, values):
        alpha = float(np.clip(6.0 / np.sqrt(max(len(rho), 1)), 0.1, 0.6))  # wide layers: fainter
        ax.scatter(d + rng.uniform(-0.25, 0.25, len(rho)), rho, s=6, alpha=alpha,
                   color="tab:blue", linewidths=0)
    ax.boxplot(list(values), positions=depth, widths=0.6, showfliers=False,
               medianprops={"color": "black"}, whis=(5, 95))
    means = [float(np.mean(v)) for v in values]
    ax.plot(depth, means, color="tab:red", marker="D", markersize=4, linewidth=1,
            label="mean ρ per layer")
    for y in (0.1, 0.9):
        ax.axhline(y, color="grey", linestyle=":", linewidth=0.8)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("gate ρ  (1 = batch norm, 0 = instance norm)")
    if n <= 60:
        ax.set_xticks(depth, [f"{d}  {name}" for d, name in zip(depth, layers)],
                      rotation=90, fontsize=6)
        ax.set_xlabel("BIN layer (depth, name)")
    else:
        ax.set_xlabel("BIN layer depth (network order)")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    return fig


def gates_sweep_figure(gates: pd.DataFrame, title: str,
                       by: Sequence[str] = ("setting", "method", "norm")) -> Figure:
    """BIN gates of a sweep (`tables.gates_frame`), one colour per group of the `by` columns
    (e.g. also `sweep` for `tables.versus_gates`): left, per layer depth the mean rho over runs
    (solid) and the lowest rho of any run (dotted); right, the share of all gates (every
    layer, run) in each tenth of [0, 1], log scale: a bimodal distribution shows mass in both
    end bins."""
    from matplotlib.ticker import MaxNLocator

    hist = [c for c in gates.columns if c.startswith("hist_")]
    groups = list(gates.groupby(list(by), sort=True))
    fig = new_figure(12.0, 4.6)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    for i, (values, g) in enumerate(groups):
        runs = int(g["n_runs"].max())
        color = _colors(len(groups))[i]
        label = f"{' '.join(map(str, values))} ({runs} run{'s' if runs != 1 else ''})"
        g = g.sort_values("depth")
        left.plot(g["depth"], g["mean"], color=color, marker="o", markersize=3, label=label)
        left.plot(g["depth"], g["min"], color=color, linestyle=":", linewidth=1)
        _gate_share_bars(right, g[hist].sum().to_numpy(dtype=float), i, len(groups), color,
                         label)
    for y in (0.1, 0.9):
        left.axhline(y, color="grey", linestyle=":", linewidth=0.8)
    left.set_ylim(-0.03, 1.03)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("BIN layer depth (network order)")
    left.set_ylabel("gate ρ: mean over runs (solid), lowest (dotted)")
    # the right panel's upper left is empty (few gates in the low bins): the legend goes there
    right.legend(*left.get_legend_handles_labels(), loc="upper left", fontsize=7)
    _gate_share_axis(right, len(hist))
    fig.suptitle(title)
    return fig


def evidence_figure(trajectory: pd.DataFrame, gates: pd.DataFrame, title: str) -> Figure:
    """The converged-evidence picture (`analysis.evidence`). Left: the mean difference
    (points) with its 95 % interval over task means (bars) at every evaluation (`trajectory`:
    iteration, mean_diff, ci_low, ci_high, n_tasks). Middle: mean gate per BIN layer against
    relative depth (layer index / (layers - 1)), one line per group of `gates`
    (`gates_by_layer.csv` rows with a `group` column). Right: the share of all gates in each
    tenth of [0, 1] per group, log scale (a bimodal distribution has mass at both ends)."""
    fig = new_figure(13.0, 4.2)
    left, middle, right = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    t = trajectory.dropna(subset=["mean_diff"])
    err = np.vstack([t["mean_diff"] - t["ci_low"], t["ci_high"] - t["mean_diff"]])
    left.errorbar(t["iteration"], t["mean_diff"], yerr=np.nan_to_num(err), fmt="o-",
                  color="tab:blue", capsize=3)
    for it, m, n in zip(t["iteration"], t["mean_diff"], t["n_tasks"], strict=True):
        left.annotate(f"n={n}", (it, m), xytext=(4, 4), textcoords="offset points", fontsize=6)
    left.axhline(0.0, color="grey", linewidth=0.8)
    left.set_xlabel("iteration")
    left.set_ylabel("target accuracy difference (points)")
    left.set_title("difference, 95 % t interval over tasks", fontsize=9)
    hist = [c for c in gates.columns if c.startswith("hist_")]
    groups = list(gates.groupby("group", sort=False))
    for i, (label, g) in enumerate(groups):
        g = g.sort_values("depth")
        color = _colors(len(groups))[i]
        rel = (g["depth"] - g["depth"].min()) / max(g["depth"].max() - g["depth"].min(), 1)
        middle.plot(rel, g["mean"], color=color, marker="o", markersize=3, label=label)
        _gate_share_bars(right, g[hist].sum().to_numpy(dtype=float), i, len(groups), color,
                         label)
    middle.set_ylim(-0.03, 1.03)
    middle.set_xlabel("relative depth of the BIN layer (0 = first, 1 = last)")
    middle.set_ylabel("mean gate ρ over runs (1 = BN)")
    if groups:
        middle.legend(fontsize=7, loc="lower right")
    _gate_share_axis(right, len(hist))
    fig.suptitle(title)
    return fig


def _gate_share_bars(ax: Axes, counts: np.ndarray, i: int, n_groups: int, color: object,
                     label: str) -> None:
    """Group i of n_groups: the share of its gates in each tenth of [0, 1], as bars side by
    side with the other groups' (`counts`: gates per tenth)."""
    width = 0.8 / max(n_groups, 1)
    ax.bar(np.arange(len(counts)) + (i - (n_groups - 1) / 2) * width,
           counts / max(counts.sum(), 1.0), width=width, color=color, label=label)


def _gate_share_axis(ax: Axes, n_bins: int) -> None:
    """Log share axis, one tick per tenth of [0, 1] (see `_gate_share_bars`)."""
    ax.set_yscale("log")
    ax.set_xticks(np.arange(n_bins), [f"{k / 10:.1f}" for k in range(n_bins)], fontsize=7)
    ax.set_xlabel("gate ρ, bin starting at")
    ax.set_ylabel("share of all gates")


def tsne_figure(
    xy: np.ndarray,
    domain: np.ndarray,
    domain_names: Sequence[str],
    label: np.ndarray,
    class_names: Sequence[str],
    title: str,
) -> Figure:
    """Two panels of the same 2-D embedding: coloured by domain, and by class."""
    fig = new_figure(12.0, 5.6)
    ax_dom, ax_cls = fig.subplots(1, 2)
    _scatter_groups(ax_dom, xy, domain, domain_names, legend=True)
    ax_dom.set_title("coloured by domain")
    _scatter_groups(ax_cls, xy, label, class_names, legend=len(class_names) <= MAX_LEGEND_CLASSES)
    ax_cls.set_title("coloured by class")
    for ax in (ax_dom, ax_cls):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    fig.suptitle(title)
    return fig


def _scatter_groups(ax: Axes, xy: np.ndarray, group: np.ndarray, names: Sequence[str],
                    legend: bool) -> None:
    for g, (name, color) in enumerate(zip(names, _colors(len(names)))):
        sel = group == g
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=color, linewidths=0,
                       label=name)
    if legend:
        ax.legend(fontsize=7, markerscale=2.5, loc="best", frameon=False)


def confusion_figure(cm: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """Row-normalised confusion matrix (colour = recall share), counts written when K <= 20."""
    k = len(class_names)
    size = max(5.0, 0.32 * k + 2.5)
    fig = new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    fontsize = 8 if k <= 12 else 6
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(k), class_names, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= MAX_ANNOTATED_CLASSES:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=fontsize,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_title(title)
    return fig


def comparison_figure(stats: pd.DataFrame, title: str, ylabel: str) -> Figure:
    """Accuracy per row (task or domain) for every column (method/norm): mean as a point,
    +-1 std over seeds as an error bar (none for one seed); the last row (Avg) is shaded.

    `stats`: one row per (row, column) with `mean`, `std`, in display order.
    """
    rows = list(dict.fromkeys(stats["row"]))
    columns = list(dict.fromkeys(stats["column"]))
    mean = stats.pivot(index="row", columns="column", values="mean").reindex(index=rows, columns=columns)
    std = stats.pivot(index="row", columns="column", values="std").reindex(index=rows, columns=columns)
    fig = new_figure(max(6.0, 0.45 * len(rows) * max(2, len(columns)) / 2 + 2.5), 4.8)
    ax = fig.add_subplot()
    x = np.arange(len(rows), dtype=np.float64)
    width = 0.8 / len(columns)
    styles = _column_styles(columns)
    for j, column in enumerate(columns):
        color, marker = styles[column]
        xs = x - 0.4 + width * (j + 0.5)
        ax.errorbar(xs, mean[column], yerr=std[column].fillna(0.0), fmt=marker, color=color,
                    markersize=5, capsize=2.5, elinewidth=1, label=column)
    avg = len(rows) - 1
    ax.axvspan(avg - 0.5, avg + 0.5, color="gold", alpha=0.25, linewidth=0)
    for j, column in enumerate(columns):  # the Avg values, written above their error bars
        m, sd = mean.iloc[avg][column], std.iloc[avg][column]
        if np.isfinite(m):
            top = m + (sd if np.isfinite(sd) else 0.0)
            ax.annotate(f"{m:.1f}", (x[avg] - 0.4 + width * (j + 0.5), top), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=6,
                        color=styles[column][0])
    ax.set_xticks(x, rows, rotation=45 if len(rows) > 8 else 0, ha="right" if len(rows) > 8 else "center")
    ax.get_xticklabels()[avg].set_fontweight("bold")
    for boundary in x[:-1] + 0.5:
        ax.axvline(boundary, color="0.9", linewidth=0.6, zorder=0)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(4, len(columns)), loc="best")
    ax.set_title(title)
    return fig


# Norm styles not declared by the norm (`NormKind.plot_marker` / `plot_shade`) are drawn from
# these, in registry order: markers no norm declares, shades in turn.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "p", "h", "<", ">", "d", "H")
SHADES = (0.7, 0.6, 0.8, 0.4)
UNREGISTERED = ("x", 0.7)  # a norm a run recorded that is not registered here


def norm_styles() -> dict[str, tuple[str, float]]:
    """norm name -> (marker, shade) for every registered norm: the kind's own, where it
    declares them, else the next marker no norm declares and the next shade (registry order),
    so every norm gets a look that does not depend on which figure draws it."""
    from domadapt.norms import NORMS

    kinds = [kind for _, kind in NORMS.items()]
    free = [m for m in MARKERS if m not in {k.plot_marker for k in kinds}]
    out, i = {}, 0
    for kind in kinds:
        if kind.plot_marker is not None and kind.plot_shade is not None:
            out[kind.name] = (kind.plot_marker, kind.plot_shade)
            continue
        out[kind.name] = (kind.plot_marker or free[i % len(free)],
                          SHADES[i % len(SHADES)] if kind.plot_shade is None else kind.plot_shade)
        i += 1
    return out


def _column_styles(columns: Sequence[str]) -> dict[str, tuple]:
    """Colour family by method (the part before '/'; the figure's methods in turn), shade and
    marker by norm (`norm_styles`)."""
    from matplotlib import colormaps

    families = ["Blues", "Oranges", "Greens", "Purples", "Reds", "Greys"]
    norms = norm_styles()
    methods = list(dict.fromkeys(c.split("/")[0] if "/" in c else "" for c in columns))
    out = {}
    for c in columns:
        method, _, norm = c.rpartition("/")
        cmap = colormaps[families[methods.index(method) % len(families)]]
        marker, shade = norms.get(norm, UNREGISTERED)
        out[c] = (cmap(shade), marker)
    return out

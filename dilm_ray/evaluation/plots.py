"""PNG figures of results and training curves (matplotlib Agg canvases: no display, no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dilm_ray.evaluation.job import FULL_DATA, ZERO_SHOT

REFERENCE = "dilm"
LINES = {FULL_DATA: "full data ({dpc} rows per label)", ZERO_SHOT[0]: "zero-shot"}  # rows drawn as horizontal lines
MAX_COLUMNS = 3


def _grid(n: int, width: float = 4.6, height: float = 3.6, bottom_room: float = 0.0) -> tuple[Figure, list]:
    """A figure with exactly ``n`` axes on a grid of at most ``MAX_COLUMNS`` columns."""
    cols = min(n, MAX_COLUMNS)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows + bottom_room))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _short(name: str) -> str:
    """A path label shortened to its last component; hub ids and names unchanged."""
    return Path(name).name if "/" in name and Path(name).expanduser().exists() else name


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path


def accuracy_figure(table: pd.DataFrame, score_name: str, reference: str = REFERENCE) -> Figure:
    """Mean score (%, ``score_name``) vs DPC with std error bars: one subplot per learner, one line per method.

    ``table``: a ``results_table`` (fractions, plotted x100); ``reference`` is drawn in red on top;
    the full-data and zero-shot rows (``LINES``) are horizontal lines, as they hold no DPC of sets.
    Raises ValueError when ``table`` lacks learner/dpc/method/mean/std columns or is empty.
    """
    missing = {"learner", "dpc", "method", "mean", "std"} - set(table.columns)
    if missing:
        raise ValueError(f"results table lacks columns {sorted(missing)}")
    if table.empty:
        raise ValueError("results table is empty: nothing to plot")
    learners = sorted(table["learner"].astype(str).unique())
    lines = table[table["method"].astype(str).isin(LINES)]  # references, not sets: drawn across every DPC
    table = table[~table["method"].astype(str).isin(LINES)]
    methods = sorted(table["method"].astype(str).unique(), key=lambda m: (m != reference, m))
    others = [m for m in methods if m != reference]
    palette = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(others)}
    colors[reference] = "#d62728"
    fig, axes = _grid(len(learners), width=4.6 if len(learners) > 1 else 7.0, bottom_room=0.8)  # one panel: room for title and legend
    spread = 0.25  # total horizontal offset between methods, so error bars do not overlap
    for ax, learner in zip(axes, learners):
        for r, style in zip(lines[lines["learner"].astype(str) == learner].to_dict("records"), ("--", ":", "-.")):
            ax.axhline(100 * r["mean"], color="black", linestyle=style, linewidth=1.2, label=LINES[r["method"]].format(dpc=r["dpc"]))
        cell = table[table["learner"].astype(str) == learner]
        dpcs = sorted(cell["dpc"].unique())
        pos = {d: i for i, d in enumerate(dpcs)}
        present = [m for m in methods if (cell["method"].astype(str) == m).any()]
        for k, method in enumerate(present):
            part = cell[cell["method"].astype(str) == method].sort_values("dpc")
            offset = (k - (len(present) - 1) / 2) * spread / max(1, len(present) - 1) if len(present) > 1 else 0.0
            x = np.array([pos[d] for d in part["dpc"]], dtype=float) + offset
            mine = method == reference
            ax.errorbar(
                x, 100 * part["mean"].to_numpy(float), yerr=100 * part["std"].fillna(0).to_numpy(float),
                label=method, color=colors[method], marker="o" if mine else "s", markersize=7 if mine else 4,
                linewidth=2.6 if mine else 1.2, alpha=1.0 if mine else 0.8, capsize=4 if mine else 2,
                zorder=3 if mine else 2,
            )
        ax.set_xticks(range(len(dpcs)), [str(d) for d in dpcs])
        ax.set_xlim(-0.5, max(1, len(dpcs)) - 0.5)
        ax.set_title(_short(learner), fontsize=10)
        ax.set_xlabel("data per class (DPC)")
        ax.set_ylabel(f"{score_name} (%)")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes:  # one legend for the figure, every method once
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.suptitle(f"{score_name.capitalize()} of learners trained on distilled sets (mean ± std over runs)")
    fig.tight_layout(rect=(0, 0.13, 1, 0.95))
    return fig


def accuracy_vs_dpc(table: pd.DataFrame, path: Path, score_name: str) -> Path:
    """Save ``accuracy_figure`` of a ``results_table`` (learner, dpc, method, mean, std, runs) as PNG.

    Creates parent folders; 120 dpi. Returns ``path``. Raises ValueError as ``accuracy_figure``.
    """
    return _save(accuracy_figure(table, score_name), path)


def curves_figure(history: dict[str, list[tuple[int, float]]], title: str) -> Figure:
    """One subplot per metric: value vs step; long noisy series also get a moving average.

    ``history``: metric name -> [(step, value)]; None and non-finite values are skipped. Series
    of 40+ points get a moving average over len // 20 points. Raises ValueError for an empty
    ``history``.
    """
    if not history:
        raise ValueError("no metrics to plot")
    fig, axes = _grid(len(history), width=4.8, height=3.2)
    for ax, (metric, points) in zip(axes, history.items()):
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        values = [(s, v) for s, v in points if v is not None and np.isfinite(v)]
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        steps, ys = (np.asarray(c, dtype=float) for c in zip(*sorted(values)))
        window = max(1, len(ys) // 20)
        if window > 1:
            smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
            ax.plot(steps, ys, color="#1f77b4", alpha=0.3, linewidth=0.8, label="raw")
            lag = (window - 1) // 2  # centre each window on its steps
            ax.plot(steps[lag : lag + len(smooth)], smooth, color="#1f77b4", linewidth=1.8, label=f"mean of {window}")
            ax.legend(fontsize=7, frameon=False)
        else:
            ax.plot(steps, ys, color="#1f77b4", marker="o" if len(ys) < 30 else None, markersize=3, linewidth=1.5)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def training_curves(history: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """Save ``curves_figure`` (metric name -> [(step, value)]) as PNG.

    Creates parent folders; 120 dpi. Returns ``path``. Raises ValueError for an empty ``history``.
    """
    return _save(curves_figure(history, title), path)

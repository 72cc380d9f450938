"""Quality–cost plots of routing methods against the single models, written as PNG files (Agg, no display)."""

from __future__ import annotations

import io
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .outputs import atomic_write_bytes

BASELINES = ("linear", "oracle", "rules")
"""Reference curves, drawn dashed so the calibrated methods stand out."""


def plot_curves(
    curves: dict[str, np.ndarray],
    path: str | os.PathLike,
    *,
    model_points: np.ndarray | None = None,
    model_names: list[str] | None = None,
    title: str = "",
    aucs: dict[str, float] | None = None,
) -> None:
    """Plot one (cost, quality) line per method and the single models as labelled points, to a PNG at `path`.

    `curves`: name -> (m, 2) points (drawn sorted by cost, `BASELINES` dashed); `aucs`: name -> AUC shown in
    the legend.
    The file is written atomically: to a temporary file in the same folder, then renamed over `path`.
    """
    if model_names is not None and (model_points is None or len(model_names) != len(model_points)):
        raise ValueError("model_names needs model_points with one (cost, quality) row per name")
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        curve = np.asarray(curve, dtype=np.float64)
        curve = curve[np.argsort(curve[:, 0], kind="stable")]
        label = name if aucs is None or name not in aucs else f"{name} (AUC {aucs[name]:.2f})"
        style = "--" if name in BASELINES else "-"
        ax.plot(curve[:, 0], curve[:, 1], linestyle=style, marker="o", markersize=3, label=label)
    if model_points is not None:
        model_points = np.asarray(model_points, dtype=np.float64)
        ax.scatter(model_points[:, 0], model_points[:, 1], color="black", marker="x", zorder=3, label="single models")
        for name, (cost, quality) in zip(model_names or [], model_points):
            ax.annotate(name, (cost, quality), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("mean cost per query (USD)")
    ax.set_ylabel("mean quality")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    atomic_write_bytes(path, buffer.getvalue())

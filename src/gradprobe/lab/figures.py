"""Lab figures: drawn from experiment tables and run series only, never from hooks.

Each helper draws one kind of figure and saves it as a PNG; experiments call them with
the numbers they already summarised, so a figure and its table always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

# Agg only where nothing chose a backend (as gradprobe.plots does): importing gradprobe.lab
# in a notebook must not take the inline backend away from the user's figures.
if getattr(matplotlib.rcParams, "_get_backend_or_none", lambda: None)() is None:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["bar_chart", "line_chart", "save"]


def save(fig: plt.Figure, folder: Path, name: str) -> Path:
    """Write ``fig`` to ``folder/name.png`` and close it."""
    path = folder / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def line_chart(
    folder: Path,
    name: str,
    lines: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    logx: bool = False,
    dashed: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    hline: float | None = None,
    hline_label: str = "",
) -> Path:
    """Lines ``label -> (x, y)``; ``dashed`` lines (e.g. a theory overlay) share their
    colour with the solid line of the same label prefix when there is one."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours: dict[str, str] = {}
    for label, (x, y) in lines.items():
        (h,) = ax.plot(list(x), _finite(y), marker="o", markersize=3, label=label)
        colours[label] = h.get_color()
    for label, (x, y) in (dashed or {}).items():
        base = next((c for k, c in colours.items() if label.startswith(k)), None)
        ax.plot(list(x), _finite(y), linestyle="--", color=base, label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", label=hline_label or None)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, folder, name)


def bar_chart(
    folder: Path,
    name: str,
    labels: Sequence[str],
    values: dict[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    errors: dict[str, Sequence[float]] | None = None,
    logy: bool = False,
) -> Path:
    """Grouped bars: one group per label, one bar per series in ``values``."""
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(labels) * max(1, len(values))), 4.0))
    n = max(1, len(values))
    width = 0.8 / n
    x = np.arange(len(labels))
    for i, (series, ys) in enumerate(values.items()):
        err = (errors or {}).get(series)
        ax.bar(x + (i - (n - 1) / 2) * width, _finite(ys), width, yerr=err, label=series, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(list(labels), rotation=30, ha="right", fontsize=8)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    if len(values) > 1:
        ax.legend(fontsize=7)
    return save(fig, folder, name)


def _finite(ys: Sequence[float]) -> list[float]:
    """NaN for non-finite values, so matplotlib leaves a gap rather than failing."""
    return [float(y) if y is not None and np.isfinite(y) else np.nan for y in ys]

"""What every figure shares: axes, thinned layer ticks, colours by depth, titles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._mpl import pyplot
from ..run import Run

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


_MAX_TICKS = 40  # layer names one axis can hold at fontsize 6
_MAX_ROW_TICKS = 32  # layer names on a heatmap's 4-inch y axis
_MAX_HIST_LAYERS = 8


_pyplot = pyplot  # the old private name, still used below


def _axes(ax: Axes | None, size: tuple[float, float] = (7.0, 4.0)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    return fig, ax


def _thin_ticks(ax: Axes, labels: Sequence[str], axis: str = "x", limit: int = _MAX_TICKS) -> int:
    """Name every position when at most ``limit`` fit, else every k-th (and the last).

    A regular stride (not a spread of positions) so the axis label can say which layers are
    named. Returns the stride k (1: every position is named).
    """
    n = len(labels)
    if n == 0:
        return 1
    stride = max(1, math.ceil(n / limit))
    idx = sorted(set(range(0, n, stride)) | {n - 1})
    size = 7 if len(idx) <= 24 else 6
    if axis == "x":
        ax.set_xticks(idx)
        ax.set_xticklabels([labels[i] for i in idx], rotation=60, ha="right", fontsize=size)
    else:
        ax.set_yticks(idx)
        ax.set_yticklabels([labels[i] for i in idx], fontsize=size)
    return stride


def _layer_axis_label(stride: int) -> str:
    ordinal = {2: "second", 3: "third"}.get(stride, f"{stride}th")
    named = "" if stride == 1 else f"; every {ordinal} named"
    return f"layer with weights (input → output{named})"


def _pick_steps(steps: np.ndarray, k: int = 3) -> list[int]:
    if len(steps) <= k:
        return [int(s) for s in steps]
    idx = np.unique(np.linspace(0, len(steps) - 1, k).round().astype(int))
    return [int(steps[i]) for i in idx]


def _positive(values: np.ndarray) -> np.ndarray:
    """Zeros and non-finite values cannot sit on a log axis: leave a gap."""
    v = np.asarray(values, dtype=float)
    return np.where(np.isfinite(v) & (v > 0), v, np.nan)


def _depth_colors(n: int) -> list[Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _depth_colorbar(fig: Figure, ax: Axes, names: Sequence[str]) -> None:
    import matplotlib as mpl

    norm = mpl.colors.Normalize(vmin=0, vmax=max(len(names) - 1, 1))
    sm = mpl.cm.ScalarMappable(norm=norm, cmap="viridis")
    cb = fig.colorbar(sm, ax=ax, pad=0.01)
    cb.set_ticks([0, max(len(names) - 1, 1)])
    cb.set_ticklabels([names[0], names[-1]] if names else ["", ""])
    cb.set_label("layer (input → output)", fontsize=8)
    cb.ax.tick_params(labelsize=7)


def _title(ax: Axes, run: Run, what: str) -> None:
    ax.set_title(f"{run.name}: {what}", fontsize=9, loc="left")


def _names_list(names: Sequence[str], limit: int = 2) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit} more" if len(names) > limit else "")

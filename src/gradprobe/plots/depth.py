"""The error signal over depth: gradient flow (per layer) and the error heatmap (layer × step)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..diagnose import (
    depth_profile,
)
from ..run import Run
from ._common import (
    _MAX_ROW_TICKS,
    _axes,
    _layer_axis_label,
    _names_list,
    _pick_steps,
    _positive,
    _pyplot,
    _thin_ticks,
    _title,
)
from ._registry import Plot, register, require

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# ---------------------------------------------------------------- plots
def gradient_flow(run: Run, ax: Axes | None = None, steps: Sequence[int] | None = None) -> Figure:
    """Per-layer error signal ‖dL/dz‖ (solid) and weight-gradient norm (dashed) at a few steps.

    Layers with weights, input on the left, log scale. An error signal of exactly 0 (it
    underflowed float32, or nothing reaches the layer) is marked ▼ on a floor labelled
    "0"; gaps are NaN/Inf.
    """
    require(run, "gradient_flow")
    fig, ax = _axes(ax)
    err = run.table("error_norm")
    p = depth_profile(run)
    layers = list(p.layers) if p is not None else [n for n in run.modules if n in err.columns]
    grads = run.table("grad_norm") if "grad_norm" in run.stats else pd.DataFrame()
    weight_of = {}
    for layer in layers:
        w = f"{layer}.weight" if layer else "weight"
        if w in grads.columns:
            weight_of[layer] = w
    chosen = list(steps) if steps is not None else _pick_steps(err.index.to_numpy())
    plt = _pyplot()
    cmap = plt.get_cmap("plasma")
    x = np.arange(len(layers))
    for i, step in enumerate(chosen):
        color = cmap(0.1 + 0.75 * i / max(len(chosen) - 1, 1))
        if step in err.index:
            ax.plot(
                x,
                _positive(err.loc[step, layers].to_numpy()),
                "-o",
                ms=3,
                lw=1.5,
                color=color,
                label=f"step {step}",
            )
        if weight_of and step in grads.index:
            gx = [i for i, n in enumerate(layers) if n in weight_of]
            ax.plot(
                gx,
                _positive(grads.loc[step, [weight_of[layers[i]] for i in gx]].to_numpy()),
                "--",
                lw=1,
                color=color,
                alpha=0.8,
            )
    ax.set_yscale("log")
    zeros = _mark_zero_errors(ax, err, chosen, layers, cmap)
    ax.set_xlabel(_layer_axis_label(_thin_ticks(ax, layers)), fontsize=8)
    ax.set_ylabel("norm (log)")
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [
        Line2D([], [], color="0.3", ls="-", marker="o", ms=3),
        Line2D([], [], color="0.3", ls="--"),
    ]
    labels += ["‖dL/dz‖ error signal", "‖dL/dW‖ weight gradient"]
    if zeros:
        handles.append(Line2D([], [], color="0.3", ls="", marker="v", ms=5))
        labels.append(f"‖dL/dz‖ exactly 0 (on the floor, '0'): {_names_list(zeros)}")
    ax.legend(handles, labels, fontsize=7, loc="best")
    _title(ax, run, "gradient flow (input left)")
    return fig


def _mark_zero_errors(
    ax: Axes, err: pd.DataFrame, steps: Sequence[int], layers: Sequence[str], cmap: Any
) -> list[str]:
    """An error signal of exactly 0 has no place on a log axis: mark it ▼ on a floor a
    decade below the smallest positive value drawn, labelled "0" on the y axis. Returns
    the layers marked."""
    rows = [s for s in steps if s in err.index]
    if not rows or not layers:
        return []
    values = err.loc[rows, list(layers)].to_numpy(dtype=float)
    if not (values == 0).any():
        return []
    positive = values[np.isfinite(values) & (values > 0)]
    lines = [ln.get_ydata() for ln in ax.get_lines()]
    drawn = (
        np.concatenate([np.asarray(y, dtype=float).ravel() for y in lines]) if lines else positive
    )
    drawn = drawn[np.isfinite(drawn) & (drawn > 0)]
    lowest = float(drawn.min()) if drawn.size else (float(positive.min()) if positive.size else 1.0)
    floor = lowest / 10.0
    marked: list[str] = []
    for i, step in enumerate(rows):
        color = cmap(0.1 + 0.75 * list(steps).index(step) / max(len(steps) - 1, 1))
        zero = np.flatnonzero(values[i] == 0)
        if zero.size:
            ax.plot(
                zero, np.full(zero.size, floor), "v", ms=6, color=color, ls="", gid="zero_error"
            )
            marked += [layers[k] for k in zero if layers[k] not in marked]
    top = ax.get_ylim()[1]
    ax.set_ylim(floor / 2, max(top, lowest * 10))
    ax.axhline(floor, color="0.6", lw=0.6, ls=":")
    ax.annotate(
        "0",
        xy=(0, floor),
        xycoords=ax.get_yaxis_transform(),
        xytext=(-4, 0),
        textcoords="offset points",
        ha="right",
        va="center",
        fontsize=8,
        gid="zero_floor_label",
    )
    return marked


def error_heatmap(
    run: Run, ax: Axes | None = None, vmin: float | None = None, vmax: float | None = None
) -> Figure:
    """log10 ‖dL/dz‖ for each layer with weights (rows, input on top) at each step (columns).

    The colour scale is the run's own (its smallest to its largest value) unless ``vmin``/
    ``vmax`` are given: on a range shared with a vanishing run, a healthy run is one flat
    colour. Cells that cannot be logged (a signal that underflowed to 0, NaN/Inf) are grey,
    and the title says so.
    """
    require(run, "error_heatmap")
    fig, ax = _axes(ax)
    err = run.table("error_norm")
    p = depth_profile(run)
    layers = list(p.layers) if p is not None else [n for n in run.modules if n in err.columns]
    values = err[layers].to_numpy(dtype=float).T
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(_positive(values))
    steps = err.index.to_numpy()
    lo, hi = _finite_range(logs, vmin, vmax)
    if vmin is None and vmax is None:
        lo, hi = _min_span(lo, hi)
    plt = _pyplot()
    # Masked cells are see-through: steps not recorded show the white background; cells
    # recorded as 0 or NaN/Inf are drawn grey by a second mesh under the first.
    cmap = plt.get_cmap("magma").with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    edges, columns = step_columns(steps, run.meta)
    grid = np.full((len(layers), len(edges) - 1), np.nan)
    grid[:, columns] = logs
    unloggable = np.zeros(grid.shape)
    unloggable[:, columns] = ~np.isfinite(logs)
    rows = np.arange(len(layers) + 1) - 0.5
    from matplotlib.colors import ListedColormap

    ax.pcolormesh(
        edges,
        rows,
        np.ma.masked_equal(unloggable, 0),
        cmap=ListedColormap(["0.75"]),
        shading="flat",
        gid="unloggable",
    )
    im = ax.pcolormesh(
        edges, rows, np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi, shading="flat"
    )
    gaps = np.ones(grid.shape[1], dtype=bool)
    gaps[columns] = False
    ax.set_facecolor("white")
    ax.set_ylim(len(layers) - 0.5, -0.5)
    _thin_ticks(ax, layers, axis="y", limit=_MAX_ROW_TICKS)
    ax.xaxis.set_major_locator(_integer_steps())
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("step")
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label("log10 ‖dL/dz‖", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    blank = int((~np.isfinite(logs)).sum())
    what = "error signal per layer and step"
    if blank:
        what += f" (grey: {blank} cells 0 or NaN/Inf)"
    if gaps.any():
        what += " (white: not recorded)"
    _title(ax, run, what)
    return fig


# A heatmap's colour scale spans at least this many decades: a run whose error signal
# moves by a few percent is then nearly one colour, not noise stretched from black to white.
HEATMAP_MIN_DECADES = 2.0


def _min_span(lo: float, hi: float) -> tuple[float, float]:
    if hi - lo >= HEATMAP_MIN_DECADES:
        return lo, hi
    mid = (lo + hi) / 2
    return mid - HEATMAP_MIN_DECADES / 2, mid + HEATMAP_MIN_DECADES / 2


def _error_logs(run: Run) -> np.ndarray:
    err = run.table("error_norm")
    p = depth_profile(run)
    layers = list(p.layers) if p is not None else [n for n in run.modules if n in err.columns]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(_positive(err[layers].to_numpy(dtype=float)))


def heatmap_scale(runs: Sequence[Run]) -> dict[str, Any]:
    """One colour scale for every panel of the error heatmap: the runs' smallest to largest
    log10 error signal, at least :data:`HEATMAP_MIN_DECADES` wide."""
    finite = [v[np.isfinite(v)] for v in (_error_logs(r) for r in runs)]
    values = np.concatenate(finite) if finite else np.array([])
    if not values.size:
        return {}
    lo, hi = _min_span(float(values.min()), float(values.max()))
    return {"vmin": lo, "vmax": hi}


def _integer_steps() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=8, integer=True)


def step_columns(steps: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Column edges on a step axis, and the column of each recorded step.

    A recorded step's column runs to the next recorded step when that is where the
    cadence (``every``: k, or "auto") puts it, else one cadence wide, and the span up to
    the next recorded step is a blank column: steps that should have been recorded and
    were not show as a gap, not as a wider column.
    """
    steps = np.asarray(steps, dtype=np.int64)
    every = (meta.get("probe") or {}).get("every", 1)
    cadence = (meta.get("probe") or {}).get("cadence") or {}

    def expected(step: int) -> int:
        if every == "auto":
            first, k = int(cadence.get("first", 20)), int(cadence.get("every", 50))
            return 1 if step + 1 < first else (step // k + 1) * k - step
        try:
            return max(int(every), 1)
        except (TypeError, ValueError):
            return 1

    edges: list[float] = []
    columns: list[int] = []
    for i, step in enumerate(steps):
        width = expected(int(step))
        nxt = int(steps[i + 1]) if i + 1 < len(steps) else int(step) + width
        end = min(nxt, int(step) + width)
        if not edges or edges[-1] != step - 0.5:
            edges.append(step - 0.5)
        columns.append(len(edges) - 1)
        edges.append(end - 0.5)
        if end < nxt:
            edges.append(nxt - 0.5)  # a blank column up to the next recorded step
    if len(steps) and edges[-1] < steps[-1] + 0.5:
        edges.append(steps[-1] + 0.5)
    return np.asarray(edges, dtype=float), np.asarray(columns, dtype=np.int64)


def _finite_range(logs: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    finite = logs[np.isfinite(logs)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


register(
    Plot(
        "gradient_flow",
        "Gradient flow",
        gradient_flow,
        ("error_norm",),
        "record error_norm (stats='cheap' or 'default')",
        "error signal ‖dL/dz‖ (solid) and weight-gradient norm (dashed) of each layer with "
        "weights, at up to three steps (first, middle, last); an error signal of exactly 0 "
        "is marked ▼ on the floor labelled 0",
    ),
    Plot(
        "error_heatmap",
        "Error signal: layer × step",
        error_heatmap,
        ("error_norm",),
        "record error_norm (stats='cheap' or 'default')",
        "log10 of the error signal of each layer with weights at each step; columns sit at "
        "their steps (blank: steps not recorded), colours span at least "
        f"{HEATMAP_MIN_DECADES:g} decades so that noise is not stretched over the full scale",
        shared_options=heatmap_scale,
    ),
)

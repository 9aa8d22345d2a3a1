"""Figures from a recorded run: they read the run's frame and meta, nothing else.

Every function takes a :class:`~gradprobe.run.Run` and an optional matplotlib ``Axes``
and returns the ``Figure`` it drew on; none touches hooks or models, so they work on a
run loaded years later. :data:`PLOTS` lists them as data with the statistics each one
needs: :func:`missing` says why a plot cannot be drawn for a run (the report shows
that note in its place), and calling a plot anyway raises a :class:`GradprobeError`
with the same note.

matplotlib is imported on first use, with the non-interactive Agg backend unless a
backend was already chosen (``MPLBACKEND``, a matplotlibrc, ``matplotlib.use``, or pyplot
already imported), so a notebook keeps its inline backend. :func:`draw` (what
``Run.plot`` calls) returns a figure that pyplot no longer holds: a notebook shows it
once, as the cell's value, and nothing accumulates in pyplot's list of open figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._mpl import pyplot
from .diagnose import (
    DEAD_UNIT_FRAC,
    SATURATION_FRAC,
    UNSTABLE_UPDATE_RATIO,
    depth_profile,
    is_weight_layer,
    unit_candidates,
    weight_names,
)
from .errors import GradprobeError
from .run import Run

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLOTS",
    "Plot",
    "activation_histograms",
    "clipping",
    "dead_saturated",
    "draw",
    "error_heatmap",
    "gradient_flow",
    "loss",
    "loss_scale",
    "missing",
    "no_loss_logged",
    "nothing_clipped",
    "update_ratios",
]

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


# ---------------------------------------------------------------- plots
def gradient_flow(run: Run, ax: Axes | None = None, steps: Sequence[int] | None = None) -> Figure:
    """Per-layer error signal ‖dL/dz‖ (solid) and weight-gradient norm (dashed) at a few steps.

    Layers with weights, input on the left, log scale. An error signal of exactly 0 (it
    underflowed float32, or nothing reaches the layer) is marked ▼ on a floor labelled
    "0"; gaps are NaN/Inf.
    """
    _require(run, "gradient_flow")
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
    _require(run, "error_heatmap")
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


def _hist_layers(run: Run, names: Sequence[str] | None) -> list[str]:
    have = set(run.frame().query("stat == 'hist_00'")["name"])
    ordered = [n for n in run.modules if n in have]
    if names is not None:
        return [n for n in ordered if n in set(names)]
    acts = [n for n in ordered if run.module_info(n).get("activation")]
    ordered = acts or ordered
    if len(ordered) > _MAX_HIST_LAYERS:
        idx = np.unique(np.linspace(0, len(ordered) - 1, _MAX_HIST_LAYERS).round().astype(int))
        ordered = [ordered[i] for i in idx]
    return ordered


def activation_histograms(
    run: Run, ax: Axes | None = None, layers: Sequence[str] | None = None
) -> Figure:
    """fastai's "colorful dimension": each layer's output histogram (y) over steps (x).

    One band per layer, input on top; within a band the value axis runs upward over the
    layer's histogram range (tails are clamped into the edge bins), colour is log(1 +
    fraction of entries). Needs ``Probe(stats="full")``.
    """
    _require(run, "activation_histograms")
    fig, ax = _axes(ax, (7.0, 5.0))
    names = _hist_layers(run, layers)
    bins = int(run.meta.get("probe", {}).get("histogram_bins", 0)) or sum(
        1 for s in run.stats if s.startswith("hist_")
    )
    hist_stats = [f"hist_{b:02d}" for b in range(bins)]
    frame = run.frame()
    sub = frame[frame["stat"].isin(hist_stats) & frame["name"].isin(names)]
    steps = np.unique(sub["step"].to_numpy())
    bands = []
    for name in names:
        one = sub[sub["name"] == name].pivot_table(
            index="stat", columns="step", values="value", aggfunc="last"
        )
        one = one.reindex(index=hist_stats, columns=steps).fillna(0.0).to_numpy()
        totals = one.sum(axis=0, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(totals > 0, one / totals, 0.0)
        bands.append(np.log1p(100.0 * frac)[::-1])  # highest bin on top of its band
    image = np.vstack(bands) if bands else np.zeros((1, max(len(steps), 1)))
    # Columns at their steps, as in the error heatmap; steps not recorded are white.
    edges, columns = step_columns(steps, run.meta) if len(steps) else (np.array([-0.5, 0.5]), [0])
    grid = np.full((image.shape[0], len(edges) - 1), np.nan)
    grid[:, columns] = image
    im = ax.pcolormesh(
        edges,
        np.arange(image.shape[0] + 1) - 0.5,
        np.ma.masked_invalid(grid),
        cmap=_pyplot().get_cmap("viridis").with_extremes(bad=(0.0, 0.0, 0.0, 0.0)),
        # A fixed scale, 0 to all entries in one bin: every layer, step and run reads alike.
        vmin=0.0,
        vmax=math.log1p(100.0),
        shading="flat",
    )
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    shares = [0.0, 0.01, 0.1, 1.0]
    cb.set_ticks([math.log1p(100.0 * f) for f in shares])
    cb.set_ticklabels(["0", "1%", "10%", "100%"])
    cb.set_label("share of the layer's entries in the bin", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    for k in range(1, len(names)):
        ax.axhline(k * bins - 0.5, color="white", lw=1.2)
    centers = [k * bins + bins / 2 for k in range(len(names))]
    labels = []
    for name in names:
        lo, hi = run.module_info(name).get("histogram_range", [math.nan, math.nan])
        labels.append(f"{name}\n[{lo:g}, {hi:g}]")
    ax.set_yticks(centers)
    ax.set_yticklabels(labels, fontsize=7)
    ax.xaxis.set_major_locator(_integer_steps())
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("step")
    _title(ax, run, "activation histograms over time")
    return fig


def dead_saturated(run: Run, ax: Axes | None = None) -> Figure:
    """Fraction of dead units (solid) and of saturated entries (dashed) per layer over steps."""
    _require(run, "dead_saturated")
    fig, ax = _axes(ax)
    dead = run.table("dead_frac") if "dead_frac" in run.stats else pd.DataFrame()
    sat = run.table("sat_frac") if "sat_frac" in run.stats else pd.DataFrame()
    names = [n for n in run.modules if n in dead.columns or n in sat.columns]
    names = unit_candidates(run, names) if dead.shape[1] else names
    names = [n for n in names if run.module_info(n).get("activation")] or names
    colors = _depth_colors(len(names))
    for color, name in zip(colors, names):
        if name in dead.columns:
            ax.plot(dead.index, dead[name], "-", color=color, lw=1.2)
        if name in sat.columns:
            ax.plot(sat.index, sat[name], "--", color=color, lw=1.2)
    ax.axhline(DEAD_UNIT_FRAC, color="0.5", ls=":", lw=0.8)
    ax.axhline(SATURATION_FRAC, color="0.5", ls=":", lw=0.8)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction")
    ax.grid(True, alpha=0.3)
    from matplotlib.lines import Line2D

    ax.legend(
        [Line2D([], [], color="0.3", ls="-"), Line2D([], [], color="0.3", ls="--")],
        ["dead units/channels (0 for the whole batch)", "saturated (f' < 1% of max)"],
        fontsize=7,
        loc="best",  # placed by the data: where the fewest lines and markers are
    )
    if names:
        _depth_colorbar(fig, ax, names)
    _title(ax, run, "dead and saturated fractions")
    return fig


def _names_list(names: Sequence[str], limit: int = 2) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit} more" if len(names) > limit else "")


def update_ratios(run: Run, ax: Axes | None = None) -> Figure:
    """‖Δw‖/‖w‖ of each weight matrix per step (log scale); ~1e-3 is the usual healthy level.

    A log axis has no place for an update of exactly 0 (a frozen weight, a zero learning
    rate, a skipped step) nor for NaN/Inf: those steps are marked on the bottom (▼, zero)
    and top (×, non-finite) edges, and the legend names the weights, so nothing vanishes
    silently.
    """
    _require(run, "update_ratios")
    fig, ax = _axes(ax)
    table = run.table("update_ratio")
    weights = [w for w in weight_names(run) if w in table.columns] or list(table.columns)
    colors = _depth_colors(len(weights))
    edge = ax.get_xaxis_transform()  # x in steps, y in axes fractions: 0 bottom, 1 top
    zero_names, bad_names = [], []
    # NaN in the table may be a step without a record; NaN/Inf that was recorded is in the frame.
    frame = run.frame()
    recorded = frame[(frame["stat"] == "update_ratio") & ~np.isfinite(frame["value"])]
    nonfinite_steps = recorded.groupby("name")["step"].apply(list).to_dict()
    for color, name in zip(colors, weights):
        values = table[name].to_numpy(dtype=float)
        ax.plot(table.index, _positive(values), "-", color=color, lw=1)
        zero = values == 0
        bad = np.isin(table.index.to_numpy(), nonfinite_steps.get(name, ()))
        if zero.any():
            zero_names.append(name)
            ax.plot(
                table.index[zero],
                np.full(zero.sum(), 0.02),
                "v",
                ms=4,
                color=color,
                transform=edge,
                clip_on=False,
                gid="zero_update",
            )
        if bad.any():
            bad_names.append(name)
            ax.plot(
                table.index[bad],
                np.full(bad.sum(), 0.98),
                "x",
                ms=4,
                color=color,
                transform=edge,
                clip_on=False,
                gid="nonfinite_update",
            )
    ax.set_yscale("log")
    ax.axhline(1e-3, color="0.4", ls=":", lw=0.8)
    ax.axhline(UNSTABLE_UPDATE_RATIO, color="tab:red", ls=":", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("‖Δw‖ / ‖w‖ (log)")
    ax.grid(True, which="major", alpha=0.3)
    from matplotlib.lines import Line2D

    handles, labels = [], []
    if zero_names:
        handles.append(Line2D([], [], color="0.3", ls="", marker="v", ms=4))
        labels.append(
            f"‖Δw‖ = 0 (bottom edge): {len(zero_names)} weight(s)\n{_names_list(zero_names)}"
        )
    if bad_names:
        handles.append(Line2D([], [], color="0.3", ls="", marker="x", ms=4))
        labels.append(f"NaN/Inf (top edge): {len(bad_names)} weight(s)\n{_names_list(bad_names)}")
    if handles:
        # Placed by the data (matplotlib's "best" counts the edge markers too).
        ax.legend(handles, labels, fontsize=6.5, loc="best")
    if weights:
        _depth_colorbar(fig, ax, weights)
    _title(ax, run, "update ratio per weight (dotted: 1e-3 typical, red: unstable)")
    return fig


def clipping(run: Run, ax: Axes | None = None) -> Figure:
    """The global gradient norm as backward produced it and as the optimizer saw it.

    Loggers that show one norm hide clipping: here the two lines part wherever
    ``clip_grad_norm_`` cut the gradient, and the title gives the fraction of steps clipped
    (and skipped by a GradScaler, where one was watched).
    """
    _require(run, "clipping")
    fig, ax = _axes(ax)
    pre, post = run.model_series("global_grad_norm_preclip"), run.model_series("global_grad_norm")
    if not pre.empty:
        ax.plot(
            pre.index,
            _positive(pre.to_numpy()),
            "-",
            color="tab:red",
            lw=1.2,
            label="before clipping",
        )
    if not post.empty:
        ax.plot(
            post.index,
            _positive(post.to_numpy()),
            "--",
            color="tab:blue",
            lw=1.2,
            label="as the optimizer saw it",
        )
    clipped, skipped = run.model_series("clipped"), run.model_series("skipped")
    for step in skipped.index[skipped.to_numpy() > 0]:
        ax.axvline(step, color="0.6", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("global ‖grad‖ (log)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    what = (
        f"gradient norm: clipped at {clipped.mean():.0%} of steps"
        if not clipped.empty
        else "gradient norm"
    )
    if not skipped.empty:
        what += f", GradScaler skipped {(skipped > 0).mean():.0%} (dotted)"
    _title(ax, run, what)
    return fig


def _clipped_anywhere(run: Run) -> bool | None:
    """Whether the run clipped (or a GradScaler skipped) any recorded step; ``None``: unknown."""
    clipped, skipped = run.model_series("clipped"), run.model_series("skipped")
    if (skipped > 0).any() or (clipped > 0).any():
        return True
    pre, post = run.model_series("global_grad_norm_preclip"), run.model_series("global_grad_norm")
    if not pre.empty and not post.empty:
        both = pd.concat([pre, post], axis=1, join="inner").to_numpy(dtype=float)
        return bool(not np.allclose(both[:, 0], both[:, 1], rtol=1e-6, equal_nan=True))
    return False if not clipped.empty else None


def nothing_clipped(runs: Sequence[Run]) -> str | None:
    """One sentence in place of the clipping figure when no run clipped anything, else ``None``.

    Then both lines of every panel coincide: the figure would show nothing. The sentence
    gives each run's range of the global norm instead.
    """
    if not runs or any(_clipped_anywhere(run) is not False for run in runs):
        return None
    ranges = []
    for run in runs:
        norm = _positive(run.model_series("global_grad_norm_preclip").to_numpy())
        if not np.isfinite(norm).any():
            norm = _positive(run.model_series("global_grad_norm").to_numpy())
        if np.isfinite(norm).any():
            ranges.append(f"{np.nanmin(norm):.3g}–{np.nanmax(norm):.3g} in {run.name}")
    where = f" in any of the {len(runs)} runs" if len(runs) > 1 else ""
    return (
        f"Nothing was clipped{where}: at every recorded step the optimizer saw the gradient "
        "as backward produced it, and no step was skipped"
        + (f" (global ‖grad‖ {'; '.join(ranges)})." if ranges else ".")
    )


LOSS_LOG_RANGE = 30.0  # max/min of the positive losses above which the loss axis is log


def loss_scale(runs: Sequence[Run]) -> dict[str, Any]:
    """Options that put every panel of the loss figure on one scale (what the report passes).

    ``log``: a log loss axis when the positive losses of all ``runs`` together span more than
    ×:data:`LOSS_LOG_RANGE` (a curve that falls by decades, or one spike far above the
    rest, would flatten everything else on a linear axis) and no finite loss is ≤ 0, which
    a log axis could not show. ``lr_limits``: one learning-rate axis for all panels.
    """
    losses = [run.model_series("loss").to_numpy(dtype=float) for run in runs]
    finite = np.concatenate([v[np.isfinite(v)] for v in losses] or [np.empty(0)])
    log = bool(finite.size and (finite > 0).all() and finite.max() / finite.min() > LOSS_LOG_RANGE)
    rates = [run.model_series("lr").to_numpy(dtype=float) for run in runs]
    rates_finite = np.concatenate([v[np.isfinite(v)] for v in rates] or [np.empty(0)])
    options: dict[str, Any] = {"log": log}
    if rates_finite.size:
        options["lr_limits"] = (0.0, float(rates_finite.max()) * 1.05 or 1.0)
    return options


def _loss_markers(run: Run) -> list[tuple[str, list[int], str, str]]:
    """The steps that the instability findings name: (label, steps, marker, colour)."""
    from .diagnose import detect_divergence, detect_grad_norm_spike, detect_loss_spike

    marks = []
    spike = detect_grad_norm_spike(run)
    if spike is not None:
        steps = list(spike.evidence["steps"])
        marks.append((f"grad_norm_spike: {len(steps)} step(s)", steps, "^", "tab:red"))
    jump = detect_loss_spike(run)
    if jump is not None:
        steps = list(jump.evidence["steps"])
        marks.append((f"loss_spike: {len(steps)} step(s)", steps, "v", "tab:orange"))
    diverged = detect_divergence(run)
    if diverged is not None:
        ev = diverged.evidence
        if ev["mode"] == "nonfinite":
            marks.append(("divergence: loss non-finite from here", [ev["first_step"]], "|", "k"))
        else:
            marks.append(
                ("divergence: loss rising from its best here", [ev["best_step"]], "|", "k")
            )
    return marks


def loss(
    run: Run,
    ax: Axes | None = None,
    *,
    log: bool | None = None,
    lr_limits: tuple[float, float] | None = None,
) -> Figure:
    """The training loss per recorded step (left axis) and the learning rate (dashed, right).

    ``log``: a log loss axis; by default when this run's positive losses span more than
    ×:data:`LOSS_LOG_RANGE` (:func:`loss_scale` decides it for several runs at once). A
    non-finite loss is marked × on the top edge (a line cannot show it); steps named by a
    ``grad_norm_spike`` (▲, bottom edge), ``loss_spike`` (▼, top edge) or ``divergence``
    (vertical line) finding are marked, with the finding in the legend.
    """
    _require(run, "loss")
    fig, ax = _axes(ax)
    series = run.model_series("loss")
    values = series.to_numpy(dtype=float)
    if log is None:
        log = loss_scale([run])["log"]
    ax.plot(
        series.index,
        values if not log else _positive(values),
        "-",
        color="tab:blue",
        lw=1.2,
        label="training loss",
    )
    edge = ax.get_xaxis_transform()  # x in steps, y in axes fractions
    bad = ~np.isfinite(values)
    if bad.any():
        ax.plot(
            series.index[bad],
            np.full(bad.sum(), 0.98),
            "x",
            ms=5,
            color="tab:red",
            transform=edge,
            clip_on=False,
            label="loss NaN/Inf (top edge)",
        )
    for label, steps, marker, color in _loss_markers(run):
        if marker == "|":
            for step in steps:
                ax.axvline(step, color=color, ls=":", lw=1, label=label)
                label = "_"  # one legend entry per finding
        else:
            y = 0.03 if marker == "^" else 0.97
            ax.plot(
                steps,
                np.full(len(steps), y),
                marker,
                ms=5,
                color=color,
                ls="",
                transform=edge,
                clip_on=False,
                label=label,
            )
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss" + (" (log)" if log else ""))
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    rate = run.model_series("lr")
    if not rate.empty:
        right = ax.twinx()
        right.plot(
            rate.index,
            rate.to_numpy(dtype=float),
            "--",
            color="tab:green",
            lw=1,
            label="learning rate (right axis)",
        )
        right.set_ylabel("learning rate", color="tab:green")
        right.tick_params(axis="y", colors="tab:green", labelsize=8)
        if lr_limits is not None:
            right.set_ylim(*lr_limits)
        more, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more, labels + more_labels
    if not rate.empty:
        # The legend goes on the right axis (drawn above both), where matplotlib's "best"
        # sees only that axis's lines: give it hidden copies of the loss and its markers,
        # so that it keeps clear of them too (add_artist leaves the axis limits alone).
        from matplotlib.lines import Line2D

        for line in ax.get_lines():
            shadow = Line2D(line.get_xdata(), line.get_ydata(), transform=line.get_transform())
            shadow.set_visible(False)
            right.add_artist(shadow)
    (right if not rate.empty else ax).legend(handles, labels, loc="best", fontsize=7)
    _title(ax, run, "training loss" + (" and learning rate" if not rate.empty else ""))
    return fig


def no_loss_logged(runs: Sequence[Run]) -> str | None:
    """One sentence in place of the loss figure when no run logged a loss, else ``None``.

    The report asks it with all its runs when none can draw the figure: one sentence that
    says how to log the loss reads better than a note per run.
    """
    if any("loss" in run.stats for run in runs):
        return None
    who = (
        f"None of the {len(runs)} runs logged a loss" if len(runs) > 1 else "The run logged no loss"
    )
    return (
        f"{who}, so there is no loss curve (and the loss findings could not "
        "be judged): call probe.log(loss=loss) at each training step, the loss tensor itself "
        "(it stays on the device until the flush)."
    )


# ---------------------------------------------------------------- registry
@dataclass(frozen=True)
class Plot:
    """A registered figure: its function, the statistics it needs (any one of them), a title."""

    name: str
    title: str
    fn: Callable[..., Figure]
    requires: tuple[str, ...]
    hint: str
    doc: str
    # Given the runs that can draw it: a sentence to show in place of a figure that would show
    # nothing (e.g. clipping where nothing was clipped), or None to draw it.
    nothing_to_show: Callable[[Sequence[Run]], str | None] | None = None
    # Given the runs that can draw it: options for every panel's function, so that the
    # panels of one figure share a scale (e.g. the loss figure's log axis and lr axis).
    shared_options: Callable[[Sequence[Run]], dict[str, Any]] | None = None


PLOTS: dict[str, Plot] = {
    p.name: p
    for p in [
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
        Plot(
            "activation_histograms",
            "Activation histograms (colorful dimension)",
            activation_histograms,
            ("hist_00",),
            "record with Probe(..., stats='full')",
            "output histograms over steps of up to 8 layers (the activations where the model has "
            "them), input on top; colour: share of the layer's entries in each bin",
        ),
        Plot(
            "dead_saturated",
            "Dead and saturated fractions",
            dead_saturated,
            ("dead_frac", "sat_frac"),
            "record dead_frac/sat_frac (stats='default')",
            "fraction of dead units (solid) and of saturated entries (dashed) per layer over steps; "
            "dotted: the diagnosis thresholds",
        ),
        Plot(
            "update_ratios",
            "Update ratios",
            update_ratios,
            ("update_ratio",),
            "record update_ratio (stats='cheap' or 'default')",
            "‖Δw‖/‖w‖ per weight over steps; an update of exactly 0, which a log axis cannot show, "
            "is marked ▼ on the bottom edge (NaN/Inf: × on the top edge)",
        ),
        Plot(
            "clipping",
            "Gradient norm before and after clipping",
            clipping,
            ("global_grad_norm_preclip", "global_grad_norm"),
            "record the global norms (stats='cheap' or 'default')",
            "global gradient norm as backward produced it and as the optimizer saw it; "
            "fraction of steps clipped (and skipped by a GradScaler)",
            nothing_clipped,
        ),
        Plot(
            "loss",
            "Training loss",
            loss,
            ("loss",),
            "call probe.log(loss=loss) at each training step (the tensor: no host sync)",
            "training loss per recorded step (solid, left axis); where the learning rate was "
            "recorded, it is dashed on the right axis; steps that a grad_norm_spike (▲), "
            "loss_spike (▼) or divergence (dotted line) finding names are marked",
            no_loss_logged,
            loss_scale,
        ),
    ]
}


def missing(plot: str | Plot, run: Run) -> str | None:
    """Why ``plot`` cannot be drawn for ``run`` (a one-line note), or ``None`` if it can."""
    spec = PLOTS[plot] if isinstance(plot, str) else plot
    if run.empty:
        return f"{spec.title}: the run has no recorded steps"
    if not set(run.stats) & set(spec.requires):
        return f"{spec.title}: not drawn, the run has no {' or '.join(spec.requires)}; {spec.hint}"
    if spec.name == "activation_histograms" and not any(
        run.module_info(n).get("histogram_range") for n in run.modules
    ):
        return f"{spec.title}: not drawn, the run's meta has no histogram ranges; {spec.hint}"
    if (
        spec.name == "update_ratios"
        and not any(is_weight_layer(run.module_info(n)) for n in run.modules)
        and not weight_names(run)
    ):
        return f"{spec.title}: not drawn, the run has no weights"
    return None


def draw(
    name: str,
    run: Run,
    *,
    ax: Axes | None = None,
    size: tuple[float, float] | None = None,
    **options: Any,
) -> Figure:
    """Plot ``name`` of :data:`PLOTS` for ``run``, as a matplotlib ``Figure``.

    With ``ax``, draws there and returns its figure. Without, a new figure that pyplot
    does not hold (a notebook shows it once, as the cell's value; ``fig.savefig``
    writes it; ``plt.show()`` does not show it). ``options`` go to the plot's function
    (``steps=`` for gradient_flow, ``vmin``/``vmax`` for error_heatmap, ``layers=`` for
    activation_histograms). An unknown name, or a run without the statistics the plot
    needs, raises :class:`GradprobeError` saying which names exist or what to record.
    """
    spec = PLOTS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise GradprobeError(
            f"no plot named {name!r}",
            f"the plots are: {', '.join(PLOTS)}",
        )
    _require(run, spec.name)
    if ax is None:
        plt = _pyplot()
        default = (7.0, 5.0) if spec.name == "activation_histograms" else (7.0, 4.0)
        # Made by pyplot, so that the backend is loaded (the inline backend registers how
        # a notebook displays figures), then let go: pyplot would show it a second time at
        # the end of the cell, and keep every figure ever drawn.
        fig = plt.figure(figsize=size or default, layout="constrained")
        plt.close(fig)
        ax = fig.add_subplot()
    return spec.fn(run, ax=ax, **options)


def _require(run: Run, name: str) -> None:
    note = missing(name, run)
    if note is not None:
        raise GradprobeError(note, PLOTS[name].hint)

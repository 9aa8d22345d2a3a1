"""Units: activation histograms, and the dead and saturated fractions per layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..diagnose import (
    DEAD_UNIT_FRAC,
    SATURATION_FRAC,
    unit_candidates,
)
from ..run import Run
from ._common import _MAX_HIST_LAYERS, _axes, _depth_colorbar, _depth_colors, _pyplot, _title
from ._registry import Plot, register, require
from .depth import _integer_steps, step_columns

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
    require(run, "activation_histograms")
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
    require(run, "dead_saturated")
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


register(
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
)

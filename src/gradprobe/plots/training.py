"""Training over steps: update ratios, clipping, and the loss with its findings marked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..diagnose import (
    UNSTABLE_UPDATE_RATIO,
    weight_names,
)
from ..run import Run
from ._common import _axes, _depth_colorbar, _depth_colors, _names_list, _positive, _title
from ._registry import Plot, register, require

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def update_ratios(run: Run, ax: Axes | None = None) -> Figure:
    """‖Δw‖/‖w‖ of each weight matrix per step (log scale); ~1e-3 is the usual healthy level.

    A log axis has no place for an update of exactly 0 (a frozen weight, a zero learning
    rate, a skipped step) nor for NaN/Inf: those steps are marked on the bottom (▼, zero)
    and top (×, non-finite) edges, and the legend names the weights, so nothing vanishes
    silently.
    """
    require(run, "update_ratios")
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
    require(run, "clipping")
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
    from ..diagnose import detect_divergence, detect_grad_norm_spike, detect_loss_spike

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
    require(run, "loss")
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


register(
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
)

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

One module per family of figures (``depth``, ``units``, ``training``), what they share
in ``_common``; here the registry, :data:`PLOTS`, :func:`missing` and :func:`draw`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import GradprobeError
from ..run import Run
from ._common import _pyplot
from ._registry import PLOTS, Plot, missing, require

# isort: off
# The families register their figures in PLOTS as they are imported: this order is
# the report's (the error signal over depth, the units, training over steps).
from .depth import HEATMAP_MIN_DECADES, error_heatmap, gradient_flow, heatmap_scale, step_columns
from .units import activation_histograms, dead_saturated
from .training import (
    LOSS_LOG_RANGE,
    clipping,
    loss,
    loss_scale,
    no_loss_logged,
    nothing_clipped,
    update_ratios,
)
# isort: on

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "HEATMAP_MIN_DECADES",
    "LOSS_LOG_RANGE",
    "PLOTS",
    "Plot",
    "activation_histograms",
    "clipping",
    "dead_saturated",
    "draw",
    "error_heatmap",
    "gradient_flow",
    "heatmap_scale",
    "loss",
    "loss_scale",
    "missing",
    "no_loss_logged",
    "nothing_clipped",
    "step_columns",
    "update_ratios",
]


# ---------------------------------------------------------------- registry
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
    require(run, spec.name)
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

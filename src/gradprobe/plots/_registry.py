"""The registry of figures: :class:`Plot` (what a figure needs and says), :data:`PLOTS`,
and :func:`missing` (why a figure cannot be drawn for a run).

Each family module registers its figures as it is imported (``gradprobe.plots`` imports
them in the order the report shows them), and a figure checks its run against its own
entry before drawing (:func:`require`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..diagnose import is_weight_layer, norm_modules, weight_names
from ..errors import GradprobeError
from ..run import Run

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["PLOTS", "Plot", "missing", "register", "require"]


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


# Filled by register(), in the order the family modules are imported.
PLOTS: dict[str, Plot] = {}


def register(*plots: Plot) -> None:
    """Enter figures in :data:`PLOTS` (by name, in this order)."""
    for plot in plots:
        PLOTS[plot.name] = plot


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
        and not any(is_weight_layer(run.module_info(n), norm_modules(run)) for n in run.modules)
        and not weight_names(run)
    ):
        return f"{spec.title}: not drawn, the run has no weights"
    return None


def require(run: Run, name: str) -> None:
    """Raise the note of :func:`missing` (and what to record) when ``run`` cannot draw ``name``."""
    note = missing(name, run)
    if note is not None:
        raise GradprobeError(note, PLOTS[name].hint)

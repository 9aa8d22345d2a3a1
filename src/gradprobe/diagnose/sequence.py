"""Through time, from the error signal itself: how ‖dL/dy[:, t]‖ of a recurrent output is
spread over its positions (``error_time_first``, ``error_time_last``: the means over the
first and last quarter of the sequence; ``error_time_slope``: the least-squares slope of
its log10 over the positions, in decades per step).

This reads what the carry gates of :func:`~gradprobe.diagnose.depth.detect_vanishing`'s
``time`` mode predict, on any recurrent module (a plain RNN, a cell loop, a user's own),
and it is a mode of the same finding, ``vanishing``: one phenomenon, one finding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..run import Run
from .selectors import _recent, _table
from .thresholds import TIME_ERROR_DECAY, VANISHING_RATIO

__all__ = ["TIME_ERROR_STATS", "vanishing_time_error"]

TIME_ERROR_STATS = ("error_time_first", "error_time_last", "error_time_slope")


def vanishing_time_error(run: Run) -> dict[str, dict[str, Any]]:
    """Recurrent outputs whose error signal falls going back through the sequence: the first
    quarter's mean below VANISHING_RATIO of the last quarter's, or a fitted loss of
    TIME_ERROR_DECAY decades or more per step back. Medians over the last half of the steps.

    The slope's sign is read against the quarters: where the first positions get less than
    the last, the error falls going back, and the slope's magnitude is that fall per step
    (whichever direction the slope was fitted in). Where they get more, nothing vanishes.
    """
    first, last = _table(run, "error_time_first"), _table(run, "error_time_last")
    slope = _table(run, "error_time_slope")
    if first.empty or last.empty:
        return {}
    first_now, last_now = _recent(first).median(), _recent(last).median()
    slope_now = _recent(slope).median() if not slope.empty else None
    found: dict[str, dict[str, Any]] = {}
    for name in first_now.index:
        if name not in last_now.index:
            continue
        f, la = float(first_now[name]), float(last_now[name])
        if not (math.isfinite(f) and math.isfinite(la)) or la <= 0 or f < 0:
            continue
        ratio = f / la
        if ratio >= 1:
            continue  # the first positions get as much as the last, or more
        s = float(slope_now[name]) if slope_now is not None and name in slope_now.index else np.nan
        decay = abs(s) if math.isfinite(s) else math.nan
        if not (ratio <= VANISHING_RATIO or (math.isfinite(decay) and decay >= TIME_ERROR_DECAY)):
            continue
        found[name] = {
            "error_first": f,
            "error_last": la,
            "first_last_ratio": ratio,
            "decades_per_step": decay,
            "log10_ratio": math.log10(ratio) if ratio > 0 else -math.inf,
        }
    return found

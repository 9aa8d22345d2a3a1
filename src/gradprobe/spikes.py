"""The gradient-norm spike rule, written once.

A value spikes when it is at least ``GRAD_SPIKE_FACTOR`` (10) times the median of the
finite values among the ``SPIKE_WINDOW`` (20) recorded steps before it, with at least
``SPIKE_MIN`` (5) of them finite, and that median is above zero. Three readers use it:
:mod:`gradprobe.diagnose` after training (:func:`running_median` over a whole series),
the live check while training and the "auto" cadence's burst (:class:`SpikeWatch`, one
value at a time). The values live here, in the numbers layer, because the recording
layer (``step.py``) may not import the analysis layer; ``gradprobe.diagnose.thresholds``
gives them their reasons and re-exports them.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Iterable

import numpy as np

__all__ = [
    "GRAD_SPIKE_FACTOR",
    "SPIKE_MIN",
    "SPIKE_WINDOW",
    "SpikeWatch",
    "is_spike",
    "median_of",
    "running_median",
]

SPIKE_WINDOW = 20
SPIKE_MIN = max(3, SPIKE_WINDOW // 4)  # a quarter of the window must be there
GRAD_SPIKE_FACTOR = 10.0


def window_median(window: Iterable[float]) -> float:
    """The median of the finite values of ``window``; NaN when fewer than SPIKE_MIN."""
    finite = [float(v) for v in window if math.isfinite(v)]
    return median_of(finite) if len(finite) >= SPIKE_MIN else math.nan


def median_of(values: list[float]) -> float:
    """``np.median`` of a few host floats, bit for bit (the middle one, or the two middle
    ones' sum halved, as numpy's mean of two), without numpy's ~20 µs per call: the
    "auto" cadence and the live check take one at every step."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def is_spike(value: float, median: float) -> bool:
    """Whether ``value`` spikes against the running ``median`` (NaN median: too few)."""
    return math.isfinite(value) and median > 0 and value >= GRAD_SPIKE_FACTOR * median


def running_median(values: np.ndarray) -> np.ndarray:
    """For each value, :func:`window_median` of the SPIKE_WINDOW values before it."""
    v = np.asarray(values, dtype=float)
    v = np.where(np.isfinite(v), v, np.nan)
    padded = np.concatenate([np.full(SPIKE_WINDOW, np.nan), v[:-1] if len(v) else v])
    if not len(v):
        return v
    windows = np.lib.stride_tricks.sliding_window_view(padded, SPIKE_WINDOW)[: len(v)]
    count = np.isfinite(windows).sum(axis=1)
    with warnings.catch_warnings():  # all-NaN windows: masked just below
        warnings.simplefilter("ignore", RuntimeWarning)
        medians = np.nanmedian(windows, axis=1)
    return np.where(count >= SPIKE_MIN, medians, np.nan)


class SpikeWatch:
    """The rule over a stream: :meth:`push` each step's value in order."""

    def __init__(self) -> None:
        self.window: deque[float] = deque(maxlen=SPIKE_WINDOW)

    def push(self, value: float) -> float | None:
        """Add ``value``; the median it spiked against, or None. A non-finite value
        takes its place in the window (as in :func:`running_median`) but is no spike."""
        median = window_median(self.window)
        self.window.append(float(value))
        return median if is_spike(value, median) else None

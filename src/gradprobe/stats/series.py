"""Per-time-step series: the error signal of a recurrent module spread over time.

A module's series of a step is ``‖dL/dy[:, t]‖²`` per time step ``t`` (``time_sq``): the
squares of every call of the step (micro-batches, a cell's calls placed at their time
index) added position by position, and, under data parallelism, those of every rank
(:meth:`gradprobe.buffer.Ranks.combine`). Squares add up where norms do not, so the
series is exact however the step is split. Sequences of different lengths are aligned at
their first step: a shorter one counts as if it were padded with zeros at the end, which
is what a padded batch is (its padded positions have no error).

At the flush, after the cross-rank combination, :func:`series_partials` turns each series
into the partials ``time_first``, ``time_last`` and ``time_slope`` (``where="series"``),
the numbers of :func:`gradprobe.sequence.error_time` computed in float64 on the host.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["add_at", "error_time_summary", "series_partials"]

# series[row][slot]: a module's per-time-step squared error norms at one drained step.
Series = dict[int, dict[int, np.ndarray]]


def add_at(series: dict[int, np.ndarray], slot: int, offset: int, values: np.ndarray) -> None:
    """Add ``values`` into ``series[slot]`` from position ``offset``, growing it as needed."""
    end = offset + values.size
    have = series.get(slot)
    if have is None:
        have = series[slot] = np.zeros(end)
    elif have.size < end:
        have = series[slot] = np.concatenate([have, np.zeros(end - have.size)])
    have[offset:end] += values


def error_time_summary(sq: np.ndarray) -> tuple[float, float, float]:
    """(first, last, slope) of one series: the mean of ``√sq`` over the first and the
    last ``max(1, ⌊T/4⌋)`` steps, and the least-squares slope of ``log10 √sq`` against
    ``t`` over the steps whose norm is positive and finite (NaN with fewer than two):
    :func:`gradprobe.sequence.error_time`, in float64."""
    norms = np.sqrt(np.asarray(sq, dtype=np.float64))
    steps = norms.size
    if steps == 0:
        return np.nan, np.nan, np.nan
    quarter = max(1, steps // 4)
    t = np.arange(steps, dtype=np.float64)
    ok = (norms > 0) & np.isfinite(norms)
    slope = np.nan
    if ok.sum() >= 2:
        tt, y = t[ok], np.log10(norms[ok])
        dt = tt - tt.mean()
        den = float((dt * dt).sum())
        slope = float((dt * (y - y.mean())).sum() / den) if den > 0 else np.nan
    return float(norms[:quarter].mean()), float(norms[steps - quarter :].mean()), slope


def series_partials(series: Series, modules: Mapping[str, np.ndarray]) -> None:
    """Fill ``time_first``, ``time_last``, ``time_slope`` (``[rows, slots]``) from the
    combined series, in place; and ``time_sq``'s column with each series' total."""
    for row, by_slot in series.items():
        for slot, sq in by_slot.items():
            first, last, slope = error_time_summary(sq)
            modules["time_first"][row, slot] = first
            modules["time_last"][row, slot] = last
            modules["time_slope"][row, slot] = slope
            modules["time_sq"][row, slot] = float(np.sum(sq))

"""Closed steps and logged values awaiting a flush, and the drain that folds them into
the partials declared in :mod:`gradprobe.stats`.

At a flush the stacked steps are copied to the host once per device, and NumPy combines
the per-call values into per-step partials (several calls of a module in one step add up
there). Logged values (``Probe.log``, the learning rate) wait here too: a loss is often
logged just after its optimizer step closed, and the micro-batches of one step must end
up in one row.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..reduce import accumulation_dtype
from ..stats import FOLDS, HEAD_COLUMNS, PARTIALS, model_partials
from ..stats.partials import MODEL_HOST_PARTIALS, MODULE_HOST_PARTIALS
from ..stats.series import Series, add_at, series_partials
from .fields import FIELDS, MODULE_PARTIALS, PARAM_PARTIALS, ClosedStep, StepRecord

if TYPE_CHECKING:
    from .ranks import Ranks

__all__ = ["Drain", "Drained"]


@dataclass
class Drained:
    """Rows taken out of the buffer at a flush, on the host."""

    steps: np.ndarray  # [rows]
    modules: dict[str, np.ndarray]  # partial -> [rows, slots]
    params: dict[str, np.ndarray]  # partial -> [rows, params]
    histograms: np.ndarray | None  # [rows, slots, bins]
    model: dict[str, np.ndarray] = field(default_factory=dict)  # partial -> [rows, 1]
    # Logged values: (step, name) -> (log_sum, log_count); steps may be any drained or
    # earlier step (a loss logged after its optimizer step closed).
    logged: dict[tuple[int, str], tuple[float, float]] = field(default_factory=dict)
    # Per-head tables (attention): (row, slot) -> [len(HEAD_COLUMNS), heads].
    heads: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    # Per-time-step series (stats.series): row -> slot -> ‖dL/dy[:, t]‖² per t.
    series: Series = field(default_factory=dict)


class Drain:
    """Closed steps and logged values until a flush takes them, as rows of partials."""

    def __init__(self, histogram_bins: int) -> None:
        self.histogram_bins = histogram_bins
        self.ranks: Ranks | None = None
        self.closed: list[ClosedStep] = []
        # Logged values by (step, name): 0-d tensors (on their device) and host floats.
        self.logged: dict[tuple[int, str], list[Tensor | float]] = {}
        self._complete: set[tuple[int, str]] = set()
        self._last_closed = -1
        self._draining_through = -1  # the last step of the drain in progress

    def __len__(self) -> int:
        return len(self.closed)

    def close(self, closed: ClosedStep) -> None:
        """Keep a closed step until the next drain."""
        self.closed.append(closed)
        self._last_closed = closed[0]

    # ------------------------------------------------------------ logged values
    def log(self, step: int, name: str, value: Tensor | float, complete: bool) -> None:
        self.logged.setdefault((step, name), []).append(value)
        if complete:
            self._complete.add((step, name))

    def discard_logged(self, step: int) -> None:
        """Forget the values logged for ``step`` (a step that leaves no rows)."""
        self.logged = {k: v for k, v in self.logged.items() if k[0] != step}
        self._complete = {k for k in self._complete if k in self.logged}

    def forget_logged_of_failed_drain(self) -> None:
        through = self._draining_through
        self.logged = {k: v for k, v in self.logged.items() if k[0] > through}
        self._complete = {k for k in self._complete if k in self.logged}

    def _take_logged(self, final: bool) -> dict[tuple[int, str], list[Tensor | float]]:
        """The logged values to drain now: all if ``final``, else those of steps before
        the last closed one, and those complete."""
        take = {
            k: v
            for k, v in self.logged.items()
            if final or k[0] < self._last_closed or k in self._complete
        }
        for key in take:
            del self.logged[key]
            self._complete.discard(key)
        return take

    # ------------------------------------------------------------ flush
    def drain(self, n_slots: int, n_params: int, final: bool) -> Drained | None:
        closed, self.closed = self.closed, []
        if closed:
            self._draining_through = closed[-1][0]
        logged = self._take_logged(final)
        # Under DDP every rank must reach the same collectives: ranks agree on ``closed``
        # and on ``final``, not on what each logged.
        if not closed and not (final and (logged or self.ranks is not None)):
            self.logged.update(logged)  # nothing to flush yet: keep it for the next drain
            return None
        rows = len(closed)
        steps = np.array([c[0] for c in closed], dtype=np.int64)
        # A partial starts at its initial value: a device max one at -inf where its values
        # may be negative (an attention logit, a logit), left out by its finaliser's mask.
        modules = {
            name: np.full((rows, n_slots), PARTIALS[name].initial) for name in MODULE_PARTIALS
        }
        heads: dict[tuple[int, int], np.ndarray] = {}
        series: Series = {}
        params = {name: np.zeros((rows, n_params)) for name in PARAM_PARTIALS}
        bins = self.histogram_bins
        hist = np.zeros((rows, n_slots, bins)) if bins else None
        model = {name: np.zeros((rows, 1)) for name in MODEL_HOST_PARTIALS}
        by_device: dict[torch.device, list[tuple[int, StepRecord]]] = defaultdict(list)
        for row, (_, host, param_host, model_host, records) in enumerate(closed):
            for i, name in enumerate(MODULE_HOST_PARTIALS):
                modules[name][row] = host[:, i]
            for name, arr in param_host.items():
                if name in params:
                    params[name][row] = arr
            for name, v in model_host.items():
                model[name][row] = v
            for record in records:
                by_device[record.flat.device].append((row, record))
        for entries in by_device.values():
            # Deliberate host sync: one copy per device per flush.
            flat = torch.cat([r.flat for _, r in entries]).cpu().numpy().astype(np.float64)
            offset = 0
            for row, record in entries:
                for kind, slots, counts, length in record.layout:
                    values = flat[offset : offset + length]
                    offset += length
                    if kind == "heads":  # counts: each call's number of heads
                        heads.update(_head_tables(row, slots, counts, values))
                        continue
                    if counts.ndim == 2:  # a series kind (stats.FOLDS "series")
                        _add_series(series.setdefault(row, {}), slots, counts, values)
                        continue
                    _combine(kind, row, slots, counts, values, modules, params, hist)
        model.update(model_partials(params))
        drained = Drained(
            steps, modules, params, hist, model, _logged_partials(logged), heads, series
        )
        if self.ranks is not None:
            self.ranks.combine(drained)
        series_partials(drained.series, drained.modules)  # after the ranks' sum
        return drained


def _head_tables(
    row: int, slots: np.ndarray, counts: np.ndarray, values: np.ndarray
) -> dict[tuple[int, int], np.ndarray]:
    """One step's per-head tables: each slot's ``[columns, heads]`` (its heads: ``counts``)."""
    out, offset = {}, 0
    columns = len(HEAD_COLUMNS)
    for slot, h in zip(slots.tolist(), counts.astype(np.int64).tolist()):
        out[(row, slot)] = values[offset : offset + columns * h].reshape(columns, h)
        offset += columns * h
    return out


def _logged_partials(
    logged: dict[tuple[int, str], list[Tensor | float]],
) -> dict[tuple[int, str], tuple[float, float]]:
    """``log_sum`` and ``log_count`` of each (step, name), on the host: one copy per device."""
    tensors: dict[torch.device, list[Tensor]] = defaultdict(list)
    for values in logged.values():
        for v in values:
            if isinstance(v, Tensor):
                tensors[v.device].append(v.reshape(()).to(accumulation_dtype(v.device)))
    host = {
        # Deliberate host sync: one copy per device per flush.
        device: iter(torch.stack(ts).cpu().numpy().astype(np.float64).tolist())
        for device, ts in tensors.items()
    }
    out = {}
    for key, values in logged.items():
        numbers = [next(host[v.device]) if isinstance(v, Tensor) else float(v) for v in values]
        out[key] = (float(np.sum(numbers)), float(len(numbers)))
    return out


def _add_series(
    series: dict[int, np.ndarray], slots: np.ndarray, counts: np.ndarray, values: np.ndarray
) -> None:
    """Add each call's vector into its module's series from the call's offset (a call of a
    discarded pass, slot -1, is skipped)."""
    start = 0
    for slot, (length, offset) in zip(slots, counts.astype(np.int64)):
        if slot >= 0:
            add_at(series, int(slot), int(offset), values[start : start + length])
        start += length


def _combine(
    kind: str,
    row: int,
    slots: np.ndarray,
    counts: np.ndarray,
    values: np.ndarray,
    modules: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    hist: np.ndarray | None,
) -> None:
    """Fold one step's per-call values into the declared partials (calls add up)."""
    if kind.startswith("param:"):
        params[kind.removeprefix("param:")][row, slots] = values
        return
    if kind in ("dead_units", "dead_window_units"):
        modules[kind][row] = values
        return
    if kind == "hist":
        if hist is not None:
            np.add.at(hist[row], slots, values.reshape(len(slots), -1))
        return
    fields = dict(zip(FIELDS[kind], values.reshape(len(FIELDS[kind]), -1)))
    kept = slots >= 0  # -1: a call of a pass whose gradient was discarded (drop_before)
    if not kept.all():
        slots, counts = slots[kept], counts[kept]
        fields = {name: v[kept] for name, v in fields.items()}

    # As the catalogue declares (stats.FOLDS); np.*.at: a module called twice adds up.
    for partial, name, how in FOLDS[kind]:
        v = fields[name]
        if how == "sumsq":
            v = v**2
        elif how == "uncounted":
            v = counts - v
        if how == "max":
            with np.errstate(invalid="ignore"):  # a NaN (logit_max of NaN logits) is the max
                np.maximum.at(modules[partial][row], slots, v)
        else:
            np.add.at(modules[partial][row], slots, v)

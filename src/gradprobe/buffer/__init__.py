"""StepBuffer: where hooks leave their per-call results, on the device, until one flush.

Why this shape: on small layers a training step is dominated by per-op dispatch
(a few microseconds each), so what a hook costs is the *number* of tensor ops it
launches, not their size. A hook therefore launches only the reductions it needs
(``var_mean``, ``count_nonzero``, one norm) and appends the 0-d results to a list,
without touching any buffer. At the end of a step each list becomes one stacked
tensor (a fixed number of ops per step, however many modules), and per-unit
activity is folded into the dead-unit counters in a handful of ops. At a flush the
stacked steps are copied to the host once per device, and NumPy combines the
per-call values into the per-step partials declared in :mod:`gradprobe.stats`
(several calls of a module in one step add up there).

:class:`StepBuffer` is a facade over four parts, each owning its state:

- :mod:`.calls` (:class:`~.calls.StepCalls`): the current step's per-call records and
  host counts, their stacking at the step's close, taking back a pass or a call;
- :mod:`.units` (:class:`~.units.UnitRuns`): dead-unit runs, one segment per module;
- :mod:`.drain` (:class:`~.drain.Drain`): closed steps and logged values until a flush,
  folded into partials (:class:`~.drain.Drained`);
- :mod:`.ranks` (:class:`~.ranks.Ranks`): the data-parallel combines.

Under data parallelism (:class:`Ranks`) the drained partials of every rank are
combined at the flush, as each partial declares (``sum`` or ``max``; ``same`` ones are
equal on every rank already): two collectives per flush, whatever the model, and a
third for logged values (``Probe.log``, the learning rate), whose names and steps need
not be the same on every rank. Only per-unit activity is combined per step (one
collective), because "dead on every rank" must be known before the next step's
inactivity runs are counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..reduce import accumulation_dtype
from .calls import Mark, StepCalls
from .drain import Drain, Drained
from .fields import FIELDS
from .ranks import Ranks
from .units import DeviceUnits, UnitRuns

__all__ = ["FIELDS", "Drained", "Ranks", "StepBuffer", "accumulation_dtype"]


class StepBuffer:
    """Per-call results of the current step, and closed steps awaiting a flush."""

    def __init__(
        self,
        n_slots: int,
        n_params: int,
        *,
        dead_window: int,
        histogram_bins: int = 0,
        ranks: Ranks | None = None,
    ) -> None:
        self._calls = StepCalls(n_slots, n_params, histogram_bins)
        self._unit_runs = UnitRuns(n_slots, dead_window)
        self._drain = Drain(histogram_bins)
        self.ranks = ranks

    def __len__(self) -> int:
        """Closed steps waiting for a flush."""
        return len(self._drain)

    # ------------------------------------------------------------ shape and settings
    @property
    def n_slots(self) -> int:
        return self._calls.n_slots

    @property
    def n_params(self) -> int:
        return self._calls.n_params

    @property
    def dead_window(self) -> int:
        return self._unit_runs.dead_window

    @property
    def histogram_bins(self) -> int:
        return self._calls.histogram_bins

    @property
    def ranks(self) -> Ranks | None:
        """The data-parallel group (set by the Probe once ``torch.distributed`` is up)."""
        return self._ranks

    @ranks.setter
    def ranks(self, ranks: Ranks | None) -> None:
        # The parts that issue collectives: unit runs (per step) and the drain (per flush).
        self._ranks = self._unit_runs.ranks = self._drain.ranks = ranks

    @property
    def track_units(self) -> bool:
        """Under data parallelism, whether per-unit activity is tracked (every rank must
        then take part in its collectives each step, whatever it ran); the Probe sets it."""
        return self._unit_runs.track_units

    @track_units.setter
    def track_units(self, track: bool) -> None:
        self._unit_runs.track_units = track

    @property
    def units_off(self) -> set[int]:
        """Modules whose number of units changed (not features or channels), or retired:
        no longer tracked for dead units."""
        return self._unit_runs.units_off

    @units_off.setter
    def units_off(self, slots: set[int]) -> None:
        self._unit_runs.units_off = slots

    @property
    def unit_problems(self) -> list[tuple[int, int, int]]:
        """(slot, units before, units after) for each module just dropped; the Probe warns."""
        return self._unit_runs.unit_problems

    @unit_problems.setter
    def unit_problems(self, problems: list[tuple[int, int, int]]) -> None:
        self._unit_runs.unit_problems = problems

    @property
    def steps_seen(self) -> np.ndarray:
        """Steps each module's units were seen."""
        return self._unit_runs.steps_seen

    @property
    def _units(self) -> dict[torch.device, DeviceUnits]:
        """Per-device unit state (tests read its plans)."""
        return self._unit_runs.units

    # ------------------------------------------------------------ written by hooks
    def record(
        self, kind: str, slot: int, device: torch.device, count: int, *values: Tensor
    ) -> None:
        """Keep one call's 0-d results (the fields of ``kind``); no device op here."""
        self._calls.record(kind, slot, device, count, *values)

    def record_many(
        self,
        kind: str,
        slots: list[int],
        device: torch.device,
        count: int | list[int],
        *values: Tensor,
    ) -> None:
        """Keep the results of several calls reduced in one batch: each value a ``[calls]``
        vector, ``count`` entries reduced by each call (or a count per call); no device
        op here."""
        self._calls.record_many(kind, slots, device, count, *values)

    def record_series(
        self, kind: str, slot: int, device: torch.device, offset: int, values: Tensor
    ) -> None:
        """Keep one call's vector of a series kind (``time``: squared error norms per time
        step), added into the module's series of the step from position ``offset`` at the
        flush (:mod:`gradprobe.stats.series`); no device op here."""
        self._calls.record_series(kind, slot, device, offset, values)

    def record_units(self, slot: int, device: torch.device, activity: Tensor) -> None:
        """Keep one call's per-unit activity (≥ 0, 0 iff the unit was all-zero)."""
        self._calls.record_units(slot, device, activity)

    def record_units_many(self, slots: list[int], device: torch.device, activity: Tensor) -> None:
        """Keep the per-unit activity of several calls of one width: ``[calls, units]``."""
        self._calls.record_units_many(slots, device, activity)

    def record_histogram(self, slot: int, device: torch.device, counts: Tensor) -> None:
        self._calls.record_histogram(slot, device, counts)

    def record_heads(self, slot: int, device: torch.device, table: Tensor) -> None:
        """Keep a module's per-head table of the step (``[columns, heads]``, attention):
        recorded once, at the step's close; no device op here."""
        self._calls.record_heads(slot, device, table)

    def add_host(self, slot: int, name: str, value: float = 1.0) -> None:
        """Add to a count the host knows without asking the device."""
        self._calls.add_host(slot, name, value)

    def set_host(self, slot: int, name: str, value: float) -> None:
        self._calls.set_host(slot, name, value)

    def record_params(
        self, device: torch.device, index: list[int] | slice, name: str, values: Tensor
    ) -> None:
        """Per-parameter values (a partial of :data:`~.fields.PARAM_PARTIALS`) for ``index``
        (a list, or a slice of the parameters).

        On the CPU they go straight into the step's host arrays (float64): there is no
        device to wait for (the values are in host memory already), and a host value
        costs the step's close no stacking, and the flush no copy or fold.
        """
        self._calls.record_params(device, index, name, values)

    def set_param_host(self, index: list[int] | slice, name: str, value: float = 1.0) -> None:
        self._calls.set_param_host(index, name, value)

    def set_param_host_many(self, index: list[int] | slice, values: dict[str, Any]) -> None:
        """Several per-parameter partials the host holds (CPU values: floats, or NumPy
        arrays of ``index``'s length) in one call: the sentinel's rows of a step."""
        self._calls.set_param_host_many(index, values)

    def set_model_host(self, name: str, value: float = 1.0) -> None:
        """Set a model-scope partial the host knows (a flag of the whole step)."""
        self._calls.set_model_host(name, value)

    def logged_values(self, step: int, name: str) -> list[Tensor | float]:
        """The values logged so far for ``step`` under ``name`` (a copy; tensors as logged)."""
        return list(self._drain.logged.get((step, name), ()))

    def log(self, step: int, name: str, value: Tensor | float, *, complete: bool = False) -> None:
        """Keep one logged value (a detached 0-d tensor, or a float) for ``step``; no
        device op here: tensors are stacked and copied at the flush. ``complete``: no
        other value will come for it (the learning rate), so it never waits a flush."""
        self._drain.log(step, name, value, complete)

    # ------------------------------------------------------------ step boundary
    def end_step(self, step: int, modules: bool = True) -> None:
        """Close the current step: stack every list, once per field and device.
        ``modules=False``: a step whose modules were not recorded (the "auto" cadence's
        sentinel): no unit runs to move, and, under DDP, none of their collectives (every
        rank keeps the same cadence, so all skip them alike)."""
        calls = self._calls
        units = self._close_all_units(calls.called()) if modules else {}
        records = calls.stack(units)
        self._drain.close(
            (step, calls.host.copy(), dict(calls.param_host), dict(calls.model_host), records)
        )
        calls.reset()

    def _close_all_units(self, called: np.ndarray) -> dict[torch.device, tuple[Tensor, Tensor]]:
        """Dead units of the step and the inactivity runs, per device: ``{device: (dead,
        dead_window)}``, each ``[n_slots]`` (:meth:`~.units.UnitRuns.close_all`)."""
        calls = self._calls
        return self._unit_runs.close_all(calls.unit_calls, called, calls.host, calls.host_col)

    def discard_step(self, step: int | None = None) -> None:
        """Forget the current step's calls (a step that will not be recorded), and the
        values logged for it if its number is given: a gap leaves no rows at all."""
        self._calls.reset()
        if step is not None:
            self._drain.discard_logged(step)

    # ------------------------------------------------------------ passes discarded
    def mark(self) -> Mark:
        """Where the current step's records stand now, to drop those before it later
        (:meth:`drop_before`): list lengths and the host counts, no device op."""
        return self._calls.mark()

    def drop_before(self, mark: Mark, slots: np.ndarray) -> None:
        """Forget the calls of modules ``slots`` recorded before ``mark``: passes whose
        gradient was discarded before the step (docs/recording.md, "One rule"). A call
        batched with others keeps its value on the device and leaves the host's fold
        (its slot becomes -1, which the drain skips); counts the host knows are taken
        back; gap flags stay (a gap only leaves a statistic out)."""
        self._calls.drop_before(mark, slots)

    # ------------------------------------------------------------ a call that failed
    def call_mark(self, slot: int) -> tuple[Any, ...]:
        """Where the current step's records stand as a call of ``slot`` begins, to take
        that call back if the Probe's work on it fails (:meth:`drop_call`): the lengths of
        the few lists a call appends to, in their dicts' order (a tuple of ints, no dict
        copied), and the slot's host counts; no device op."""
        return self._calls.call_mark(slot)

    def drop_call(self, mark: tuple[Any, ...], slot: int) -> None:
        """Take back what ``slot`` recorded since ``mark`` (:meth:`call_mark`): one call's
        records, whose work failed part-way. Records of other slots made meanwhile (a
        module's submodules run inside its call) stay. A batched record leaves the host's
        fold as in :meth:`drop_before` (slot -1); additive host counts return to the mark;
        flags stay."""
        self._calls.drop_call(mark, slot)

    def grow(self, n_slots: int, n_params: int) -> None:
        """Make room for modules and parameters bound after the start (a model that
        changed, :mod:`gradprobe.follow`). Closed steps must have been drained: their
        arrays have the old widths."""
        if len(self._drain):
            raise RuntimeError("grow() with closed steps waiting: drain first")
        self._calls.grow(n_slots, n_params)
        self._unit_runs.grow(n_slots)

    # ------------------------------------------------------------ flush
    def drain(self, final: bool = False) -> Drained | None:
        """Copy the closed steps to the host and combine them into partials.

        Logged values of the last closed step wait for the next drain unless ``final``
        (``frame()``, ``close()``) or complete (the learning rate): a loss is often logged
        just after its optimizer step closed, and the micro-batches of one step must end
        up in one row.
        """
        return self._drain.drain(self.n_slots, self.n_params, final)

    def forget_logged_of_failed_drain(self) -> None:
        """A flush failed after its drain: its steps have no rows, so the values logged
        for them that still wait (the last closed step's) must not appear alone later."""
        self._drain.forget_logged_of_failed_drain()

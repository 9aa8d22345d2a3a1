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

Under data parallelism (:class:`Ranks`) the drained partials of every rank are
combined at the flush, as each partial declares (``sum`` or ``max``; ``same`` ones are
equal on every rank already): two collectives per flush, whatever the model, and a
third for logged values (``Probe.log``, the learning rate), whose names and steps need
not be the same on every rank. Only
per-unit activity is combined per step (one collective), because "dead on every
rank" must be known before the next step's inactivity runs are counted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .reduce import accumulation_dtype
from .stats import FOLDS, PARTIALS, model_partials
from .stats.partials import MODEL_HOST_PARTIALS, MODULE_HOST_PARTIALS, Combine

__all__ = ["FIELDS", "Drained", "Ranks", "StepBuffer", "accumulation_dtype"]

# What a hook records per call, by kind: the fields of its 0-d results, in order, as the
# catalogue's folds name them (stats.FOLDS: a new field is one line there).
FIELDS: dict[str, tuple[str, ...]] = {
    kind: tuple(field for _, field, _ in folds) for kind, folds in FOLDS.items()
}
MODULE_PARTIALS = [n for n, p in PARTIALS.items() if p.scope == "module"]
PARAM_PARTIALS = [n for n, p in PARTIALS.items() if p.scope == "parameter"]
_PARAM_PARTIAL_SET = frozenset(PARAM_PARTIALS)
# Counts the host adds up per call (calls, entries): what a dropped pass takes back.
_ADDITIVE_HOST = [n for n in MODULE_HOST_PARTIALS if PARTIALS[n].combine == "sum"]
# CPU tensors of these dtypes are read by NumPy in place (``Tensor.numpy()``).
_NUMPY_VIEWABLE = (torch.float32, torch.float64, torch.bool)


@dataclass
class _Calls:
    """Per-call results of one kind on one device during the current step."""

    slots: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # entries reduced, known on the host
    values: list[list[Tensor]] = field(default_factory=list)  # one list per field


@dataclass
class _Units:
    """Flat per-unit state of one device: units of every module, one segment each."""

    segments: dict[int, tuple[int, int]] = field(default_factory=dict)
    inactive_run: Tensor | None = None  # recorded steps in a row each unit was all-zero
    slot_of_unit: Tensor | None = None
    aranges: dict[int, Tensor] = field(default_factory=dict)
    # Where a step's calls, in their order, land in the flat vectors, by (slots, units in
    # all): the index for index_add_, or None where they land in order, once each.
    plans: dict[tuple[tuple[int, ...], int], Tensor | None] = field(default_factory=dict)
    widths: np.ndarray | None = None  # [n_slots]: units of each module's segment, 0 if none


@dataclass
class _UnitCalls:
    """Per-unit activity of a step's calls on one device, in call order: ``blocks`` hold
    one call each (a vector) or several of one width (a ``[calls, units]`` matrix from
    a batched reduction), flattened in the order of ``slots``."""

    slots: list[int] = field(default_factory=list)  # one per call
    widths: list[int] = field(default_factory=list)  # units of each call
    blocks: list[Tensor] = field(default_factory=list)

    def rows(self) -> list[Tensor]:
        """One activity vector per call (blocks split)."""
        return [row for b in self.blocks for row in b.reshape(-1, b.shape[-1]).unbind(0)]


@dataclass
class _StepRecord:
    """One closed step on one device: a flat vector and how to read it on the host."""

    flat: Tensor
    layout: list[tuple[str, np.ndarray, np.ndarray, int]]  # kind, slots, counts, length


@dataclass
class _Mark:
    """The current step's records at one moment (:meth:`StepBuffer.mark`)."""

    calls: dict[tuple[str, torch.device], int]
    units: dict[torch.device, int]
    hists: dict[torch.device, int]
    host: np.ndarray


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


class Ranks:
    """The data-parallel process group over which statistics are combined.

    Built only where ``torch.distributed`` is initialised. Collectives on host arrays
    run on the CPU, or through the current GPU where the backend is NCCL (which
    reduces CUDA tensors only); they happen at a flush, itself a host sync already.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        nccl = dist.get_backend(group) == "nccl"
        self.host_device = (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        )

    def all_reduce_(self, tensor: Tensor, combine: Combine) -> None:
        """Combine ``tensor`` in place across the ranks (every rank must call it)."""
        import torch.distributed as dist

        op = dist.ReduceOp.SUM if combine == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(tensor, op=op, group=self.group)

    def combine(self, drained: Drained) -> None:
        """Combine every rank's partials as :data:`~gradprobe.stats.PARTIALS` declares."""
        for combine in ("sum", "max"):
            entries = [
                (table, name)
                for table in (drained.modules, drained.params, drained.model)
                for name in table
                if PARTIALS[name].combine == combine
            ]
            arrays = [table[name] for table, name in entries]
            if combine == "sum" and drained.histograms is not None:
                arrays.append(drained.histograms)  # histogram counts add up like counts
            if not arrays:
                continue
            flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
            flat = flat.to(self.host_device)
            self.all_reduce_(flat, combine)  # deliberate collective, at the flush
            reduced = flat.cpu().numpy()  # deliberate host copy, at the flush (NCCL: from the GPU)
            offset = 0
            for a in arrays:
                a.reshape(-1)[:] = reduced[offset : offset + a.size]
                offset += a.size
        for table in (drained.modules, drained.params, drained.model):
            for name, values in table.items():
                degree = PARTIALS[name].loss_degree
                if degree:
                    # DDP applies the gradient of the mean of the ranks' losses.
                    values *= float(self.world) ** -degree
        drained.logged = self.combine_logged(drained.logged)

    def combine_logged(
        self, logged: dict[tuple[int, str], tuple[float, float]]
    ) -> dict[tuple[int, str], tuple[float, float]]:
        """Add up every rank's ``log_sum`` and ``log_count`` per (step, name), as declared
        (``sum``): ranks may have logged different names or steps (only rank 0 logs, or a
        value arrived after a flush on one rank), so they are gathered as objects."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        # Deliberate collective of host numbers, at the flush (every rank calls it).
        dist.all_gather_object(gathered, logged, group=self.group)
        combined: dict[tuple[int, str], tuple[float, float]] = {}
        for part in gathered:
            for key, (total, count) in (part or {}).items():
                before = combined.get(key, (0.0, 0.0))
                combined[key] = (before[0] + total, before[1] + count)
        return combined


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
        self.ranks = ranks
        self.n_slots = n_slots
        self.n_params = n_params
        self.dead_window = dead_window
        self.histogram_bins = histogram_bins
        self.steps_seen = np.zeros(n_slots, dtype=np.int64)  # steps each module's units were seen
        # Under data parallelism, whether per-unit activity is tracked (every rank must then
        # take part in its collectives each step, whatever it ran); the Probe sets it.
        self.track_units = False
        self._rank_unit_device: torch.device | None = None
        # Modules whose number of units changed (not features or channels): no longer tracked.
        self.units_off: set[int] = set()
        # (slot, units before, units after) for each module just dropped; the Probe warns.
        self.unit_problems: list[tuple[int, int, int]] = []
        self._calls: dict[tuple[str, torch.device], _Calls] = {}
        self._unit_calls: dict[torch.device, _UnitCalls] = {}
        self._hist_calls: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        self._param_values: list[tuple[torch.device, list[int], str, Tensor]] = []
        self._units: dict[torch.device, _Units] = {}
        self._host = np.zeros((n_slots, len(MODULE_HOST_PARTIALS)))
        self._host_col = {name: i for i, name in enumerate(MODULE_HOST_PARTIALS)}
        self._param_host: dict[str, np.ndarray] = {}
        self._model_host: dict[str, float] = {}
        # Logged values by (step, name): 0-d tensors (on their device) and host floats.
        self._logged: dict[tuple[int, str], list[Tensor | float]] = {}
        self._last_closed = -1
        self._draining_through = -1  # the last step of the drain in progress
        self._complete: set[tuple[int, str]] = set()
        # Closed steps: step number, host partials (modules, parameters, model), records per device.
        self._closed: list[
            tuple[int, np.ndarray, dict[str, np.ndarray], dict[str, float], list[_StepRecord]]
        ] = []

    def __len__(self) -> int:
        """Closed steps waiting for a flush."""
        return len(self._closed)

    # ------------------------------------------------------------ written by hooks
    def record(
        self, kind: str, slot: int, device: torch.device, count: int, *values: Tensor
    ) -> None:
        """Keep one call's 0-d results (the fields of ``kind``); no device op here."""
        calls = self._calls.get((kind, device))
        if calls is None:
            calls = _Calls(values=[[] for _ in FIELDS[kind]])
            self._calls[(kind, device)] = calls
        calls.slots.append(slot)
        calls.counts.append(count)
        for column, value in zip(calls.values, values):
            column.append(value)

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
        calls = self._calls.get((kind, device))
        if calls is None:
            calls = _Calls(values=[[] for _ in FIELDS[kind]])
            self._calls[(kind, device)] = calls
        calls.slots.extend(slots)
        calls.counts.extend(count if isinstance(count, list) else [count] * len(slots))
        for column, value in zip(calls.values, values):
            column.append(value)

    def record_units(self, slot: int, device: torch.device, activity: Tensor) -> None:
        """Keep one call's per-unit activity (≥ 0, 0 iff the unit was all-zero)."""
        calls = self._unit_calls.get(device)
        if calls is None:
            calls = self._unit_calls[device] = _UnitCalls()
        calls.slots.append(slot)
        calls.widths.append(activity.numel())
        calls.blocks.append(activity)

    def record_units_many(self, slots: list[int], device: torch.device, activity: Tensor) -> None:
        """Keep the per-unit activity of several calls of one width: ``[calls, units]``."""
        calls = self._unit_calls.get(device)
        if calls is None:
            calls = self._unit_calls[device] = _UnitCalls()
        calls.slots.extend(slots)
        calls.widths.extend([activity.shape[1]] * len(slots))
        calls.blocks.append(activity)

    def record_histogram(self, slot: int, device: torch.device, counts: Tensor) -> None:
        entry = self._hist_calls.setdefault(device, ([], []))
        entry[0].append(slot)
        entry[1].append(counts)

    def add_host(self, slot: int, name: str, value: float = 1.0) -> None:
        """Add to a count the host knows without asking the device."""
        self._host[slot, self._host_col[name]] += value

    def set_host(self, slot: int, name: str, value: float) -> None:
        self._host[slot, self._host_col[name]] = value

    def record_params(
        self, device: torch.device, index: list[int], name: str, values: Tensor
    ) -> None:
        """Per-parameter values (a partial of :data:`PARAM_PARTIALS`) for ``index``.

        On the CPU they go straight into the step's host arrays (float64): there is no
        device to wait for (the values are in host memory already), and a host value
        costs the step's close no stacking, and the flush no copy or fold.
        """
        if device.type == "cpu":
            if name not in _PARAM_PARTIAL_SET:  # as the device path's flush would say
                raise KeyError(f"{name!r} is not a per-parameter partial")
            host = values.detach().reshape(-1)
            if host.dtype not in _NUMPY_VIEWABLE:
                host = host.to(torch.float64)
            self.set_param_host(index, name, host.numpy())
            return
        self._param_values.append((device, index, name, values))

    def set_param_host(self, index: list[int], name: str, value: float = 1.0) -> None:
        arr = self._param_host.setdefault(name, np.zeros(self.n_params))
        arr[index] = value

    def set_model_host(self, name: str, value: float = 1.0) -> None:
        """Set a model-scope partial the host knows (a flag of the whole step)."""
        self._model_host[name] = value

    def log(self, step: int, name: str, value: Tensor | float, *, complete: bool = False) -> None:
        """Keep one logged value (a detached 0-d tensor, or a float) for ``step``; no
        device op here: tensors are stacked and copied at the flush. ``complete``: no
        other value will come for it (the learning rate), so it never waits a flush."""
        self._logged.setdefault((step, name), []).append(value)
        if complete:
            self._complete.add((step, name))

    # ------------------------------------------------------------ step boundary
    def end_step(self, step: int, modules: bool = True) -> None:
        """Close the current step: stack every list, once per field and device.
        ``modules=False``: a step whose modules were not recorded (the "auto" cadence's
        sentinel): no unit runs to move, and, under DDP, none of their collectives (every
        rank keeps the same cadence, so all skip them alike)."""
        called = self._host[:, self._host_col["calls"]] > 0
        by_device: dict[torch.device, tuple[list[Tensor], list]] = defaultdict(lambda: ([], []))
        for (kind, device), calls in self._calls.items():
            tensors, layout = by_device[device]
            # One op for every field of every call of this kind: [fields × calls]. Batched
            # calls (record_many) left vectors among the 0-d values: those are concatenated.
            values = [v for column in calls.values for v in column]
            dtype = accumulation_dtype(device)
            # stack and cat promote float32 beside float64 exactly; integer counts (exact
            # beyond 2^24 only in float64) and flags are converted first.
            values = [v if v.is_floating_point() else v.to(dtype) for v in values]
            if all(v.dim() == 0 for v in values):
                joined = torch.stack(values)
            else:
                joined = torch.cat([v.reshape(-1) for v in values])
            tensors.append(joined.to(dtype))
            n = len(calls.slots)
            layout.append(
                (
                    kind,
                    np.asarray(calls.slots),
                    np.asarray(calls.counts, dtype=np.float64),
                    n * len(FIELDS[kind]),
                )
            )
        units = self._close_all_units(called) if modules else {}
        for device, (dead, dead_window) in units.items():
            tensors, layout = by_device[device]
            tensors += [dead, dead_window]
            every_slot = np.arange(self.n_slots)
            layout.append(("dead_units", every_slot, np.zeros(0), self.n_slots))
            layout.append(("dead_window_units", every_slot, np.zeros(0), self.n_slots))
        for device, (slots_list, hists) in self._hist_calls.items():
            tensors, layout = by_device[device]
            tensors.append(torch.stack(hists).to(accumulation_dtype(device)).reshape(-1))
            layout.append(
                ("hist", np.asarray(slots_list), np.zeros(0), len(slots_list) * self.histogram_bins)
            )
        for device, index, name, values in self._param_values:
            tensors, layout = by_device[device]
            tensors.append(values.to(accumulation_dtype(device)).reshape(-1))
            layout.append((f"param:{name}", np.asarray(index), np.zeros(0), len(index)))
        records = [
            _StepRecord(torch.cat([t.reshape(-1) for t in tensors]), layout)
            for tensors, layout in by_device.values()
            if tensors
        ]
        self._closed.append(
            (step, self._host.copy(), dict(self._param_host), dict(self._model_host), records)
        )
        self._last_closed = step
        self._reset_step()

    def _reset_step(self) -> None:
        self._calls = {}
        self._unit_calls = {}
        self._hist_calls = {}
        self._param_values = []
        self._host[:] = 0
        self._param_host = {}
        self._model_host = {}

    def discard_step(self, step: int | None = None) -> None:
        """Forget the current step's calls (a step that will not be recorded), and the
        values logged for it if its number is given: a gap leaves no rows at all."""
        self._reset_step()
        if step is not None:
            self._logged = {k: v for k, v in self._logged.items() if k[0] != step}
            self._complete = {k for k in self._complete if k in self._logged}

    # ------------------------------------------------------------ passes discarded
    def mark(self) -> _Mark:
        """Where the current step's records stand now, to drop those before it later
        (:meth:`drop_before`): list lengths and the host counts, no device op."""
        return _Mark(
            {key: len(calls.slots) for key, calls in self._calls.items()},
            {device: len(calls.slots) for device, calls in self._unit_calls.items()},
            {device: len(entry[0]) for device, entry in self._hist_calls.items()},
            self._host.copy(),
        )

    def drop_before(self, mark: _Mark, slots: np.ndarray) -> None:
        """Forget the calls of modules ``slots`` recorded before ``mark``: passes whose
        gradient was discarded before the step (docs/recording.md, "One rule"). A call
        batched with others keeps its value on the device and leaves the host's fold
        (its slot becomes -1, which :func:`_combine` skips); counts the host knows are
        taken back; gap flags stay (a gap only leaves a statistic out)."""
        drop = np.zeros(self.n_slots, dtype=bool)
        drop[slots] = True
        for key, n in mark.calls.items():
            calls = self._calls.get(key)
            if calls is not None:
                calls.slots[:n] = [-1 if s >= 0 and drop[s] else s for s in calls.slots[:n]]
        for device, n in mark.units.items():
            calls = self._unit_calls.get(device)
            if calls is None or not any(drop[s] for s in calls.slots[:n]):
                continue
            kept = _UnitCalls()
            for i, (s, row) in enumerate(zip(calls.slots, calls.rows())):
                if i >= n or not drop[s]:
                    kept.slots.append(s)
                    kept.widths.append(row.numel())
                    kept.blocks.append(row)
            self._unit_calls[device] = kept
        for device, n in mark.hists.items():
            entry = self._hist_calls.get(device)
            if entry is not None:
                keep = [i for i, s in enumerate(entry[0]) if i >= n or not drop[s]]
                self._hist_calls[device] = (
                    [entry[0][i] for i in keep],
                    [entry[1][i] for i in keep],
                )
        rows = np.flatnonzero(drop[: mark.host.shape[0]])
        for name in _ADDITIVE_HOST:
            col = self._host_col[name]
            self._host[rows, col] -= mark.host[rows, col]

    # ------------------------------------------------------------ a call that failed
    def call_mark(self, slot: int) -> tuple[Any, ...]:
        """Where the current step's records stand as a call of ``slot`` begins, to take
        that call back if the Probe's work on it fails (:meth:`drop_call`): the lengths of
        the few lists a call appends to, in their dicts' order (a tuple of ints, no dict
        copied), and the slot's host counts; no device op."""
        return (
            tuple([len(c.slots) for c in self._calls.values()]),
            tuple([len(c.slots) for c in self._unit_calls.values()]),
            tuple([len(e[0]) for e in self._hist_calls.values()]),
            self._host[slot].copy(),
        )

    def drop_call(self, mark: tuple[Any, ...], slot: int) -> None:
        """Take back what ``slot`` recorded since ``mark`` (:meth:`call_mark`): one call's
        records, whose work failed part-way. Records of other slots made meanwhile (a
        module's submodules run inside its call) stay. A batched record leaves the host's
        fold as in :meth:`drop_before` (slot -1); additive host counts return to the mark;
        flags stay."""
        calls_n, units_n, hists_n, host = mark
        for i, calls in enumerate(self._calls.values()):
            slots = calls.slots
            for j in range(calls_n[i] if i < len(calls_n) else 0, len(slots)):
                if slots[j] == slot:
                    slots[j] = -1
        for i, (device, calls) in enumerate(list(self._unit_calls.items())):
            start = units_n[i] if i < len(units_n) else 0
            if slot not in calls.slots[start:]:
                continue
            kept = _UnitCalls()
            for j, (s, row) in enumerate(zip(calls.slots, calls.rows())):
                if j < start or s != slot:
                    kept.slots.append(s)
                    kept.widths.append(row.numel())
                    kept.blocks.append(row)
            self._unit_calls[device] = kept
        for i, (device, entry) in enumerate(list(self._hist_calls.items())):
            start = hists_n[i] if i < len(hists_n) else 0
            keep = [j for j, s in enumerate(entry[0]) if j < start or s != slot]
            if len(keep) < len(entry[0]):
                self._hist_calls[device] = (
                    [entry[0][j] for j in keep],
                    [entry[1][j] for j in keep],
                )
        cols = [self._host_col[name] for name in _ADDITIVE_HOST]
        self._host[slot, cols] = host[cols]

    def grow(self, n_slots: int, n_params: int) -> None:
        """Make room for modules and parameters bound after the start (a model that
        changed, :mod:`gradprobe.follow`). Closed steps must have been drained: their
        arrays have the old widths."""
        if self._closed:
            raise RuntimeError("grow() with closed steps waiting: drain first")
        extra = n_slots - self.n_slots
        if extra > 0:
            self._host = np.vstack([self._host, np.zeros((extra, self._host.shape[1]))])
            self.steps_seen = np.concatenate([self.steps_seen, np.zeros(extra, dtype=np.int64)])
            for units in self._units.values():
                if units.widths is not None:
                    units.widths = np.concatenate([units.widths, np.zeros(extra, dtype=np.int64)])
            self.n_slots = n_slots
        if n_params > self.n_params:
            pad = n_params - self.n_params
            self._param_host = {
                k: np.concatenate([v, np.zeros(pad)]) for k, v in self._param_host.items()
            }
            self.n_params = n_params

    def _close_all_units(self, called: np.ndarray) -> dict[torch.device, tuple[Tensor, Tensor]]:
        """Dead units of the step and the inactivity runs, per device: ``{device: (dead,
        dead_window)}``, each ``[n_slots]``.

        Units are keyed by module and counted once: a module's number of units must stay
        the same from call to call and step to step (features and channels do, whatever the
        batch size, sequence length or image size). A module where it does not is dropped
        from unit tracking for good, and named in :attr:`unit_problems` (the Probe warns).

        Under data parallelism every rank issues the same collectives with the same shapes,
        whatever modules it ran: first which modules ran anywhere and their unit counts
        (host integers), then the activity of every unit known to any rank.
        """
        calls = self._unit_calls
        if self.ranks is not None:
            if not self.track_units:
                return {}
            if self._rank_unit_device is None:
                self._rank_unit_device = next(iter(calls), self.ranks.host_device)
            device = self._rank_unit_device
            merged = _UnitCalls()
            for part in calls.values():
                merged.slots += part.slots
                merged.widths += part.widths
                merged.blocks += [b.to(device) for b in part.blocks]
            calls = {device: merged}
        if not calls:
            return {}
        closed = {}
        for device, unit_calls in calls.items():
            lo, hi = _unit_counts(self.n_slots, unit_calls.slots, unit_calls.widths)
            anywhere = called.copy()
            if self.ranks is not None:
                # Deliberate collective (host integers), once per step: the segment table,
                # hence the shape of the activity collective, must agree on every rank.
                big = np.iinfo(np.int64).max
                agreed = np.concatenate([called.astype(np.int64), hi, np.where(hi > 0, -lo, -big)])
                flat = torch.from_numpy(agreed).to(self.ranks.host_device)
                self.ranks.all_reduce_(flat, "max")
                agreed = flat.cpu().numpy()  # deliberate host copy (NCCL: from the GPU)
                n = self.n_slots
                anywhere, hi, lo = agreed[:n] > 0, agreed[n : 2 * n], -agreed[2 * n :]
            result = self._close_units(device, unit_calls, anywhere, lo, hi)
            if result is not None:
                closed[device] = result
        return closed

    def _close_units(
        self,
        device: torch.device,
        calls: _UnitCalls,
        called: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> tuple[Tensor, Tensor] | None:
        """Dead units of the step, and runs of inactivity, for every module at once."""
        units = self._units.setdefault(device, _Units())
        if units.widths is None:
            units.widths = np.zeros(self.n_slots, dtype=np.int64)
        active = np.flatnonzero(hi > 0)  # slot order: the same on every rank
        # The common step: every module that ran has its segment already, as wide as all
        # its calls were, and none was dropped. Host arrays, no loop over modules.
        if (
            (lo[active] == hi[active]).all()
            and (units.widths[active] == hi[active]).all()
            and (not self.units_off or not self.units_off.intersection(active.tolist()))
        ):
            live = active.tolist()
        else:
            live = self._live_units(units, device, active, lo, hi)
        if units.inactive_run is None or units.slot_of_unit is None:
            return None
        total = units.inactive_run.numel()
        dtype = accumulation_dtype(device)
        activity = self._step_activity(units, device, calls, set(live), total)
        if self.ranks is not None:
            # Deliberate collective, once per step: a unit is dead only if it is 0 on every
            # rank (an OR of activity), and the inactivity runs below must agree on all ranks.
            self.ranks.all_reduce_(activity, "max")
        live_called = [s for s in live if called[s]]
        every = set(units.segments) - self.units_off
        if every and every <= set(live_called):
            seen = None  # every tracked module ran: the common case, no mask to build
        else:
            seen = torch.zeros(total, dtype=torch.bool, device=device)
            for s in live_called:
                start, n = units.segments[s]
                seen[start : start + n] = True
        inactive = activity == 0
        if seen is None:
            units.inactive_run = (units.inactive_run + 1) * inactive
        else:
            # A module not run in this step keeps its runs as they were.
            inactive = inactive & seen
            units.inactive_run = torch.where(
                seen, (units.inactive_run + 1) * inactive, units.inactive_run
            )
        dead = torch.zeros(self.n_slots, dtype=dtype, device=device)
        dead.index_add_(0, units.slot_of_unit, inactive.to(dtype))
        long_dead = (units.inactive_run >= self.dead_window).to(dtype)
        dead_window = torch.zeros(self.n_slots, dtype=dtype, device=device)
        dead_window.index_add_(0, units.slot_of_unit, long_dead)
        seen_now = np.asarray(live_called, dtype=np.int64)
        self.steps_seen[seen_now] += 1
        self._host[seen_now, self._host_col["n_units"]] = units.widths[seen_now]
        ready = self.steps_seen[seen_now] >= self.dead_window
        self._host[seen_now, self._host_col["window_ready"]] = ready
        return dead, dead_window

    def _live_units(
        self,
        units: _Units,
        device: torch.device,
        active: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> list[int]:
        """The modules whose units are tracked this step, among those that ran: a module
        seen for the first time gets its segment; one whose number of units changed is
        dropped for good (named in :attr:`unit_problems`)."""
        live = []
        for s in active.tolist():
            if s in self.units_off:
                continue
            known = units.segments.get(s)
            n = int(hi[s])
            if lo[s] != n or (known is not None and known[1] != n):
                before, after = (int(lo[s]), n) if known is None else (known[1], int(lo[s]))
                if known is not None and after == known[1]:
                    after = n
                self.units_off.add(s)
                self.unit_problems.append((s, before, after))
                continue
            if known is None:
                self._add_segment(units, device, s, n)
            live.append(s)
        return live

    @staticmethod
    def _step_activity(
        units: _Units, device: torch.device, calls: _UnitCalls, live: set[int], total: int
    ) -> Tensor:
        """Each tracked unit's activity in the step, ``[total]``: its calls' added up (≥ 0
        each: > 0 iff some call was active). Where every call is tracked, the index is
        planned once per pattern of calls, and skipped where the calls land in order."""
        dtype = accumulation_dtype(device)
        if calls.blocks and all(s in live for s in calls.slots):
            key = (tuple(calls.slots), total)
            if key not in units.plans:
                if len(units.plans) >= 64:  # patterns that do not repeat: keep a few
                    units.plans.clear()
                end = 0  # do the calls' segments follow each other from 0 to the end?
                for s in calls.slots:
                    start, n = units.segments[s]
                    end = end + n if start == end else -1
                in_order = end == total
                index = None if in_order else torch.cat([units.aranges[s] for s in calls.slots])
                units.plans[key] = index
            index = units.plans[key]
            blocks = [b.reshape(-1) for b in calls.blocks]
            values = (blocks[0] if len(blocks) == 1 else torch.cat(blocks)).to(dtype)
            if index is None:
                return values
            return torch.zeros(total, dtype=dtype, device=device).index_add_(0, index, values)
        activity = torch.zeros(total, dtype=dtype, device=device)
        kept = [(s, a) for s, a in zip(calls.slots, calls.rows()) if s in live]
        if kept:
            index = torch.cat([units.aranges[s] for s, _ in kept])
            values = torch.cat([a.reshape(-1) for _, a in kept]).to(dtype)
            activity.index_add_(0, index, values)
        return activity

    @staticmethod
    def _add_segment(units: _Units, device: torch.device, slot: int, n: int) -> None:
        """A module's units are seen for the first time: extend the flat vectors."""
        start = 0 if units.inactive_run is None else units.inactive_run.numel()
        run = torch.zeros(n, dtype=torch.int32, device=device)
        owner = torch.full((n,), slot, dtype=torch.long, device=device)
        units.inactive_run = (
            run if units.inactive_run is None else torch.cat([units.inactive_run, run])
        )
        units.slot_of_unit = (
            owner if units.slot_of_unit is None else torch.cat([units.slot_of_unit, owner])
        )
        units.segments[slot] = (start, n)
        assert units.widths is not None  # made by _close_units
        units.widths[slot] = n
        units.aranges[slot] = torch.arange(start, start + n, device=device)

    # ------------------------------------------------------------ flush
    def drain(self, final: bool = False) -> Drained | None:
        """Copy the closed steps to the host and combine them into partials.

        Logged values of the last closed step wait for the next drain unless ``final``
        (``frame()``, ``close()``) or complete (the learning rate): a loss is often logged
        just after its optimizer step closed, and the micro-batches of one step must end
        up in one row.
        """
        closed, self._closed = self._closed, []
        if closed:
            self._draining_through = closed[-1][0]
        logged = self._take_logged(final)
        # Under DDP every rank must reach the same collectives: ranks agree on ``closed``
        # and on ``final``, not on what each logged.
        if not closed and not (final and (logged or self.ranks is not None)):
            self._logged.update(logged)  # nothing to flush yet: keep it for the next drain
            return None
        rows = len(closed)
        steps = np.array([c[0] for c in closed], dtype=np.int64)
        modules = {name: np.zeros((rows, self.n_slots)) for name in MODULE_PARTIALS}
        params = {name: np.zeros((rows, self.n_params)) for name in PARAM_PARTIALS}
        hist = np.zeros((rows, self.n_slots, self.histogram_bins)) if self.histogram_bins else None
        model = {name: np.zeros((rows, 1)) for name in MODEL_HOST_PARTIALS}
        by_device: dict[torch.device, list[tuple[int, _StepRecord]]] = defaultdict(list)
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
                    _combine(kind, row, slots, counts, values, modules, params, hist)
        model.update(model_partials(params))
        drained = Drained(steps, modules, params, hist, model, _logged_partials(logged))
        if self.ranks is not None:
            self.ranks.combine(drained)
        return drained

    def forget_logged_of_failed_drain(self) -> None:
        """A flush failed after its drain: its steps have no rows, so the values logged
        for them that still wait (the last closed step's) must not appear alone later."""
        through = self._draining_through
        self._logged = {k: v for k, v in self._logged.items() if k[0] > through}
        self._complete = {k for k in self._complete if k in self._logged}

    def _take_logged(self, final: bool) -> dict[tuple[int, str], list[Tensor | float]]:
        """The logged values to drain now: all if ``final``, else those of steps before
        the last closed one."""
        take = {
            k: v
            for k, v in self._logged.items()
            if final or k[0] < self._last_closed or k in self._complete
        }
        for key in take:
            del self._logged[key]
            self._complete.discard(key)
        return take


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


def _unit_counts(
    n_slots: int, slots: list[int], widths: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Fewest and most units of each module's calls in the step (host shapes; 0 if none)."""
    lo = np.zeros(n_slots, dtype=np.int64)
    hi = np.zeros(n_slots, dtype=np.int64)
    for s, n in zip(slots, widths):
        lo[s] = n if hi[s] == 0 else min(lo[s], n)
        hi[s] = max(hi[s], n)
    return lo, hi


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
            np.maximum.at(modules[partial][row], slots, v)
        else:
            np.add.at(modules[partial][row], slots, v)

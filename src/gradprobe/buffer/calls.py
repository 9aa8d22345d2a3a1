"""The current step's per-call records: what hooks leave (0-d results, per-unit activity,
histograms, per-parameter values, counts the host knows), their stacking at the step's
close, and taking back the calls of a discarded pass or of a call whose work failed.

A hook launches only the reductions it needs and appends the 0-d results to a list,
without touching any buffer; at the step's close each list becomes one stacked tensor
(a fixed number of ops per step, however many modules).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..reduce import accumulation_dtype
from ..stats.partials import MODULE_HOST_PARTIALS
from .fields import ADDITIVE_HOST, FIELDS, PARAM_PARTIAL_SET, StepRecord

__all__ = ["Mark", "StepCalls", "UnitCalls"]

# CPU tensors of these dtypes are read by NumPy in place (``Tensor.numpy()``).
_NUMPY_VIEWABLE = (torch.float32, torch.float64, torch.bool)


@dataclass
class _Calls:
    """Per-call results of one kind on one device during the current step."""

    slots: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # entries reduced, known on the host
    values: list[list[Tensor]] = field(default_factory=list)  # one list per field
    # Series kinds (stats.FOLDS "series": one vector per call): where each call's vector
    # starts in its module's series of the step (its time index); counts hold the lengths.
    offsets: list[int] = field(default_factory=list)


@dataclass
class UnitCalls:
    """Per-unit activity of a step's calls on one device, in call order: ``blocks`` hold
    one call each (a vector) or several of one width (a ``[calls, units]`` matrix from
    a batched reduction), flattened in the order of ``slots``."""

    slots: list[int] = field(default_factory=list)  # one per call
    widths: list[int] = field(default_factory=list)  # units of each call
    blocks: list[Tensor] = field(default_factory=list)

    def rows(self) -> list[Tensor]:
        """One activity vector per call (blocks split)."""
        return [row for b in self.blocks for row in b.reshape(-1, b.shape[-1]).unbind(0)]

    def without(self, dropped: Callable[[int, int], bool]) -> UnitCalls:
        """These calls less those where ``dropped(index, slot)``, one row each."""
        kept = UnitCalls()
        for i, (s, row) in enumerate(zip(self.slots, self.rows())):
            if not dropped(i, s):
                kept.slots.append(s)
                kept.widths.append(row.numel())
                kept.blocks.append(row)
        return kept


@dataclass
class Mark:
    """The current step's records at one moment (:meth:`StepCalls.mark`)."""

    calls: dict[tuple[str, torch.device], int]
    units: dict[torch.device, int]
    hists: dict[torch.device, int]
    host: np.ndarray


class StepCalls:
    """Per-call records of the current step, and the counts the host knows of it."""

    def __init__(self, n_slots: int, n_params: int, histogram_bins: int) -> None:
        self.n_slots = n_slots
        self.n_params = n_params
        self.histogram_bins = histogram_bins
        self.calls: dict[tuple[str, torch.device], _Calls] = {}
        self.unit_calls: dict[torch.device, UnitCalls] = {}
        self.hist_calls: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        self.param_values: list[tuple[torch.device, list[int], str, Tensor]] = []
        # Per-head tables (attention), one per module and step: (slot, heads, [columns, H]).
        self.head_calls: dict[torch.device, list[tuple[int, int, Tensor]]] = {}
        self.host = np.zeros((n_slots, len(MODULE_HOST_PARTIALS)))
        self.host_col = {name: i for i, name in enumerate(MODULE_HOST_PARTIALS)}
        self.param_host: dict[str, np.ndarray] = {}
        self.model_host: dict[str, float] = {}

    # ------------------------------------------------------------ written by hooks
    def record(
        self, kind: str, slot: int, device: torch.device, count: int, *values: Tensor
    ) -> None:
        calls = self.calls.get((kind, device))
        if calls is None:
            calls = _Calls(values=[[] for _ in FIELDS[kind]])
            self.calls[(kind, device)] = calls
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
        calls = self.calls.get((kind, device))
        if calls is None:
            calls = _Calls(values=[[] for _ in FIELDS[kind]])
            self.calls[(kind, device)] = calls
        calls.slots.extend(slots)
        calls.counts.extend(count if isinstance(count, list) else [count] * len(slots))
        for column, value in zip(calls.values, values):
            column.append(value)

    def record_series(
        self, kind: str, slot: int, device: torch.device, offset: int, values: Tensor
    ) -> None:
        """One call's vector of a series kind (``time``), to be added into its module's
        series of the step from position ``offset``."""
        calls = self.calls.get((kind, device))
        if calls is None:
            calls = _Calls(values=[[]])
            self.calls[(kind, device)] = calls
        values = values.reshape(-1)
        calls.slots.append(slot)
        calls.counts.append(values.numel())
        calls.offsets.append(offset)
        calls.values[0].append(values)

    def record_units(self, slot: int, device: torch.device, activity: Tensor) -> None:
        calls = self.unit_calls.get(device)
        if calls is None:
            calls = self.unit_calls[device] = UnitCalls()
        calls.slots.append(slot)
        calls.widths.append(activity.numel())
        calls.blocks.append(activity)

    def record_units_many(self, slots: list[int], device: torch.device, activity: Tensor) -> None:
        calls = self.unit_calls.get(device)
        if calls is None:
            calls = self.unit_calls[device] = UnitCalls()
        calls.slots.extend(slots)
        calls.widths.extend([activity.shape[1]] * len(slots))
        calls.blocks.append(activity)

    def record_histogram(self, slot: int, device: torch.device, counts: Tensor) -> None:
        entry = self.hist_calls.setdefault(device, ([], []))
        entry[0].append(slot)
        entry[1].append(counts)

    def record_heads(self, slot: int, device: torch.device, table: Tensor) -> None:
        self.head_calls.setdefault(device, []).append((slot, table.shape[-1], table))

    def add_host(self, slot: int, name: str, value: float = 1.0) -> None:
        self.host[slot, self.host_col[name]] += value

    def set_host(self, slot: int, name: str, value: float) -> None:
        self.host[slot, self.host_col[name]] = value

    def record_params(
        self, device: torch.device, index: list[int] | slice, name: str, values: Tensor
    ) -> None:
        # ``index``: the parameters' places, or a slice of them (every parameter: a slice
        # assigns without numpy gathering a list of indices). On the CPU the values go
        # straight into the step's host arrays (float64): there is no device to wait for
        # (they are in host memory already), and a host value costs the step's close no
        # stacking, and the flush no copy or fold.
        if name not in PARAM_PARTIAL_SET:  # as the device path's flush would say
            raise KeyError(f"{name!r} is not a per-parameter partial")
        if device.type == "cpu":
            host = values.detach().reshape(-1)
            if host.dtype not in _NUMPY_VIEWABLE:
                host = host.to(torch.float64)
            self.set_param_host(index, name, host.numpy())
            return
        if isinstance(index, slice):  # (the drain's layout takes the indices themselves)
            index = list(range(*index.indices(self.n_params)))
        self.param_values.append((device, index, name, values))

    def set_param_host(self, index: list[int] | slice, name: str, value: float = 1.0) -> None:
        arr = self.param_host.setdefault(name, np.zeros(self.n_params))
        arr[index] = value

    def set_param_host_many(self, index: list[int] | slice, values: dict[str, Any]) -> None:
        host, n = self.param_host, self.n_params
        for name, value in values.items():
            arr = host.get(name)
            if arr is None:
                arr = host[name] = np.zeros(n)
            arr[index] = value

    def set_model_host(self, name: str, value: float = 1.0) -> None:
        self.model_host[name] = value

    # ------------------------------------------------------------ step boundary
    def called(self) -> np.ndarray:
        """Which modules were called in the step (the host's count of calls)."""
        return self.host[:, self.host_col["calls"]] > 0

    def stack(self, units: dict[torch.device, tuple[Tensor, Tensor]]) -> list[StepRecord]:
        """The step's records, one flat vector per device: every list stacked once per
        field and device, with the step's dead units (``units``) after the calls."""
        by_device: dict[torch.device, tuple[list[Tensor], list]] = defaultdict(lambda: ([], []))
        for (kind, device), calls in self.calls.items():
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
            if calls.offsets:  # a series kind: [calls, 2] (length, offset), their vectors
                counts = np.asarray([calls.counts, calls.offsets], dtype=np.float64).T
                layout.append((kind, np.asarray(calls.slots), counts, sum(calls.counts)))
                continue
            layout.append(
                (
                    kind,
                    np.asarray(calls.slots),
                    np.asarray(calls.counts, dtype=np.float64),
                    n * len(FIELDS[kind]),
                )
            )
        for device, (dead, dead_window) in units.items():
            tensors, layout = by_device[device]
            tensors += [dead, dead_window]
            every_slot = np.arange(self.n_slots)
            layout.append(("dead_units", every_slot, np.zeros(0), self.n_slots))
            layout.append(("dead_window_units", every_slot, np.zeros(0), self.n_slots))
        for device, (slots_list, hists) in self.hist_calls.items():
            tensors, layout = by_device[device]
            tensors.append(torch.stack(hists).to(accumulation_dtype(device)).reshape(-1))
            layout.append(
                ("hist", np.asarray(slots_list), np.zeros(0), len(slots_list) * self.histogram_bins)
            )
        for device, entries in self.head_calls.items():
            tensors, layout = by_device[device]
            tensors += [t.to(accumulation_dtype(device)).reshape(-1) for _, _, t in entries]
            slots = np.asarray([e[0] for e in entries])
            widths = np.asarray([e[1] for e in entries], dtype=np.float64)
            layout.append(("heads", slots, widths, sum(e[2].numel() for e in entries)))
        for device, index, name, values in self.param_values:
            tensors, layout = by_device[device]
            tensors.append(values.to(accumulation_dtype(device)).reshape(-1))
            layout.append((f"param:{name}", np.asarray(index), np.zeros(0), len(index)))
        return [
            StepRecord(torch.cat([t.reshape(-1) for t in tensors]), layout)
            for tensors, layout in by_device.values()
            if tensors
        ]

    def reset(self) -> None:
        self.calls = {}
        self.unit_calls = {}
        self.hist_calls = {}
        self.param_values = []
        self.head_calls = {}
        self.host[:] = 0
        self.param_host = {}
        self.model_host = {}

    # ------------------------------------------------------------ passes discarded
    def mark(self) -> Mark:
        return Mark(
            {key: len(calls.slots) for key, calls in self.calls.items()},
            {device: len(calls.slots) for device, calls in self.unit_calls.items()},
            {device: len(entry[0]) for device, entry in self.hist_calls.items()},
            self.host.copy(),
        )

    def drop_before(self, mark: Mark, slots: np.ndarray) -> None:
        drop = np.zeros(self.n_slots, dtype=bool)
        drop[slots] = True
        for key, n in mark.calls.items():
            calls = self.calls.get(key)
            if calls is not None:
                calls.slots[:n] = [-1 if s >= 0 and drop[s] else s for s in calls.slots[:n]]
        for device, n in mark.units.items():
            unit_calls = self.unit_calls.get(device)
            if unit_calls is None or not any(drop[s] for s in unit_calls.slots[:n]):
                continue
            self.unit_calls[device] = unit_calls.without(lambda i, s, n=n: i < n and drop[s])
        for device, n in mark.hists.items():
            entry = self.hist_calls.get(device)
            if entry is not None:
                keep = [i for i, s in enumerate(entry[0]) if i >= n or not drop[s]]
                self.hist_calls[device] = (
                    [entry[0][i] for i in keep],
                    [entry[1][i] for i in keep],
                )
        rows = np.flatnonzero(drop[: mark.host.shape[0]])
        for name in ADDITIVE_HOST:
            col = self.host_col[name]
            self.host[rows, col] -= mark.host[rows, col]

    # ------------------------------------------------------------ a call that failed
    def call_mark(self, slot: int) -> tuple[Any, ...]:
        return (
            tuple([len(c.slots) for c in self.calls.values()]),
            tuple([len(c.slots) for c in self.unit_calls.values()]),
            tuple([len(e[0]) for e in self.hist_calls.values()]),
            self.host[slot].copy(),
        )

    def drop_call(self, mark: tuple[Any, ...], slot: int) -> None:
        calls_n, units_n, hists_n, host = mark
        for i, calls in enumerate(self.calls.values()):
            slots = calls.slots
            for j in range(calls_n[i] if i < len(calls_n) else 0, len(slots)):
                if slots[j] == slot:
                    slots[j] = -1
        for i, (device, unit_calls) in enumerate(list(self.unit_calls.items())):
            start = units_n[i] if i < len(units_n) else 0
            if slot not in unit_calls.slots[start:]:
                continue
            self.unit_calls[device] = unit_calls.without(
                lambda j, s, start=start: j >= start and s == slot
            )
        for i, (device, entry) in enumerate(list(self.hist_calls.items())):
            start = hists_n[i] if i < len(hists_n) else 0
            keep = [j for j, s in enumerate(entry[0]) if j < start or s != slot]
            if len(keep) < len(entry[0]):
                self.hist_calls[device] = (
                    [entry[0][j] for j in keep],
                    [entry[1][j] for j in keep],
                )
        cols = [self.host_col[name] for name in ADDITIVE_HOST]
        self.host[slot, cols] = host[cols]

    def grow(self, n_slots: int, n_params: int) -> None:
        extra = n_slots - self.n_slots
        if extra > 0:
            self.host = np.vstack([self.host, np.zeros((extra, self.host.shape[1]))])
            self.n_slots = n_slots
        if n_params > self.n_params:
            pad = n_params - self.n_params
            self.param_host = {
                k: np.concatenate([v, np.zeros(pad)]) for k, v in self.param_host.items()
            }
            self.n_params = n_params

"""StepBuffer: where hooks accumulate partials, on the device, until one flush.

Layout: for each device there is one preallocated block ``[capacity, slots,
partials]`` for modules and one ``[capacity, params, partials]`` for parameters;
row ``r`` is the step being recorded. A hook adds its partials into a slice of the
row with one in-place op. Counts the host already knows (calls, numbers of entries)
go to a NumPy block and cost the device nothing. Per-unit activity (for
``dead_frac``/``dead_window_frac``) lives in one flat boolean vector per device, with a
segment per module, so the end of a step handles every module in a handful of ops.

:meth:`StepBuffer.drain` is the only place that copies device values to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .stats import (
    MODULE_DEVICE_PARTIALS,
    MODULE_HOST_PARTIALS,
    PARAM_DEVICE_PARTIALS,
    PARAM_HOST_PARTIALS,
)

__all__ = ["Drained", "StepBuffer", "accumulation_dtype"]

MOD_COL = {name: i for i, name in enumerate(MODULE_DEVICE_PARTIALS)}
MOD_HOST_COL = {name: i for i, name in enumerate(MODULE_HOST_PARTIALS)}
PAR_COL = {name: i for i, name in enumerate(PARAM_DEVICE_PARTIALS)}
PAR_HOST_COL = {name: i for i, name in enumerate(PARAM_HOST_PARTIALS)}

# Hooks add a few adjacent partials at once: these are the column ranges they write.
OUTPUT_COLS = slice(MOD_COL["out_sum"], MOD_COL["out_nonfinite"] + 1)
GATE_COLS = slice(MOD_COL["gate_sum"], MOD_COL["sat_count"] + 1)
ERROR_COLS = slice(MOD_COL["err_sumsq"], MOD_COL["err_nonfinite"] + 1)
assert OUTPUT_COLS.stop - OUTPUT_COLS.start == 4 and GATE_COLS.stop - GATE_COLS.start == 2


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it: squared error signals of 1e-20 must not underflow."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class _Units:
    """Flat per-unit state of one device: which units were active this step, and for how
    many recorded steps in a row each has been inactive."""

    active: Tensor
    inactive_run: Tensor
    slot_of_unit: Tensor
    segments: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass
class _Bank:
    """Everything accumulated on one device."""

    device: torch.device
    dtype: torch.dtype
    modules: Tensor  # [capacity, slots, module device partials]
    params: Tensor  # [capacity, params, parameter device partials]
    histograms: Tensor | None  # [capacity, slots, bins]
    units: _Units | None = None


@dataclass
class Drained:
    """Rows taken out of the buffer at a flush, on the host: ``steps`` and partials."""

    steps: np.ndarray  # [rows]
    modules: dict[str, np.ndarray]  # partial -> [rows, slots]
    params: dict[str, np.ndarray]  # partial -> [rows, params]
    histograms: np.ndarray | None  # [rows, slots, bins]


class StepBuffer:
    """Device-side accumulation of partials for up to ``capacity`` recorded steps."""

    def __init__(
        self,
        n_slots: int,
        n_params: int,
        capacity: int,
        *,
        dead_window: int,
        histogram_bins: int = 0,
    ) -> None:
        self.n_slots = n_slots
        self.n_params = n_params
        self.capacity = capacity
        self.dead_window = dead_window
        self.histogram_bins = histogram_bins
        self.row = 0
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.host_modules = np.zeros((capacity, n_slots, len(MODULE_HOST_PARTIALS)))
        self.host_params = np.zeros((capacity, n_params, len(PARAM_HOST_PARTIALS)))
        self.banks: dict[torch.device, _Bank] = {}
        # How many recorded steps each module has been seen in (for `window_ready`).
        self.steps_seen = np.zeros(n_slots, dtype=np.int64)

    # ------------------------------------------------------------ per device
    def bank(self, device: torch.device) -> _Bank:
        bank = self.banks.get(device)
        if bank is None:
            dtype = accumulation_dtype(device)
            bins = self.histogram_bins
            bank = _Bank(
                device=device,
                dtype=dtype,
                modules=torch.zeros(
                    (self.capacity, self.n_slots, len(MODULE_DEVICE_PARTIALS)), dtype=dtype, device=device
                ),
                params=torch.zeros(
                    (self.capacity, self.n_params, len(PARAM_DEVICE_PARTIALS)), dtype=dtype, device=device
                ),
                histograms=(
                    torch.zeros((self.capacity, self.n_slots, bins), dtype=dtype, device=device)
                    if bins
                    else None
                ),
            )
            self.banks[device] = bank
        return bank

    # ------------------------------------------------------------ written by hooks
    def add_module(self, slot: int, device: torch.device, cols: slice, values: Tensor) -> None:
        """Add ``values`` to the partials ``cols`` of module ``slot`` in the current row."""
        bank = self.bank(device)
        bank.modules[self.row, slot, cols].add_(values)

    def add_histogram(self, slot: int, device: torch.device, counts: Tensor) -> None:
        hist = self.bank(device).histograms
        if hist is not None:
            hist[self.row, slot].add_(counts)

    def add_host(self, slot: int, **counts: float) -> None:
        """Add counts the host knows without asking the device (calls, entries)."""
        row = self.host_modules[self.row, slot]
        for name, value in counts.items():
            row[MOD_HOST_COL[name]] += value

    def set_host(self, slot: int, name: str, value: float) -> None:
        self.host_modules[self.row, slot, MOD_HOST_COL[name]] = value

    def mark_units(self, slot: int, device: torch.device, active: Tensor) -> None:
        """OR this call's per-unit activity into the module's segment."""
        bank = self.bank(device)
        units = bank.units
        seg = units.segments.get(slot) if units is not None else None
        if seg is None or seg[1] != active.numel():
            if seg is not None:
                raise ValueError(f"the number of units changed from {seg[1]} to {active.numel()}")
            units = self._add_segment(bank, slot, active.numel())
            seg = units.segments[slot]
        start, n = seg
        view = units.active[start : start + n]
        torch.logical_or(view, active, out=view)
        self.set_host(slot, "n_units", n)

    def _add_segment(self, bank: _Bank, slot: int, n: int) -> _Units:
        """A module's units are first seen: extend the flat vectors (first step only)."""
        device = bank.device
        fresh_active = torch.zeros(n, dtype=torch.bool, device=device)
        fresh_run = torch.zeros(n, dtype=torch.int32, device=device)
        fresh_slot = torch.full((n,), slot, dtype=torch.long, device=device)
        if bank.units is None:
            bank.units = _Units(fresh_active, fresh_run, fresh_slot, {slot: (0, n)})
        else:
            u = bank.units
            start = u.active.numel()
            u.active = torch.cat([u.active, fresh_active])
            u.inactive_run = torch.cat([u.inactive_run, fresh_run])
            u.slot_of_unit = torch.cat([u.slot_of_unit, fresh_slot])
            u.segments[slot] = (start, n)
        return bank.units

    def set_params(self, device: torch.device, index: Tensor, cols: slice, values: Tensor) -> None:
        """Write per-parameter values ``[len(index), cols]`` into the current row."""
        self.bank(device).params[self.row, :, cols].index_copy_(0, index, values)

    def set_param_host(self, index: list[int], name: str, value: float = 1.0) -> None:
        self.host_params[self.row, index, PAR_HOST_COL[name]] = value

    # ------------------------------------------------------------ step boundary
    def end_step(self, step: int) -> bool:
        """Close the current row as ``step``; returns True when the buffer is full."""
        row = self.row
        called = self.host_modules[row, :, MOD_HOST_COL["calls"]] > 0
        self.steps_seen += called
        ready = (self.steps_seen >= self.dead_window) & called
        self.host_modules[row, :, MOD_HOST_COL["window_ready"]] = ready
        for bank in self.banks.values():
            if bank.units is not None:
                self._close_units(bank, row, called)
        self.steps[row] = step
        self.row += 1
        return self.row >= self.capacity

    def _close_units(self, bank: _Bank, row: int, called: np.ndarray) -> None:
        """Dead units of the step and runs of inactivity, for every module at once."""
        u = bank.units
        assert u is not None
        inactive = ~u.active
        if not all(called[slot] for slot in u.segments):
            # A module not run in this step keeps its runs as they were.
            seen = torch.zeros_like(u.active)
            for slot, (start, n) in u.segments.items():
                if called[slot]:
                    seen[start : start + n] = True
            inactive = inactive & seen
            u.inactive_run = torch.where(seen, (u.inactive_run + 1) * inactive, u.inactive_run)
        else:
            u.inactive_run = (u.inactive_run + 1) * inactive
        dead = torch.zeros(self.n_slots, dtype=bank.dtype, device=bank.device)
        dead.index_add_(0, u.slot_of_unit, inactive.to(bank.dtype))
        bank.modules[row, :, MOD_COL["dead_units"]] = dead
        long_dead = (u.inactive_run >= self.dead_window).to(bank.dtype)
        dead_window = torch.zeros(self.n_slots, dtype=bank.dtype, device=bank.device)
        dead_window.index_add_(0, u.slot_of_unit, long_dead)
        bank.modules[row, :, MOD_COL["dead_window_units"]] = dead_window
        u.active.zero_()

    def discard_row(self) -> None:
        """Forget what the current row holds (a step that will not be recorded)."""
        row = self.row
        self.host_modules[row] = 0
        self.host_params[row] = 0
        for bank in self.banks.values():
            bank.modules[row].zero_()
            bank.params[row].zero_()
            if bank.histograms is not None:
                bank.histograms[row].zero_()
            if bank.units is not None:
                bank.units.active.zero_()

    # ------------------------------------------------------------ flush
    def drain(self) -> Drained | None:
        """Copy the closed rows to the host (the one deliberate sync) and reset."""
        rows = self.row
        if rows == 0:
            return None
        modules = np.zeros((rows, self.n_slots, len(MODULE_DEVICE_PARTIALS)))
        params = np.zeros((rows, self.n_params, len(PARAM_DEVICE_PARTIALS)))
        hist = np.zeros((rows, self.n_slots, self.histogram_bins)) if self.histogram_bins else None
        for bank in self.banks.values():
            # Deliberate host sync: one copy per device per flush. Banks of different
            # devices hold disjoint slots (zeros elsewhere), so they add up.
            modules += bank.modules[:rows].cpu().numpy()
            params += bank.params[:rows].cpu().numpy()
            if hist is not None and bank.histograms is not None:
                hist += bank.histograms[:rows].cpu().numpy()
            bank.modules[:rows].zero_()
            bank.params[:rows].zero_()
            if bank.histograms is not None:
                bank.histograms[:rows].zero_()
        out_modules = {name: modules[:, :, i] for i, name in enumerate(MODULE_DEVICE_PARTIALS)}
        out_modules.update(
            {name: self.host_modules[:rows, :, i].copy() for i, name in enumerate(MODULE_HOST_PARTIALS)}
        )
        out_params = {name: params[:, :, i] for i, name in enumerate(PARAM_DEVICE_PARTIALS)}
        out_params.update(
            {name: self.host_params[:rows, :, i].copy() for i, name in enumerate(PARAM_HOST_PARTIALS)}
        )
        drained = Drained(self.steps[:rows].copy(), out_modules, out_params, hist)
        self.host_modules[:rows] = 0
        self.host_params[:rows] = 0
        self.row = 0
        return drained

"""Dead units: per-unit activity folded, once per step, into runs of inactivity.

Units are keyed by module and counted once: a module's number of units must stay the same
from call to call and step to step (features and channels do, whatever the batch size,
sequence length or image size). A module where it does not is dropped from unit tracking
for good, and named in :attr:`UnitRuns.unit_problems` (the Probe warns).

Each device keeps one flat vector of every tracked unit's run (one segment per module),
so a step costs a handful of ops however many modules there are. Under data parallelism
per-unit activity is combined per step (one collective), because "dead on every rank"
must be known before the next step's inactivity runs are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..reduce import accumulation_dtype
from .calls import UnitCalls

if TYPE_CHECKING:
    from .ranks import Ranks

__all__ = ["DeviceUnits", "UnitRuns"]


@dataclass
class DeviceUnits:
    """Flat per-unit state of one device: units of every module, one segment each."""

    segments: dict[int, tuple[int, int]] = field(default_factory=dict)
    inactive_run: Tensor | None = None  # recorded steps in a row each unit was all-zero
    slot_of_unit: Tensor | None = None
    aranges: dict[int, Tensor] = field(default_factory=dict)
    # Where a step's calls, in their order, land in the flat vectors, by (slots, units in
    # all): the index for index_add_, or None where they land in order, once each.
    plans: dict[tuple[tuple[int, ...], int], Tensor | None] = field(default_factory=dict)
    widths: np.ndarray | None = None  # [n_slots]: units of each module's segment, 0 if none


class UnitRuns:
    """Runs of inactivity of every tracked unit, per device, and which modules are tracked."""

    def __init__(self, n_slots: int, dead_window: int) -> None:
        self.n_slots = n_slots
        self.dead_window = dead_window
        self.ranks: Ranks | None = None
        self.steps_seen = np.zeros(n_slots, dtype=np.int64)  # steps each module's units were seen
        # Under data parallelism, whether per-unit activity is tracked (every rank must then
        # take part in its collectives each step, whatever it ran); the Probe sets it.
        self.track_units = False
        self.rank_unit_device: torch.device | None = None
        # Modules whose number of units changed (not features or channels): no longer tracked.
        self.units_off: set[int] = set()
        # (slot, units before, units after) for each module just dropped; the Probe warns.
        self.unit_problems: list[tuple[int, int, int]] = []
        self.units: dict[torch.device, DeviceUnits] = {}

    def close_all(
        self,
        calls: dict[torch.device, UnitCalls],
        called: np.ndarray,
        host: np.ndarray,
        host_col: dict[str, int],
    ) -> dict[torch.device, tuple[Tensor, Tensor]]:
        """Dead units of the step and the inactivity runs, per device: ``{device: (dead,
        dead_window)}``, each ``[n_slots]``; the modules' unit counts and whether their
        window is full go into the step's ``host`` counts.

        Under data parallelism every rank issues the same collectives with the same shapes,
        whatever modules it ran: first which modules ran anywhere and their unit counts
        (host integers), then the activity of every unit known to any rank.
        """
        if self.ranks is not None:
            if not self.track_units:
                return {}
            if self.rank_unit_device is None:
                self.rank_unit_device = next(iter(calls), self.ranks.host_device)
            device = self.rank_unit_device
            merged = UnitCalls()
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
            result = self._close(device, unit_calls, anywhere, lo, hi, host, host_col)
            if result is not None:
                closed[device] = result
        return closed

    def _close(
        self,
        device: torch.device,
        calls: UnitCalls,
        called: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        host: np.ndarray,
        host_col: dict[str, int],
    ) -> tuple[Tensor, Tensor] | None:
        """Dead units of the step, and runs of inactivity, for every module at once."""
        units = self.units.setdefault(device, DeviceUnits())
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
        activity = _step_activity(units, device, calls, set(live), total)
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
        host[seen_now, host_col["n_units"]] = units.widths[seen_now]
        ready = self.steps_seen[seen_now] >= self.dead_window
        host[seen_now, host_col["window_ready"]] = ready
        return dead, dead_window

    def _live_units(
        self,
        units: DeviceUnits,
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
                _add_segment(units, device, s, n)
            live.append(s)
        return live

    def grow(self, n_slots: int) -> None:
        """Room for modules bound after the start (their units untracked until seen)."""
        extra = n_slots - self.n_slots
        if extra > 0:
            self.steps_seen = np.concatenate([self.steps_seen, np.zeros(extra, dtype=np.int64)])
            for units in self.units.values():
                if units.widths is not None:
                    units.widths = np.concatenate([units.widths, np.zeros(extra, dtype=np.int64)])
            self.n_slots = n_slots


def _step_activity(
    units: DeviceUnits, device: torch.device, calls: UnitCalls, live: set[int], total: int
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


def _add_segment(units: DeviceUnits, device: torch.device, slot: int, n: int) -> None:
    """A module's units are seen for the first time: extend the flat vectors."""
    start = 0 if units.inactive_run is None else units.inactive_run.numel()
    run = torch.zeros(n, dtype=torch.int32, device=device)
    owner = torch.full((n,), slot, dtype=torch.long, device=device)
    units.inactive_run = run if units.inactive_run is None else torch.cat([units.inactive_run, run])
    units.slot_of_unit = (
        owner if units.slot_of_unit is None else torch.cat([units.slot_of_unit, owner])
    )
    units.segments[slot] = (start, n)
    assert units.widths is not None  # made by UnitRuns._close
    units.widths[slot] = n
    units.aranges[slot] = torch.arange(start, start + n, device=device)


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

"""The step clock: which steps are recorded (the cadence), and a step's close.

:class:`StepClock` closes a step (never raising: a failure is one warning and a gap): the
held outputs and deferred units are settled, the buffer stacks the step, every
``flush_every`` recorded steps the rows are flushed, and the step count moves on, with
``recording`` set for the next step by the cadence. Under "auto" it keeps the recent
global gradient norms (the spike burst, :mod:`gradprobe.spikes`) and the burst after
non-finite gradients.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..buffer import Ranks
from ..hooks import warn_gap
from ..reduce import to_host_later
from ..spikes import GRAD_SPIKE_FACTOR, SPIKE_MIN, SPIKE_WINDOW, SpikeWatch
from .context import Context

__all__ = [
    "AUTO_BURST",
    "AUTO_EVERY",
    "AUTO_FIRST",
    "SPIKE_BURST_FACTOR",
    "SPIKE_BURST_MIN",
    "SPIKE_BURST_WINDOW",
    "StepClock",
]

# The "auto" cadence, Probe(every="auto"): all of the first AUTO_FIRST steps (where a bad
# initialisation shows), then every AUTO_EVERY-th; the gradients' norms at every step (one
# _foreach_norm: the floor of any monitor), and after a step whose gradients held a NaN or
# an Inf, the AUTO_BURST steps that follow in full. Over 500 steps it records 29 in full.
AUTO_FIRST = 20
AUTO_EVERY = 50
AUTO_BURST = 20
# ... and after a gradient-norm spike: the step's global norm (before clipping where it was
# measured) spikes by gradprobe/spikes.py's rule, diagnose's grad_norm_spike rule (the
# SPIKE_BURST_* names are its values). Read without a host sync: on the CPU the norms are
# host values already; on a GPU the step's total is copied to pinned host memory without
# waiting and read at a later step, once its event has completed (Event.query() never
# blocks), so the burst starts a step or so late there. The same values feed the live
# check's step-level rules (gradprobe/live.py: LiveCheck.at_step).
SPIKE_BURST_FACTOR = GRAD_SPIKE_FACTOR
SPIKE_BURST_WINDOW = SPIKE_WINDOW
SPIKE_BURST_MIN = SPIKE_MIN
_PENDING_NORMS = 64  # copies in flight at most (they complete within a step or two)


def _on_host(values: list[Any]) -> bool:
    """Whether every value is a host number or a CPU tensor (read without a sync)."""
    return all(not isinstance(v, Tensor) or v.device.type == "cpu" for v in values)


def auto_cadence() -> dict[str, int]:
    """The "auto" cadence's constants, as the run's meta keeps them."""
    return {"first": AUTO_FIRST, "every": AUTO_EVERY, "burst": AUTO_BURST}


class StepClock:
    """The cadence and a step's close. ``flush``: the rows' flush (every ``flush_every``
    recorded steps)."""

    def __init__(self, ctx: Context, flush: Callable[[], None]) -> None:
        self.ctx = ctx
        self._flush = flush
        # "auto": until this step (a burst after non-finite gradients) every step is recorded.
        self._burst_until = -1
        # ... or after a gradient-norm spike (gradprobe/spikes.py): recent global norms on
        # the host, and the device copies of the latest not read yet.
        self._spikes = SpikeWatch()
        self._pending_norms: deque[tuple[int, list[Any], list[Any]]] = deque()
        self._ranks_resolved = False  # the process group is looked up at the first close
        self.closing_step = -1  # the step an optimizer step post-hook is closing

    # ------------------------------------------------------------ the cadence
    def records(self, step: int) -> bool:
        """Whether the cadence records ``step`` in full (module hooks on)."""
        ctx = self.ctx
        if ctx.unfollowed:
            return False
        if ctx.auto:
            return step < AUTO_FIRST or step % AUTO_EVERY == 0 or step <= self._burst_until
        return step % ctx.every == 0

    def burst(self) -> None:
        """Record the AUTO_BURST steps after this one in full (non-finite gradients)."""
        self._burst_until = self.ctx.step_index + AUTO_BURST

    def watch_spike(self, totals: list[Tensor | float]) -> None:
        """Queue the step's global gradient norm (``totals``: Σ‖g‖² per group, host
        floats or device tensors, :func:`.params.squared_total`) and its logged loss for
        the spike burst and the live check's step-level rules, and read every queued step
        whose values have reached the host."""
        ctx = self.ctx
        # The loss logged so far for this step (one logged after optimizer.step() is read
        # by the flush's check instead); kept as logged: a tensor, or a float.
        losses = ctx.buffer.logged_values(ctx.step_index, "loss")
        if not self._pending_norms and _on_host(totals) and _on_host(losses):
            self._check(ctx.step_index, totals, losses)  # the CPU: nothing to wait for
            return
        put = to_host_later
        entry = (ctx.step_index, [put(t) for t in totals], [put(v) for v in losses])
        if len(self._pending_norms) < _PENDING_NORMS:
            self._pending_norms.append(entry)
        self._read_norms()

    def _read_norms(self) -> None:
        """Run the spike burst and the live check on each queued step that is on the host."""
        pending = self._pending_norms
        while pending and all(e is None or e.query() for _, e in pending[0][1] + pending[0][2]):
            step, totals, losses = pending.popleft()
            self._check(step, [h for h, _ in totals], [h for h, _ in losses])

    def _check(self, step: int, totals: list[Any], losses: list[Any]) -> None:
        """The spike burst and the live check of ``step`` on its host values."""
        ctx = self.ctx
        total = float(sum(float(h) for h in totals)) ** 0.5
        if self._spikes.push(total) is not None and ctx.auto:
            self._burst_until = max(self._burst_until, ctx.step_index + AUTO_BURST)
        if ctx.scaler_ref is None:  # with a scaler, only the flush knows skipped steps
            loss = float(sum(float(h) for h in losses)) if losses else None
            ctx.guard(partial(ctx.live.at_step, step, total, loss), "the live check")

    # ------------------------------------------------------------ the close
    def end_step(self) -> None:
        """Close the step. Never raises: a failure is one warning and a gap (this step's
        rows, or a flush's), and the step count moves on."""
        ctx = self.ctx
        if not self._ranks_resolved:
            ctx.guard(self._resolve_ranks, "the step boundary (process group)")
        # A step the "auto" cadence does not record still closes: its sentinel's rows.
        closes = ctx.recording or ctx.auto
        if closes and ctx.shards:
            ctx.guard_params(self._end_sharded_step, "the step boundary (sharded norms)")
        if closes and not ctx.guard(self._close_step, "the step boundary"):
            ctx.guard(
                partial(ctx.emit, "step_discarded", ctx.step_index, False),
                "the step boundary (discard)",
            )
            ctx.guard(
                partial(ctx.buffer.discard_step, ctx.step_index), "the step boundary (discard)"
            )
        step = ctx.step_index
        ctx.step_index += 1
        ctx.recording = self.records(ctx.step_index)
        ctx.guard(partial(ctx.emit, "step_closed", step), "the step boundary (hooks)")

    def _close_step(self) -> None:
        ctx = self.ctx
        buffer = ctx.buffer
        ctx.emit("step_closing")  # held outputs reduced, deferred units recorded
        if ctx.scaler_ref is not None:
            buffer.set_model_host("scaler")
        try:
            buffer.end_step(ctx.step_index, modules=ctx.recording)
        finally:
            self._warn_unit_problems()
        if len(buffer) >= ctx.flush_every:
            self._flush()
            if self._pending_norms:  # the flush waited for the device: their copies landed
                self._read_norms()

    def _warn_unit_problems(self) -> None:
        ctx = self.ctx
        problems, ctx.buffer.unit_problems = ctx.buffer.unit_problems, []
        for k, before, after in problems:
            name = ctx.slots[k].name
            warn_gap(
                ctx.failed_where,
                f"units of {name}",
                f"gradprobe: the number of units of module {name!r} changed from {before} to "
                f"{after}: its output has no fixed feature or channel dimension, so dead_frac "
                "and dead_window_frac are not recorded for it from now on",
            )

    def _end_sharded_step(self) -> None:
        """Sharded parameters' norms of the step: their shards' squares summed across the
        ranks, by all of them (whatever failed before on one), unless told not to combine
        ranks: then they are left out, with one warning (a shard's norm is not theirs)."""
        ctx = self.ctx
        if ctx.sync_ranks is not False:
            ctx.shards.reduce(ctx.buffer)
            return
        ctx.shards.drop(ctx.buffer)
        warn_gap(
            ctx.failed_where,
            "sharded parameters",
            "gradprobe: sync_ranks=False, so the norms of sharded (FSDP2) parameters are "
            "not combined across ranks; a shard's norm is not the parameter's, so they and "
            "the global norms are not recorded. Leave sync_ranks unset to have them",
        )

    def _resolve_ranks(self) -> None:
        """Combine statistics across ranks if asked, or by default when there are several."""
        self._ranks_resolved = True
        ctx = self.ctx
        dist = torch.distributed
        sync = ctx.sync_ranks
        if sync is None:
            sync = (
                dist.is_available()
                and dist.is_initialized()
                and dist.get_world_size(ctx.process_group) > 1
            )
        if sync:
            ctx.buffer.ranks = Ranks(ctx.process_group)
            # Every rank then takes part in the unit collectives each step, ran it or not.
            ctx.buffer.track_units = ctx.plan.units
            ctx.meta["probe"]["world_size"] = ctx.buffer.ranks.world
            if ctx.store is not None:
                ctx.store.update_meta(probe=ctx.meta["probe"])

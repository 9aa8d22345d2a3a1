"""The recording engine of one Probe: its components, made and wired in one place.

Who gets which collaborator is read here, top to bottom; everything else the components
tell each other goes through the context's events (:data:`.context.EVENTS`), whose
handlers run in the order the components are made below.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .clock import StepClock
from .context import Context
from .errors import ErrorCapture
from .follow import Follow
from .forward import ForwardCapture
from .hookup import Hookup
from .kept import Kept
from .optstep import OptimizerStep
from .params import ParamStats
from .passes import Passes
from .rows import Rows
from .scaler import ScalerWatch
from .sentinel import SentinelRoute
from .sequences import SequenceCapture, SequenceSites
from .units import Units
from .updates import UpdateSnapshot

__all__ = ["Engine"]


@dataclass
class Engine:
    """The components (see :mod:`gradprobe.recording` for what each owns)."""

    ctx: Context
    follow: Follow
    kept: Kept
    units: Units
    errors: ErrorCapture
    capture: ForwardCapture
    rows: Rows
    clock: StepClock
    updates: UpdateSnapshot
    params: ParamStats
    sentinel: SentinelRoute
    scaler: ScalerWatch
    step: OptimizerStep
    passes: Passes
    sequence: SequenceCapture
    hookup: Hookup

    @classmethod
    def build(
        cls, ctx: Context, model: nn.Module, selection: object, sites: SequenceSites
    ) -> Engine:
        """The components over ``ctx`` for ``model`` (``selection``: the Probe's
        ``modules``, to follow a model that changes; ``sites``: where the sequence statistics
        are measured, :func:`.sequences.sequence_sites`). No hook is on the model yet
        (:meth:`Hookup.register`)."""
        follow = Follow(ctx, model, selection, sites)
        kept = Kept(ctx)
        units = Units(ctx)
        errors = ErrorCapture(ctx, kept, sites)
        capture = ForwardCapture(ctx, kept, units, errors, follow)
        rows = Rows(ctx)
        clock = StepClock(ctx, rows.flush)
        updates = UpdateSnapshot(ctx)
        params = ParamStats(ctx, updates, clock)
        sentinel = SentinelRoute(ctx, params, clock)
        scaler = ScalerWatch(ctx, clock)
        step = OptimizerStep(
            ctx,
            params=params,
            sentinel=sentinel,
            updates=updates,
            scaler=scaler,
            follow=follow,
            clock=clock,
            note_time=ctx.progress.note_time,
        )
        passes = Passes(ctx, follow)
        sequence = SequenceCapture(ctx, sites)
        hookup = Hookup(
            ctx,
            model,
            passes=passes,
            capture=capture,
            errors=errors,
            params=params,
            sentinel=sentinel,
            scaler=scaler,
            step=step,
            clock=clock,
            sequence=sequence,
        )
        return cls(
            ctx, follow, kept, units, errors, capture, rows, clock, updates, params, sentinel,
            scaler, step, passes, sequence, hookup,
        )  # fmt: skip

    def release(self) -> None:
        """Let go of the tensors kept from step to step (the Probe is closed)."""
        self.ctx.params = []
        self.updates.close()
        self.params.close()
        self.sentinel.close()
        self.kept.close()
        self.units.close()

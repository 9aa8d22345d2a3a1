"""A step the ``GradScaler`` skipped: its ``optimizer.step()`` is never called.

No step hook fires for it. It is recognised when ``scaler.update()`` has run without an
optimizer step: ``update`` changes the scale tensor in place, which bumps its version
counter, a host-side number (no sync). That step's statistics are dropped and it is
recorded as ``skipped`` on :data:`~gradprobe.stats.MODEL_NAME`.
"""

from __future__ import annotations

from typing import Any

import torch

from .context import Context

__all__ = ["ScalerWatch", "scale_marker"]


def scale_marker(scaler: torch.amp.GradScaler | None) -> tuple[int, int] | None:
    """(identity, version) of the scaler's scale tensor; None before its first ``scale()``."""
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    return None if scale is None else (id(scale), scale._version)


class ScalerWatch:
    """Watches the ``GradScaler``'s updates; ``clock``: the step clock that closes a
    skipped step."""

    def __init__(self, ctx: Context, clock: Any) -> None:
        self.ctx = ctx
        self._clock = clock
        self._marker = scale_marker(ctx.scaler())
        self._stepped_since_update = False

    def stepped(self) -> None:
        """An optimizer step (or ``probe.step()``) closed this step: the next update is its."""
        self._stepped_since_update = True

    def poll(self) -> None:
        """Close a step the ``GradScaler`` skipped (never raises: see :meth:`_check`)."""
        if self.ctx.scaler_ref is not None:
            self.ctx.guard(self._check, "the GradScaler watch")

    def _check(self) -> None:
        """Close a step the ``GradScaler`` skipped: ``update()`` ran but no optimizer step.

        ``update()`` changes the scale tensor in place (also when the value stays), so its
        version counter, read on the host without a sync, counts the updates.
        """
        marker = scale_marker(self.ctx.scaler())
        if marker is None or marker == self._marker:
            return
        previous, self._marker = self._marker, marker
        fresh = previous is None or previous[0] != marker[0]  # a new tensor starts at version 0
        updates = marker[1] if fresh else marker[1] - previous[1]
        if updates <= 0:
            return
        if self._stepped_since_update:
            self._stepped_since_update = False
        else:
            self._skip_step()

    def _skip_step(self) -> None:
        """The scaler skipped the step: drop what it recorded, keep a ``skipped`` row."""
        ctx = self.ctx
        ctx.buffer.discard_step(ctx.step_index)
        ctx.emit("step_discarded", ctx.step_index, True)
        if ctx.recording or ctx.auto:
            ctx.buffer.set_model_host("skipped")
        self._clock.end_step()

"""Units and layouts: which dimension of a module's output holds its units, learned in call order.

Units are features or channels: they do not change with the batch size, the sequence
length or the image size. A typed module (Linear, Conv, ...) knows its layout; an
element-wise one (ReLU, Dropout, ...) takes the layout of the tensor it received: that of
a typed module that made or read that shape. Where nothing has said it yet (the model's
input, first step), the call's activity waits for the step's close, by when the module
that reads the tensor has said (:meth:`Units.record_deferred`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import sites
from ..hooks import warn_gap
from .context import Context

__all__ = ["Units"]


class Units:
    """The layouts learned so far, and the units that wait for the step's close."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._want_units = ctx.plan.units
        self._layout_by_shape: dict[tuple[int, ...], str] = {}
        # (dims, layout, units) seen on a typed module's input or output, and the layout
        # each element-wise module took.
        self._layout_signatures: set[tuple[int, str, int]] = set()
        self._slot_layout: dict[int, str] = {}
        # Shapes two typed modules read in different layouts ([B, T, W] features and, with
        # T == W, [B, W, T] channels after a transpose): their shape says nothing.
        self._ambiguous_shapes: set[tuple[int, ...]] = set()
        # Unit activity waiting for the step's close to say its layout, and how many of
        # them came before the gradients' mark (gradprobe/recording/follow.py).
        self._deferred: list[tuple[int, tuple[int, ...], Tensor]] = []
        self._deferred_mark = 0
        ctx.on("gradients_marked", self._on_gradients_marked)
        ctx.on("gradients_discarded", self._on_gradients_discarded)
        ctx.on("step_discarded", self._on_step_discarded)

    # ------------------------------------------------------------ events
    def _on_gradients_marked(self) -> None:
        self._deferred_mark = len(self._deferred)

    def _on_gradients_discarded(self, dropped: set[int]) -> None:
        n = self._deferred_mark
        self._deferred = [
            entry for i, entry in enumerate(self._deferred) if i >= n or entry[0] not in dropped
        ]

    def _on_step_discarded(self, step: int, skipped: bool) -> None:
        if not skipped:
            self._deferred = []

    def close(self) -> None:
        self._deferred = []

    # ------------------------------------------------------------ a call's units
    def of(self, slot: Any, yd: Tensor) -> int | None:
        """The unit dimension of this call (``-1``: not recorded; ``None``: not known yet)."""
        if not self._want_units or yd.dim() < 1:
            return -1
        return self._unit_dim(slot, yd)

    def mark(self) -> int:
        """Where the deferred units stand (a call's mark: see drop_since)."""
        return len(self._deferred)

    def drop_since(self, n: int, k: int) -> None:
        """Take back module ``k``'s deferred units since mark ``n`` (a failed call)."""
        self._deferred[n:] = [e for e in self._deferred[n:] if e[0] != k]

    def defer(self, slot: Any, y: Tensor) -> None:
        """Units of a call whose layout is not known yet: an element-wise module on a
        tensor no module has shown the layout of. The batch dimension is reduced now, the
        rest when the step closes."""
        self._deferred.append((slot.index, tuple(y.shape), sites.activity(y, (0,))))

    def note_kind(self, k: int, unit: int, dims: int) -> None:
        kinds = self.ctx.progress.unit_kinds
        if k not in kinds:  # host-only, once per module
            kinds[k] = "channel" if unit == 1 and dims >= 3 else "feature"

    def record_deferred(self) -> None:
        """Units of the calls whose layout was not known in their hook (see defer)."""
        ctx = self.ctx
        deferred, self._deferred = self._deferred, []
        kinds = ctx.progress.unit_kinds
        for k, shape, activity in deferred:
            layout = self._inherited_layout(k, shape)
            if layout is None and shape in self._ambiguous_shapes:
                # Features-last and channels share this shape and this module has shown
                # neither yet: its units are unknown, so no units rather than wrong ones.
                name = ctx.slots[k].name
                warn_gap(
                    ctx.failed_where,
                    f"ambiguous units of {name}",
                    f"gradprobe: module {name!r} received a {list(shape)} tensor that other "
                    "modules read both as [N, ..., features] and as [N, channels, ...] (a "
                    "transpose where the sequence length equals the width): its dead_frac "
                    "and dead_window_frac are not recorded for such calls until a call of "
                    "another shape shows its units",
                )
                continue
            # Nothing in the step said: channels of [N, C, ...], as before.
            layout = layout or "channel"
            unit = len(shape) - 1 if layout == "last" else 1
            if k not in kinds:
                kinds[k] = "channel" if unit == 1 else "feature"
            dims = tuple(d - 1 for d in range(1, len(shape)) if d != unit)
            units = activity.amax(dim=dims) if dims else activity
            ctx.buffer.record_units(k, activity.device, units.reshape(-1))

    # ------------------------------------------------------------ layouts
    def _unit_dim(self, slot: Any, y: Tensor) -> int | None:
        """Which dimension holds the units: features of [N, F], channels of [N, C, ...]
        (``None`` while nothing has said it for an element-wise module's tensor)."""
        if y.dim() <= 2:
            return y.dim() - 1
        layout = slot.layout
        if layout == "inherit":
            found = self._inherited_layout(slot.index, tuple(y.shape))
            if found is None:
                return None
            layout = found
        else:
            self._learn_layout(tuple(y.shape), layout)
        return y.dim() - 1 if layout == "last" else 1

    def _learn_layout(self, shape: tuple[int, ...], layout: str) -> None:
        known = self._layout_by_shape.get(shape)
        if shape in self._ambiguous_shapes or (known is not None and known != layout):
            self._ambiguous_shapes.add(shape)
            self._layout_by_shape.pop(shape, None)
        else:
            self._layout_by_shape[shape] = layout
        units = shape[-1] if layout == "last" else shape[1]
        self._layout_signatures.add((len(shape), layout, units))

    def note_input_layout(self, slot: Any, x: Tensor) -> None:
        """A typed module reads its input in its own layout: [N, ..., F] or [N, C, ...]."""
        if slot.layout != "inherit" and x.dim() >= 3:
            self._learn_layout(tuple(x.shape), slot.layout)

    def _inherited_layout(self, k: int, shape: tuple[int, ...]) -> str | None:
        """The layout of an element-wise module's tensor: that of a typed module that made
        or read this very shape; else the one this module took before (shapes change with
        the sequence length and image size, a module's layout does not); else, with as many
        dimensions, the one whose features or channels match a typed module's, if only one
        does."""
        layout = self._layout_by_shape.get(shape) or self._slot_layout.get(k)
        if layout is None:
            last = (len(shape), "last", shape[-1]) in self._layout_signatures
            channel = (len(shape), "channel", shape[1]) in self._layout_signatures
            if last == channel:
                return None
            layout = "last" if last else "channel"
        self._slot_layout[k] = layout
        return layout

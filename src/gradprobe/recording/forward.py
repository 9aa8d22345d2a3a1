"""Forward capture: what a module's forward pre-hook and forward hook take from a recorded call.

:class:`ForwardCapture` measures the activation gate from a call's input (its pre-hook),
and from its output the output statistics, the gate of a stock ReLU/tanh/sigmoid, the
units' activity and the histogram; small outputs wait for the end of the forward and are
reduced together, shape by shape (:meth:`ForwardCapture._hold`,
:meth:`ForwardCapture._reduce_held`). What is measured of them is in the site reducers of
:mod:`gradprobe.sites` (one path for one call and a stack of calls). A failure of the
work on one call takes back that call's records and keeps the module's other calls.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from ..hooks import warn_gap
from ..sites import reduce_outputs, sum_dtype
from ..stats import SAT_THRESHOLD
from ..traversals import GAP_BOTH_SIDES
from . import kept
from .context import Context
from .tensors import first_float_tensor, first_input

__all__ = ["ForwardCapture"]

# A call's state (open_call): its pre-hook failed; or its records can no longer be taken
# back alone (_reduce_held).
_SKIPPED: Any = ("skipped",)
_UNDOABLE: Any = (-1,)

_Held = tuple[Any, Tensor, int, int]  # (slot, detached output, its version, unit dim)


def _gate_of_input(buffer: Any, kept_tensors: Any, k: int, module: nn.Module, act: Any, x: Tensor):
    """The activation's gate f'(z) from its input z (not from its output)."""
    with torch.no_grad():
        z = x.detach()
        gate = act.gate(z, act.params(module))
        if act.saturates:
            # |f'|: below 0 (GELU's, SiLU's dip) is not "saturated" (issue 22 §4).
            small = gate.abs() if act.signed_derivative else gate
            saturated = torch.count_nonzero(small < SAT_THRESHOLD * act.max_derivative)
        else:
            saturated = kept_tensors.constant(z.device, 0)
        total = gate.sum(dtype=sum_dtype(gate))
        buffer.record("gate", k, z.device, z.numel(), total, saturated)
    buffer.add_host(k, "gate_count", z.numel())
    if act.saturates:
        buffer.add_host(k, "sat_count_n", z.numel())


def warn_unreadable(ctx: Context, k: int, side: str, value: Any) -> None:
    """One warning per module whose output (or input) holds no floating-point tensor."""
    slot = ctx.slots[k]
    warn_gap(
        ctx.unreadable,
        f"{side} {k}",
        f"gradprobe: module {slot.name!r} ({slot.type}) has no floating-point tensor "
        f"in its {side} (a {type(value).__name__}): its {side} statistics are not "
        "recorded. gradprobe reads the first floating-point tensor of a module's "
        f"{side}, through tuples, lists, dicts, dataclasses and pytrees "
        "(docs/recording.md)",
    )


class ForwardCapture:
    """The module hooks' work. Collaborators: ``kept`` (kept tensors), ``units`` (Units:
    layouts), ``errors`` (ErrorCapture: a call's error hooks), ``follow`` (Follow: whether
    a module's parameters are frozen for this pass)."""

    def __init__(self, ctx: Context, kept_tensors: Any, units: Any, errors: Any, follow: Any):
        self.ctx = ctx
        self._kept = kept_tensors
        self._units = units
        self._errors = errors
        self._follow = follow
        plan = ctx.plan
        # What the plan measures: plain bools, read on the hot path.
        self._want_output = plan.output
        self._want_nonfinite = plan.nonfinite
        self._want_absmax = plan.absmax
        self._want_gate = plan.gate
        self._want_units = plan.units
        self._want_error = plan.error
        self._want_forward = plan.forward
        # Small outputs waiting for the end of the forward (see _hold), and outputs
        # watched to see whether their module leaves them alone until then.
        self._held: list[_Held] = []
        self._held_numel = 0
        self._held_epoch = 0  # how many times held outputs were reduced (drop_failed_call)
        self._watched: list[tuple[int, Tensor, int]] = []
        self._unbatched: set[int] = set()  # modules whose outputs are reduced in the hook
        self._batch_safe: set[int] = set()
        # Each module's open call: where the step's records stood as it began.
        self._call_marks: dict[int, Any] = {}
        self._errors_hooked = -1  # the module whose call has put its error hooks on
        ctx.on("forward_ended", self._on_forward_ended)
        ctx.on("step_closing", self._on_step_closing)
        ctx.on("step_discarded", self._on_step_discarded)

    # ------------------------------------------------------------ events
    def _on_forward_ended(self) -> None:
        if self._held or self._watched:
            self._reduce_held()

    def _on_step_closing(self) -> None:
        if self._held or self._watched:
            self._reduce_held()
        self._units.record_deferred()  # after the held outputs: they may defer units

    def _on_step_discarded(self, step: int, skipped: bool) -> None:
        self._held, self._held_numel, self._watched = [], 0, []

    def reduce_in_hooks(self) -> None:
        """Reduce every module's outputs in its hook from now on (no batching)."""
        self._unbatched.update(s.index for s in self.ctx.slots)

    # ------------------------------------------------------------ the hooks
    # Each hook launches only the reductions it needs and hands the 0-d results to the
    # buffer: on small layers the number of ops, not their size, is what costs.
    def on_pre(self, k: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        if self._follow.slot_frozen(k):
            return  # its parameters are frozen for this pass (gradprobe/recording/follow.py)
        # "The" input: the first floating-point tensor, positional arguments before keywords.
        x = first_input(args, kwargs)
        slot = self.ctx.slots[k]
        if slot.inplace and (self._held or self._watched):
            self._reduce_held()  # it will write over its input, which may be held
            self.open_call(k)  # anew: the batch just reduced holds no record of this call
        if x is None:
            if slot.activation is not None and self._want_gate:
                warn_unreadable(self.ctx, k, "input", args)  # the gate needs it
            return
        if x.numel() == 0:
            return  # a call on nothing (an expert given no tokens): no entry to gate
        if self._want_units:
            self._units.note_input_layout(slot, x)
        self._errors.note_input(k, x, args)
        act = slot.activation
        if act is not None and self._want_gate and slot.gate_from_output is None:
            _gate_of_input(self.ctx.buffer, self._kept, k, module, act, x)

    def on_forward(self, k: int, module: nn.Module, output: Any) -> None:
        if self._follow.slot_frozen(k):
            return  # its parameters are frozen for this pass (gradprobe/recording/follow.py)
        y = first_float_tensor(output)
        if y is None:
            warn_unreadable(self.ctx, k, "output", output)
            return
        ctx = self.ctx
        buffer = ctx.buffer
        if self._want_error:
            self._errors.owe(k, y)  # no error hooks on a first run under no_grad
        slot = ctx.slots[k]
        progress = ctx.progress
        if k not in progress.seen_slots:
            progress.seen_slots.add(k)
            progress.execution_order.append(k)
        n = y.numel()
        buffer.add_host(k, "calls")
        if n == 0:
            # A call on nothing (an expert given no tokens, an empty batch): counted, and
            # contributes no entry, no unit, no error signal: the step's means, fractions
            # and norms are over the entries that exist (docs/recording.md).
            return
        buffer.add_host(k, "count", n)
        # Detached: no graph is recorded, so no no_grad() context (it costs per call).
        yd = y.detach()
        if not self._hold(slot, yd):
            self._forward_stats(slot, yd, self._units.of(slot, yd))
        if ctx.histograms:
            lo, hi = slot.histogram_range
            counts = torch.histc(yd.float().clamp(lo, hi), buffer.histogram_bins, lo, hi)
            buffer.record_histogram(k, y.device, counts)
        if self._want_error and y.requires_grad:
            self._errors_hooked = k  # from here a failure cannot take the error back
            self._errors.hook(k, y)

    # ------------------------------------------------------------ a call that failed
    # A failure in the Probe's work on one call of a module takes back that call's records
    # and keeps the module's other calls of the step (docs/recording.md, "Compiled models,
    # failures and unusual inputs"). A call's state: where the step's records stood when
    # its work began (its pre-hook's, else its forward hook's), kept until its forward
    # hook has finished; _SKIPPED once its pre-hook failed (its forward hook does nothing).
    def open_call(self, k: int) -> None:
        """A recorded call of module ``k`` begins: note where the records stand (a few
        list lengths and the module's host counts: O(1), no device op)."""
        self._call_marks[k] = (
            self.ctx.step_index,
            self.ctx.buffer.call_mark(k),
            len(self._held),
            self._held_epoch,
            len(self._watched),
            self._units.mark(),
        )

    def begin_forward(self, k: int) -> bool:
        """The forward hook of a recorded call: False if its pre-hook failed (the call is
        left out); else it keeps the pre-hook's mark, or notes one now."""
        self._errors_hooked = -1
        state = self._call_marks.get(k)
        if state is _SKIPPED:
            del self._call_marks[k]
            return False
        if state is None or (state is not _UNDOABLE and state[0] != self.ctx.step_index):
            self.open_call(k)
        return True

    def end_forward(self, k: int) -> None:
        self._call_marks.pop(k, None)  # the call is complete: nothing to take back

    def drop_failed_call(self, k: int, pre: bool) -> bool:
        """The Probe's work on the current call of module ``k`` failed: take back what the
        call recorded, True if that was possible (else the caller gaps the module for the
        step). ``pre``: it failed in the pre-hook, so the call's forward hook skips it. A
        call whose error-signal hooks were already put on leaves the module's error
        statistics out of the step (err_gap): its signal cannot be told from the others'."""
        step = self.ctx.step_index
        state = self._call_marks.pop(k, None)
        if pre:
            self._call_marks[k] = _SKIPPED
        if self._errors_hooked == k:
            self._errors_hooked = -1
            self._errors.leave_out([k], GAP_BOTH_SIDES)
        if state is None or state is _SKIPPED or state[0] != step:
            return False
        _step, mark, held_n, epoch, watched_n, deferred_n = state
        self.ctx.buffer.drop_call(mark, k)
        if epoch != self._held_epoch:  # reduced since: what is held now came after the mark
            held_n = watched_n = 0
        dropped = [e for e in self._held[held_n:] if e[0].index == k]
        if dropped:
            self._held[held_n:] = [e for e in self._held[held_n:] if e[0].index != k]
            self._held_numel -= sum(e[1].numel() for e in dropped)
        self._watched[watched_n:] = [e for e in self._watched[watched_n:] if e[0] != k]
        self._units.drop_since(deferred_n, k)
        return True

    # ------------------------------------------------------------ held outputs
    def _hold(self, slot: Any, yd: Tensor) -> bool:
        """Keep a small output for the batched reduction at the end of the forward."""
        n = yd.numel()
        if not self._want_forward:
            return True  # nothing of the output is asked for
        if n > kept.HELD_NUMEL or slot.index in self._unbatched or n == 0:
            return False
        unit = self._units.of(slot, yd)
        if unit is None or slot.index not in self._batch_safe:
            # Units deferred (see Units.defer), or a module not yet seen to leave its
            # output alone until the forward ends: reduce now, and watch the output.
            self._forward_stats(slot, yd, unit)
            if unit is not None:
                self._watched.append((slot.index, yd, yd._version))
            return True
        self._held.append((slot, yd, yd._version, unit))
        self._held_numel += n
        if self._held_numel > kept.HELD_NUMEL_TOTAL:
            self._reduce_held()
        return True

    def _reduce_held(self) -> None:
        """Reduce the held outputs: one batch per shape, dtype, device and unit dimension.

        A module's outputs are held only once one of them was seen to stay as it was until
        the forward ended (watched on its first recorded call): an output written in place
        after its hook (``out += identity`` after a BatchNorm, in a parent's forward) is not
        what the module made. Should that still happen to a held one (control flow), its
        call is a gap, and the module is reduced in its hook from then on."""
        ctx = self.ctx
        self._held_epoch += 1
        if self._call_marks:
            # A module whose call is open (between its pre-hook and the end of its forward
            # hook: a submodule in place, 64 MiB held) gets records of earlier calls now,
            # after its mark: a failure of that call can no longer take back its own only.
            for slot, *_ in self._held:
                if self._call_marks.get(slot.index, _SKIPPED) is not _SKIPPED:
                    self._call_marks[slot.index] = _UNDOABLE
        watched, self._watched = self._watched, []
        for k, yd, version in watched:
            (self._batch_safe if yd._version == version else self._unbatched).add(k)
        self._batch_safe -= self._unbatched
        held, self._held, self._held_numel = self._held, [], 0
        groups: dict[tuple[Any, ...], list[_Held]] = defaultdict(list)
        for entry in held:
            slot, yd, version, unit = entry
            if yd._version != version:
                self._unbatched.add(slot.index)
                ctx.buffer.set_host(slot.index, "gap", 1)
                continue
            groups[(tuple(yd.shape), yd.dtype, yd.device, unit)].append(entry)
        for (_shape, _dtype, device, unit), entries in groups.items():
            try:
                with torch.no_grad():
                    if len(entries) == 1:
                        self._forward_stats(entries[0][0], entries[0][1], unit)
                    else:
                        self._forward_stats_batch(entries, device, unit)
            except Exception as exc:  # never the user's training: a gap and a warning
                for slot, *_ in entries:
                    ctx.module_failed(slot.index, "the batched forward statistics", exc)

    def _forward_stats_batch(self, entries: list[_Held], device: torch.device, unit: int) -> None:
        """The statistics of :meth:`_forward_stats` for calls of one shape, stacked.

        The stack is our own copy, in a buffer kept from step to step (a fresh one page-
        faults on every touch: it was the dearest op here); the site reducer overwrites it
        in place (|y|, then |y| ≠ 0) once the reductions that need the values are done."""
        # tanh first: their saturation is counted over a view of the stack (a slice)
        entries = sorted(entries, key=lambda e: e[0].gate_from_output != "tanh")
        first = entries[0][1]
        stack = self._kept.staging_for(first.expand(len(entries), *first.shape), "stack")
        torch.stack([e[1] for e in entries], out=stack)
        self._reduce_outputs([e[0] for e in entries], stack, unit, True)

    def _forward_stats(self, slot: Any, yd: Tensor, unit: int | None) -> None:
        """Output, non-finite, gate (from the output) and unit statistics of one call: a
        stack of one, reduced as the batches are (:meth:`_reduce_outputs`)."""
        with torch.no_grad():
            self._reduce_outputs([slot], yd.unsqueeze(0), -1 if unit is None else unit, False)
            if unit is None:
                self._units.defer(slot, yd)

    def _reduce_outputs(self, slots: list[Any], stack: Tensor, unit: int, owned: bool) -> None:
        """Record what the plan wants of the calls of ``slots``, stacked in ``stack``
        (``owned``: our copy, which the reducer may overwrite; else the user's output)."""
        kept_tensors, buffer = self._kept, self.ctx.buffer
        kinds = ["out"] if self._want_output else ["nonfinite"] if self._want_nonfinite else []
        if self._want_absmax:
            kinds.append("absmax")
        gates = [s.gate_from_output for s in slots]
        if self._want_gate and any(gates):
            kinds.append("gate")
        ks = [s.index for s in slots]
        device, n = stack.device, stack.numel() // len(slots)
        reduced = reduce_outputs(
            stack,
            kinds,
            constant=kept_tensors.constant,
            index=kept_tensors.index,
            gates=gates,
            unit=unit,
            exact=self.ctx.exact_counts,
            owned=owned,
            compare=(lambda like: kept_tensors.staging_for(like, "compare")) if owned else None,
            counts_buffer=None if owned else kept_tensors.count_buffer,
        )
        for kind, fields in reduced.fields.items():
            buffer.record_many(kind, ks, device, n, *fields)
        for name, rows, gate_sum, saturated in reduced.gates:
            buffer.record_many("gate", [ks[i] for i in rows], device, n, gate_sum, saturated)
            for i in rows:
                buffer.add_host(ks[i], "gate_count", n)
                if name != "relu":  # a ReLU never saturates
                    buffer.add_host(ks[i], "sat_count_n", n)
        if reduced.units is not None:
            for k in ks:
                self._units.note_kind(k, unit, stack.dim() - 1)
            buffer.record_units_many(ks, device, reduced.units)

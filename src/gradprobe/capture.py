"""What the hooks capture: the module hooks' and error-signal hooks' work for a recorded step.

:class:`Capture` is a part of :class:`gradprobe.Probe` (a mixin; the Probe owns the state
it reads): what a module's forward pre-hook and forward hook take from a call (the
activation gate, the output's statistics, per-unit activity), how small outputs wait for
the end of the forward and are reduced together (:meth:`Capture._hold`,
:meth:`Capture._reduce_held`), and the error signals dL/d(output) and the module's own
share of dL/d(input), measured when their backward pass ends. What is measured of them is
in the site reducers of :mod:`gradprobe.sites` (one path for one call and a stack of
calls), the norms in :mod:`gradprobe.reduce`; where a step begins and ends is in
:mod:`gradprobe.step`.
The hook functions here are module-level and hold a weak reference to the Probe and a
slot index, never a module or a tensor.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree

from . import sites
from .activations import Activation
from .hooks import Site, at_backward_end, on_node, on_node_pre, on_tensor, warn_gap
from .reduce import _COUNT_CHUNK
from .sites import nonfinite, reduce_errors, reduce_outputs, sum_dtype
from .stats import SAT_THRESHOLD
from .traversals import GAP_BOTH_SIDES, GAP_INPUT_SIDE, consumer_edges, input_edge

if TYPE_CHECKING:
    from .probe import Probe

__all__ = ["Capture"]


_PREFERRED_KEYS = ("logits", "last_hidden_state")


_SKIPPED_KEYS = frozenset({"loss"})


# A call's state (Capture._open_call): its pre-hook failed; or its records can no longer
# be taken back alone (Capture._reduce_held).
_SKIPPED: Any = ("skipped",)
_UNDOABLE: Any = (-1,)

_MAX_NESTING = 32  # deeper than any real output; guards against self-referencing objects


@dataclass(frozen=True)
class _Slot:
    """A probed module, by name: what the hooks need to know about it."""

    index: int
    name: str
    type: str
    activation: Activation | None
    layout: str  # "last", "channel" or "inherit" (element-wise: like the tensor it received)
    histogram_range: tuple[float, float]
    # The activation's gate read from its output (gradprobe/sites.py), or None: from z.
    gate_from_output: str | None = None
    inplace: bool = False  # an in-place module writes over its input


def _first_float_tensor(value: Any, depth: int = 0) -> Tensor | None:
    """ "The" tensor of a module's output (or input): the first floating-point tensor in
    pytree order, see docs/recording.md ("Inputs and outputs").

    Tuples and lists in order; mappings at ``logits``, then ``last_hidden_state``, then
    their other values in insertion order, never at ``loss``; dataclasses in field order;
    any other type registered with ``torch.utils._pytree`` in its flattening order.
    """
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    if value is None or depth > _MAX_NESTING or isinstance(value, (str, bytes, int, float)):
        return None
    if isinstance(value, (tuple, list)):
        children: Iterable[Any] = value
    elif isinstance(value, Mapping):
        first = [value[key] for key in _PREFERRED_KEYS if key in value]
        rest = [
            v for key, v in value.items() if key not in _PREFERRED_KEYS and key not in _SKIPPED_KEYS
        ]
        children = first + rest
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
        children = [c for c in children if c is not None]
    else:
        node = _pytree.SUPPORTED_NODES.get(type(value))
        if node is None:
            return None
        children, _context = node.flatten_fn(value)
    for item in children:
        found = _first_float_tensor(item, depth + 1)
        if found is not None:
            return found
    return None


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """:func:`_first_float_tensor` of a call's arguments, positional before keywords; the
    common call (a float tensor first) without the walk."""
    if args:
        first = args[0]
        if isinstance(first, Tensor) and first.is_floating_point():
            return first
    return _first_float_tensor((args, kwargs))


def _inside_backward() -> bool:
    """Whether this thread is running a backward pass: autograd's current graph task.

    A module's forward that runs inside backward is activation checkpointing recomputing
    it (``torch.utils.checkpoint``, either ``use_reentrant``), not a new pass.
    """
    return torch._C._current_graph_task_id() != -1


# The entry points of the error signals (gradprobe.hooks.Entry guards each): a failure
# leaves the module's error statistics out of the step (all of them, or error_gain only).
_OUTPUT_ERROR_SITE = Site("backward (output) hook", "errors")
_INPUT_ERROR_SITE = Site("backward (input) hook", "input_errors")
_ERRORS_END_SITE = Site("the end of backward (errors)", "all_errors")


def _error_grad_hook(probe: Probe, k: int, token: int, kind: str, grad: Tensor) -> None:
    """A tensor hook: dL/d(output) (``kind`` "err"), or dL/d(input) of a module whose
    input passes through it unchanged ("in_err")."""
    probe._on_error_grad(k, grad, kind, token)


def _error_prehook(
    probe: Probe,
    k: int,
    token: int,
    kind: str,
    output_nr: int,
    grad_outputs: Sequence[Tensor | None],
) -> None:
    """:func:`_error_grad_hook` as a pre-hook of the output's autograd node: the node's
    gradient for that output, all of it (autograd adds every reader's before the node
    runs). Registered on the node, not the tensor: half the cost per call (bench/)."""
    grad = grad_outputs[output_nr]
    if grad is not None:  # the node also runs for its other outputs' gradients
        probe._on_error_grad(k, grad, kind, token)


def _input_share_hook(
    probe: Probe,
    k: int,
    token: int,
    indices: tuple[int, ...],
    nodes: int,
    producer: int,
    grad_inputs: Sequence[Tensor | None],
    grad_outputs: Sequence[Tensor | None],
) -> None:
    """On an autograd node of module ``k`` that reads its input: ``grad_inputs[i]`` for
    ``i`` in ``indices`` is the gradient this node sends to that input. ``producer``: the
    token of the probed call whose output that input is, or -1 (Capture._on_input_share)."""
    probe._on_input_share(k, token, indices, nodes, grad_inputs, producer)


def _errors_end_hook(probe: Probe, task: int, step: int) -> None:
    if not probe._closed:
        probe._commit_errors(task, step)


@dataclass
class _Batch:
    """The norms of a backward pass's deferred error signals, and their NaN/Inf flags."""

    norms: Tensor
    flags: Tensor


class Capture:
    # ================================================================ module hooks
    # Each hook launches only the reductions it needs and hands the 0-d results to the
    # buffer: on small layers the number of ops, not their size, is what costs.
    def _on_recomputed_pre(self, k: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Checkpointing re-runs this forward inside backward: its statistics were taken in
        the first run. Only an owed error-signal hook (see _on_recomputed) needs the input."""
        x = _first_input(args, kwargs)
        owed = self._owed_error_hooks.get(k) and self._want_input_error
        if owed and x is not None and x.requires_grad:
            self._traversals.input_edges[k] = input_edge(x)  # its own share: see _hook_errors

    def _on_recomputed(self, k: int, output: Any) -> None:
        """Activation checkpointing's recomputation, inside backward: calls, activation and
        unit statistics were recorded by the first run and are not doubled. The first run's
        error-signal hooks fire on the original graph (``use_reentrant=False``); a first run
        under no_grad (``use_reentrant=True``) had none: they are owed, and hooked here, on
        the graph that the checkpoint's own backward traverses."""
        if not self._owed_error_hooks.get(k):
            return
        self._owed_error_hooks[k] -= 1
        y = _first_float_tensor(output)
        if y is not None and self._want_error and y.requires_grad:
            self._hook_errors(k, y)

    def _on_pre(
        self, k: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._slot_frozen(k):
            return  # its parameters are frozen for this pass (gradprobe/follow.py)
        # "The" input: the first floating-point tensor, positional arguments before keywords.
        x = _first_input(args, kwargs)
        slot = self._slots[k]
        if slot.inplace and (self._held or self._watched):
            self._reduce_held()  # it will write over its input, which may be held
            self._open_call(k)  # anew: the batch just reduced holds no record of this call
        if x is None:
            if slot.activation is not None and self._want_gate:
                self._unreadable_module(k, "input", args)  # the gate needs it
            return
        if x.numel() == 0:
            return  # a call on nothing (an expert given no tokens): no entry to gate
        if self._want_units:
            self._note_input_layout(slot, x)
        if self._want_input_error and x.requires_grad:
            self._traversals.input_edges[k] = input_edge(x)  # its own share: see _hook_errors
        act = slot.activation
        if act is not None and self._want_gate and slot.gate_from_output is None:
            with torch.no_grad():
                z = x.detach()
                gate = act.gate(z, act.params(module))
                if act.saturates:
                    # |f'|: below 0 (GELU's, SiLU's dip) is not "saturated" (issue 22 §4).
                    small = gate.abs() if act.signed_derivative else gate
                    saturated = torch.count_nonzero(small < SAT_THRESHOLD * act.max_derivative)
                else:
                    saturated = self._zero(z.device)
                total = gate.sum(dtype=sum_dtype(gate))
                self.buffer.record("gate", k, z.device, z.numel(), total, saturated)
            self.buffer.add_host(k, "gate_count", z.numel())
            if act.saturates:
                self.buffer.add_host(k, "sat_count_n", z.numel())

    def _on_forward(self, k: int, module: nn.Module, output: Any) -> None:
        if self._slot_frozen(k):
            return  # its parameters are frozen for this pass (gradprobe/follow.py)
        y = _first_float_tensor(output)
        if y is None:
            self._unreadable_module(k, "output", output)
            return
        if self._want_error and not y.requires_grad and not torch.is_grad_enabled():
            # A first run under no_grad inside a trained pass (reentrant checkpointing):
            # only its recomputation pays this (_on_recomputed); reset at the step's end.
            self._owed_error_hooks[k] += 1
        slot = self._slots[k]
        if k not in self._seen_slots:
            self._seen_slots.add(k)
            self._execution_order.append(k)
        n = y.numel()
        self.buffer.add_host(k, "calls")
        if n == 0:
            # A call on nothing (an expert given no tokens, an empty batch): counted, and
            # contributes no entry, no unit, no error signal: the step's means, fractions
            # and norms are over the entries that exist (docs/recording.md).
            return
        self.buffer.add_host(k, "count", n)
        # Detached: no graph is recorded, so no no_grad() context (it costs per call).
        yd = y.detach()
        if not self._hold(slot, yd):
            self._forward_stats(slot, yd, self._units_of(slot, yd))
        if self.histograms:
            lo, hi = slot.histogram_range
            counts = torch.histc(yd.float().clamp(lo, hi), self.buffer.histogram_bins, lo, hi)
            self.buffer.record_histogram(k, y.device, counts)
        if self._want_error and y.requires_grad:
            self._errors_hooked = k  # from here a failure cannot take the error back
            self._hook_errors(k, y)

    # ------------------------------------------------------------ a call that failed
    # A failure in the Probe's work on one call of a module takes back that call's records
    # and keeps the module's other calls of the step (docs/recording.md, "Compiled models,
    # failures and unusual inputs"). A call's state: where the step's records stood when
    # its work began (its pre-hook's, else its forward hook's), kept until its forward
    # hook has finished; _SKIPPED once its pre-hook failed (its forward hook does nothing).
    def _open_call(self, k: int) -> None:
        """A recorded call of module ``k`` begins: note where the records stand (a few
        list lengths and the module's host counts: O(1), no device op)."""
        self._call_marks[k] = (
            self.step_index,
            self.buffer.call_mark(k),
            len(self._held),
            self._held_epoch,
            len(self._watched),
            len(self._deferred_units),
        )

    def _begin_forward(self, k: int) -> bool:
        """The forward hook of a recorded call: False if its pre-hook failed (the call is
        left out); else it keeps the pre-hook's mark, or notes one now."""
        self._errors_hooked = -1
        state = self._call_marks.get(k)
        if state is _SKIPPED:
            del self._call_marks[k]
            return False
        if state is None or (state is not _UNDOABLE and state[0] != self.step_index):
            self._open_call(k)
        return True

    def _end_forward(self, k: int) -> None:
        self._call_marks.pop(k, None)  # the call is complete: nothing to take back

    def _drop_failed_call(self, k: int, pre: bool) -> bool:
        """The Probe's work on the current call of module ``k`` failed: take back what the
        call recorded, True if that was possible (else the caller gaps the module for the
        step). ``pre``: it failed in the pre-hook, so the call's forward hook skips it. A
        call whose error-signal hooks were already put on leaves the module's error
        statistics out of the step (err_gap): its signal cannot be told from the others'."""
        state = self._call_marks.pop(k, None)
        if pre:
            self._call_marks[k] = _SKIPPED
        if self._errors_hooked == k:
            self._errors_hooked = -1
            self.buffer.set_host(
                k, "err_gap", self._traversals.gap(k, GAP_BOTH_SIDES, self.step_index)
            )
        if state is None or state is _SKIPPED or state[0] != self.step_index:
            return False
        _step, mark, held_n, epoch, watched_n, deferred_n = state
        self.buffer.drop_call(mark, k)
        if epoch != self._held_epoch:  # reduced since: what is held now came after the mark
            held_n = watched_n = 0
        dropped = [e for e in self._held[held_n:] if e[0].index == k]
        if dropped:
            self._held[held_n:] = [e for e in self._held[held_n:] if e[0].index != k]
            self._held_numel -= sum(e[1].numel() for e in dropped)
        self._watched[watched_n:] = [e for e in self._watched[watched_n:] if e[0] != k]
        self._deferred_units[deferred_n:] = [
            e for e in self._deferred_units[deferred_n:] if e[0] != k
        ]
        return True

    # Outputs of at most this many entries wait for the end of the forward, and are
    # reduced there, shape by shape, a few ops for all of them (bench/: on a 12×256 MLP
    # the per-module ops, not their size, were the cost). They are held, not copied; a
    # hold is checked against the tensor's version counter before it is read.
    _HELD_NUMEL = 1 << 16
    _HELD_NUMEL_TOTAL = 1 << 24  # 64 MiB of float32 at most: then reduce what is held

    def _units_of(self, slot: _Slot, yd: Tensor) -> int | None:
        """The unit dimension of this call (``-1``: not recorded), learned in call order."""
        if not self._want_units or yd.dim() < 1:
            return -1
        return self._unit_dim(slot, yd)

    def _hold(self, slot: _Slot, yd: Tensor) -> bool:
        """Keep a small output for the batched reduction at the end of the forward."""
        n = yd.numel()
        if not self._want_forward:
            return True  # nothing of the output is asked for
        if n > self._HELD_NUMEL or slot.index in self._unbatched or n == 0:
            return False
        unit = self._units_of(slot, yd)
        if unit is None or slot.index not in self._batch_safe:
            # Units deferred (see _record_units), or a module not yet seen to leave its
            # output alone until the forward ends: reduce now, and watch the output.
            self._forward_stats(slot, yd, unit)
            if unit is not None:
                self._watched.append((slot.index, yd, yd._version))
            return True
        self._held.append((slot, yd, yd._version, unit))
        self._held_numel += n
        if self._held_numel > self._HELD_NUMEL_TOTAL:
            self._reduce_held()
        return True

    def _reduce_held(self) -> None:
        """Reduce the held outputs: one batch per shape, dtype, device and unit dimension.

        A module's outputs are held only once one of them was seen to stay as it was until
        the forward ended (watched on its first recorded call): an output written in place
        after its hook (``out += identity`` after a BatchNorm, in a parent's forward) is not
        what the module made. Should that still happen to a held one (control flow), its
        call is a gap, and the module is reduced in its hook from then on."""
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
        groups: dict[tuple[Any, ...], list[tuple[_Slot, Tensor, int, int]]] = defaultdict(list)
        for entry in held:
            slot, yd, version, unit = entry
            if yd._version != version:
                self._unbatched.add(slot.index)
                self.buffer.set_host(slot.index, "gap", 1)
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
                    self._module_failed(slot.index, "the batched forward statistics", exc)

    def _forward_stats_batch(
        self, entries: list[tuple[_Slot, Tensor, int, int]], device: torch.device, unit: int
    ) -> None:
        """The statistics of :meth:`_forward_stats` for calls of one shape, stacked.

        The stack is our own copy, in a buffer kept from step to step (a fresh one page-
        faults on every touch: it was the dearest op here); the site reducer overwrites it
        in place (|y|, then |y| ≠ 0) once the reductions that need the values are done."""
        # tanh first: their saturation is counted over a view of the stack (a slice)
        entries = sorted(entries, key=lambda e: e[0].gate_from_output != "tanh")
        self._reduce_outputs([e[0] for e in entries], self._staging(entries), unit, True)

    def _reduce_outputs(self, slots: list[_Slot], stack: Tensor, unit: int, owned: bool) -> None:
        """Record what the plan wants of the calls of ``slots``, stacked in ``stack``
        (``owned``: our copy, which the reducer may overwrite; else the user's output)."""
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
            constant=self._constant,
            index=self._index,
            gates=gates,
            unit=unit,
            exact=self.exact_counts,
            owned=owned,
            compare=(lambda like: self._staging_for(like, "compare")) if owned else None,
            counts_buffer=None if owned else self._count_buffer,
        )
        for kind, fields in reduced.fields.items():
            self.buffer.record_many(kind, ks, device, n, *fields)
        for name, rows, gate_sum, saturated in reduced.gates:
            self.buffer.record_many("gate", [ks[i] for i in rows], device, n, gate_sum, saturated)
            for i in rows:
                self.buffer.add_host(ks[i], "gate_count", n)
                if name != "relu":  # a ReLU never saturates
                    self.buffer.add_host(ks[i], "sat_count_n", n)
        if reduced.units is not None:
            for k in ks:
                self._note_unit_kind(k, unit, stack.dim() - 1)
            self.buffer.record_units_many(ks, device, reduced.units)

    def _index(self, rows: list[int], device: torch.device) -> Tensor:
        """An index tensor, made once per pattern (no host-to-device copy per step)."""
        key = (tuple(rows), device)
        index = self._index_tensors.get(key)
        if index is None:
            if len(self._index_tensors) >= 256:  # patterns that do not repeat: keep a few
                self._index_tensors.clear()
            index = self._index_tensors[key] = torch.tensor(rows, device=device)
        return index

    def _staging(self, entries: list[tuple[_Slot, Tensor, int, int]]) -> Tensor:
        """``torch.stack`` of the held outputs into a buffer kept for their shape (grown
        when more calls come); its memory is counted in the run's meta."""
        first = entries[0][1]
        out = self._staging_for(first.expand(len(entries), *first.shape), "stack")
        torch.stack([e[1] for e in entries], out=out)
        return out

    def _staging_for(self, like: Tensor, role: str) -> Tensor:
        """A buffer of ``like``'s shape, dtype and device for ``role``, kept from step to
        step (grown when more calls come); its memory is counted in the run's meta."""
        key = (role, tuple(like.shape[1:]), like.dtype, like.device)
        buffer = self._staging_buffers.get(key)
        if buffer is None or buffer.shape[0] < like.shape[0]:
            buffer = torch.empty(tuple(like.shape), dtype=like.dtype, device=like.device)
            self._keep_staging(key, buffer)
        return buffer[: like.shape[0]]

    def _keep_staging(self, key: tuple[Any, ...], buffer: Tensor) -> None:
        """Keep ``buffer`` from step to step under ``key``; the run's meta says how many
        bytes all kept staging buffers hold (``probe.staging_bytes``)."""
        self._staging_buffers[key] = buffer
        held = sum(b.numel() * b.element_size() for b in self._staging_buffers.values())
        self._meta["probe"]["staging_bytes"] = held

    def _forward_stats(self, slot: _Slot, yd: Tensor, unit: int | None) -> None:
        """Output, non-finite, gate (from the output) and unit statistics of one call: a
        stack of one, reduced as the batches are (:meth:`_reduce_outputs`)."""
        with torch.no_grad():
            self._reduce_outputs([slot], yd.unsqueeze(0), -1 if unit is None else unit, False)
            if unit is None:
                self._record_units(slot, yd, unit)

    def _count_buffer(self, per_row: int) -> Tensor:
        """The kept float buffer of the one-pass unit counts (gradprobe/reduce.py), of at
        least a chunk and one sample's slice, shared by every large CPU output."""
        need = max(_COUNT_CHUNK, per_row)
        key = ("count", torch.device("cpu"))
        buffer = self._staging_buffers.get(key)
        if buffer is None or buffer.numel() < need:
            buffer = torch.empty(need)
            self._keep_staging(key, buffer)
        return buffer

    def _zero(self, device: torch.device) -> Tensor:
        return self._constant(device, 0)

    def _constant(self, device: torch.device, value: int) -> Tensor:
        """A 0-d tensor of 0 or 1 to record (the buffer stacks copies: it is never written)."""
        constant = self._zeros.get((device, value))
        if constant is None:
            constant = self._zeros[(device, value)] = torch.full((), float(value), device=device)
        return constant

    def _record_units(self, slot: _Slot, y: Tensor, unit: int | None) -> None:
        """Units of a call whose layout is not known yet (``unit`` None): an element-wise
        module on a tensor no module has shown the layout of (the model's input, first
        step). The batch dimension is reduced now, the rest when the step closes, by when
        the module that reads this tensor has said (the others: the site reducer)."""
        self._deferred_units.append((slot.index, tuple(y.shape), sites.activity(y, (0,))))

    def _note_unit_kind(self, k: int, unit: int, dims: int) -> None:
        if k not in self._unit_kinds:  # host-only, once per module
            self._unit_kinds[k] = "channel" if unit == 1 and dims >= 3 else "feature"

    def _record_deferred_units(self) -> None:
        """Units of the calls whose layout was not known in their hook (see _record_units)."""
        deferred, self._deferred_units = self._deferred_units, []
        for k, shape, activity in deferred:
            layout = self._inherited_layout(k, shape)
            if layout is None and shape in self._ambiguous_shapes:
                # Features-last and channels share this shape and this module has shown
                # neither yet: its units are unknown, so no units rather than wrong ones.
                name = self._slots[k].name
                warn_gap(
                    self._failed_where,
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
            if k not in self._unit_kinds:
                self._unit_kinds[k] = "channel" if unit == 1 else "feature"
            dims = tuple(d - 1 for d in range(1, len(shape)) if d != unit)
            units = activity.amax(dim=dims) if dims else activity
            self.buffer.record_units(k, activity.device, units.reshape(-1))

    def _unit_dim(self, slot: _Slot, y: Tensor) -> int | None:
        """Which dimension holds the units: features of [N, F], channels of [N, C, ...].

        Units are features or channels: they do not change with the batch size, the
        sequence length or the image size. A typed module (Linear, Conv, ...) knows its
        layout; an element-wise one (ReLU, Dropout, ...) takes the layout of the tensor it
        received (see :meth:`_inherited_layout`), or ``None`` while nothing has said it yet.
        """
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

    def _note_input_layout(self, slot: _Slot, x: Tensor) -> None:
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

    # ---------------------------------------------------------------- error signals
    # What a step's error signal is when autograd traverses a tensor more than once:
    # gradprobe/traversals.py and docs/recording.md.
    def _hook_errors(self, k: int, y: Tensor) -> None:
        """A tensor hook on the output (dL/d(output), all of it, whoever else reads ``y``)
        and hooks on the module's own autograd nodes that read its input (its share of
        dL/d(input), not what other readers of that tensor add)."""
        token = self._traversals.new_token()
        edge = self._traversals.input_edges.pop(k, None)
        fn = y.grad_fn
        if fn is None:  # a leaf (a module that returns a parameter): a tensor hook
            on_tensor(y, _error_grad_hook, self._ref, _OUTPUT_ERROR_SITE, k, k, token, "err")
            return
        output_nr = y.output_nr
        on_node_pre(
            fn, _error_prehook, self._ref, _OUTPUT_ERROR_SITE, k, k, token, "err", output_nr
        )
        sequence_nr = fn._sequence_nr()
        output_edges = self._traversals.output_edges
        output_edges[(sequence_nr, output_nr)] = token
        if edge is None:
            return
        if edge.leaf_id is None and (sequence_nr, output_nr) == (edge.sequence_nr, edge.output_nr):
            # The input passed through (an identity): the same signal.
            on_node_pre(
                fn, _error_prehook, self._ref, _INPUT_ERROR_SITE, k, k, token, "in_err", output_nr
            )
            return
        readers = consumer_edges(fn, edge)
        if readers is None:
            self._error_gap(
                k,
                GAP_INPUT_SIDE,
                "large graph",
                f"the autograd graph of `{self._slots[k].name}` is too large to find the "
                "module's own share of dL/d(input): its error_gain is not recorded (probe "
                "its submodules instead)",
            )
            return
        # Read by one node of this module: its share may be the producer's whole signal.
        producer = -1
        if len(readers) == 1 and edge.leaf_id is None:
            producer = output_edges.get((edge.sequence_nr, edge.output_nr), -1)
        for node, indices in readers:
            on_node(
                node,
                _input_share_hook,
                self._ref,
                _INPUT_ERROR_SITE,
                k,
                *(k, token, indices, len(readers), producer),
            )

    def _on_error_grad(self, k: int, grad: Tensor, kind: str, token: int) -> None:
        if self._closed:
            return
        pending = self._pending_errors()
        if kind == "err" and pending.shared and self._same_as_share(pending, k, token, grad):
            return  # (a share kept for this call is dropped either way: no gradient outlives it)
        self._record_error(pending, kind, k, token, grad.detach())

    def _same_as_share(self, pending: Any, k: int, token: int, grad: Tensor) -> bool:
        """Record dL/d(output) of module ``k`` from a reader's share of it, if ``grad`` is
        that very tensor, unchanged: autograd handed the reader's gradient on as it was,
        so nothing else was added to it. Saves a pass over the tensor (a norm per layer
        of a chain: on the bench CNN, ~1 ms each)."""
        entry = pending.shared.pop(token, None)
        if entry is None:
            return False
        share, version, index, finite = entry
        if share is not grad or grad._version != version:
            return False
        record = ("err", k, token, grad.device, grad.numel())
        values = pending.records[index][-1]
        if values:  # measured in its hook: the flag comes with the norm
            norm = values[0]
            flag = nonfinite(grad, norm, finite, self.exact_counts, self._constant)
            pending.records.append((*record, (norm, flag)))
        else:  # waits for the pass's end: so does this one
            pending.aliases[len(pending.records)] = index
            pending.records.append((*record, ()))
        return True

    def _record_error(
        self,
        pending: Any,
        kind: str,
        k: int,
        token: int,
        g: Tensor,
        source: Tensor | None = None,
        producer: int = -1,
    ) -> None:
        """The norm of one error signal: now, or (small, and its module's signals seen to
        stay as they came until the pass ends) with the others at the pass's end.
        ``source``: the tensor autograd handed on, kept until the call ``producer`` (a
        token) receives its own signal, to be recognised there (_same_as_share)."""
        record = (kind, k, token, g.device, g.numel())
        small = g.numel() <= self._HELD_NUMEL and not self.exact_counts
        room = self._deferred_numel + g.numel() <= self._HELD_NUMEL_TOTAL
        index = len(pending.records)
        if small and room and (kind, k) in self._errors_batch_safe:
            self._deferred_numel += g.numel()
            pending.deferred[index] = (g, g._version)
            pending.records.append((*record, ()))
            if source is not None:
                pending.shared[producer] = (source, source._version, index, None)
            return
        # On the input side the norm itself carries NaN/Inf (a NaN/Inf error_gain where
        # dL/d(output) is finite). ``g`` is detached.
        values, finite = reduce_errors(kind, g, self.exact_counts, self._constant)
        pending.records.append((*record, values))
        if source is not None and not self.exact_counts:
            pending.shared[producer] = (source, source._version, index, finite)
        if small and (kind, k) not in self._errors_unbatched:
            pending.watched.append((kind, k, g, g._version))

    def _resolve_deferred(self, pending: Any) -> None:
        """Norms of the deferred error signals, one batched pass per device and dtype. One
        changed in place since it came is not the module's signal: a gap for that step,
        and the module's signals are measured at once from then on."""
        for kind, k, g, version in pending.watched:
            safe = g._version == version
            (self._errors_batch_safe if safe else self._errors_unbatched).add((kind, k))
        self._errors_batch_safe -= self._errors_unbatched
        self._deferred_numel = 0
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, (g, version) in pending.deferred.items():
            kind, k = pending.records[i][0], pending.records[i][1]
            if g._version != version:
                self._errors_unbatched.add((kind, k))
                self._errors_batch_safe.discard((kind, k))
                continue
            groups[(g.device, g.dtype)].append(i)
        for indices in groups.values():
            with torch.no_grad():
                signals = [pending.deferred[i][0] for i in indices]
                # "err" fields: the flags serve dL/d(output); deferral is off under "full"
                (norms, flags), _ = reduce_errors("err", signals, False, self._constant)
            # Not split into 0-d tensors: each record points into the batch's vectors,
            # and _commit_errors takes them out with one index per statistic.
            batch = _Batch(norms, flags)
            for j, i in enumerate(indices):
                pending.records[i] = (*pending.records[i][:5], (batch, j))
        for i, source in pending.aliases.items():  # the same tensor's norm (_same_as_share)
            values = pending.records[source][-1]
            if values:  # else a gap, as its source's
                pending.records[i] = (*pending.records[i][:5], values)
        pending.deferred, pending.aliases, pending.shared = {}, {}, {}

    def _on_input_share(
        self,
        k: int,
        token: int,
        indices: tuple[int, ...],
        nodes: int,
        grad_inputs: Sequence[Tensor | None],
        producer: int = -1,
    ) -> None:
        """One of the module's nodes that read its input has run: add its gradients.
        ``producer`` (≥ 0): the input is that probed call's output and this node its
        module's one reader; the very tensor it hands on is kept to be recognised when the
        producer's own signal comes (_same_as_share), and let go then."""
        if self._closed:
            return
        grads = [grad_inputs[i] for i in indices if grad_inputs[i] is not None]
        if not grads:
            return
        share = grads[0].detach()  # detached: no graph, so no no_grad() context
        for g in grads[1:]:
            share = share + g.detach()
        pending = self._pending_errors()
        total = self._traversals.add_share(pending, k, token, nodes, share)
        if total is None:
            return
        source = grads[0] if producer >= 0 and len(grads) == 1 else None
        self._record_error(pending, "in_err", k, token, total, source, producer)

    def _pending_errors(self) -> Any:
        """The current backward pass's waiting results; its end is queued on first use."""
        task = torch._C._current_graph_task_id()
        pending, new = self._traversals.task(task)
        if new and (self._held or self._watched):
            self._reduce_held()  # backward began: the forward's held outputs are complete
        if new:
            at_backward_end(
                _errors_end_hook, self._ref, _ERRORS_END_SITE, -1, task, self.step_index
            )
        return pending

    def _note_accumulation(self, param: Tensor | None = None) -> None:
        """A ``.grad`` was accumulated: this backward pass's error signals count. At the
        pass's first accumulation, were the gradients of the passes before discarded
        (``param``: the one accumulated now; gradprobe/follow.py)?"""
        task = torch._C._current_graph_task_id()
        accumulating = self._traversals.accumulating
        if task not in accumulating:
            if param is not None and self._grad_marker is not None and not self._searching:
                self._check_discarded(param)
            accumulating.add(task)

    def _commit_errors(self, task: int, step: int) -> None:
        """A backward pass ended: keep its error signals if it accumulated into ``.grad``."""
        traversals = self._traversals
        pending = traversals.pending.pop(task, None)
        # A model with no trainable parameter accumulates nothing: its passes all count.
        counts = task in traversals.accumulating or not any(p.requires_grad for p in self._params)
        traversals.accumulating = {t for t in traversals.accumulating if t in traversals.pending}
        if pending is None or not counts or step != self.step_index or not self._recording:
            return  # torch.autograd.grad, or a pass that outlived its step
        self._resolve_deferred(pending)
        for k, _token in pending.shares:
            self._error_gap(
                k,
                GAP_INPUT_SIDE,
                "partial share",
                f"only some of `{self._slots[k].name}`'s own nodes that read its input ran "
                "in a backward pass: its error_gain is not recorded for that step",
            )
        # Records measured in a batch, by kind and batch: (slots, counts, rows).
        batched: dict[tuple[str, int], tuple[_Batch, list[int], list[int], list[int]]] = {}
        for kind, k, token, device, numel, values in pending.records:
            if not values:  # deferred, and changed in place before the pass ended
                side = GAP_BOTH_SIDES if kind == "err" else GAP_INPUT_SIDE
                self.buffer.set_host(k, "err_gap", traversals.gap(k, side, step))
                continue
            if not traversals.first_commit(kind, token, step):
                self._error_gap(
                    k,
                    GAP_BOTH_SIDES,
                    "retraversal",
                    f"the output of `{self._slots[k].name}` was traversed by two backward "
                    "passes in one step (a retained graph: backward(retain_graph=True) and "
                    "another backward()); the step's error signal is their sum, whose norm "
                    "needs both gradients at once, so error_norm and error_gain are not "
                    "recorded for such a step (sum the losses and call backward() once to "
                    "have them; see docs/recording.md)",
                )
                continue
            self.buffer.add_host(k, f"{kind}_calls")
            if isinstance(values[0], _Batch):
                batch, row = values
                entry = batched.get((kind, id(batch)))
                if entry is None:
                    entry = batched[(kind, id(batch))] = (batch, [], [], [])
                entry[1].append(k)
                entry[2].append(numel)
                entry[3].append(row)
                continue
            self.buffer.record(kind, k, device, numel, *values)
        for (kind, _), (batch, ks, counts, rows) in batched.items():
            device = batch.norms.device
            index = self._index(rows, device)  # made once per pattern of rows
            norms = batch.norms.index_select(0, index)
            if kind == "err":
                flags = batch.flags.index_select(0, index)
                self.buffer.record_many(kind, ks, device, counts, norms, flags)
            else:
                self.buffer.record_many(kind, ks, device, counts, norms)

    def _error_gap(self, k: int, level: float, cause: str, message: str) -> None:
        """Leave module ``k``'s error statistics out of this step, with one warning."""
        self.buffer.set_host(k, "err_gap", self._traversals.gap(k, level, self.step_index))
        self._traversals.warn_once(cause, message)

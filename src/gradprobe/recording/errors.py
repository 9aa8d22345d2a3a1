"""Error-signal capture: dL/d(output) and the module's own share of dL/d(input), per call.

:class:`ErrorCapture` hooks, for each recorded call, the output's autograd node (its
gradient for that output: dL/d(output), whoever else reads the tensor) and the module's
own nodes that read its input (its share of dL/d(input), ``error_gain``). The norms are
taken in the hooks, or (small signals of modules seen to leave them alone) batched when
the backward pass ends; a pass's signals are kept only if it accumulated into ``.grad``
(``torch.autograd.grad`` does not train). What a step's signal is when autograd traverses
a tensor more than once: gradprobe/traversals.py and docs/recording.md.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..hooks import Site, at_backward_end, on_node, on_node_pre, on_tensor
from ..sites import nonfinite, reduce_errors
from ..traversals import GAP_BOTH_SIDES, GAP_INPUT_SIDE, Traversals, consumer_edges, input_edge
from . import kept
from .context import Context, inside_backward
from .sequences import TimeErrors
from .tensors import first_float_tensor, first_input

__all__ = ["ErrorCapture"]

# The entry points of the error signals (Entry guards each; the owner is the hook
# registration, whose ``errors`` is this component): a failure leaves the module's error
# statistics out of the step (all of them, or error_gain only).
_OUTPUT_ERROR_SITE = Site("backward (output) hook", "errors")
_INPUT_ERROR_SITE = Site("backward (input) hook", "input_errors")
_ERRORS_END_SITE = Site("the end of backward (errors)", "all_errors")


def _error_grad_hook(owner: Any, k: int, token: int, kind: str, grad: Tensor) -> None:
    """A tensor hook: dL/d(output) (``kind`` "err"), or dL/d(input) of a module whose
    input passes through it unchanged ("in_err")."""
    owner.errors.on_error_grad(k, grad, kind, token)


def _error_prehook(
    owner: Any,
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
        owner.errors.on_error_grad(k, grad, kind, token)


def _input_share_hook(
    owner: Any,
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
    token of the probed call whose output that input is, or -1 (on_input_share)."""
    owner.errors.on_input_share(k, token, indices, nodes, grad_inputs, producer)


def _errors_end_hook(owner: Any, task: int, step: int) -> None:
    if not owner.ctx.closed:
        owner.errors.commit_errors(task, step)


@dataclass
class _Batch:
    """The norms of a backward pass's deferred error signals, and their NaN/Inf flags."""

    norms: Tensor
    flags: Tensor


class Deferred:
    """Small error signals whose norms wait for their backward pass's end, batched: of the
    (kind, module) pairs seen to stay as they came until the pass ended (watched on their
    first recorded signal); one changed in place is measured at once from then on."""

    def __init__(self, kept_tensors: kept.Kept) -> None:
        self._kept = kept_tensors
        self._batch_safe: set[tuple[str, int]] = set()
        self._unbatched: set[tuple[str, int]] = set()
        self.numel = 0  # entries deferred in the pass so far

    def defer(
        self,
        pending: Any,
        record: tuple[Any, ...],
        g: Tensor,
        exact: bool,
        source: Any,
        producer: int,
    ) -> bool:
        """Defer signal ``g`` (``record``: its kind, module, token, device, size) if it is
        small and its module's signals are batch-safe; True if it was."""
        small = g.numel() <= kept.HELD_NUMEL and not exact
        room = self.numel + g.numel() <= kept.HELD_NUMEL_TOTAL
        if not (small and room and (record[0], record[1]) in self._batch_safe):
            return False
        self.numel += g.numel()
        index = len(pending.records)
        pending.deferred[index] = (g, g._version)
        pending.records.append((*record, ()))
        if source is not None:
            pending.shared[producer] = (source, source._version, index, None)
        return True

    def watch(self, pending: Any, kind: str, k: int, g: Tensor, exact: bool) -> None:
        """A small signal measured at once: see at the pass's end whether it stayed."""
        small = g.numel() <= kept.HELD_NUMEL and not exact
        if small and (kind, k) not in self._unbatched:
            pending.watched.append((kind, k, g, g._version))

    def resolve(self, pending: Any) -> None:
        """Norms of the deferred error signals, one batched pass per device and dtype. One
        changed in place since it came is not the module's signal: a gap for that step,
        and the module's signals are measured at once from then on."""
        for kind, k, g, version in pending.watched:
            safe = g._version == version
            (self._batch_safe if safe else self._unbatched).add((kind, k))
        self._batch_safe -= self._unbatched
        self.numel = 0
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, (g, version) in pending.deferred.items():
            kind, k = pending.records[i][0], pending.records[i][1]
            if g._version != version:
                self._unbatched.add((kind, k))
                self._batch_safe.discard((kind, k))
                continue
            groups[(g.device, g.dtype)].append(i)
        for indices in groups.values():
            with torch.no_grad():
                signals = [pending.deferred[i][0] for i in indices]
                # "err" fields: the flags serve dL/d(output); deferral is off under "full"
                (norms, flags), _ = reduce_errors("err", signals, False, self._kept.constant)
            # Not split into 0-d tensors: each record points into the batch's vectors,
            # and commit_errors takes them out with one index per statistic.
            batch = _Batch(norms, flags)
            for j, i in enumerate(indices):
                pending.records[i] = (*pending.records[i][:5], (batch, j))
        for i, source in pending.aliases.items():  # the same tensor's norm (_same_as_share)
            values = pending.records[source][-1]
            if values:  # else a gap, as its source's
                pending.records[i] = (*pending.records[i][:5], values)
        pending.deferred, pending.aliases, pending.shared = {}, {}, {}


def _same_as_share(
    pending: Any, k: int, token: int, grad: Tensor, exact: bool, constant: Any
) -> bool:
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
        flag = nonfinite(grad, norm, finite, exact, constant)
        pending.records.append((*record, (norm, flag)))
    else:  # waits for the pass's end: so does this one
        pending.aliases[len(pending.records)] = index
        pending.records.append((*record, ()))
    return True


class ErrorCapture:
    """The error signals of recorded calls. ``kept``: the kept constants and indices.
    ``sites`` (:class:`~gradprobe.recording.sequences.SequenceSites`): the recurrent
    modules whose error is also recorded per time step (``error_time_*``)."""

    def __init__(self, ctx: Context, kept_tensors: kept.Kept, sites: Any = None) -> None:
        self.ctx = ctx
        self._kept = kept_tensors
        self._want_error = ctx.plan.error
        self._want_input_error = ctx.plan.input_error
        self._time = TimeErrors(sites if ctx.plan.time else None)  # error through time
        # Error signals wait for their backward pass to end: only .backward() counts.
        self._traversals = Traversals()
        # Calls whose first run could not register error-signal hooks (a reentrant
        # checkpoint runs it under no_grad): their recomputation in backward registers them.
        self._owed: dict[int, int] = defaultdict(int)
        self._deferred = Deferred(kept_tensors)  # small signals batched at the pass's end
        ctx.on("step_closed", self._on_step_closed)

    @property
    def traversals(self) -> Traversals:
        """The error-signal traversals (error_gain's graph walks, kept while the graph
        repeats: ``traversals.keep_walks``, ``walk_caches``)."""
        return self._traversals

    def _on_step_closed(self, step: int) -> None:
        if not inside_backward():
            # Nothing of a backward outlives its step: a backward that raised (an OOM retry)
            # never ran the callback that drops its pending results, and with no probed
            # module hooked no pass ever trims the set of passes that accumulated.
            self._owed.clear()
            self._time.clear()
            self._deferred.numel = 0
            self._traversals.pending.clear()
            self._traversals.output_edges.clear()
            self._traversals.accumulating.clear()

    def leave_out(self, ks: Iterable[int], level: float) -> None:
        """Leave the error statistics of modules ``ks`` out of this step (``level``: both
        sides, or the input side: error_gain only)."""
        ctx = self.ctx
        for k in ks:
            ctx.buffer.set_host(k, "err_gap", self._traversals.gap(k, level, ctx.step_index))

    # ------------------------------------------------------------ at the forward
    def note_input(self, k: int, x: Tensor, args: tuple[Any, ...] = ()) -> None:
        """The input of module ``k``'s call (its own share of dL/d(input): see hook)."""
        timed = self._time.note_input(k, x, args)
        if (self._want_input_error or timed) and x.requires_grad:
            self._traversals.input_edges[k] = input_edge(x)

    def owe(self, k: int, y: Tensor) -> None:
        """A first run under no_grad inside a trained pass (reentrant checkpointing): only
        its recomputation pays this (on_recomputed); reset at the step's end."""
        if self._want_error and not y.requires_grad and not torch.is_grad_enabled():
            self._owed[k] += 1

    def on_recomputed_pre(self, k: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Checkpointing re-runs this forward inside backward: its statistics were taken in
        the first run. Only an owed error-signal hook (see on_recomputed) needs the input."""
        x = first_input(args, kwargs)
        owed = self._owed.get(k) and self._want_input_error
        if owed and x is not None and x.requires_grad:
            self._traversals.input_edges[k] = input_edge(x)  # its own share: see hook

    def on_recomputed(self, k: int, output: Any) -> None:
        """Activation checkpointing's recomputation, inside backward: calls, activation and
        unit statistics were recorded by the first run and are not doubled. The first run's
        error-signal hooks fire on the original graph (``use_reentrant=False``); a first run
        under no_grad (``use_reentrant=True``) had none: they are owed, and hooked here, on
        the graph that the checkpoint's own backward traverses."""
        if not self._owed.get(k):
            return
        self._owed[k] -= 1
        y = first_float_tensor(output)
        if y is not None and self._want_error and y.requires_grad:
            self.hook(k, y)

    def hook(self, k: int, y: Tensor) -> None:
        """A tensor hook on the output (dL/d(output), all of it, whoever else reads ``y``)
        and hooks on the module's own autograd nodes that read its input (its share of
        dL/d(input), not what other readers of that tensor add)."""
        ref = self.ctx.owner_ref
        token = self._traversals.new_token()
        edge = self._traversals.input_edges.pop(k, None)
        self._time.note_call(k, token, edge is not None)
        fn = y.grad_fn
        if fn is None:  # a leaf (a module that returns a parameter): a tensor hook
            on_tensor(y, _error_grad_hook, ref, _OUTPUT_ERROR_SITE, k, k, token, "err")
            return
        output_nr = y.output_nr
        on_node_pre(fn, _error_prehook, ref, _OUTPUT_ERROR_SITE, k, k, token, "err", output_nr)
        sequence_nr = fn._sequence_nr()
        output_edges = self._traversals.output_edges
        output_edges[(sequence_nr, output_nr)] = token
        if edge is None:
            return
        if edge.leaf_id is None and (sequence_nr, output_nr) == (edge.sequence_nr, edge.output_nr):
            # The input passed through (an identity): the same signal.
            on_node_pre(
                fn, _error_prehook, ref, _INPUT_ERROR_SITE, k, k, token, "in_err", output_nr
            )
            return
        readers = consumer_edges(fn, edge)
        if readers is None:
            self._error_gap(
                k,
                GAP_INPUT_SIDE,
                "large graph",
                f"the autograd graph of `{self.ctx.slots[k].name}` is too large to find the "
                "module's own share of dL/d(input): its error_gain is not recorded (probe "
                "its submodules instead)",
            )
            return
        # Read by one node of this module: its share may be the producer's whole signal.
        producer = -1
        if len(readers) == 1 and edge.leaf_id is None:
            producer = output_edges.get((edge.sequence_nr, edge.output_nr), -1)
        for node, indices in readers:
            bound = (k, token, indices, len(readers), producer)
            on_node(node, _input_share_hook, ref, _INPUT_ERROR_SITE, k, *bound)

    # ------------------------------------------------------------ in backward
    def on_error_grad(self, k: int, grad: Tensor, kind: str, token: int) -> None:
        if self.ctx.closed:
            return
        pending = self._pending_errors()
        if kind == "err":
            self._time.on_output_error(pending, k, token, grad)
        if (
            kind == "err"
            and pending.shared
            and _same_as_share(pending, k, token, grad, self.ctx.exact_counts, self._kept.constant)
        ):
            return  # (a share kept for this call is dropped either way: no gradient outlives it)
        self._record_error(pending, kind, k, token, grad.detach())

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
        exact = self.ctx.exact_counts
        record = (kind, k, token, g.device, g.numel())
        if self._deferred.defer(pending, record, g, exact, source, producer):
            return
        # On the input side the norm itself carries NaN/Inf (a NaN/Inf error_gain where
        # dL/d(output) is finite). ``g`` is detached.
        values, finite = reduce_errors(kind, g, exact, self._kept.constant)
        index = len(pending.records)
        pending.records.append((*record, values))
        if source is not None and not exact:
            pending.shared[producer] = (source, source._version, index, finite)
        self._deferred.watch(pending, kind, k, g, exact)

    def on_input_share(
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
        if self.ctx.closed:
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
        self._time.on_input_error(pending, k, token, total)
        if not self._want_input_error:
            return  # hooked for the error through time only
        source = grads[0] if producer >= 0 and len(grads) == 1 else None
        self._record_error(pending, "in_err", k, token, total, source, producer)

    def _pending_errors(self) -> Any:
        """The current backward pass's waiting results; its end is queued on first use."""
        ctx = self.ctx
        task = torch._C._current_graph_task_id()
        pending, new = self._traversals.task(task)
        if new:
            ctx.emit("forward_ended")  # backward began: the forward's outputs are complete
            at_backward_end(
                _errors_end_hook, ctx.owner_ref, _ERRORS_END_SITE, -1, task, ctx.step_index
            )
        return pending

    def note_accumulation(self, param: Tensor | None = None) -> None:
        """A ``.grad`` was accumulated: this backward pass's error signals count. At the
        pass's first accumulation, were the gradients of the passes before discarded
        (``param``: the one accumulated now; gradprobe/recording/follow.py)?"""
        task = torch._C._current_graph_task_id()
        accumulating = self._traversals.accumulating
        if task not in accumulating:
            if param is not None:
                self.ctx.emit("backward_accumulating", param)
            accumulating.add(task)

    # ------------------------------------------------------------ the backward's end
    def commit_errors(self, task: int, step: int) -> None:
        """A backward pass ended: keep its error signals if it accumulated into ``.grad``."""
        ctx = self.ctx
        traversals = self._traversals
        pending = traversals.pending.pop(task, None)
        # A model with no trainable parameter accumulates nothing: its passes all count.
        counts = task in traversals.accumulating or not any(p.requires_grad for p in ctx.params)
        traversals.accumulating = {t for t in traversals.accumulating if t in traversals.pending}
        if pending is None or not counts or step != ctx.step_index or not ctx.recording:
            return  # torch.autograd.grad, or a pass that outlived its step
        self._deferred.resolve(pending)
        slots, buffer = ctx.slots, ctx.buffer
        for k, _token in pending.shares:
            self._error_gap(
                k,
                GAP_INPUT_SIDE,
                "partial share",
                f"only some of `{slots[k].name}`'s own nodes that read its input ran "
                "in a backward pass: its error_gain is not recorded for that step",
            )
        # Records measured in a batch, by kind and batch: (slots, counts, rows).
        batched: dict[tuple[str, int], tuple[_Batch, list[int], list[int], list[int]]] = {}
        first_call = self._time.first_calls(pending.records)
        for kind, k, token, device, numel, values in pending.records:
            if not values:  # deferred, and changed in place before the pass ended
                side = GAP_BOTH_SIDES if kind == "err" else GAP_INPUT_SIDE
                buffer.set_host(k, "err_gap", traversals.gap(k, side, step))
                continue
            if not traversals.first_commit(kind, token, step):
                self._error_gap(
                    k,
                    GAP_BOTH_SIDES,
                    "retraversal",
                    f"the output of `{slots[k].name}` was traversed by two backward "
                    "passes in one step (a retained graph: backward(retain_graph=True) and "
                    "another backward()); the step's error signal is their sum, whose norm "
                    "needs both gradients at once, so error_norm and error_gain are not "
                    "recorded for such a step (sum the losses and call backward() once to "
                    "have them; see docs/recording.md)",
                )
                continue
            buffer.add_host(k, f"{kind}_calls")
            if kind == "time":
                buffer.record_series("time", k, device, numel - first_call.get(k, 0), values[0])
                continue
            if isinstance(values[0], _Batch):
                batch, row = values
                entry = batched.get((kind, id(batch)))
                if entry is None:
                    entry = batched[(kind, id(batch))] = (batch, [], [], [])
                entry[1].append(k)
                entry[2].append(numel)
                entry[3].append(row)
                continue
            buffer.record(kind, k, device, numel, *values)
        for (kind, _), (batch, ks, counts, rows) in batched.items():
            device = batch.norms.device
            index = self._kept.index(rows, device)  # made once per pattern of rows
            norms = batch.norms.index_select(0, index)
            if kind == "err":
                flags = batch.flags.index_select(0, index)
                buffer.record_many(kind, ks, device, counts, norms, flags)
            else:
                buffer.record_many(kind, ks, device, counts, norms)

    def _error_gap(self, k: int, level: float, cause: str, message: str) -> None:
        """Leave module ``k``'s error statistics out of this step, with one warning."""
        self.leave_out([k], level)
        self._traversals.warn_once(cause, message)

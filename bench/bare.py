"""The floor of the default statistics: their reductions, hand-written, with nothing else.

Why this exists: issue 12 asks the default Probe at ``every=1`` to cost at most 1.5× a
plain step on the bench MLP. :class:`BareMonitor` shows what the *reductions* of the
default statistics cost on their own, written the cheapest way we know, with none of a
real monitor's work: no statistic table, no partials, no rows, no step close, no flush,
no guard against a failing hook, no version checks, no checkpointing, retained-graph,
in-place or DDP handling. Its results are dropped at the end of each step. A bench row of
it beside the Probe's says how much of the Probe's cost is the work itself (the floor
any eager implementation pays on this machine) and how much is everything around it.

What it computes per step, as the Probe's default statistics need:

* every leaf module's output, held until the model's forward ends, then, per shape, in
  one stacked buffer: the L2 norm and the sum (act_mean, act_std, the NaN/Inf flag), the
  non-zero count (zero_frac, a ReLU's gate), a tanh's saturated count, and each unit's
  largest |y| (dead units);
* dL/d(output) of every leaf module (a tensor hook) and the gradient its output's
  autograd node sends to its input (a node hook: the input side of error_gain), their
  norms in one ``_foreach_norm`` when backward ends;
* the gradients' norms (grad_norm, the global norm and its pre-clip twin are the same
  pass here), the parameters' norms, a copy of the parameters before the step and the
  norm of the update after it (update_ratio).

Not a public API; ``bench/overhead.py`` runs it as the mode "bare".
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from gradprobe.reduce import _COUNT_CHUNK, unit_nonzero_counts

_TANH_SATURATED = math.sqrt(0.99)  # |tanh| above it: f' = 1 − y² < 1 % of its maximum
_HELD_NUMEL = 1 << 16  # outputs up to this many entries wait for the forward's end


class BareMonitor:
    """The default statistics' reductions on ``model`` and ``optimizer``, nothing else."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.results: list[Any] = []  # this step's tensors, dropped when it ends
        self._held: list[tuple[bool, Tensor]] = []  # (is a tanh, output)
        self._signals: list[Tensor] = []
        self._queued = False
        self._last_large: Tensor | None = None
        self._buffers: dict[tuple[Any, ...], Tensor] = {}
        self._snapshot: list[Tensor] | None = None
        leaves = [m for m in model.modules() if not list(m.children())]
        self._handles = [m.register_forward_hook(self._on_forward) for m in leaves]
        self._handles.append(model.register_forward_hook(self._on_model_forward))
        self._handles.append(optimizer.register_step_pre_hook(self._on_step_pre))
        self._handles.append(optimizer.register_step_post_hook(self._on_step_post))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_forward(self, module: nn.Module, args: Any, output: Tensor) -> None:
        y = output.detach()
        if y.numel() > _HELD_NUMEL and y.dim() >= 2 and y.is_contiguous():
            self.results.append(self._reduce_now(y, isinstance(module, nn.Tanh)))
        else:
            self._held.append((isinstance(module, nn.Tanh), y))
        if output.requires_grad:
            output.register_hook(self._on_signal)
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if output.grad_fn is not None and x is not None:
                output.grad_fn.register_hook(partial(self._on_node, x.shape))

    def _on_node(self, shape: Any, grad_inputs: tuple[Tensor | None, ...], _: Any) -> None:
        # The gradient this node sends to the module's input (not to its weight).
        for g in grad_inputs:
            if g is not None and g.shape == shape:
                self._on_signal(g)
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_signal(self, g: Tensor) -> None:
        """A small signal waits for the pass's end; a large one is measured now (holding
        it would keep autograd from reusing its memory). A node's input gradient is
        often the very tensor the producer's output hook gets next (a chain): one norm
        for both, as the Probe does (by identity, here)."""
        if g.numel() <= _HELD_NUMEL:
            self._signals.append(g)
        elif g is not self._last_large:
            self._last_large = g
            self.results.append(torch.linalg.vector_norm(g.view(g.shape[0], -1), dim=1).norm())

    def _on_backward_end(self) -> None:
        signals, self._signals, self._queued = self._signals, [], False
        self._last_large = None
        unique = list({id(g): g for g in signals}.values())
        self.results.append(torch.stack(torch._foreach_norm(unique)))

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        buffer = self._buffers.get((shape, dtype))
        if buffer is None:
            buffer = self._buffers[(shape, dtype)] = torch.empty(shape, dtype=dtype)
        return buffer

    def _on_model_forward(self, module: nn.Module, args: Any, output: Tensor) -> None:
        held, self._held = self._held, []
        groups: dict[tuple[int, ...], list[tuple[bool, Tensor]]] = defaultdict(list)
        for tanh, y in held:
            groups[tuple(y.shape)].append((tanh, y))
        for shape, entries in groups.items():
            entries.sort(key=lambda e: not e[0])  # tanh first: their rows are a slice
            stacked = self._buffer((len(entries), *shape), entries[0][1].dtype)
            torch.stack([y for _, y in entries], out=stacked)
            self.results.append(self._reduce(stacked, sum(e[0] for e in entries)))

    def _reduce_now(self, y: Tensor, tanh: bool) -> tuple[Tensor | None, ...]:
        """A large output, in its hook: norm, sum, the non-zero count of each unit (one
        pass for the zero count and the dead units: gradprobe.reduce's way), and a tanh's
        saturated count."""
        norm = torch.linalg.vector_norm(y.view(y.shape[0], -1), dim=1).norm()
        total = y.sum()
        counts = unit_nonzero_counts(y, 1, self._buffer((_COUNT_CHUNK,), torch.float32))
        saturated = torch.count_nonzero(y.abs() > _TANH_SATURATED) if tanh else None
        return norm, total, counts, saturated

    def _reduce(self, stacked: Tensor, tanh_rows: int) -> tuple[Tensor | None, ...]:
        """Per call (the first dimension; the first ``tanh_rows`` are tanh outputs): norm,
        sum, per-unit activity (features of [N, F], channels of [N, C, ...]), the tanh
        rows' saturated count, the non-zero count. ``stacked`` is our own buffer: it is
        overwritten (|y|, then its sign), as the Probe does."""
        rows = stacked.view(stacked.shape[0], -1)
        norms = torch.linalg.vector_norm(rows, dim=1)
        sums = rows.sum(dim=1)
        activity = None
        if stacked.dim() >= 3:
            dims = tuple(d for d in range(1, stacked.dim()) if d != 2)
            activity = torch.maximum(stacked.amax(dim=dims), stacked.amin(dim=dims).neg())
        saturated = None
        rows.abs_()
        if tanh_rows:
            over = self._buffer((tanh_rows, rows.shape[1]), rows.dtype)
            torch.gt(rows[:tanh_rows], _TANH_SATURATED, out=over)
            saturated = over.sum(dim=1)
        nonzero = rows.sign_().sum(dim=1)
        return norms, sums, activity, saturated, nonzero

    @torch.no_grad()
    def _on_step_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        params = [p.detach() for p in self.params if p.grad is not None]
        self.results.append(torch.stack(torch._foreach_norm(grads)))
        self.results.append(torch.stack(torch._foreach_norm(params)))
        if self._snapshot is None or len(self._snapshot) != len(params):
            self._snapshot = [p.clone() for p in params]
        else:
            torch._foreach_copy_(self._snapshot, params)

    @torch.no_grad()
    def _on_step_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        assert self._snapshot is not None
        params = [p.detach() for p in self.params if p.grad is not None]
        torch._foreach_sub_(self._snapshot, params)
        self.results.append(torch.stack(torch._foreach_norm(self._snapshot)))
        self.results = []

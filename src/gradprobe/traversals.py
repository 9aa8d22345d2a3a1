"""Which backward traversals make a step's error signals, and each module's own share.

Autograd may traverse one tensor several times in a step; the Probe's rule
(``docs/recording.md``, "Error signals when autograd traverses a tensor more than once"):

- A traversal counts only if it accumulates into some parameter's ``.grad`` (a
  ``.backward()``): ``torch.autograd.grad`` (a gradient penalty's inner gradient, a
  saliency map, an inner meta-learning step) does not, so the hooks' results wait in
  :class:`Traversals` until their backward pass ends and are dropped if it accumulated
  nothing. The ``.backward()`` of a penalised loss sees the whole gradient anyway.
- Separate forward passes (micro-batches) are separate tensors: their signals add up.
- One tensor traversed by two counting passes in one step (a retained graph,
  ``l1.backward(retain_graph=True); l2.backward()``) would need ‖g₁ + g₂‖, and only
  g₁'s norm is kept (keeping g₁ itself would hold a gradient per module until the
  step): that module's ``error_norm`` and ``error_gain`` are not recorded for the step,
  with one warning.
- The input side of ``error_gain`` is the module's *own* share of dL/d(input): the
  gradient flowing along the module's own graph edges into its input tensor, read with
  hooks on those autograd nodes (found by :func:`consumer_edges`), not the input
  tensor's total gradient, which other readers of the tensor (a second head, a skip
  connection) add to.

Nothing here holds a module or a tensor between steps: a pending result is a 0-d tensor
of a backward pass still running; an input edge is kept from a module's forward
pre-hook to its forward hook, as sequence numbers and ids.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .hooks import GradprobeWarning

__all__ = ["InputEdge", "Traversals", "consumer_edges", "input_edge"]

# Autograd nodes walked from a module's output back to its input, at most: a leaf layer
# takes 1-3, nn.MultiheadAttention about 30. Beyond it the module's own share of
# dL/d(input) is not looked for (``error_gain`` not recorded, one warning).
MAX_NODES_WALKED = 512

# Levels of the ``err_gap`` partial: what is not recorded for a module at a step.
GAP_INPUT_SIDE = 1.0  # error_gain
GAP_BOTH_SIDES = 2.0  # error_norm and error_gain


@dataclass(frozen=True)
class InputEdge:
    """Where a module's input tensor enters autograd, without holding the tensor or node.

    ``sequence_nr`` is the creating node's (numbers grow as nodes are made, so the
    module's own nodes have larger ones); a leaf's ``AccumulateGrad`` is known by the
    ``id`` of its tensor instead.
    """

    sequence_nr: int
    output_nr: int
    leaf_id: int | None


def input_edge(x: Tensor) -> InputEdge:
    """The autograd edge through which gradient reaches ``x``."""
    fn = x.grad_fn
    if fn is None:
        return InputEdge(-1, 0, id(x))
    return InputEdge(fn._sequence_nr(), x.output_nr, None)


def consumer_edges(root: Any, edge: InputEdge) -> list[tuple[Any, tuple[int, ...]]] | None:
    """The nodes between ``root`` (the module's output node) and ``edge`` that read the
    input, each with the indices of its gradient outputs that flow into it; ``None``
    when more than :data:`MAX_NODES_WALKED` nodes would have to be walked.

    Only nodes made after the input are walked (larger sequence numbers): the module's
    own, and those of any other input it reads; the walk never goes below the input.
    """
    found: list[tuple[Any, tuple[int, ...]]] = []
    stack, seen, walked = [root], {id(root)}, 0
    leaf_id, below, output_nr = edge.leaf_id, edge.sequence_nr, edge.output_nr
    while stack:
        node = stack.pop()
        walked += 1
        if walked > MAX_NODES_WALKED:
            return None
        hits = []
        for i, (nxt, nr) in enumerate(node.next_functions):
            if nxt is None:
                continue
            # Is this the input's edge? (This walk runs in every probed call's forward hook.)
            sequence_nr = nxt._sequence_nr()
            if leaf_id is not None:
                hit = id(getattr(nxt, "variable", None)) == leaf_id
            else:
                hit = nr == output_nr and sequence_nr == below
            if hit:
                hits.append(i)
            elif id(nxt) not in seen and sequence_nr > below and nxt.next_functions:
                seen.add(id(nxt))
                stack.append(nxt)
        if hits:
            found.append((node, tuple(hits)))
    return found


@dataclass
class _Pending:
    """Results of one backward pass (a graph task), waiting for it to end."""

    records: list[tuple[str, int, int, torch.device, int, tuple[Tensor, ...]]] = field(
        default_factory=list
    )
    # (slot, token) -> [node hooks fired, sum of the module's own share so far]
    shares: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    # Small error signals whose norms wait for the pass's end (one batched pass for all),
    # by their index in ``records``: (the gradient, its version when it came); and the
    # ones measured at once but watched to see whether they stay as they came.
    deferred: dict[int, tuple[Tensor, int]] = field(default_factory=dict)
    watched: list[tuple[str, int, Tensor, int]] = field(default_factory=list)
    # A module's own share of dL/d(input) as autograd handed it on, when the tensor it
    # reads is a probed call's output: by that call's token, (the gradient, its version,
    # its record's index, whether it is finite). If that very tensor arrives unchanged as
    # the producer's dL/d(output), no other reader added to it: one norm serves both
    # (see Capture); it is let go when the producer's signal comes, equal or not.
    shared: dict[int, tuple[Tensor, int, int, bool | None]] = field(default_factory=dict)
    # Records whose values are another's (an error signal that is that very share).
    aliases: dict[int, int] = field(default_factory=dict)


class Traversals:
    """Per-Probe bookkeeping of backward traversals (host-side only, no device sync)."""

    def __init__(self) -> None:
        self._next_token = 0
        self.input_edges: dict[int, InputEdge] = {}
        # Where this step's hooked module outputs enter autograd, (sequence_nr, output_nr),
        # and the token of the call that made each.
        self.output_edges: dict[tuple[int, int], int] = {}
        self.pending: dict[int, _Pending] = {}
        self.accumulating: set[int] = set()
        self._step = -1
        self._committed: set[tuple[str, int]] = set()
        self._gaps: dict[int, float] = defaultdict(float)
        self._warned: set[str] = set()

    def new_token(self) -> int:
        """One number per registered hook: a second counting traversal of it is seen."""
        self._next_token += 1
        return self._next_token

    def task(self, task: int) -> tuple[_Pending, bool]:
        """The pending results of ``task``, and whether it is new (queue its end)."""
        pending = self.pending.get(task)
        if pending is None:
            pending = self.pending[task] = _Pending()
            return pending, True
        return pending, False

    def add_share(
        self, pending: _Pending, k: int, token: int, nodes: int, grad: Tensor
    ) -> Tensor | None:
        """Sum the module's own share of dL/d(input) over its ``nodes`` reading nodes;
        the total once every one has fired in this backward pass, else ``None``."""
        if nodes == 1:
            return grad
        entry = pending.shares.get((k, token))
        if entry is None:
            pending.shares[(k, token)] = [1, grad]
            return None
        entry[0] += 1
        entry[1] = entry[1] + grad
        if entry[0] < nodes:
            return None
        del pending.shares[(k, token)]
        return entry[1]

    def first_commit(self, kind: str, token: int, step: int) -> bool:
        """False if this hook's tensor was already traversed by a counting pass this step."""
        self._new_step(step)
        key = (kind, token)
        if key in self._committed:
            return False
        self._committed.add(key)
        return True

    def gap(self, k: int, level: float, step: int) -> float:
        """Raise module ``k``'s gap level for ``step``; the level to record."""
        self._new_step(step)
        self._gaps[k] = max(self._gaps[k], level)
        return self._gaps[k]

    def _new_step(self, step: int) -> None:
        if step != self._step:
            self._step = step
            self._committed = set()
            self._gaps = defaultdict(float)

    def warn_once(self, cause: str, message: str) -> None:
        if cause in self._warned:
            return
        self._warned.add(cause)
        warnings.warn(f"gradprobe: {message}", GradprobeWarning, stacklevel=3)

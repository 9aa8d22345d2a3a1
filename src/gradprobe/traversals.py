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

Graphs that repeat (issue 26): finding a module's readers of its input walks its part of
the autograd graph in Python at every recorded call, although a training loop builds the
same graph step after step. :class:`WalkCache` keeps, per module, the part of a walk that
leads from the output's node to the readers (a tree: at each node, which edge to follow
and the print of all its edges: each next node's type, creation offset from the output's
node and output index), under a signature read without walking: the output node's type,
the input's output index and how many autograd nodes this thread made between the
input's node and the output's (``sequence_nr`` is a per-thread creation counter). A later
call with that signature follows the tree on its own graph and compares every print; any
difference (another branch taken, a detached input, eval mode's missing dropout nodes, a
module replaced) walks the graph again and keeps the new result beside the old. A walk is
kept only where the tree has fewer nodes than the walk visited (a leaf layer's walk of
1-2 nodes is as cheap as the check).

What the check cannot see: a node off the tree (on no path from the output to a reader)
that starts to read the input while the node count and every print on the tree stay the
same (``h * x.detach()`` → ``h * x`` in a branch beside the readers' paths, in a step
that makes no other node). To bound how long that could go unnoticed, each kept walk is
walked again after :data:`REWALK_EVERY` uses.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .hooks import GradprobeWarning

__all__ = ["InputEdge", "Traversals", "WalkCache", "consumer_edges", "input_edge"]

# Autograd nodes walked from a module's output back to its input, at most: a leaf layer
# takes 1-3, nn.MultiheadAttention about 30. Beyond it the module's own share of
# dL/d(input) is not looked for (``error_gain`` not recorded, one warning).
MAX_NODES_WALKED = 512

# A module's kept walks (graph signatures) at most: a module called in several ways in one
# step (a shared layer, an encoder on two kinds of input) keeps one per way.
MAX_SIGNATURES = 8
# A kept walk is walked again (and replaced) after this many uses: a bound on how long a
# change its signature does not see (see the module's docstring) could go unnoticed.
REWALK_EVERY = 100

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
    # The module's kept walks, when the edge was filed in Traversals.input_edges.
    walks: WalkCache | None = field(default=None, compare=False, repr=False)


def input_edge(x: Tensor) -> InputEdge:
    """The autograd edge through which gradient reaches ``x``."""
    fn = x.grad_fn
    if fn is None:
        return InputEdge(-1, 0, id(x))
    return InputEdge(fn._sequence_nr(), x.output_nr, None)


Readers = list[tuple[Any, tuple[int, ...]]]
# A node's edges as kept: for each, (its node's type, the output node's sequence_nr minus
# its own, its output index); an empty slot is (None, 0, 0).
_Print = tuple[tuple[Any, int, int], ...]


def _print(node: Any, top: int, below: int) -> _Print:
    """``node``'s edges as kept: what the module's graph is made of, not what lies below
    its input (another module's node, whose type may change without changing this
    module's readers)."""
    prints = []
    for nxt, nr in node.next_functions:
        if nxt is None:
            prints.append((None, 0, 0))
            continue
        made = nxt._sequence_nr()
        if made > top:  # a leaf's AccumulateGrad has no creation number (the largest one)
            prints.append((type(nxt), -1, nr))
        elif made <= below:  # the input itself, or a node made before it
            prints.append((None, top - made if made == below else -1, nr))
        else:
            prints.append((type(nxt), top - made, nr))
    return tuple(prints)


class _Kept:
    """A kept walk: the part of the graph that leads from the output's node to the
    readers, as a tree (each node: its parent's position, its index among the parent's
    edges, and the print of its own edges), and which of its nodes read the input."""

    __slots__ = ("readers", "tree", "uses")

    def __init__(
        self, tree: list[tuple[int, int, _Print]] | None, readers: list[tuple[int, tuple[int, ...]]]
    ) -> None:
        self.tree = tree  # None: the graph was too large to walk
        self.readers = readers
        self.uses = 0

    def follow(self, root: Any, top: int, below: int) -> Readers | bool | None:
        """The readers on this graph; ``False`` where any kept node's edges differ."""
        if self.tree is None:
            return None
        nodes = []
        for parent, index, kept in self.tree:
            node = root if parent < 0 else nodes[parent].next_functions[index][0]
            if _print(node, top, below) != kept:
                return False
            nodes.append(node)
        return [(nodes[i], hits) for i, hits in self.readers]


_UNSEEN: Any = object()  # a signature not met yet


class WalkCache:
    """One module's kept graph walks, by signature (see the module's docstring).

    ``walks`` counts the full walks this module's calls ran, ``hits`` the calls answered
    from a kept walk: host-side counts, for tests and benchmarks.
    """

    __slots__ = ("hits", "kept", "walks")

    def __init__(self) -> None:
        # None: the signature's walk is no dearer than following a kept one
        self.kept: dict[tuple[type, int, int], _Kept | None] = {}
        self.walks = 0
        self.hits = 0

    def readers(self, root: Any, edge: InputEdge) -> Readers | None:
        """:func:`consumer_edges`, from a kept walk where the graph repeats."""
        if edge.leaf_id is not None:
            # A leaf input has no creation number to bound the graph: walk (rare: an
            # input that is a leaf requiring grad).
            self.walks += 1
            return _walk(root, edge)[0]
        top = root._sequence_nr()
        key = (type(root), edge.output_nr, top - edge.sequence_nr)
        kept = self.kept.get(key, _UNSEEN)
        self.walks += kept is None or kept is _UNSEEN
        if kept is None:  # a walk as cheap as its check: walk, keep nothing
            return _walk(root, edge)[0]
        if kept is not _UNSEEN:
            if kept.uses < REWALK_EVERY:
                found = kept.follow(root, top, edge.sequence_nr)
                if found is not False:
                    kept.uses += 1
                    self.hits += 1
                    return found
            self.walks += 1
        found, kept = _walk(root, edge, top)
        if len(self.kept) >= MAX_SIGNATURES and key not in self.kept:
            self.kept.pop(next(iter(self.kept)))
        self.kept[key] = kept
        return found


def consumer_edges(root: Any, edge: InputEdge) -> Readers | None:
    """The nodes between ``root`` (the module's output node) and ``edge`` that read the
    input, each with the indices of its gradient outputs that flow into it; ``None``
    when more than :data:`MAX_NODES_WALKED` nodes would have to be walked.

    Only nodes made after the input are walked (larger sequence numbers): the module's
    own, and those of any other input it reads; the walk never goes below the input.
    Where the edge carries its module's :class:`WalkCache`, a graph that repeats is
    not walked again.
    """
    if edge.walks is not None:
        return edge.walks.readers(root, edge)
    return _walk(root, edge)[0]


def _walk(root: Any, edge: InputEdge, top: int | None = None) -> tuple[Readers | None, Any]:
    """The walk itself; with ``top`` (``root``'s sequence number), also what a
    :class:`WalkCache` keeps of it: ``None`` where following the kept part of the graph
    would visit as many nodes as walking it again."""
    found: Readers = []
    parents: dict[int, tuple[Any, int]] = {}  # id(node) -> (its parent, its index there)
    stack, seen, walked = [root], {id(root)}, 0
    leaf_id, below, output_nr = edge.leaf_id, edge.sequence_nr, edge.output_nr
    while stack:
        node = stack.pop()
        walked += 1
        if walked > MAX_NODES_WALKED:
            return None, _Kept(None, [])
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
                parents[id(nxt)] = (node, i)
        if hits:
            found.append((node, tuple(hits)))
    if top is None:
        return found, None
    # The tree of the readers' paths from the root, parents before children.
    position: dict[int, int] = {}
    tree: list[tuple[int, int, _Print]] = []

    def place(node: Any) -> int:
        if id(node) in position:
            return position[id(node)]
        parent, index = parents.get(id(node), (None, -1))
        at = -1 if parent is None else place(parent)
        position[id(node)] = len(tree)
        tree.append((at, index, _print(node, top, below)))
        return position[id(node)]

    readers = [(place(node), hits) for node, hits in found]
    if len(tree) >= walked:
        return found, None
    return found, _Kept(tree, readers)


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


class _InputEdges(dict):
    """Module index -> its input's edge, each filed with the module's :class:`WalkCache`
    (``walks`` None: no cache, every call walks)."""

    def __init__(self) -> None:
        super().__init__()
        self.walks: dict[int, WalkCache] | None = {}

    def __setitem__(self, k: int, edge: InputEdge) -> None:
        if self.walks is not None and edge.leaf_id is None:
            cache = self.walks.get(k)
            if cache is None:
                cache = self.walks[k] = WalkCache()
            edge = InputEdge(edge.sequence_nr, edge.output_nr, None, cache)
        super().__setitem__(k, edge)


class Traversals:
    """Per-Probe bookkeeping of backward traversals (host-side only, no device sync)."""

    def __init__(self) -> None:
        self._next_token = 0
        self.input_edges: dict[int, InputEdge] = _InputEdges()
        # Where this step's hooked module outputs enter autograd, (sequence_nr, output_nr),
        # and the token of the call that made each.
        self.output_edges: dict[tuple[int, int], int] = {}
        self.pending: dict[int, _Pending] = {}
        self.accumulating: set[int] = set()
        self._step = -1
        self._committed: set[tuple[str, int]] = set()
        self._gaps: dict[int, float] = defaultdict(float)
        self._warned: set[str] = set()

    @property
    def walk_caches(self) -> dict[int, WalkCache] | None:
        """Each module's kept graph walks, by module index; ``None`` when not kept."""
        return self.input_edges.walks if isinstance(self.input_edges, _InputEdges) else None

    def keep_walks(self, keep: bool) -> None:
        """Keep graph walks that repeat (the default), or walk at every call."""
        if isinstance(self.input_edges, _InputEdges):
            self.input_edges.walks = {} if keep else None

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

"""Sequence sites: token geometry of blocks, the final projection's logits, error through time.

Where each statistic of :mod:`gradprobe.sequence` is measured (issue 25 §2, §3; the
reasons are in docs/attention.md, "Where the engine measures them"):

- ``token_cosine``: on the *blocks* of a sequence model: the children of a
  ``ModuleList``/``Sequential`` that are transformer layers (:mod:`gradprobe.kinds`) or
  whose subtree holds attention (a module of kind ``attention``, or a class named
  ``…Attention``: Hugging Face's ``GPT2Attention``/``LlamaAttention``, nanoGPT's
  ``CausalSelfAttention``); the innermost such children where they nest. Their outputs
  are ``[N, T, F]`` (``[T, N, F]`` for a sequence-first ``nn.Transformer*Layer``; ``[T,
  F]`` unbatched); a tuple's first floating-point tensor (Hugging Face blocks).
- ``logit_max``, ``logit_z``: on the model's *final projection*: Hugging Face's output
  embeddings (``get_output_embeddings()``, the module that makes ``ModelOutput.logits``),
  else the last ``nn.Linear`` in the model's module order outside any block or attention
  module (nanoGPT's ``lm_head``, a classifier's last layer), when it has two outputs or
  more. Measured on that module's own output, so a model that returns only its loss, or
  logits wrapped in a ``ModelOutput`` or a tuple, is measured all the same.
- ``error_time_*``: on the probed recurrent modules: a fused ``nn.RNN``/``LSTM``/``GRU``
  from the error at its input (its own share of dL/dx: gradprobe.recording.errors), a
  cell from each call's output error, placed at the call's index in the forward.

With the default module selection, blocks and the final projection that are not probed
(a block has no parameters of its own) become *sequence-only* slots: hooked only on
recorded steps, by a forward hook that measures only these statistics, so they add rows
of these statistics and nothing else. With an explicit ``modules=``, only the selected
modules are sites (``modules=[]``: none, the model compiles whole).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..kinds import module_kind
from ..sequence import logit_stats, time_sq_norms, token_cosine
from .bindings import Slot, make_slot
from .context import Context
from .tensors import first_float_tensor

__all__ = ["SequenceCapture", "SequenceSites", "TimeErrors", "follow_sites", "sequence_sites"]


@dataclass
class SequenceSites:
    """Slot indices of the sequence sites: blocks (with their time dimension in a 3-D
    output), the final projection, fused recurrent modules (``batch_first``), cells."""

    blocks: dict[int, int] = field(default_factory=dict)
    head: int | None = None
    fused: dict[int, bool] = field(default_factory=dict)
    cells: set[int] = field(default_factory=set)
    head_name: str | None = None  # the final projection's, measured or not


def _is_attention(module: nn.Module) -> bool:
    kind = module_kind(module)
    return kind.attention or kind.transformer_layer or type(module).__name__.endswith("Attention")


def _block_time_dim(module: nn.Module) -> int:
    """1 for ``[N, T, F]``; 0 for a sequence-first torch Transformer layer ``[T, N, F]``."""
    # nn.MultiheadAttention is the kinds table's module that computes attention itself
    attn = module if module_kind(module).attention else getattr(module, "self_attn", None)
    attention = isinstance(attn, nn.Module) and module_kind(attn).attention
    if attention and not getattr(attn, "batch_first", True):
        return 0
    return 1


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The innermost children of a ModuleList/Sequential whose subtree holds attention."""
    found: dict[str, nn.Module] = {}
    for name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        for child_name, child in container.named_children():
            if any(_is_attention(m) for m in child.modules()):
                found[f"{name}.{child_name}" if name else child_name] = child
    # A block holding blocks (a Sequential around a TransformerEncoder) is not one.
    return {
        n: m for n, m in found.items() if not any(o.startswith(n + ".") for o in found if o != n)
    }


def _head(
    model: nn.Module, blocks: dict[str, nn.Module], previous: str | None = None
) -> str | None:
    """The final projection (see the module's docstring). ``previous``: the one before a
    change of the model, kept while a Linear of that rule still holds its name (an adapter
    registered after it does not take its place; a head replaced under its name is the
    new one)."""
    names = {id(m): n for n, m in model.named_modules()}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except Exception:  # a model whose method is not implemented
            out = None
        if isinstance(out, nn.Module) and id(out) in names:
            return names[id(out)]
    inside = set()
    for n, m in model.named_modules():
        if n in blocks or _is_attention(m):
            inside.update(id(d) for d in m.modules())
    linear = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in inside and m.out_features >= 2
    ]
    if previous in linear:
        return previous
    return linear[-1] if linear else None


def sequence_sites(
    model: nn.Module,
    slots: list[Slot],
    explicit: bool,
    bound: dict[tuple[str, int], int] | None = None,
    start: int | None = None,
    previous_head: str | None = None,
) -> tuple[list[Slot], SequenceSites]:
    """The sequence sites of ``model`` given the probed ``slots``: the sequence-only slots
    to append (none where ``explicit``: the user chose the modules), and the sites.
    Following a changed model: ``bound``, the sequence-only slots already bound, by (name,
    module id), kept where that module still is; ``start``, the first new slot's index;
    ``previous_head``, the final projection's name before the change."""
    by_name = {s.name: s.index for s in slots}
    modules = dict(model.named_modules())
    blocks = _blocks(model)
    head = _head(model, blocks, previous_head)
    extra: list[Slot] = []
    first = len(slots) if start is None else start

    def index(name: str) -> int | None:
        if name in by_name:
            return by_name[name]
        if explicit:
            return None
        k = (bound or {}).get((name, id(modules[name])))
        if k is not None:
            by_name[name] = k
            return k
        slot = make_slot(first + len(extra), name, modules[name], sequence_only=True)
        extra.append(slot)
        by_name[name] = slot.index
        return slot.index

    sites = SequenceSites(head_name=head)
    for name, module in blocks.items():
        k = index(name)
        if k is not None:
            sites.blocks[k] = _block_time_dim(module)
    if head is not None:
        sites.head = index(head)
    for slot in slots:
        kind = module_kind(modules[slot.name])
        if kind.recurrent is None:
            continue
        if kind.cell:
            sites.cells.add(slot.index)
        else:
            sites.fused[slot.index] = bool(getattr(modules[slot.name], "batch_first", False))
    return extra, sites


def follow_sites(
    ctx: Context,
    model: nn.Module,
    refs: list[Any],
    kept: set[int],
    explicit: bool,
    previous: SequenceSites | None,
) -> SequenceSites:
    """The sequence sites of a model that changed (gradprobe/recording/follow.py), by the
    rules of the Probe's construction: ``kept``, the probed slots bound to it now (the
    sites' blocks and head are added); a sequence-only slot whose module is still there
    keeps its slot, one for a new block or head is appended to ``ctx.slots`` (its module's
    weak reference to ``refs``). Where no statistic measured at sequence-only slots is
    asked for, none is bound, as at construction. ``previous``: the sites before."""
    slots = ctx.slots
    bound = {
        (s.name, id(ref())): s.index
        for s, ref in zip(slots, refs)
        if s.sequence_only and s.index not in ctx.retired_slots and ref() is not None
    }
    explicit = explicit or not (ctx.plan.tokens or ctx.plan.logits)
    probed = [slots[k] for k in sorted(kept)]
    head = previous.head_name if previous is not None else None
    extra, sites = sequence_sites(model, probed, explicit, bound, len(slots), head)
    modules = dict(model.named_modules())
    for slot in extra:
        slots.append(slot)
        refs.append(weakref.ref(modules[slot.name]))
    kept.update(sites.blocks, () if sites.head is None else (sites.head,))
    return sites


class SequenceCapture:
    """What the forward hooks of sequence sites measure (blocks and the final projection);
    the error through time is the error capture's (it owns the error hooks)."""

    def __init__(self, ctx: Context, sites: SequenceSites) -> None:
        self.ctx = ctx
        self._on_sites(sites)
        # Before the hooks go on again (hookup handles model_rebound, emitted after).
        ctx.on("sequence_sites", self._on_sites)

    def _on_sites(self, sites: SequenceSites) -> None:
        """The sites of the model as it is (at construction; after a change of it)."""
        self.sites = sites
        plan = self.ctx.plan
        self._blocks = sites.blocks if plan.tokens else {}
        self._head = sites.head if plan.logits else None
        # The slots whose forward hook calls on_forward (hookup reads it).
        self.forward_slots = frozenset(self._blocks) | (
            frozenset() if self._head is None else frozenset({self._head})
        )

    def on_forward(self, k: int, output: Any) -> None:
        y = first_float_tensor(output)
        if y is None or y.numel() == 0:
            return
        buffer = self.ctx.buffer
        if k in self._blocks and y.dim() in (2, 3):  # [T, F] or [N, T, F] / [T, N, F]
            time_dim = self._blocks[k] if y.dim() == 3 else 0
            total, count = token_cosine(y, time_dim=time_dim)
            buffer.record("cos", k, y.device, y.numel(), total, count)
        if k == self._head and y.dim() >= 1:
            top, total, count = logit_stats(y)
            buffer.record("logit", k, y.device, y.numel(), top, total, count)


class TimeErrors:
    """The error through time of recurrent modules, for the error capture (which owns the
    error hooks and a backward pass's records; a record here counts where its pass does).

    A fused module: ``‖dL/dx[:, t]‖²`` per time step of its own share of dL/d(input) (the
    error that has travelled back through the recurrence; its output error is zero before
    the loss position when the loss is on the last step). A cell: ``‖dL/dh_t‖²`` of each
    call's output error, at the call's index in the forward (backward visits the calls in
    reverse). Records are ``("time", slot, token, device, index, (series,))``."""

    def __init__(self, sites: SequenceSites | None) -> None:
        self.rebind(sites)
        self._dims: dict[int, int] = {}  # slot -> the open call's time dimension
        self._tokens: dict[int, int] = {}  # token -> time dimension (fused)
        self._cell_calls: dict[int, int] = defaultdict(int)  # slot -> calls in the step
        self._cell_tokens: dict[int, int] = {}  # token -> the call's index in the step

    def rebind(self, sites: SequenceSites | None) -> None:
        """The recurrent modules to measure (``None``: none): at construction, and for a
        model that changed (the sites recomputed: recording/follow.py)."""
        self._fused: dict[int, bool] = dict(sites.fused) if sites is not None else {}
        self._cells: frozenset[int] = frozenset(sites.cells if sites is not None else ())

    def clear(self) -> None:
        """The step closed: nothing of its calls is kept."""
        self._tokens.clear()
        self._cell_calls.clear()
        self._cell_tokens.clear()

    def note_input(self, k: int, x: Tensor, args: tuple[Any, ...] = ()) -> bool:
        """A call's input; True if its error at the input is wanted (a fused module). A
        PackedSequence's rows are not a time dimension: no series (a gap)."""
        batch_first = self._fused.get(k)
        if batch_first is None:
            return False
        if args and isinstance(args[0], PackedSequence):
            self._dims.pop(k, None)
            return False
        # [N, T, F] if batch_first, [T, N, F] if not, [T, F] unbatched (torch's rule).
        self._dims[k] = 1 if batch_first and x.dim() == 3 else 0
        return True

    def note_call(self, k: int, token: int, input_hooked: bool) -> None:
        """The call ``token`` of module ``k`` has its error hooks on."""
        if k in self._cells:  # its index among the cell's calls of the step
            self._cell_tokens[token] = self._cell_calls[k]
            self._cell_calls[k] += 1
        elif input_hooked and k in self._dims:  # a fused module's call (not packed)
            self._tokens[token] = self._dims.pop(k)

    def on_output_error(self, pending: Any, k: int, token: int, grad: Tensor) -> None:
        if token in self._cell_tokens:
            self._record(pending, k, token, grad.detach().unsqueeze(0), 0)

    def on_input_error(self, pending: Any, k: int, token: int, total: Tensor) -> None:
        if token in self._tokens:
            self._record(pending, k, token, total, self._tokens[token])

    def _record(self, pending: Any, k: int, token: int, g: Tensor, time_dim: int) -> None:
        sq = time_sq_norms(g, time_dim=time_dim)
        index = self._cell_tokens.get(token, 0)
        pending.records.append(("time", k, token, g.device, index, (sq,)))

    def first_calls(self, records: list[Any]) -> dict[int, int]:
        """Each cell's first call index among a pass's records: its calls are placed from
        there, so that a step's later pass (a micro-batch) starts its loop again at 0, as
        its sequences do."""
        first: dict[int, int] = {}
        for kind, k, _token, _device, index, _values in records:
            if kind == "time" and k in self._cells:
                first[k] = min(first.get(k, index), index)
        return first

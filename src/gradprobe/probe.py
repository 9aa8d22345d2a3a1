"""Probe: attach to any ``nn.Module``, record per-layer statistics of real training.

What happens, and where it costs::

    forward pre-hook (module)   activation modules: gate f'(z) partials from the input z
                                (read before an in-place module overwrites it);
                                a tensor hook on z for dL/d(input) (``error_gain``)
    forward hook (module)       output partials (sum, sum², zeros, NaN/Inf, active units);
                                a tensor hook on the output for dL/d(output) (``error_norm``)
    post-accumulate-grad hook   (parameters) when a backward pass has accumulated into
                                ``.grad``, queue one callback at the end of that backward:
                                the gradient norms *before* any clipping, batched, unscaled
                                by the watched ``GradScaler`` (``global_grad_norm_preclip``)
    optimizer step pre-hook     grad and parameter norms, batched with ``torch._foreach_norm``
                                (after AMP unscale, clipping and the DDP all-reduce);
                                a copy of the parameters for ``update_ratio``
    optimizer step post-hook    update norms; the step's row is closed

All of it stays on the device, in a :class:`~gradprobe.buffer.StepBuffer`; every
``flush_every`` recorded steps (and at ``frame()``/``close()``) the buffer is copied
to the host once, finalised into long-form rows and appended to the store. On steps
that ``every`` skips, hooks return at once and no tensor hook is registered.

The Probe holds names and slot indices, not modules: hooks reach it through a weak
reference, and a ``weakref.finalize`` removes them if the Probe is dropped unclosed.

Where users train (see ``docs/integrations.md``):

- *Gradient accumulation*: a step is an optimizer step, so module statistics add up
  over every micro-batch of it and parameter statistics are of the accumulated gradient.
- *AMP*: with ``scaler=``, a step the ``GradScaler`` skips (its ``optimizer.step()`` is
  never called, so no step hook fires) is recognised when ``scaler.update()`` has run
  without an optimizer step: ``update`` changes the scale tensor in place, which bumps
  its version counter, a host-side number (no sync). That step's statistics are dropped
  and it is recorded as ``skipped`` on :data:`~gradprobe.stats.MODEL_NAME`.
- *DDP*: statistics of every rank are combined as :mod:`gradprobe.stats` declares
  (:class:`~gradprobe.buffer.Ranks`); rank 0 writes the store. ``frame()``, ``run()``
  and ``close()`` are then collective: call them on every rank. Ranks may run different
  modules in a step (``find_unused_parameters=True``): every collective has the same
  shape on every rank, and a module run on some ranks only has the statistics of the
  samples that went through it (sums and counts over those ranks; units dead if 0
  wherever it ran; ``error_norm`` that of the mean of the ranks' losses, as DDP applies).
- *FSDP2* (``fully_shard``): as DDP for module statistics; parameter statistics are of
  the full tensors, their shards' squared norms summed in one collective per step
  (:mod:`gradprobe.shards`).
- *torch.compile*: module hooks run outside the compiled graphs (one warning says so).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
import sys
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils import _pytree

from ._version import __version__
from .activations import Activation, activation_of, recurrent_nonlinearity
from .buffer import Drained, Ranks, StepBuffer
from .errors import GradprobeError
from .hooks import GradprobeWarning, HookSet, ModuleHook, warn_gap, warn_once
from .recurrent import carry_slots, record_carry
from .reduce import accumulation_dtype, l2_norm, l2_norms, nonzero_count, row_norms
from .run import Run, empty_frame, load, normalize_frame
from .shards import ShardedNorms, local_shards, sharded_parameters
from .stats import MODEL_NAME, PRESETS, SAT_THRESHOLD, STATISTICS, finalize, logged_mean
from .store import Store
from .traversals import GAP_BOTH_SIDES, GAP_INPUT_SIDE, Traversals, consumer_edges, input_edge

__all__ = ["Probe", "unwrap_model"]

ModuleFilter = Callable[[str, nn.Module], bool]

# Modules whose outputs keep features in the last dimension ([N, ..., F]) ...
_LAST_DIM_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.Embedding,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# ... and those that keep channels in dimension 1 ([N, C, ...]).
_CHANNEL_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)

DEFAULT_HISTOGRAM_RANGE = (-4.0, 4.0)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model``, a wrapper around it or one of its submodules is ``torch.compile``d."""
    if "torch._dynamo" not in sys.modules:
        return False  # nothing was compiled in this process (and importing dynamo is slow)
    from torch._dynamo.eval_frame import OptimizedModule

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, OptimizedModule):
            return True
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
    return any(isinstance(m, OptimizedModule) for m in model.modules())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP/DataParallel and ``torch.compile`` wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
    return model


@dataclass(frozen=True)
class _Slot:
    """A probed module, by name: what the hooks need to know about it."""

    index: int
    name: str
    type: str
    activation: Activation | None
    layout: str  # "last", "channel" or "inherit" (element-wise: like the tensor it received)
    histogram_range: tuple[float, float]
    # The activation's gate read from its output (see _gate_from_output), or None: from z.
    gate_from_output: str | None = None
    inplace: bool = False  # an in-place module writes over its input


def _sum_dtype(t: Tensor) -> torch.dtype | None:
    """float32 for half-precision tensors (AMP): a bfloat16 sum keeps about 3 digits."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None


def _activity(y: Tensor, dims: tuple[int, ...]) -> Tensor:
    """max |y| over ``dims``: > 0 iff the unit is non-zero somewhere (NaN: counted dead).
    A max and a min are two reading passes; ``abs()`` first would write a copy (~2× dearer
    on a conv output)."""
    return torch.maximum(y.amax(dim=dims), y.amin(dim=dims).neg())


# A mapping output (a dict, a transformers ModelOutput) is read at these keys first: the
# tensor the module computes. A "loss" entry is never "the" output: it is a function of it.
_PREFERRED_KEYS = ("logits", "last_hidden_state")
_SKIPPED_KEYS = frozenset({"loss"})
_MAX_NESTING = 32  # deeper than any real output; guards against self-referencing objects


def _first_float_tensor(value: Any, depth: int = 0) -> Tensor | None:
    """"The" tensor of a module's output (or input): the first floating-point tensor in
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
        rest = [v for key, v in value.items() if key not in _PREFERRED_KEYS and key not in _SKIPPED_KEYS]
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


def _layout_of(module: nn.Module) -> str:
    if isinstance(module, _LAST_DIM_TYPES):
        return "last"
    cls = type(module)
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return "last"  # Hugging Face's GPT-2 linear layer: [N, T, F], despite its name
    if isinstance(module, _CHANNEL_TYPES):
        return "channel"
    return "inherit"


class Probe:
    """Records per-layer gradient, error-signal and activation statistics during training.

    Args:
        model: the network (DDP/DataParallel/compiled wrappers are unwrapped for names).
        optimizer: its ``step()`` marks a step (hooks, so the loop does not change);
            without one, call :meth:`step` after each update.
        every: record every ``every``-th step only (others cost almost nothing).
        store: a run directory to stream to (see :mod:`gradprobe.store`).
        stats: ``"cheap"``, ``"default"``, ``"full"`` (adds activation histograms), or a
            list of statistic names from ``gradprobe.stats.STATISTICS``.
        modules: which modules to probe: by default every leaf module and every module
            with parameters of its own; or a list of qualified names; or a predicate
            ``(name, module) -> bool``.
        flush_every: recorded steps kept on the device between host copies.
        dead_window: recorded steps a unit must stay 0 to count in ``dead_window_frac``.
        histogram_bins: bins of the activation histograms (with ``stats="full"``).
        label: a name for the run (reports and lab tables use it).
        config: anything JSON-serialisable to keep in the run's meta (hyper-parameters).
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop: steps it skips
            are recorded as ``skipped`` (and their statistics dropped), and the pre-clip
            gradient norm is unscaled by it.
        process_group: the data-parallel group (default: the whole world).
        sync_ranks: combine statistics across ranks; by default, whenever
            ``torch.distributed`` is initialised with more than one rank. Sharded
            (FSDP2) parameters' norms are combined across their shards at each step
            unless it is ``False``; then they are left out, with one warning.

    Use it as a context manager, or call :meth:`close`: that removes every hook and
    leaves the model exactly as it was. Keep a reference to the Probe while training:
    its hooks hold it only weakly, and remove themselves if it is garbage-collected.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int = 1,
        store: str | os.PathLike[str] | None = None,
        stats: str | Sequence[str] = "default",
        modules: Sequence[str] | ModuleFilter | None = None,
        flush_every: int = 50,
        dead_window: int = 10,
        histogram_bins: int = 40,
        label: str | None = None,
        config: dict[str, Any] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        process_group: Any = None,
        sync_ranks: bool | None = None,
    ) -> None:
        _validate(model, optimizer, every, flush_every, dead_window, histogram_bins)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise GradprobeError(
                f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}",
                "pass the GradScaler whose step() and update() your loop calls",
            )
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if sync_ranks and not distributed:
            raise GradprobeError(
                "sync_ranks=True but torch.distributed is not initialised",
                "call torch.distributed.init_process_group first, or leave sync_ranks unset",
            )
        # The group is looked up when the first step closes (see _resolve_ranks).
        self._sync_ranks = sync_ranks
        self._distributed = distributed
        self._process_group = process_group
        self._ranks_resolved = False
        self.compiled = is_compiled(model)
        self.every = every
        self.flush_every = flush_every
        self.stats = _resolve_stats(stats)
        self.histograms = stats == "full"
        # NaN/Inf: exact counts of entries under "full"; elsewhere a flag that the norms
        # carry at no extra pass (gradprobe/reduce.py).
        self.exact_counts = stats == "full"
        self.label = label
        inner = unwrap_model(model)
        self._model_ref = weakref.ref(inner)
        self._optimizer_ref = weakref.ref(optimizer) if optimizer is not None else None

        self._slots = _select_modules(inner, modules)
        self._param_names, self._params = _trainable_parameters(inner)
        # FSDP2: sharded parameters, whose norms add up over the ranks at each step.
        self._shards = ShardedNorms(self._params, inner)
        self.buffer = StepBuffer(
            len(self._slots),
            len(self._params),
            dead_window=dead_window,
            histogram_bins=histogram_bins if self.histograms else 0,
        )
        self.step_index = 0
        self._recording = True
        self._closed = False
        self._failed_where: set[str] = set()
        self._execution_order: list[int] = []
        self._seen_slots: set[int] = set()
        self._layout_by_shape: dict[tuple[int, ...], str] = {}
        # (dims, layout, units) seen on a typed module's input or output, the layout each
        # element-wise module took, and unit activity waiting for the step's end to say it.
        self._layout_signatures: set[tuple[int, str, int]] = set()
        self._slot_layout: dict[int, str] = {}
        self._deferred_units: list[tuple[int, tuple[int, ...], Tensor]] = []
        # Small outputs waiting for the end of the forward (see _hold), and the modules
        # whose outputs were written in place after their hook: reduced in the hook.
        self._held: list[tuple[_Slot, Tensor, int, int]] = []
        self._held_numel = 0
        self._unbatched: set[int] = set()
        self._batch_safe: set[int] = set()
        self._staging_buffers: dict[tuple[Any, ...], Tensor] = {}
        self._index_tensors: dict[tuple[Any, ...], Tensor] = {}
        # Error signals (kind, slot) seen to stay as they came until the backward ended
        # (their norms are then batched at its end), and those seen changed (never).
        self._errors_batch_safe: set[tuple[str, int]] = set()
        self._errors_unbatched: set[tuple[str, int]] = set()
        self._deferred_numel = 0
        self._watched: list[tuple[int, Tensor, int]] = []
        # Shapes two typed modules read in different layouts ([B, T, W] features and, with
        # T == W, [B, W, T] channels after a transpose): their shape says nothing.
        self._ambiguous_shapes: set[tuple[int, ...]] = set()
        # What each module's units turned out to be ("feature" or "channel"), for the meta.
        self._unit_kinds: dict[int, str] = {}
        # One weak reference for every hook: the hooks must not keep the Probe alive.
        self._ref = weakref.ref(self)
        self._frames: list[pd.DataFrame] = []
        self._listeners: list[Callable[[pd.DataFrame], None]] = []
        self._snapshot: (
            dict[tuple[torch.device, torch.dtype], tuple[list[int], list[Tensor], Tensor]] | None
        ) = None
        self._zeros: dict[tuple[torch.device, int], Tensor] = {}
        # Gradient norms of the last finished backward pass, by (device, parameter indices).
        self._preclip: dict[
            tuple[torch.device, tuple[int, ...]], tuple[Tensor, list[bool] | None]
        ] = {}
        # The .grad tensors and versions those norms were taken of (see _grads_untouched).
        self._grad_versions: dict[tuple[torch.device, tuple[int, ...]], list[tuple[int, int]]] = {}
        # ‖w‖ just taken for param_norm: the update_ratio snapshot reuses them.
        self._param_norms_now: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
        self._backward_pending = False
        self._scaler_ref = weakref.ref(scaler) if scaler is not None else None
        self._scale_marker = _scale_marker(scaler)
        self._stepped_since_update = False
        # Error signals wait for their backward pass to end: only .backward() counts.
        self._traversals = Traversals()
        # The last step in which a probed module ran under grad (which step log() is for).
        self._forward_step = -1

        want = set(self.stats)
        self._want_output = bool(want & {"act_mean", "act_std", "zero_frac"})
        self._want_nonfinite = "nonfinite" in want
        self._want_units = bool(want & {"dead_frac", "dead_window_frac"})
        self._want_gate = bool(want & {"gate_mean", "sat_frac"})
        self._want_error = bool(want & {"error_norm", "error_gain", "error_nonfinite"})
        self._want_input_error = "error_gain" in want
        self._want_params = bool(
            want
            & {
                "grad_norm",
                "param_norm",
                "update_ratio",
                "nonfinite",
                "global_grad_norm",
                "clipped",
            }
        )
        self._want_update = "update_ratio" in want
        self._want_forward = (
            self._want_output or self._want_nonfinite or self._want_units or self._want_gate
        )
        self._want_preclip = bool(want & {"global_grad_norm_preclip", "clipped"})
        # Gated recurrent modules whose carry gates are measured (gradprobe.recurrent).
        self._carry_slots = frozenset()
        if want & {"carry_gate_mean", "memory_steps", "seq_len"}:
            by_name = dict(inner.named_modules())
            self._carry_slots = carry_slots([(s.index, by_name[s.name]) for s in self._slots])

        self._meta = self._describe(inner, config)
        if optimizer is not None:
            self._meta["optimizer"] = _optimizer_meta(optimizer)
        self._meta["probe"].update(scaler=scaler is not None, compiled=self.compiled, world_size=1)
        # Every rank holds the combined statistics; one writes them.
        rank_zero = not distributed or torch.distributed.get_rank() == 0
        self._store = Store(store, self._meta) if store is not None and rank_zero else None
        if self.compiled:
            warnings.warn(
                "gradprobe: the model is compiled (torch.compile). Every statistic is recorded, "
                "but the module hooks run outside the compiled graphs, so the graph breaks at "
                "each probed module and fusion across modules is lost. To keep the graph whole, "
                "probe parameters only (modules=[]: grad/param norms, update ratios, global and "
                "pre-clip norms need no module hooks), probe a few modules (modules=[...]), or "
                "take the full per-layer statistics on a short uncompiled run.",
                GradprobeWarning,
                stacklevel=2,
            )

        self._hooks = HookSet()
        # Module and gradient hooks, on the model only for recorded steps.
        self._step_hooks = HookSet()
        self._step_hooks_on = False
        self._register(inner, optimizer)
        # If the Probe is dropped without close(), its hooks must not outlive it.
        self._finalizer = weakref.finalize(self, _remove_all, self._hooks, self._step_hooks)
        if optimizer is None and self._want_update:
            self._take_snapshot()

    # ================================================================ public API
    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def meta(self) -> dict[str, Any]:
        return {**self._meta, **self._progress()}

    def _progress(self) -> dict[str, Any]:
        """What is learned while training: forward order, steps, each module's units."""
        modules = [
            {**info, "units": self._unit_kinds[i]} if i in self._unit_kinds else info
            for i, info in enumerate(self._meta["modules"])
        ]
        return {
            "execution_order": self._order_names(),
            "steps": self.step_index,
            "modules": modules,
        }

    @property
    def closed(self) -> bool:
        return self._closed

    def step(self) -> None:
        """Mark the end of a step when no optimizer was given (after the update)."""
        if self._optimizer_ref is not None:
            raise GradprobeError(
                "Probe.step() was called but the Probe watches an optimizer",
                "its step() already marks each step: remove the call to probe.step()",
            )
        if self._closed:
            return
        self._poll_scaler()
        if self._recording:
            self._guard_params(self._record_params, "probe.step")
            if self._want_update and self._snapshot is not None:
                self._guard_params(self._record_updates, "probe.step (update ratio)")
        self._stepped_since_update = True
        self._end_step()
        if self._recording and self._want_update:
            self._guard_params(self._take_snapshot, "probe.step (snapshot)")

    def frame(self) -> pd.DataFrame:
        """All recorded rows so far (columns step, name, stat, value); flushes the buffer.

        Under DDP the flush is collective: call it on every rank (each gets the same rows).
        """
        if not self._closed:
            self._poll_scaler()
        self._flush(final=True)
        if self._store is not None:
            # With a store the rows live on disk only: a long run must not grow in memory.
            return load(self._store.path).frame()
        if not self._frames:
            return empty_frame()
        return pd.concat(self._frames, ignore_index=True)

    def run(self) -> Run:
        """What has been recorded so far, as a :class:`~gradprobe.run.Run`."""
        return Run(self.meta, self.frame(), path=self._store.path if self._store else None)

    def add_listener(self, listener: Callable[[pd.DataFrame], None]) -> Callable[[], None]:
        """Call ``listener(rows)`` with the rows of every flush, on the host; returns its remover.

        Live writers (e.g. :mod:`gradprobe.integrations.tensorboard`) use it: they see each
        step once, when it is flushed, and cost the training loop nothing in between.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def log(self, **scalars: Tensor | float) -> None:
        """Record scalars of the training step as ``(model)`` rows: ``probe.log(loss=loss)``.

        A tensor (one element) stays on its device, detached, until the flush: logging
        costs no host sync. Python and NumPy numbers are taken as they are. A step's row
        is the mean of the values logged for it (its micro-batches: log each one's own
        loss, not divided by the accumulation steps), and under DDP the mean over the
        ranks that logged it.

        Which step a value belongs to: the step in progress if the model (or any probed
        module) has run a forward pass under grad since the last optimizer step; otherwise (logged after
        ``optimizer.step()``, before the next forward) the step that just closed. Values
        for steps that ``every`` does not record are dropped, as are values logged after
        :meth:`close`. ``lr`` is read from the optimizer at each step; log it yourself
        only when the Probe watches no optimizer.
        """
        reads_lr = self._optimizer_ref is not None
        values = {name: _loggable(name, value, reads_lr) for name, value in scalars.items()}
        if self._closed or not values:
            return
        step = self.step_index
        if step not in (self._trained_step, self._forward_step) and step > 0:
            step -= 1  # no training pass since the optimizer step: the loss is that step's
        if step % self.every != 0:
            return
        for name, value in values.items():
            self.buffer.log(step, name, value)

    def close(self) -> None:
        """Remove every hook, flush, finish the store. Idempotent."""
        if self._closed:
            return
        self._poll_scaler()  # a last step the scaler skipped
        self._closed = True
        self._guard(self._hooks.remove, "close (removing hooks)")
        self._guard(self._step_hooks.remove, "close (removing hooks)")
        self._step_hooks_on = False
        self._finalizer.detach()
        self._flush(final=True)  # never raises
        if self._store is not None:
            store = self._store
            self._guard(lambda: store.close(**self._progress(), finished=_now()), "close (store)")
        self._params = []
        self._snapshot = None
        self._preclip = {}
        self._deferred_units = []


    # ================================================================ registration
    def _register(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        ref = self._ref
        # Is the current pass of the probed model trained? Decided once per pass by the
        # hooks on the model itself (see _call_mode and docs/recording.md).
        self._pass_open = False
        self._pass_trained = False
        self._trained_step = -1  # the last step with a recorded pass
        self._eval_grad_step: int | None = None  # a step with eval() passes under grad
        # Calls whose first run could not register error-signal hooks (a reentrant
        # checkpoint runs it under no_grad): their recomputation in backward registers them.
        self._owed_error_hooks: dict[int, int] = defaultdict(int)
        self._unreadable: set[str] = set()
        # Under torch.compile the hooks must run eagerly: traced, their appends to Python
        # lists would guard on list lengths and recompile every call.
        hook = _eager_hooks() if self.compiled else ModuleHook
        hooks = self._hooks
        # ModuleHook, not a closure: it pickles and deep-copies as an inert no-op, so the
        # model can be saved or copied while probed (see gradprobe.hooks).
        hooks.add(
            model.register_forward_pre_hook(
                hook(_pass_start_hook, ref, -1, model, hooks), prepend=True, with_kwargs=True
            )
        )
        self._hook_factory = hook
        self._attach_step_hooks()
        # Registered last, so that it closes the pass after the model's own forward hook;
        # always called, so that a forward that raises closes it too.
        hooks.add(
            model.register_forward_hook(
                hook(_pass_end_hook, ref, -1, model, hooks), with_kwargs=True, always_call=True
            )
        )
        if optimizer is not None:
            self._hooks.add(optimizer.register_step_pre_hook(partial(_step_pre_hook, ref)))
            self._hooks.add(optimizer.register_step_post_hook(partial(_step_post_hook, ref)))

    def _attach_step_hooks(self) -> None:
        """The hooks that record a step: on each probed module, and on each parameter's
        gradient accumulation. They are on the model only while a recorded step runs
        (see :meth:`_sync_step_hooks`): a hook that returns at once still costs its call
        and takes the module off PyTorch's fast path (≈ +10 % on a 12×256 MLP)."""
        ref, hook, hooks = self._ref, self._hook_factory, self._step_hooks
        model = self._model_ref()
        if model is None:
            return
        by_name = dict(model.named_modules())
        # Statistics the user did not ask for cost nothing: no module statistic, no hook.
        module_stats = {n for n, st in STATISTICS.items() if st.module is not None}
        for slot in self._slots if module_stats & set(self.stats) or self.histograms else []:
            module = by_name.get(slot.name)
            if module is None:
                continue
            pre_hook = hook(_pre_hook, ref, slot.index, module, hooks)
            forward_hook = hook(_forward_hook, ref, slot.index, module, hooks)
            hooks.add(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            hooks.add(module.register_forward_hook(forward_hook, with_kwargs=True))
        # Post-accumulate hooks also tell which backward passes count for error signals.
        if self._want_preclip or self._want_error:
            for p in self._params:
                if p.requires_grad:
                    hooks.add(
                        p.register_post_accumulate_grad_hook(partial(_post_accumulate_hook, ref))
                    )
        self._step_hooks_on = True

    def _sync_step_hooks(self) -> None:
        """Put the step hooks on for a recorded step, take them off for the others. Not
        for a compiled model: each change of its hooks would recompile it."""
        wanted = self._recording or self.compiled
        if wanted and not self._step_hooks_on:
            self._attach_step_hooks()
        elif not wanted and self._step_hooks_on and not _inside_backward():
            self._step_hooks.remove()
            self._step_hooks_on = False

    def _trained_now(self) -> bool:
        """A pass is trained if gradients are enabled and the probed model is in train()
        mode; a submodule's own flag (frozen BatchNorm, a backbone in eval()) does not count."""
        model = self._model_ref()
        return model is not None and model.training and torch.is_grad_enabled()

    def _on_pass_start(self) -> None:
        """The probed model's forward begins: decide, once for the whole pass, whether
        its modules are recorded (see docs/recording.md, "Training passes and eval()")."""
        if _inside_backward():
            return  # the model itself recomputed by checkpointing: not a pass
        if self._forward_step != self.step_index and torch.is_grad_enabled():
            self._forward_step = self.step_index  # a forward under grad in this step (log())
        self._check_trained_in_eval()  # before this pass counts
        self._pass_open = True
        self._pass_trained = self._trained_now()
        if self._pass_trained:
            self._trained_step = self.step_index
        elif torch.is_grad_enabled():
            self._eval_grad_step = self.step_index

    def _on_pass_end(self) -> None:
        if self._held or self._watched:
            self._reduce_held()
        if not _inside_backward():
            self._pass_open = False
            if self._shards.awaiting_unsharded and self._want_error:
                self._hook_unsharded_params()  # FSDP2 made them in this forward

    def _check_trained_in_eval(self) -> None:
        """Say once if the model is trained in eval() mode: then nothing of its modules is
        recorded. Host-side: a step ended after an eval() pass under grad, with no trained
        pass in that step."""
        step = self._eval_grad_step
        if step is None or self.step_index <= step:
            return
        self._eval_grad_step = None
        if self._trained_step != step:
            warn_gap(
                self._unreadable,
                "trained in eval",
                "gradprobe: the model is in eval() mode with gradients enabled and an optimizer "
                "step followed: passes in eval() mode are not recorded (as validation and "
                "saliency maps are not), so its modules have no rows. To record training "
                "in eval() mode, keep the model in train() and put the submodules that must "
                "not change in eval() (frozen BatchNorm, no dropout): the computation is the "
                "same, and a submodule's own mode does not stop recording",
            )

    def _call_mode(self) -> int:
        """What a module hook does with this call: skip it, record it, or (a forward run
        again inside backward by activation checkpointing) register only owed hooks."""
        if self._forward_step != self.step_index and torch.is_grad_enabled():
            self._forward_step = self.step_index  # a forward under grad in this step (log())
        if self._closed or not self._recording:
            return _SKIP
        if _inside_backward():
            # The first run of this forward was recorded; this one must not double it.
            return _RECOMPUTE if self._trained_now() else _SKIP
        if self._pass_open:
            return _RECORD if self._pass_trained else _SKIP
        # A submodule called outside the model's forward: the same rule, judged now.
        return _RECORD if self._trained_now() else _SKIP

    def _unreadable_module(self, k: int, side: str, value: Any) -> None:
        """One warning per module whose output (or input) holds no floating-point tensor."""
        name = self._slots[k].name
        warn_gap(
            self._unreadable,
            f"{side} {k}",
            f"gradprobe: module {name!r} ({self._slots[k].type}) has no floating-point tensor "
            f"in its {side} (a {type(value).__name__}): its {side} statistics are not "
            "recorded. gradprobe reads the first floating-point tensor of a module's "
            f"{side}, through tuples, lists, dicts, dataclasses and pytrees "
            "(docs/recording.md)",
        )

    # ================================================================ module hooks
    # Each hook launches only the reductions it needs and hands the 0-d results to the
    # buffer: on small layers the number of ops, not their size, is what costs.
    def _on_recomputed_pre(self, k: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Checkpointing re-runs this forward inside backward: its statistics were taken in
        the first run. Only an owed error-signal hook (see _on_recomputed) needs the input."""
        x = _first_float_tensor((args, kwargs))
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
        # "The" input: the first floating-point tensor, positional arguments before keywords.
        x = _first_float_tensor((args, kwargs))
        slot = self._slots[k]
        if slot.inplace and (self._held or self._watched):
            self._reduce_held()  # it will write over its input, which may be held
        if x is None:
            if slot.activation is not None and self._want_gate:
                self._unreadable_module(k, "input", args)  # the gate needs it
            return
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
                    saturated = torch.count_nonzero(gate < SAT_THRESHOLD * act.max_derivative)
                else:
                    saturated = self._zero(z.device)
                total = gate.sum(dtype=_sum_dtype(gate))
                self.buffer.record("gate", k, z.device, z.numel(), total, saturated)
            self.buffer.add_host(k, "gate_count", z.numel())
            if act.saturates:
                self.buffer.add_host(k, "sat_count_n", z.numel())

    def _on_forward(self, k: int, module: nn.Module, output: Any) -> None:
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
        self.buffer.add_host(k, "count", n)
        with torch.no_grad():
            yd = y.detach()
            if not self._hold(slot, yd):
                self._forward_stats(slot, yd, self._units_of(slot, yd))
            if self.histograms:
                lo, hi = slot.histogram_range
                counts = torch.histc(yd.float().clamp(lo, hi), self.buffer.histogram_bins, lo, hi)
                self.buffer.record_histogram(k, y.device, counts)
        if self._want_error and y.requires_grad:
            self._hook_errors(k, y)

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
        faults on every touch: it was the dearest op here); after the reductions that need
        the values it is overwritten in place (|y|, then sign) for the ones that do not."""
        slots = [e[0] for e in entries]
        ks = [s.index for s in slots]
        stacked = self._staging(entries)
        rows = stacked.view(len(entries), -1)
        n = rows.shape[1]
        want_gate = self._want_gate
        relu = [i for i, s in enumerate(slots) if want_gate and s.gate_from_output == "relu"]
        tanh = [i for i, s in enumerate(slots) if want_gate and s.gate_from_output == "tanh"]
        other = [
            i for i, s in enumerate(slots) if want_gate and s.gate_from_output == "sigmoid"
        ]
        measure = self._want_output or relu or tanh or other
        if measure or self._want_nonfinite:
            norms, finite = row_norms(rows)
            nonfinite = self._nonfinite_rows(rows, norms, finite)
        if measure:
            totals = rows.sum(dim=1, dtype=_sum_dtype(rows))
            for i in other:  # reads the values: before they are overwritten below
                self._gate_from_output(slots[i], entries[i][1], totals[i], norms[i], None)
        if unit >= 0:
            dims = tuple(d + 1 for d in range(stacked.dim() - 1) if d != unit)
            activity = _activity(stacked, dims) if dims else stacked.abs()
            for k, row in zip(ks, activity.unbind(0)):
                self._note_unit_kind(k, unit, stacked.dim() - 1)
                self.buffer.record_units(k, device, row.reshape(-1))
        if not measure:
            if self._want_nonfinite:
                self.buffer.record_many("nonfinite", ks, device, n, nonfinite)
            return
        rows.abs_()
        if tanh:  # f' = 1 − y² < 1% where |y| > √0.99
            over = (rows > math.sqrt(1.0 - SAT_THRESHOLD)).sum(dim=1)
        # Per-row count_nonzero branches per entry (~8× a sum here); sign(|y|) is 0 or 1
        # and its float sum exact (rows ≤ 2²⁴ entries); NaN stays NaN: counted by bool.
        rows.sign_()
        finite_rows = finite is not None and all(finite)
        nonzero = rows.sum(dim=1) if finite_rows else rows.bool().sum(dim=1)
        if self._want_output:
            self.buffer.record_many("out", ks, device, n, totals, norms, nonzero, nonfinite)
        elif self._want_nonfinite:
            self.buffer.record_many("nonfinite", ks, device, n, nonfinite)
        if relu:  # f' = 1 where y > 0: the non-zero count; never saturates
            index = self._index(relu, device)
            zeros = self._zero(device).expand(len(relu))
            self.buffer.record_many(
                "gate", [ks[i] for i in relu], device, n, nonzero.index_select(0, index), zeros
            )
            for i in relu:
                self.buffer.add_host(ks[i], "gate_count", n)
        if tanh:
            index = self._index(tanh, device)
            sumsq = norms.index_select(0, index).to(accumulation_dtype(device)) ** 2
            self.buffer.record_many(
                "gate", [ks[i] for i in tanh], device, n, n - sumsq, over.index_select(0, index)
            )
            for i in tanh:
                self.buffer.add_host(ks[i], "gate_count", n)
                self.buffer.add_host(ks[i], "sat_count_n", n)

    def _index(self, rows: list[int], device: torch.device) -> Tensor:
        """An index tensor, made once per pattern (no host-to-device copy per step)."""
        key = (tuple(rows), device)
        index = self._index_tensors.get(key)
        if index is None:
            index = self._index_tensors[key] = torch.tensor(rows, device=device)
        return index

    def _staging(self, entries: list[tuple[_Slot, Tensor, int, int]]) -> Tensor:
        """``torch.stack`` of the held outputs into a buffer kept for their shape (grown
        when more calls come); its memory is counted in the run's meta."""
        first = entries[0][1]
        key = (tuple(first.shape), first.dtype, first.device)
        buffer = self._staging_buffers.get(key)
        if buffer is None or buffer.shape[0] < len(entries):
            buffer = torch.empty((len(entries), *first.shape), dtype=first.dtype, device=first.device)
            self._staging_buffers[key] = buffer
            held = sum(b.numel() * b.element_size() for b in self._staging_buffers.values())
            self._meta["probe"]["staging_bytes"] = held
        out = buffer[: len(entries)]
        torch.stack([e[1] for e in entries], out=out)
        return out

    def _nonfinite_rows(self, rows: Tensor, norms: Tensor, finite: list[bool] | None) -> Tensor:
        """Per row, as :meth:`_nonfinite`."""
        if self.exact_counts:
            return torch.count_nonzero(rows - rows, dim=1)
        if finite is not None:
            return torch.tensor([0.0 if ok else 1.0 for ok in finite], device=rows.device)
        return ~torch.isfinite(norms)

    def _forward_stats(self, slot: _Slot, yd: Tensor, unit: int | None) -> None:
        """Output, non-finite, gate (from the output) and unit statistics of one call."""
        k, n, device = slot.index, yd.numel(), yd.device
        with torch.no_grad():
            gate = self._want_gate and slot.gate_from_output is not None
            if self._want_output or gate:
                # sum and norm are each a single cheap kernel (var_mean is several times
                # dearer); the norm carries the NaN/Inf flag (gradprobe/reduce.py).
                norm, finite = l2_norm(yd)
                total = yd.sum(dtype=_sum_dtype(yd))
                nonzero = nonzero_count(yd)
                if self._want_output:
                    nonfinite = self._nonfinite(yd, norm, finite)
                    self.buffer.record("out", k, device, n, total, norm, nonzero, nonfinite)
                elif self._want_nonfinite:
                    self.buffer.record("nonfinite", k, device, n, self._nonfinite(yd, norm, finite))
                if gate:
                    self._gate_from_output(slot, yd, total, norm, nonzero)
            elif self._want_nonfinite:
                norm, finite = l2_norm(yd)
                self.buffer.record("nonfinite", k, device, n, self._nonfinite(yd, norm, finite))
            if unit != -1:
                self._record_units(slot, yd, unit)

    def _gate_from_output(
        self, slot: _Slot, y: Tensor, total: Tensor, norm: Tensor, nonzero: Tensor | None
    ) -> None:
        """Gate statistics of a stock ReLU, tanh or sigmoid from its output y = f(z): the
        sum of f'(z) from the output's own sum, norm and non-zero count; the saturated
        entries (f' < 1% of its maximum) in one comparison. z itself may be gone (an
        in-place module writes y over it)."""
        k, n, device = slot.index, y.numel(), y.device
        name = slot.gate_from_output
        if name == "relu":  # f' = 1 where y > 0, else 0; never saturates
            assert nonzero is not None
            self.buffer.record("gate", k, device, n, nonzero, self._zero(device))
        else:
            sumsq = norm.to(accumulation_dtype(device)) ** 2
            if name == "tanh":  # f' = 1 − y²: saturated where y² > 1 − 0.01
                gate_sum = n - sumsq
                saturated = torch.count_nonzero(y.abs() > math.sqrt(1.0 - SAT_THRESHOLD))
            else:  # sigmoid, f' = y(1 − y) ≤ 1/4: saturated where |y − ½| > √(¼ − 0.01·¼)
                gate_sum = total - sumsq
                bound = math.sqrt(0.25 - SAT_THRESHOLD * 0.25)
                saturated = torch.count_nonzero((y - 0.5).abs() > bound)
            self.buffer.record("gate", k, device, n, gate_sum, saturated)
            self.buffer.add_host(k, "sat_count_n", n)
        self.buffer.add_host(k, "gate_count", n)

    def _zero(self, device: torch.device) -> Tensor:
        return self._constant(device, 0)

    def _constant(self, device: torch.device, value: int) -> Tensor:
        """A 0-d tensor of 0 or 1 to record (the buffer stacks copies: it is never written)."""
        constant = self._zeros.get((device, value))
        if constant is None:
            constant = self._zeros[(device, value)] = torch.full((), float(value), device=device)
        return constant

    def _nonfinite(self, t: Tensor, norm: Tensor, finite: bool | None) -> Tensor:
        """NaN/Inf entries of ``t``: their exact number under ``stats="full"``, else a flag
        (0 or 1) that the norm already carries, at no extra pass (gradprobe/reduce.py)."""
        if self.exact_counts:
            return torch.count_nonzero(t - t)  # t − t is NaN exactly where t is NaN or ±Inf
        if finite is not None:
            return self._constant(t.device, 0 if finite else 1)
        return ~torch.isfinite(norm)

    def _record_units(self, slot: _Slot, y: Tensor, unit: int | None) -> None:
        """Per-unit activity of one call: max |y| per unit, > 0 iff the unit fired somewhere
        (cheaper than counting). ``unit``: from :meth:`_unit_dim`, in call order."""
        k = slot.index
        if unit is None:
            # An element-wise module on a tensor no module has shown the layout of yet (the
            # model's input, first step): reduce the batch dimension now, the rest when the
            # step closes, by when the module that reads this tensor has said.
            self._deferred_units.append((k, tuple(y.shape), _activity(y, (0,))))
            return
        self._note_unit_kind(k, unit, y.dim())
        dims = tuple(d for d in range(y.dim()) if d != unit)
        self.buffer.record_units(k, y.device, _activity(y, dims).reshape(-1))

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
        y.register_hook(partial(_output_grad_hook, self._ref, k, token))
        edge = self._traversals.input_edges.pop(k, None)
        if edge is None or y.grad_fn is None:
            return
        if input_edge(y) == edge:  # the input passed through (an identity): same signal
            y.register_hook(partial(_input_grad_hook, self._ref, k, token))
            return
        readers = consumer_edges(y.grad_fn, edge)
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
        for node, indices in readers:
            node.register_hook(
                partial(_input_share_hook, self._ref, k, token, indices, len(readers))
            )

    def _on_error_grad(self, k: int, grad: Tensor, kind: str, token: int) -> None:
        if self._closed:
            return
        self._record_error(self._pending_errors(), kind, k, token, grad.detach())

    def _record_error(self, pending: Any, kind: str, k: int, token: int, g: Tensor) -> None:
        """The norm of one error signal: now, or (small, and its module's signals seen to
        stay as they came until the pass ends) with the others at the pass's end."""
        record = (kind, k, token, g.device, g.numel())
        small = g.numel() <= self._HELD_NUMEL and not self.exact_counts
        room = self._deferred_numel + g.numel() <= self._HELD_NUMEL_TOTAL
        if small and room and (kind, k) in self._errors_batch_safe:
            self._deferred_numel += g.numel()
            pending.deferred[len(pending.records)] = (g, g._version)
            pending.records.append((*record, ()))
            return
        with torch.no_grad():
            # Screened float32, or float64: 1e-20 signals of vanishing nets must not
            # underflow (gradprobe/reduce.py). On the input side the norm itself carries
            # NaN/Inf (a NaN/Inf error_gain where dL/d(output) is finite).
            norm, finite = l2_norm(g)
            values = (norm, self._nonfinite(g, norm, finite)) if kind == "err" else (norm,)
        pending.records.append((*record, values))
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
        for (device, _dtype), indices in groups.items():
            with torch.no_grad():
                norms, finite = l2_norms([pending.deferred[i][0] for i in indices], device)
                flags = self._grads_nonfinite(device, [], norms, finite)
            for j, i in enumerate(indices):
                kind, k, token, dev, numel, _ = pending.records[i]
                values = (norms[j], flags[j]) if kind == "err" else (norms[j],)
                pending.records[i] = (kind, k, token, dev, numel, values)
        pending.deferred = {}

    def _on_input_share(
        self,
        k: int,
        token: int,
        indices: tuple[int, ...],
        nodes: int,
        grad_inputs: Sequence[Tensor | None],
    ) -> None:
        """One of the module's nodes that read its input has run: add its gradients."""
        if self._closed:
            return
        grads = [grad_inputs[i] for i in indices if grad_inputs[i] is not None]
        if not grads:
            return
        with torch.no_grad():
            share = grads[0].detach()
            for g in grads[1:]:
                share = share + g.detach()
        pending = self._pending_errors()
        total = self._traversals.add_share(pending, k, token, nodes, share)
        if total is None:
            return
        self._record_error(pending, "in_err", k, token, total)

    def _pending_errors(self) -> Any:
        """The current backward pass's waiting results; its end is queued on first use."""
        task = torch._C._current_graph_task_id()
        pending, new = self._traversals.task(task)
        if new and (self._held or self._watched):
            self._reduce_held()  # backward began: the forward's held outputs are complete
        if new:
            queue_at_backward_end(partial(_errors_end_hook, self._ref, task, self.step_index))
        return pending

    def _note_accumulation(self) -> None:
        """A ``.grad`` was accumulated: this backward pass's error signals count."""
        self._traversals.accumulating.add(torch._C._current_graph_task_id())

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
            self.buffer.record(kind, k, device, numel, *values)
            self.buffer.add_host(k, f"{kind}_calls")

    def _error_gap(self, k: int, level: float, cause: str, message: str) -> None:
        """Leave module ``k``'s error statistics out of this step, with one warning."""
        self.buffer.set_host(k, "err_gap", self._traversals.gap(k, level, self.step_index))
        self._traversals.warn_once(cause, message)

    # ================================================================ parameter hooks
    def _param_groups(self, with_grad: bool) -> dict[tuple[torch.device, torch.dtype], list[int]]:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, p in enumerate(self._params):
            if with_grad and p.grad is None:
                continue
            groups[(p.device, p.dtype)].append(i)
        return groups

    def _record_missing_grads(self) -> None:
        """Flag the parameters the optimizer holds for training that got no gradient.

        Not flagged: parameters the optimizer does not hold, or with ``requires_grad=False``
        (frozen on purpose). Host-only: ``.grad is None`` is known without the device.
        """
        optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
        if optimizer is None or "grad_missing" not in self.stats:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [
            i
            for i, p in enumerate(self._params)
            if p.grad is None and p.requires_grad and id(p) in held
        ]
        if missing:
            self.buffer.set_param_host(missing, "grad_missing")

    @torch.no_grad()
    def _record_params(self) -> None:
        """Gradient norms, parameter norms, NaN/Inf counts: one batched pass per group."""
        preclip, self._preclip = self._preclip, {}
        # Sharded parameters' values (of local shards) wait for the step's one collective.
        record = partial(self._shards.record, self.buffer)
        for (device, idx), (norms, _finite) in preclip.items():
            record(device, list(idx), "preclip_norm", norms)
            self.buffer.set_param_host(list(idx), "has_preclip")
        self._record_missing_grads()
        if not self._want_params:
            return
        preclip_by_key = {key: value for key, value in preclip.items()}
        for (device, _dtype), idx in self._param_groups(with_grad=True).items():
            params = local_shards([self._params[i] for i in idx])
            grads = _grad_values([self._params[i].grad for i in idx])
            # The norms backward left are these very gradients' where nothing touched
            # them since (no clipping, no scaler): one pass fewer.
            same = preclip_by_key.get((device, tuple(idx)))
            if same is not None and self._grads_untouched(idx):
                grad_norms, finite = same
            else:
                grad_norms, finite = l2_norms(grads, device)
            record(device, idx, "grad_norm", grad_norms)
            # Only what is asked: each is a pass over every parameter.
            if "param_norm" in self.stats:
                record(device, idx, "param_norm", self._before_norms(device, idx, params))
            if "nonfinite" in self.stats:
                flags = self._grads_nonfinite(device, grads, grad_norms, finite)
                record(device, idx, "grad_nonfinite", flags)
            self.buffer.set_param_host(idx, "has_grad")

    def _end_sharded_step(self) -> None:
        """Sharded parameters' norms of the step: their shards' squares summed across the
        ranks, by all of them (whatever failed before on one), unless told not to combine
        ranks: then they are left out, with one warning (a shard's norm is not theirs)."""
        if self._sync_ranks is not False:
            self._shards.reduce(self.buffer)
            return
        self._shards.drop(self.buffer)
        warn_gap(
            self._failed_where,
            "sharded parameters",
            "gradprobe: sync_ranks=False, so the norms of sharded (FSDP2) parameters are "
            "not combined across ranks; a shard's norm is not the parameter's, so they and "
            "the global norms are not recorded. Leave sync_ranks unset to have them",
        )

    def _hook_unsharded_params(self) -> None:
        """Hook FSDP2's full parameters, which it makes at its first all-gather: backward
        accumulates into them, and without gradient sync only into them, so they say
        which backward passes count for error signals (the sharded ones' hooks fire only
        where FSDP2 reduce-scatters)."""
        for full in self._shards.new_unsharded():
            self._hooks.add(
                full.register_post_accumulate_grad_hook(partial(_accumulated_hook, self._ref))
            )

    def _on_post_accumulate(self) -> None:
        """A parameter's ``.grad`` was accumulated: measure once, when this backward ends."""
        if self._closed or not self._recording or self._backward_pending:
            return
        self._backward_pending = True
        queue_at_backward_end(partial(_backward_end_hook, self._ref, True))

    @torch.no_grad()
    def _record_preclip(self) -> None:
        """Norms of ``.grad`` as backward left them: before clipping, unscaled.

        Kept until the step (the last backward of an accumulation step wins), replaced,
        never summed: the accumulated gradient is what clipping would see.
        """
        self._backward_pending = False
        scaler = self._scaler_ref() if self._scaler_ref is not None else None
        scale = scaler._scale if scaler is not None and scaler.is_enabled() else None
        preclip = {}
        for (device, _dtype), idx in self._param_groups(with_grad=True).items():
            norms, finite = l2_norms(_grad_values([self._params[i].grad for i in idx]), device)
            if scale is not None:
                dtype = accumulation_dtype(device)
                # The scaled loss made scaled gradients: divide on the device, no sync.
                norms = norms.to(dtype) / scale.to(device=device, dtype=dtype)
                self._grad_versions.pop((device, tuple(idx)), None)
            else:  # unscaled: the step may reuse them if nothing touched the gradients
                self._grad_versions[(device, tuple(idx))] = self._versions(idx)
            preclip[(device, tuple(idx))] = (norms, finite)
        self._preclip = preclip

    def _versions(self, idx: list[int]) -> list[tuple[int, int]]:
        """Which tensor each ``.grad`` is and its in-place version: host numbers, no sync."""
        return [(id(g), g._version) for g in (self._params[i].grad for i in idx)]

    def _grads_untouched(self, idx: list[int]) -> bool:
        """Whether the gradients are exactly as the last backward left them (no clipping,
        unscaling, or other in-place change since), read from version counters."""
        key = (self._params[idx[0]].device, tuple(idx)) if idx else None
        before = self._grad_versions.pop(key, None) if key is not None else None
        # Under data parallelism collectives write gradients without a version bump.
        alone = not self._distributed and not self._shards
        return alone and before is not None and before == self._versions(idx)

    def _grads_nonfinite(
        self, device: torch.device, grads: list[Tensor], norms: Tensor, finite: list[bool] | None
    ) -> Tensor:
        """Per gradient: its NaN/Inf entries under ``stats="full"``, else a 0/1 flag the
        norms carry at no extra pass."""
        if self.exact_counts:
            # NaN·0 and Inf·0 are NaN, finite·0 is 0: the ord-0 "norm" counts them.
            return torch.stack(torch._foreach_norm(torch._foreach_mul(grads, 0.0), 0))
        if finite is not None:
            return torch.tensor([0.0 if ok else 1.0 for ok in finite], device=device)
        return ~torch.isfinite(norms)

    def _poll_scaler(self) -> None:
        """Close a step the ``GradScaler`` skipped (never raises: see :meth:`_check_scaler`)."""
        if self._scaler_ref is not None:
            self._guard(self._check_scaler, "the GradScaler watch")

    def _check_scaler(self) -> None:
        """Close a step the ``GradScaler`` skipped: ``update()`` ran but no optimizer step.

        ``update()`` changes the scale tensor in place (also when the value stays), so its
        version counter, read on the host without a sync, counts the updates.
        """
        scaler = self._scaler_ref() if self._scaler_ref is not None else None
        marker = _scale_marker(scaler)
        if marker is None or marker == self._scale_marker:
            return
        previous, self._scale_marker = self._scale_marker, marker
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
        self.buffer.discard_step(self.step_index)
        self._held, self._held_numel, self._watched = [], 0, []
        self._preclip = {}
        self._shards.discard()
        if self._optimizer_ref is not None:
            self._snapshot = None
        if self._recording:
            self.buffer.set_model_host("skipped")
        self._end_step()

    def _before_norms(self, device: torch.device, idx: list[int], params: list[Tensor]) -> Tensor:
        """‖w‖ before the update: from the snapshot when the update already happened."""
        if self._optimizer_ref is None and self._snapshot is not None:
            for (dev, _), (snap_idx, _, norms) in self._snapshot.items():
                if dev == device and snap_idx == idx:
                    return norms
        norms, _ = l2_norms(params, device)
        self._param_norms_now[(device, tuple(idx))] = norms  # the snapshot's, if it follows
        return norms

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        """Copy the parameters that will be updated, for ``update_ratio``."""
        snapshot = {}
        with_grad = self._optimizer_ref is not None
        for key, idx in self._param_groups(with_grad=with_grad).items():
            # Sharded parameters: of this rank's shard, before and after alike.
            params = local_shards([self._params[i].detach() for i in idx])
            # A fresh copy at each step, not a buffer kept between steps: it lives only
            # across optimizer.step(), when the activations are gone, so it never adds
            # to the step's peak memory.
            copies = [p.clone() for p in params]
            norms = self._param_norms_now.get((key[0], tuple(idx)))
            if norms is None:
                norms, _ = l2_norms(copies, key[0])
            snapshot[key] = (idx, copies, norms)
        self._param_norms_now = {}
        self._snapshot = snapshot

    @torch.no_grad()
    def _record_updates(self) -> None:
        snapshot, self._snapshot = self._snapshot, None
        if not snapshot:
            return
        for (device, _dtype), (idx, before, before_norms) in snapshot.items():
            after = local_shards([self._params[i].detach() for i in idx])
            torch._foreach_sub_(before, after)  # the copy is ours: −update, in place
            update_norms, _ = l2_norms(before, device)
            dtype = accumulation_dtype(device)
            self._shards.record_ratio(
                self.buffer,
                device,
                idx,
                "update_ratio",
                update_norms.to(dtype),
                before_norms.to(dtype),
            )
            self.buffer.set_param_host(idx, "has_update")

    def _on_step_pre(self) -> None:
        if self._closed:
            return
        self._poll_scaler()
        if self._recording:
            if "lr" in self.stats:
                self._guard(self._record_lr, "optimizer step (learning rate)")
            self._guard_params(self._record_params, "optimizer step (gradients)")
            if self._want_update:
                self._guard_params(self._take_snapshot, "optimizer step (snapshot)")

    def _on_step_post(self) -> None:
        if self._closed:
            return
        if self._recording and self._want_update and self._snapshot is not None:
            self._guard_params(self._record_updates, "optimizer step (update ratio)")
        self._stepped_since_update = True
        self._end_step()

    def _record_lr(self) -> None:
        """Each param group's learning rate: host numbers (a tensor rate, as capturable
        optimizers keep it, is logged as a tensor: no sync). ``lr`` is the largest; with
        groups at different rates each one's is ``lr/<i>`` too."""
        optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
        if optimizer is None:
            return
        rates = [g["lr"] for g in optimizer.param_groups if "lr" in g]
        if not rates:
            return
        log = partial(self.buffer.log, self.step_index, complete=True)
        if all(not isinstance(r, Tensor) for r in rates):
            floats = [float(r) for r in rates]
            log("lr", max(floats))
            if len(set(floats)) > 1:
                for i, rate in enumerate(floats):
                    log(f"lr/{i}", rate)
            return
        tensors = [r.detach() if isinstance(r, Tensor) else torch.tensor(float(r)) for r in rates]
        if len(tensors) == 1:
            log("lr", tensors[0])
            return
        device = tensors[0].device
        stacked = torch.stack([t.to(device=device, dtype=torch.float64) for t in tensors])
        log("lr", stacked.max())
        for i, rate in enumerate(tensors):
            log(f"lr/{i}", rate)

    # ================================================================ steps and flushes
    def _resolve_ranks(self) -> None:
        """Combine statistics across ranks if asked, or by default when there are several."""
        self._ranks_resolved = True
        dist = torch.distributed
        sync = self._sync_ranks
        if sync is None:
            sync = (
                dist.is_available()
                and dist.is_initialized()
                and dist.get_world_size(self._process_group) > 1
            )
        if sync:
            self.buffer.ranks = Ranks(self._process_group)
            # Every rank then takes part in the unit collectives each step, ran it or not.
            self.buffer.track_units = self._want_units
            self._meta["probe"]["world_size"] = self.buffer.ranks.world

            if self._store is not None:
                self._store.update_meta(probe=self._meta["probe"])

    def _end_step(self) -> None:
        """Close the step. Never raises: a failure is one warning and a gap (this step's
        rows, or a flush's), and the step count moves on."""
        self._backward_pending = False  # a backward that raised never ran its callback
        if not _inside_backward():
            # Nothing of a backward outlives its step: a backward that raised (an OOM retry)
            # never ran the callback that drops its pending results, and with no probed
            # module hooked no pass ever trims the set of passes that accumulated.
            self._owed_error_hooks.clear()
            self._deferred_numel = 0
            self._traversals.pending.clear()
            self._traversals.accumulating.clear()
        if not self._ranks_resolved:
            self._guard(self._resolve_ranks, "the step boundary (process group)")
        if self._recording and self._shards:
            self._guard_params(self._end_sharded_step, "the step boundary (sharded norms)")
        if self._recording and not self._guard(self._close_step, "the step boundary"):
            self._deferred_units = []
            self._held, self._held_numel, self._watched = [], 0, []
            self._guard(
                partial(self.buffer.discard_step, self.step_index), "the step boundary (discard)"
            )
        self.step_index += 1
        self._recording = self.step_index % self.every == 0
        self._guard(self._sync_step_hooks, "the step boundary (hooks)")

    def _close_step(self) -> None:
        if self._held or self._watched:
            self._reduce_held()
        self._record_deferred_units()
        if self._scaler_ref is not None:
            self.buffer.set_model_host("scaler")
        try:
            self.buffer.end_step(self.step_index)
        finally:
            self._warn_unit_problems()
        if len(self.buffer) >= self.flush_every:
            self._flush()

    def _warn_unit_problems(self) -> None:
        problems, self.buffer.unit_problems = self.buffer.unit_problems, []
        for k, before, after in problems:
            name = self._slots[k].name
            warn_gap(
                self._failed_where,
                f"units of {name}",
                f"gradprobe: the number of units of module {name!r} changed from {before} to "
                f"{after}: its output has no fixed feature or channel dimension, so dead_frac "
                "and dead_window_frac are not recorded for it from now on",
            )

    def _flush(self, final: bool = False) -> None:
        """Drain the buffer into rows and write them. Never raises: a failure loses the
        drained steps' rows (one warning), not the run. ``final`` (``frame()``, ``close()``)
        also drains the values logged for the last closed step."""
        if not self._guard(
            partial(self._flush_rows, final), "a flush (the rows of the steps since the last one)"
        ):
            self._guard(self.buffer.forget_logged_of_failed_drain, "a flush (logged values)")

    def _flush_rows(self, final: bool = False) -> None:
        drained = self.buffer.drain(final)
        if drained is None:
            return
        frame = self._to_frame(drained)
        if self._store is not None:
            self._store.append(frame)
            self._guard(lambda: self._store.update_meta(**self._progress()), "the store's meta")
        else:
            self._frames.append(frame)
        for listener in list(self._listeners):
            try:
                listener(frame)
            except Exception as exc:  # a writer's failure must not stop training
                warn_once(self._failed_where, f"flush listener {listener!r}", exc)

    def _to_frame(self, d: Drained) -> pd.DataFrame:
        """Finalise partials into long-form rows (host side, NumPy)."""
        parts: list[pd.DataFrame] = []
        module_names = np.array([s.name for s in self._slots], dtype=object)
        module_gap = d.modules["gap"] > 0
        for stat, (values, present) in finalize(d.modules, self.stats, "module").items():
            parts.append(_long(d.steps, module_names, stat, values, present & ~module_gap))
        param_names = np.array(self._param_names, dtype=object)
        param_gap = d.params["param_gap"] > 0
        for stat, (values, present) in finalize(d.params, self.stats, "parameter").items():
            parts.append(_long(d.steps, param_names, stat, values, present & ~param_gap))
        model_names = np.array([MODEL_NAME], dtype=object)
        for stat, (values, present) in finalize(d.model, self.stats, "model").items():
            parts.append(_long(d.steps, model_names, stat, values, present))
        parts += _logged_rows(d.logged)
        if d.histograms is not None:
            present = (d.modules["calls"] > 0) & ~module_gap
            for b in range(d.histograms.shape[2]):
                parts.append(
                    _long(d.steps, module_names, f"hist_{b:02d}", d.histograms[:, :, b], present)
                )
        parts = [p for p in parts if not p.empty]
        if not parts:
            return empty_frame()
        frame = normalize_frame(pd.concat(parts, ignore_index=True))
        return frame.sort_values("step", kind="stable", ignore_index=True)

    # ================================================================ failures
    def _guard_params(self, fn: Callable[[], None], where: str) -> None:
        if not self._guard(fn, where):
            self._guard(
                lambda: self.buffer.set_param_host(list(range(len(self._params))), "param_gap"),
                f"{where} (marking the gap)",
            )

    def _guard(self, fn: Callable[[], object], where: str) -> bool:
        """Run a piece of the Probe's work; a failure is one warning, never the user's error."""
        try:
            fn()
        except Exception as exc:  # never into the user's loop
            warn_once(self._failed_where, where, exc)
            return False
        return True

    def _module_failed(self, k: int, where: str, exc: BaseException) -> None:
        warn_once(self._failed_where, f"{where} of module {self._slots[k].name!r}", exc)
        self.buffer.set_host(k, "gap", 1)

    # ================================================================ description
    def _order_names(self) -> list[str]:
        seen = [self._slots[k].name for k in self._execution_order]
        rest = [s.name for s in self._slots if s.index not in self._seen_slots]
        return seen + rest

    def _describe(self, model: nn.Module, config: dict[str, Any] | None) -> dict[str, Any]:
        by_name = dict(model.named_modules())
        modules = []
        for s in self._slots:
            m = by_name[s.name]
            info = {
                "name": s.name,
                "type": s.type,
                "activation": s.activation.name if s.activation else recurrent_nonlinearity(m),
                "parameters": sum(p.numel() for p in m.parameters(recurse=False)),
                "layout": s.layout,
            }
            if self.histograms:
                info["histogram_range"] = list(s.histogram_range)
            modules.append(info)
        params = dict(model.named_parameters())
        return {
            "label": self.label,
            "created": _now(),
            "model": {
                "class": type(model).__name__,
                "parameters": sum(p.numel() for p in model.parameters()),
                "summary": _summary(model),
            },
            "modules": modules,
            "parameters": [
                {"name": n, "shape": list(params[n].shape), "numel": params[n].numel()}
                for n in self._param_names
            ],
            "probe": {
                "every": self.every,
                "flush_every": self.flush_every,
                "stats": list(self.stats),
                "dead_window": self.buffer.dead_window,
                "histogram_bins": self.buffer.histogram_bins,
            },
            "config": config or {},
            "versions": {
                "gradprobe": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
        }


_OPTIMIZER_KEYS = ("lr", "betas", "eps", "momentum", "weight_decay", "nesterov", "amsgrad")


def _optimizer_meta(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's class and each param group's scalar hyper-parameters, for the meta.

    Remedies read them (Adam's β₂/ε, momentum); tensors (a capturable lr) are left out
    rather than copied to the host.
    """
    groups = []
    for group in optimizer.param_groups:
        kept: dict[str, Any] = {}
        for key in _OPTIMIZER_KEYS:
            value = group.get(key)
            if isinstance(value, (bool, int, float)):
                kept[key] = value
            elif isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):
                kept[key] = list(value)
        groups.append(kept)
    return {"class": type(optimizer).__name__, "param_groups": groups}


# ==================================================================== hook functions
# Module-level functions. The module hooks are called through a ModuleHook (gradprobe.hooks),
# which holds a weak reference to the Probe and a slot index, never a module or a tensor.
# What a module hook does with a call (Probe._call_mode).
_SKIP, _RECORD, _RECOMPUTE = 0, 1, 2


def _inside_backward() -> bool:
    """Whether this thread is running a backward pass: autograd's current graph task.

    A module's forward that runs inside backward is activation checkpointing recomputing
    it (``torch.utils.checkpoint``, either ``use_reentrant``), not a new pass.
    """
    return torch._C._current_graph_task_id() != -1


def _remove_all(*hooksets: HookSet) -> None:
    for hooks in hooksets:
        hooks.remove()


def _pre_hook(
    ref: weakref.ref[Probe], k: int, module: nn.Module, args: tuple[Any, ...], kwargs: Any
) -> None:
    probe = ref()
    if probe is None:
        return
    if probe._scaler_ref is not None:
        probe._poll_scaler()  # the first forward of an iteration closes a skipped step
    try:
        mode = probe._call_mode()
        if mode == _RECORD:
            probe._on_pre(k, module, args, kwargs)
        elif mode == _RECOMPUTE:
            probe._on_recomputed_pre(k, args, kwargs)
    except Exception as exc:
        probe._module_failed(k, "forward pre-hook", exc)


def _forward_hook(
    ref: weakref.ref[Probe], k: int, module: nn.Module, args: Any, kwargs: Any, output: Any
) -> None:
    probe = ref()
    if probe is None:
        return
    try:
        mode = probe._call_mode()
        if mode == _RECORD:
            probe._on_forward(k, module, output)
            if k in probe._carry_slots:
                name = probe._slots[k].name
                record_carry(probe.buffer, k, name, module, args, kwargs, output, probe._unreadable)
        elif mode == _RECOMPUTE:
            probe._on_recomputed(k, output)
    except Exception as exc:
        probe._module_failed(k, "forward hook", exc)


def _pass_start_hook(
    ref: weakref.ref[Probe], key: int, module: nn.Module, args: Any, kwargs: Any
) -> None:
    probe = ref()
    if probe is not None and not probe._closed:
        if probe._scaler_ref is not None:
            probe._poll_scaler()  # the first forward of an iteration closes a skipped step
        probe._guard(probe._on_pass_start, "the start of the model's forward")


def _pass_end_hook(
    ref: weakref.ref[Probe], key: int, module: nn.Module, args: Any, kwargs: Any, output: Any
) -> None:
    probe = ref()
    if probe is not None and not probe._closed:
        probe._guard(probe._on_pass_end, "the end of the model's forward")


# The same module hooks, never traced by dynamo (used when the model is compiled).
# Made on first use, not at import: torch.compiler.disable imports torch._dynamo (about
# 2 s), which `from gradprobe import Probe` must not cost a process that compiles nothing.
@cache
def _eager_hooks() -> type[ModuleHook]:
    class EagerModuleHook(ModuleHook):
        """A ModuleHook whose call dynamo never traces (it would pass the Probe's weak
        reference on as the Probe itself)."""

        __slots__ = ()
        __call__ = torch.compiler.disable(ModuleHook.__call__)

    return EagerModuleHook


def _accumulated_hook(ref: weakref.ref[Probe], param: Tensor) -> None:
    """A backward pass accumulated into one of FSDP2's full parameters."""
    probe = ref()
    if probe is not None:
        probe._guard(probe._note_accumulation, "a gradient-accumulated hook (error signals)")


def _post_accumulate_hook(ref: weakref.ref[Probe], param: Tensor) -> None:
    probe = ref()
    if probe is None:
        return
    if probe._scaler_ref is not None:
        probe._poll_scaler()
    probe._guard(probe._note_accumulation, "a gradient-accumulated hook (error signals)")
    if probe._want_preclip:
        probe._guard(probe._on_post_accumulate, "a gradient-accumulated hook")


def _backward_end_hook(ref: weakref.ref[Probe], first: bool) -> None:
    if first:
        # Queue once more, behind every callback queued during the backward pass: DDP's
        # reducer queues the one that writes the all-reduced buckets into .grad, and the
        # pre-clip norm must be of those synchronised gradients.
        try:
            queue_at_backward_end(partial(_backward_end_hook, ref, False))
        except Exception as exc:  # never into the user's backward
            probe = ref()
            if probe is not None:
                warn_once(probe._failed_where, "the end of backward", exc)
        return
    probe = ref()
    if probe is not None and not probe._closed:
        probe._guard_params(probe._record_preclip, "end of backward (pre-clip norms)")


def queue_at_backward_end(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the current backward pass has finished (all of it)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def _output_grad_hook(ref: weakref.ref[Probe], k: int, token: int, grad: Tensor) -> None:
    probe = ref()
    if probe is None:
        return
    try:
        probe._on_error_grad(k, grad, "err", token)
    except Exception as exc:
        probe._module_failed(k, "backward (output) hook", exc)


def _input_grad_hook(ref: weakref.ref[Probe], k: int, token: int, grad: Tensor) -> None:
    probe = ref()
    if probe is None:
        return
    try:
        probe._on_error_grad(k, grad, "in_err", token)
    except Exception as exc:
        probe._module_failed(k, "backward (input) hook", exc)


def _input_share_hook(
    ref: weakref.ref[Probe],
    k: int,
    token: int,
    indices: tuple[int, ...],
    nodes: int,
    grad_inputs: Sequence[Tensor | None],
    grad_outputs: Sequence[Tensor | None],
) -> None:
    """On an autograd node of module ``k`` that reads its input: ``grad_inputs[i]`` for
    ``i`` in ``indices`` is the gradient this node sends to that input."""
    probe = ref()
    if probe is None:
        return
    try:
        probe._on_input_share(k, token, indices, nodes, grad_inputs)
    except Exception as exc:
        probe._module_failed(k, "backward (input) hook", exc)


def _errors_end_hook(ref: weakref.ref[Probe], task: int, step: int) -> None:
    probe = ref()
    if probe is not None and not probe._closed:
        probe._guard(partial(probe._commit_errors, task, step), "the end of backward (errors)")


def _scale_marker(scaler: torch.amp.GradScaler | None) -> tuple[int, int] | None:
    """(identity, version) of the scaler's scale tensor; None before its first ``scale()``."""
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    return None if scale is None else (id(scale), scale._version)


def _step_pre_hook(ref: weakref.ref[Probe], optimizer: Any, args: Any, kwargs: Any) -> None:
    probe = ref()
    if probe is not None:
        probe._guard(probe._on_step_pre, "the optimizer step (pre-hook)")


def _step_post_hook(ref: weakref.ref[Probe], optimizer: Any, args: Any, kwargs: Any) -> None:
    probe = ref()
    if probe is not None:
        probe._guard(probe._on_step_post, "the optimizer step (post-hook)")



# ==================================================================== helpers
def _loggable(name: str, value: Any, reads_lr: bool) -> Tensor | float:
    """A value for :meth:`Probe.log`: a detached one-element tensor, or a float."""
    if not name.isidentifier() and not name.startswith("lr/"):
        raise GradprobeError(
            f"cannot log {name!r}: names are identifiers", "e.g. probe.log(loss=loss)"
        )
    if (name == "lr" and reads_lr) or (name in STATISTICS and STATISTICS[name].logged is None):
        raise GradprobeError(
            f"cannot log {name!r}: the Probe records it itself",
            "log the loss and other values of your own under their own names",
        )
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise GradprobeError(
                f"cannot log {name!r}: a tensor of shape {tuple(value.shape)} is not one real "
                "number",
                f"log a scalar, e.g. probe.log({name}=loss) with loss = loss_fn(out, y)",
            )
        return value.detach()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise GradprobeError(
            f"cannot log {name!r}: a {type(value).__name__} is not a number",
            f"log a tensor or a float, e.g. probe.log({name}=loss)",
        )
    return float(value)


def _logged_rows(logged: Mapping[tuple[int, str], tuple[float, float]]) -> list[pd.DataFrame]:
    """``(model)`` rows of logged values, finalised as their statistic declares."""
    by_name: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for (step, name), (total, count) in logged.items():
        by_name[name].append((step, total, count))
    names = np.array([MODEL_NAME], dtype=object)
    parts = []
    for name, entries in by_name.items():
        steps = np.array([e[0] for e in entries], dtype=np.int64)
        partials = {
            "log_sum": np.array([[e[1]] for e in entries]),
            "log_count": np.array([[e[2]] for e in entries]),
        }
        declared = STATISTICS.get(name)
        fn = declared.logged if declared is not None and declared.logged else logged_mean
        values, present = fn(partials)
        parts.append(_long(steps, names, name, values, present))
    return parts


def _grad_values(grads: list[Tensor]) -> list[Tensor]:
    """Gradients as dense tensors with the same norm and the same NaN/Inf entries.

    A sparse gradient (``nn.Embedding(sparse=True)``, ``EmbeddingBag``) is its coalesced
    values: an uncoalesced one may hold an index several times, and those entries add up
    to the gradient's entry, so they must be summed before any norm. A sharded gradient
    (a ``DTensor``) is this rank's shard: its values add up over the shards.
    """
    values = []
    for g in local_shards(grads):
        if g.layout == torch.sparse_coo:
            g = g.coalesce().values()
        elif g.layout != torch.strided:
            g = g.values()  # compressed layouts hold each index once
        values.append(g)
    return values


def _long(
    steps: np.ndarray, names: np.ndarray, stat: str, values: np.ndarray, present: np.ndarray
) -> pd.DataFrame:
    rows, cols = np.nonzero(present)
    return pd.DataFrame(
        {
            "step": steps[rows].astype(np.int64),
            "name": names[cols],
            "stat": np.full(len(rows), stat, dtype=object),
            "value": values[rows, cols].astype(np.float64),
        }
    )


def _validate(
    model: Any, optimizer: Any, every: Any, flush_every: Any, dead_window: Any, histogram_bins: Any
) -> None:
    if not isinstance(model, nn.Module):
        raise GradprobeError(
            f"Probe needs a torch.nn.Module, got {type(model).__name__}",
            "pass your model, e.g. Probe(model)",
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GradprobeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}",
            "pass the optimizer that steps this model, or none and call probe.step()",
        )
    for name, value in (
        ("every", every),
        ("flush_every", flush_every),
        ("dead_window", dead_window),
        ("histogram_bins", histogram_bins),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GradprobeError(
                f"{name} must be a positive integer, got {value!r}", f"e.g. {name}=1"
            )


def _resolve_stats(stats: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(stats, str):
        if stats not in PRESETS:
            raise GradprobeError(
                f"unknown statistics preset {stats!r}",
                f"use one of {sorted(PRESETS)} or a list of names from {sorted(STATISTICS)}",
            )
        return PRESETS[stats]
    unknown = [s for s in stats if s not in STATISTICS]
    if unknown:
        raise GradprobeError(f"unknown statistics {unknown}", f"choose from {sorted(STATISTICS)}")
    return tuple(dict.fromkeys(stats))


def _select_modules(
    model: nn.Module, selection: Sequence[str] | ModuleFilter | None
) -> list[_Slot]:
    named = list(model.named_modules())
    if selection is None:
        chosen = [
            (n, m)
            for n, m in named
            if not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False))
        ]
    elif callable(selection):
        chosen = [(n, m) for n, m in named if selection(n, m)]
    else:
        wanted = list(selection)
        names = {n for n, _ in named}
        missing = [n for n in wanted if n not in names]
        if missing:
            raise GradprobeError(
                f"no modules named {missing} in the model", "see model.named_modules()"
            )
        chosen = [(n, m) for n, m in named if n in set(wanted)]
    slots = []
    for i, (name, module) in enumerate(chosen):
        act = activation_of(module)
        hist = act.histogram_range if act else DEFAULT_HISTOGRAM_RANGE
        from_output = act.name if act is not None and _stock_forward(module, act) else None
        inplace = getattr(module, "inplace", False) is True
        slots.append(
            _Slot(
                i, name, type(module).__name__, act, _layout_of(module), hist, from_output, inplace
            )
        )
    return slots


# Activations whose gate f'(z) is a function of their output y = f(z), so that the gate
# statistics come from the output statistics (no second pass over z, no f recomputed):
# ReLU: f' = [y > 0]; tanh: f' = 1 − y²; sigmoid: f' = y(1 − y).
_GATE_FROM_OUTPUT = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _stock_forward(module: nn.Module, act: Activation) -> bool:
    """Whether the module computes exactly its activation (a subclass may do more)."""
    base = _GATE_FROM_OUTPUT.get(act.name)
    return base is not None and type(module).forward is base.forward


def _trainable_parameters(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Parameters in order, each once (a shared one under its first name).

    Under FSDP2 each is the sharded ``DTensor`` the optimizer holds, also while a forward
    with ``reshard_after_forward=False`` has left the full one registered on its module.
    """
    sharded = sharded_parameters(model)
    by_module = dict(model.named_modules()) if sharded else {}
    names, params = [], []
    for name, p in model.named_parameters():
        if sharded:
            owner, _, attribute = name.rpartition(".")
            p = sharded.get((id(by_module[owner]), attribute), p)
        names.append(name)
        params.append(p)
    return names, params


def _summary(model: nn.Module, limit: int = 4000) -> str:
    text = repr(model)
    return text if len(text) <= limit else text[:limit] + "\n..."


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

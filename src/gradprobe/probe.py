"""Probe: attach to any ``nn.Module``, record per-layer statistics of real training.

The Probe is the public API and the lifecycle (hooks put on and taken off, flushes, the
store, the frame); its work is in three modules named after it: what the hooks capture
(:mod:`gradprobe.capture`), how a tensor becomes a few numbers (:mod:`gradprobe.reduce`),
and where a step begins and ends (:mod:`gradprobe.step`). :mod:`gradprobe.stats` is still
the one place a statistic is declared.

What happens, and where it costs::

    forward pre-hook (module)   activation modules: gate f'(z) partials from the input z
                                (read before an in-place module overwrites it);
                                a tensor hook on z for dL/d(input) (``error_gain``)
    forward hook (module)       output partials (sum, sum², zeros, NaN/Inf, active units),
                                a small output held and reduced with the others of its
                                shape at the end of the forward;
                                a tensor hook on the output for dL/d(output) (``error_norm``)
    post-accumulate-grad hook   (parameters) when a backward pass has accumulated into
                                ``.grad``, queue one callback at the end of that backward:
                                the gradient norms *before* any clipping, batched, unscaled
                                by the watched ``GradScaler`` (``global_grad_norm_preclip``)
    optimizer step pre-hook     grad and parameter norms, batched with ``torch._foreach_norm``
                                (after AMP unscale, clipping and the DDP all-reduce);
                                a copy of the parameters for ``update_ratio``; with a
                                closure, all of it when the closure's first evaluation
                                returns (gradprobe/follow.py: what the step applies)
    optimizer step post-hook    update norms; the step's row is closed

All of it stays on the device, in a :class:`~gradprobe.buffer.StepBuffer`; every
``flush_every`` recorded steps (and at ``frame()``/``close()``) the buffer is copied
to the host once, finalised into long-form rows and appended to the store. On steps
that ``every`` skips, no module or gradient hook is on the model.

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
- *torch.compile*, before or after the Probe is built: every hook runs outside the
  compiled graphs (gradprobe.hooks.Entry; one warning says so).
- *A failure of the Probe's own work* anywhere is one warning naming the site and a gap
  in what it feeds, never the user's exception (gradprobe.hooks.Entry, the one guard).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import sys
import time
import warnings
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ._version import __version__
from .activations import Activation, activation_of, recurrent_nonlinearity
from .architecture import describe_architecture
from .buffer import Drained, StepBuffer
from .capture import (
    Capture,
    _inside_backward,
    _Slot,
)
from .errors import GradprobeError
from .finding import Finding
from .follow import Follow
from .hooks import GradprobeWarning, HookSet, Site, warn_gap, warn_once
from .recurrent import carry_slots, record_carry
from .run import Run, empty_frame, load, normalize_frame, text_column
from .shards import ShardedNorms, sharded_parameters
from .spikes import SpikeWatch
from .stats import MODEL_NAME, PRESETS, STATISTICS, Plan, finalize, logged_mean
from .step import (
    AUTO_BURST,
    AUTO_EVERY,
    AUTO_FIRST,
    StepBoundary,
    _loggable,
    _scale_marker,
)
from .store import Store
from .traversals import GAP_BOTH_SIDES, GAP_INPUT_SIDE, Traversals

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
# Wall-clock anchors kept in the meta (see _note_time): thinned past this many.
_MAX_TIME_ANCHORS = 512


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


# A mapping output (a dict, a transformers ModelOutput) is read at these keys first: the
# tensor the module computes. A "loss" entry is never "the" output: it is a function of it.


def _layout_of(module: nn.Module) -> str:
    if isinstance(module, _LAST_DIM_TYPES):
        return "last"
    cls = type(module)
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return "last"  # Hugging Face's GPT-2 linear layer: [N, T, F], despite its name
    if isinstance(module, _CHANNEL_TYPES):
        return "channel"
    return "inherit"


class Probe(Capture, StepBoundary, Follow):
    """Records per-layer gradient, error-signal and activation statistics during training.

    Args:
        model: the network (DDP/DataParallel/compiled wrappers are unwrapped for names).
        optimizer: its ``step()`` marks a step (hooks, so the loop does not change);
            without one, call :meth:`step` after each update.
        every: ``"auto"`` (the default): every step for the first
            ``gradprobe.step.AUTO_FIRST`` (20) steps, then every ``AUTO_EVERY``-th
            (50th), with the gradients' norms (``grad_norm``, ``global_grad_norm`` and
            its pre-clip value, their NaN/Inf flags) recorded at *every* step as a
            sentinel: a step whose gradients are not finite shows in those rows exactly,
            and the ``AUTO_BURST`` (20) steps after it are recorded in full (see
            docs/recording.md, "Cadence"). Or an integer k: every k-th step in full, the
            others cost nothing (``every=1``: every step).
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
        on_finding: called with a :class:`~gradprobe.Finding` when a NaN/Inf, a
            gradient-norm spike or an explosion is seen (``finding.evidence["step"]``:
            the step), at the flush that brings that step to the host; each is also one
            ``GradprobeWarning`` line (once per kind). See :mod:`gradprobe.live`.
        stop_on: kinds (``"nonfinite"``, ``"grad_norm_spike"``, ``"exploding"``) for
            which the step boundary that saw one raises
            :class:`~gradprobe.errors.StopTraining` (once). Nothing is raised unless asked.

    Use it as a context manager, or call :meth:`close`: that removes every hook and
    leaves the model exactly as it was. Keep a reference to the Probe while training:
    its hooks hold it only weakly, and remove themselves if it is garbage-collected.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int | str = "auto",
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
        on_finding: Callable[[Finding], Any] | None = None,
        stop_on: Sequence[str] = (),
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
        # "auto": a sentinel runs on the steps the cadence does not record; until this
        # step (a burst after non-finite gradients) every step is recorded.
        self._auto = every == "auto"
        self._burst_until = -1
        # ... or after a gradient-norm spike (step.py, gradprobe/spikes.py): recent global norms
        # on the host, and the device copies of the latest not read yet.
        self._spikes = SpikeWatch()
        self._pending_norms: deque[tuple[int, list[Any], list[Any]]] = deque()
        self._param_hooks_kept = False  # "auto": the gradient hooks stay on at every step
        self.flush_every = flush_every
        # Findings said while training, from each flush's host rows (gradprobe/live.py).
        self._live = _live_check(on_finding, stop_on)
        # [step, seconds since the epoch] at the first step's close and at each flush (the
        # close of the flush's last step): exporters place steps in time by them.
        self._wall_time: list[list[float]] = []
        self._last_close: list[float] | None = None
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
        # What the step applies: closures, discarded gradients, a changed model (follow.py).
        self._init_follow(inner, modules)
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
        self._held_epoch = 0  # how many times held outputs were reduced (_drop_failed_call)
        # Each module's open call: where the step's records stood as it began (capture.py).
        self._call_marks: dict[int, Any] = {}
        self._errors_hooked = -1  # the module whose call has put its error hooks on
        self._unbatched: set[int] = set()
        self._batch_safe: set[int] = set()
        self._staging_buffers: dict[tuple[Any, ...], Tensor] = {}
        # The parameters' copies for update_ratio, kept from step to step (gradprobe/step.py).
        self._snapshot_buffers: dict[tuple[Any, ...], tuple[tuple[int, ...], list[Tensor]]] = {}
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
        self._closing_step = -1  # the step an optimizer step post-hook is closing
        self._scaler_ref = weakref.ref(scaler) if scaler is not None else None
        self._scale_marker = _scale_marker(scaler)
        self._stepped_since_update = False
        # Error signals wait for their backward pass to end: only .backward() counts.
        self._traversals = Traversals()
        # The last step in which a probed module ran under grad (which step log() is for).
        self._forward_step = -1

        # What the hooks measure, derived from the statistics' needs (stats.MEASURES):
        # plain bools, read on the hot path.
        plan = Plan.of(self.stats)
        self._want_output = plan.output
        self._want_nonfinite = plan.nonfinite
        self._want_absmax = plan.absmax
        self._want_units = plan.units
        self._want_gate = plan.gate
        self._want_error = plan.error
        self._want_input_error = plan.input_error
        self._want_params = plan.params
        self._want_update = plan.update
        self._want_forward = plan.forward
        self._want_preclip = plan.preclip
        # Gated recurrent modules whose carry gates are measured (gradprobe.recurrent).
        self._carry_slots = frozenset()
        if plan.carry:
            by_name = dict(inner.named_modules())
            self._carry_slots = carry_slots([(s.index, by_name[s.name]) for s in self._slots])

        self._meta = self._describe(inner, config)
        if optimizer is not None:
            self._meta["optimizer"] = _optimizer_meta(optimizer)
        self._meta["probe"].update(scaler=scaler is not None, compiled=self.compiled, world_size=1)
        # The structure and init statistics the theory predicts from (theory.compare).
        self._guard(lambda: self._meta.update(theory=_theory_of(inner)), "the theory's description")
        # Every rank holds the combined statistics; one writes them.
        rank_zero = not distributed or torch.distributed.get_rank() == 0
        self._live.warn = rank_zero  # every rank sees the same rows: one says it
        self._store = Store(store, self._meta) if store is not None and rank_zero else None
        if self.compiled:
            self._warn_compiled()

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
            "wall_time": [list(a) for a in self._wall_time],
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
        self._follow_or_stop("probe.step (following the model)")
        self._poll_scaler()
        if self._recording:
            self._guard_params(self._record_params, "probe.step")
            if self._want_update and self._snapshot is not None:
                self._guard_params(self._record_updates, "probe.step (update ratio)")
        elif self._auto:
            self._guard_params(self._record_sentinel, "probe.step (sentinel)")
        self._stepped_since_update = True
        _note_time(self)
        self._end_step()
        if self._recording and self._want_update:
            self._guard_params(self._take_snapshot, "probe.step (snapshot)")
        _raise_if_asked(self)

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
        for steps that an integer ``every`` does not record are dropped (``"auto"`` keeps
        them: every step has its sentinel rows), as are values logged after
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
        if not self._records(step) and not self._auto:
            return  # (under "auto" every step has rows: the sentinel's)
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
        self._snapshot_buffers = {}
        self._staging_buffers = {}
        self._preclip = {}
        self._deferred_units = []

    # ================================================================ registration
    def _register(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        # Is the current pass of the probed model trained? Decided once per pass by the
        # hooks on the model itself (see _call_mode and docs/recording.md).
        self._pass_open = False
        self._pass_trained = False
        self._trained_step = -1  # the last step with a recorded pass
        self._followed_step = -1  # the last step whose model was compared (follow.py)
        self._eval_grad_step: int | None = None  # a step with eval() passes under grad
        # Calls whose first run could not register error-signal hooks (a reentrant
        # checkpoint runs it under no_grad): their recomputation in backward registers them.
        self._owed_error_hooks: dict[int, int] = defaultdict(int)
        self._unreadable: set[str] = set()
        ref, hooks = self._ref, self._hooks
        # Every hook is an Entry (gradprobe.hooks): a failure is a warning and a gap, and
        # dynamo never traces it, whenever the model is compiled. Module hooks are
        # ModuleHooks: they pickle and deep-copy as inert no-ops, so the model can be
        # saved or copied while probed.
        self._attach_step_hooks()
        site = _PASS_START_SITE if self._module_hooks_wanted() else _PASS_START_UNHOOKED_SITE
        hooks.on_module_pre(model, _pass_start_hook, ref, site, -1, prepend=True)
        # Registered last, so that it closes the pass after the model's own forward hook;
        # always called, so that a forward that raises closes it too.
        hooks.on_module(model, _pass_end_hook, ref, _PASS_END_SITE, -1, always_call=True)
        if optimizer is not None:
            hooks.on_step(optimizer, _step_pre_hook, ref, _STEP_PRE_SITE)
            hooks.on_step(optimizer, _step_post_hook, ref, _STEP_POST_SITE, post=True)

    def _attach_step_hooks(self, new_params: list[Tensor] | None = None) -> None:
        """The hooks that record a step: on each probed module, and on each parameter's
        gradient accumulation. They are on the model only while a recorded step runs
        (see :meth:`_sync_step_hooks`): a hook that returns at once still costs its call
        and takes the module off PyTorch's fast path (≈ +10 % on a 12×256 MLP).
        ``new_params``: parameters bound since (a changed model) whose gradient hooks,
        kept on at every step, are still to be put on."""
        ref, hooks = self._ref, self._step_hooks
        model = self._model_ref()
        if model is None:
            return
        by_name = dict(model.named_modules())
        module_hooks = self._module_hooks_wanted()
        slots = self._slots if module_hooks else []
        if self.compiled:
            slots = self._compiled_slots(slots)
        for slot in slots:
            module = by_name.get(slot.name)
            if module is None or slot.index in self._retired_slots:
                continue
            hooks.on_module_pre(module, _pre_hook, ref, _PRE_SITE, slot.index)
            hooks.on_module(module, _forward_hook, ref, _FORWARD_SITE, slot.index)
        # Post-accumulate hooks also tell which backward passes count for error signals,
        # and where gradients a pass made were discarded before the step (follow.py).
        # Under every="auto" they stay on at every step: the sentinel's pre-clip norms.
        wanted = self._want_preclip or self._want_error or module_hooks
        if wanted and (not self._param_hooks_kept or new_params):
            kept = self._auto
            for p in new_params if self._param_hooks_kept and new_params else self._params:
                if p.requires_grad:
                    (self._hooks if kept else hooks).on_accumulated(
                        p, _post_accumulate_hook, ref, _ACCUMULATED_SITE
                    )
            self._param_hooks_kept = kept
        self._step_hooks_on = True

    def _module_hooks_wanted(self) -> bool:
        """Statistics the user did not ask for cost nothing: no module statistic, no hook."""
        module_stats = {n for n, st in STATISTICS.items() if st.module is not None}
        return bool(self._slots) and bool(module_stats & set(self.stats) or self.histograms)

    def _compiled_slots(self, slots: list[_Slot]) -> list[_Slot]:
        """The modules hooked while the model is compiled: not those that work in place.
        A graph break beside an in-place op (each hook is one) makes a graph that mutates
        its input, which aot_autograd cannot always differentiate (an in-place SiLU's
        backward then raises in the user's backward, with any graph break there): their
        statistics are left out, with one warning."""
        inplace = [s.name for s in slots if s.inplace]
        if inplace:
            # Their pre-hook no longer reduces the held outputs before they are written
            # over: every module's outputs are reduced in its hook from now on.
            self._unbatched.update(s.index for s in self._slots)
            warn_gap(
                self._unreadable,
                "compiled in place",
                f"gradprobe: the model is compiled, and modules {inplace} work in place: a "
                "hook breaks the graph beside an in-place op, which compiled autograd cannot "
                "always differentiate, so these modules are not hooked and their statistics "
                "are not recorded while the model is compiled (use inplace=False to have them)",
            )
        return [s for s in slots if not s.inplace]

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
        if self._followed_step != self.step_index:  # once per step: the model as it is
            self._follow_or_stop("the start of the model's forward (following)")
        if self._grad_marker is not None and not self._searching:
            self._guard(self._check_discarded, "the start of the model's forward (gradients)")
        self._pass_open = True
        self._pass_trained = self._trained_now()
        if self._pass_trained:
            self._trained_step = self.step_index
            if self._recording:  # modules frozen for this pass (a GAN's D while G trains)
                self._guard(self._update_frozen, "the start of the model's forward (frozen)")
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
        if self._closed or not self._recording or self._searching:
            return _SKIP
        transform = torch._C._functorch.peek_interpreter_stack()
        if transform is not None:
            self._skip_transform(transform)
            return _SKIP
        if _inside_backward():
            # The first run of this forward was recorded; this one must not double it.
            return _RECOMPUTE if self._trained_now() else _SKIP
        if self._pass_open:
            return _RECORD if self._pass_trained else _SKIP
        # A submodule called outside the model's forward: the same rule, judged now.
        return _RECORD if self._trained_now() else _SKIP

    def _skip_transform(self, transform: Any) -> None:
        """A call inside a ``torch.func`` transform is left out, with one warning per kind
        of transform (docs/recording.md, "Transforms")."""
        kind = str(transform.key()).rpartition(".")[2]
        name = _TRANSFORMS.get(kind, kind)
        warn_gap(
            self._unreadable,
            f"transform {kind}",
            f"gradprobe: modules called inside {name} are not recorded: their tensors are the "
            "transform's wrappers (per-sample slices of a batch under vmap, a level of "
            "differentiation under grad), which statistics of the step would mix up or carry "
            "out of the transform. Passes outside it are recorded as usual, and so are the "
            "parameters' statistics at the optimizer step",
        )

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
        if self._last_close is not None and self._last_close[0] > self._wall_time[-1][0]:
            self._wall_time.append(list(self._last_close))
            if len(self._wall_time) > _MAX_TIME_ANCHORS:
                # The meta is rewritten at every flush: keep it small on long runs by
                # dropping every other anchor between the first and the last.
                inner = self._wall_time[1:-1][1::2]
                self._wall_time = [self._wall_time[0], *inner, self._wall_time[-1]]
        if self._store is not None:
            self._store.append(frame)
            self._guard(lambda: self._store.update_meta(**self._progress()), "the store's meta")
        else:
            self._frames.append(frame)
        self._guard(partial(self._live, frame), "the live check of a flush")
        for listener in list(self._listeners):
            try:
                listener(frame)
            except Exception as exc:  # a writer's failure must not stop training
                warn_once(self._failed_where, f"flush listener {listener!r}", exc)

    def _to_frame(self, d: Drained) -> pd.DataFrame:
        """Finalise partials into long-form rows (host side, NumPy): columns per statistic,
        joined as arrays, one DataFrame at the end (a frame per statistic, then a concat,
        cost ~10× as much: text columns are converted once, not once per statistic)."""
        # Text as codes into a vocabulary until the frame is made (text_column).
        names = [s.name for s in self._slots] + list(self._param_names) + [MODEL_NAME]
        module_codes = np.arange(len(self._slots))
        param_codes = len(self._slots) + np.arange(len(self._param_names))
        model_codes = np.array([len(names) - 1])
        stats: list[str] = []
        parts: list[_Rows] = []

        def add(codes: np.ndarray, stat: str, values: np.ndarray, present: np.ndarray) -> None:
            stats.append(stat)
            parts.append(_long(d.steps, codes, len(stats) - 1, values, present))

        module_gap = d.modules["gap"] > 0
        for stat, (values, present) in finalize(d.modules, self.stats, "module").items():
            add(module_codes, stat, values, present & ~module_gap)
        param_gap = d.params["param_gap"] > 0
        for stat, (values, present) in finalize(d.params, self.stats, "parameter").items():
            add(param_codes, stat, values, present & ~param_gap)
        for stat, (values, present) in finalize(d.model, self.stats, "model").items():
            add(model_codes, stat, values, present)
        for stat, steps, values, present in _logged_rows(d.logged):
            stats.append(stat)
            parts.append(_long(steps, model_codes, len(stats) - 1, values, present))
        if d.histograms is not None:
            present = (d.modules["calls"] > 0) & ~module_gap
            for b in range(d.histograms.shape[2]):
                add(module_codes, f"hist_{b:02d}", d.histograms[:, :, b], present)
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return empty_frame()
        steps, name_codes, stat_codes, values = (np.concatenate(column) for column in zip(*parts))
        order = np.argsort(steps, kind="stable")
        frame = pd.DataFrame(
            {
                "step": steps[order],
                "name": text_column(names, name_codes[order]),
                "stat": text_column(stats, stat_codes[order]),
                "value": values[order],
            }
        )
        return normalize_frame(frame)

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

    def _entry_failed(self, site: Site, key: int, exc: BaseException) -> None:
        """An entry point failed (gradprobe.hooks.Entry): one warning naming the site, and
        a gap in what the site feeds, for this step."""
        one = site.gap in ("module", "errors", "input_errors") and 0 <= key < len(self._slots)
        where = f"{site.where} of module {self._slots[key].name!r}" if one else site.where
        warn_once(self._failed_where, where, exc)
        step, slots = self.step_index, range(len(self._slots))
        if site.gap == "module":
            # One call failed: it is taken back, the module's other calls stay.
            if not self._drop_failed_call(key, site is _PRE_SITE):
                self.buffer.set_host(key, "gap", 1)
        elif site.gap == "modules":
            for k in slots:
                self.buffer.set_host(k, "gap", 1)
        elif site.gap in ("errors", "input_errors", "all_errors"):
            level = GAP_INPUT_SIDE if site.gap == "input_errors" else GAP_BOTH_SIDES
            for k in [key] if site.gap != "all_errors" else slots:
                self.buffer.set_host(k, "err_gap", self._traversals.gap(k, level, step))
        elif site.gap in ("params", "step"):
            self.buffer.set_param_host(list(range(len(self._params))), "param_gap")
        if site.gap == "step" and self._closing_step == step and not self._closed:
            self._end_step()  # never raises; the step count moves on, as the optimizer's did

    def _entry_traced(self, site: Site) -> None:
        """Dynamo traced an entry point (it ran outside the graph all the same): the model
        is compiled, whenever that happened. Say so once, and keep the hooks on from now:
        each change of them would recompile the model (see _sync_step_hooks)."""
        if not self.compiled:
            self.compiled = True
            self._meta["probe"]["compiled"] = True
            self._warn_compiled()
            # Put the module hooks on now (traced at a step the cadence does not record,
            # they are off), those of in-place modules off (see _compiled_slots), while
            # dynamo has yet to trace the modules: it resumes after this graph break and
            # reads their hook tables then.
            if self._step_hooks_on and not _inside_backward():
                self._step_hooks.remove()
                self._step_hooks_on = False
            self._sync_step_hooks()

    def _without_backward_hooks(self, why: str) -> None:
        """The backward passes of this step ran where the Probe's backward hooks are not
        seen whole: every module's error statistics are left out of it, with one warning."""
        warn_gap(
            self._unreadable,
            why,
            f"gradprobe: {why} runs backward passes as compiled graphs, whose gradient "
            "accumulation and end the Probe does not see: error_norm, error_gain and "
            "global_grad_norm_preclip are not recorded while it is on (the other statistics "
            "are)",
        )
        for k in range(len(self._slots)):
            self.buffer.set_host(
                k, "err_gap", self._traversals.gap(k, GAP_BOTH_SIDES, self.step_index)
            )

    def _warn_compiled(self) -> None:
        warnings.warn(
            "gradprobe: the model is compiled (torch.compile). Every statistic is recorded, "
            "but the module hooks run outside the compiled graphs, so the graph breaks at "
            "each probed module and fusion across modules is lost (and fullgraph=True cannot "
            "hold). To keep the graph whole, probe parameters only (modules=[]: grad/param "
            "norms, update ratios, global and pre-clip norms need no module hooks), probe a "
            "few modules (modules=[...]), or take the full per-layer statistics on a short "
            "uncompiled run.",
            GradprobeWarning,
            stacklevel=3,
        )

    # ================================================================ description
    def _order_names(self) -> list[str]:
        seen = [self._slots[k].name for k in self._execution_order]
        rest = [s.name for s in self._slots if s.index not in self._seen_slots]
        return seen + rest

    def _module_info(self, s: _Slot, m: nn.Module) -> dict[str, Any]:
        info = {
            "name": s.name,
            "type": s.type,
            "activation": s.activation.name if s.activation else recurrent_nonlinearity(m),
            "parameters": sum(p.numel() for p in m.parameters(recurse=False)),
            "layout": s.layout,
        }
        if self.histograms:
            info["histogram_range"] = list(s.histogram_range)
        return info

    def _describe(self, model: nn.Module, config: dict[str, Any] | None) -> dict[str, Any]:
        by_name = dict(model.named_modules())
        modules = [self._module_info(s, by_name[s.name]) for s in self._slots]
        params = dict(model.named_parameters())
        # What the model is and does (attention, norms and where they sit, residual
        # additions...), read once here so that a loaded run is diagnosed as a live one.
        architecture: dict[str, Any] = {}
        self._guard(
            lambda: architecture.update(describe_architecture(model)),
            "reading the model's architecture",
        )
        return {
            "label": self.label,
            "created": _now(),
            "model": {
                "class": type(model).__name__,
                "parameters": sum(p.numel() for p in model.parameters()),
                "summary": _summary(model),
            },
            "modules": modules,
            "architecture": architecture,
            "parameters": [
                {"name": n, "shape": list(params[n].shape), "numel": params[n].numel()}
                for n in self._param_names
            ],
            "probe": {
                "every": self.every,
                **({"cadence": _auto_cadence()} if self._auto else {}),
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
# Module-level functions, each called through an Entry (gradprobe.hooks), which holds a weak
# reference to the Probe and a slot index, never a module or a tensor, and guards the call.
# The torch.func transforms a call can run inside (functorch's TransformType), as users
# write them.
_TRANSFORMS = {
    "Vmap": "torch.func.vmap",
    "Grad": "torch.func.grad (or vjp, jacrev)",
    "Jvp": "torch.func.jvp (or jacfwd)",
    "Functionalize": "torch.func.functionalize",
}
# What a module hook does with a call (Probe._call_mode).
_SKIP, _RECORD, _RECOMPUTE = 0, 1, 2


def _remove_all(*hooksets: HookSet) -> None:
    for hooks in hooksets:
        hooks.remove()


# The entry points of this module (gradprobe.hooks.Entry is the guard around each): what
# a failure is called, and what it leaves out of the step.
_PRE_SITE = Site("forward pre-hook", "module")
_FORWARD_SITE = Site("forward hook", "module")
# The pass decides what every module records: a failure leaves every module out. Traced
# (a compiled model) the end does nothing: held outputs are reduced when backward begins or
# the step closes. The start runs outside the graph where there are module hooks (they
# break the graph anyway): it tells the Probe the model is compiled before dynamo reads
# the modules' hook tables, which it reads once (hooks put on later would be ignored).
# Without module hooks (modules=[]) it does nothing either: each module hook would judge
# its call by the same rule (_call_mode), and the post-accumulate hooks say that a trained
# pass ran (log()), so such a model compiles whole, fullgraph=True included.
_PASS_START_SITE = Site("the start of the model's forward", "modules")
_PASS_START_UNHOOKED_SITE = Site("the start of the model's forward", "modules", "skip")
_PASS_END_SITE = Site("the end of the model's forward", "modules", "skip")
# Pre-clip norms and which passes' error signals count (both feed the step's rows).
_ACCUMULATED_SITE = Site("a gradient-accumulated hook", "params")
_STEP_PRE_SITE = Site("the optimizer step (pre-hook)", "params", passes_result=True)
_STEP_POST_SITE = Site("the optimizer step (post-hook)", "step")


def _pre_hook(probe: Probe, k: int, module: nn.Module, args: tuple[Any, ...], kwargs: Any) -> None:
    if probe._scaler_ref is not None:
        probe._poll_scaler()  # the first forward of an iteration closes a skipped step
    mode = probe._call_mode()
    if mode == _RECORD:
        probe._open_call(k)  # what this call records can be taken back (_drop_failed_call)
        probe._on_pre(k, module, args, kwargs)
    elif mode == _RECOMPUTE:
        probe._on_recomputed_pre(k, args, kwargs)


def _forward_hook(
    probe: Probe, k: int, module: nn.Module, args: Any, kwargs: Any, output: Any
) -> None:
    mode = probe._call_mode()
    if mode == _RECORD:
        if not probe._begin_forward(k):
            return  # its pre-hook failed: the call is left out (Capture._drop_failed_call)
        probe._on_forward(k, module, output)
        if k in probe._carry_slots:
            name = probe._slots[k].name
            record_carry(probe.buffer, k, name, module, args, kwargs, output, probe._unreadable)
        probe._end_forward(k)
    elif mode == _RECOMPUTE:
        probe._on_recomputed(k, output)


def _pass_start_hook(probe: Probe, key: int, module: nn.Module, args: Any, kwargs: Any) -> None:
    # A forward inside a torch.func transform is no pass of the step: its modules are left
    # out (_call_mode), and nothing of the step's bookkeeping may see its wrapped tensors.
    if not probe._closed and torch._C._functorch.peek_interpreter_stack() is None:
        if probe._scaler_ref is not None:
            probe._poll_scaler()  # the first forward of an iteration closes a skipped step
        probe._on_pass_start()


def _pass_end_hook(
    probe: Probe, key: int, module: nn.Module, args: Any, kwargs: Any, output: Any
) -> None:
    if not probe._closed and torch._C._functorch.peek_interpreter_stack() is None:
        probe._on_pass_end()


def _post_accumulate_hook(probe: Probe, param: Tensor) -> None:
    if probe._scaler_ref is not None:
        probe._poll_scaler()
    probe._forward_step = probe.step_index  # a trained pass ran in this step (log())
    # It runs for every parameter in every backward, recorded or not (the "auto"
    # cadence's sentinel): what it has to do is tested here, before any call. Error
    # signals are kept only at recorded steps, so only they need the passes noted (and
    # the gradients marked when the pass ends: gradprobe/follow.py, discarded passes).
    if probe._recording:
        probe._note_accumulation(param)
    if (probe._want_preclip or probe._recording) and not probe._backward_pending:
        probe._on_post_accumulate()


def _step_pre_hook(probe: Probe, optimizer: Any, args: Any, kwargs: Any) -> Any:
    if _compiled_autograd():
        probe._without_backward_hooks("compiled autograd (torch._dynamo.config.compiled_autograd)")
    # None, or (args, kwargs) with the closure watched (gradprobe/follow.py): the one entry
    # point whose result PyTorch uses (its Site passes it on; a failure passes None).
    return probe._before_step(args, kwargs)


def _compiled_autograd() -> bool:
    """Whether dynamo compiles backward passes (its hooks then run inside a compiled graph
    whose gradient accumulation and end the Probe does not see)."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and getattr(dynamo.config, "compiled_autograd", False) is True


def _step_post_hook(probe: Probe, optimizer: Any, args: Any, kwargs: Any) -> None:
    probe._closing_step = probe.step_index  # should the close fail: which step to close
    if not probe._closed:
        _note_time(probe)
    probe._on_step_post()
    _raise_if_asked(probe)


def _note_time(probe: Probe) -> None:
    """The wall-clock time of this step's close (one host clock read, no device
    work): the first step's and each flush's last step's become the run's time anchors."""
    probe._last_close = [probe.step_index, time.time()]
    if not probe._wall_time:
        probe._wall_time.append(list(probe._last_close))


def _raise_if_asked(probe: Probe) -> None:
    """``stop_on``: the one place the Probe raises into training, because the user asked
    (gradprobe.hooks.Entry lets :class:`~gradprobe.StopTraining` through, nothing else)."""
    stop = probe._live.take_stop() if probe._live.stop is not None else None
    if stop is not None:
        raise stop


# ==================================================================== helpers


def _logged_rows(
    logged: Mapping[tuple[int, str], tuple[float, float]],
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Logged values finalised as their statistic declares (rows of ``(model)``): per
    name, ``(name, steps, values [steps, 1], present [steps, 1])``."""
    by_name: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for (step, name), (total, count) in logged.items():
        by_name[name].append((step, total, count))
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
        parts.append((name, steps, values, present))
    return parts


# Long-form rows of one statistic, as columns: step, name code, stat code, value.
_Rows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _long(
    steps: np.ndarray, names: np.ndarray, stat: int, values: np.ndarray, present: np.ndarray
) -> _Rows:
    """The present cells of one statistic's ``[steps, names]`` table as rows: step, name
    code (``names``: the code of each column), stat code, value."""
    rows, cols = np.nonzero(present)
    return (
        steps[rows].astype(np.int64),
        names[cols],
        np.full(len(rows), stat, dtype=np.int64),
        values[rows, cols].astype(np.float64),
    )


def _auto_cadence() -> dict[str, int]:
    return {"first": AUTO_FIRST, "every": AUTO_EVERY, "burst": AUTO_BURST}


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
    if every != "auto":
        _positive("every", every)
    for name, value in (
        ("flush_every", flush_every),
        ("dead_window", dead_window),
        ("histogram_bins", histogram_bins),
    ):
        _positive(name, value)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = ' or "auto"' if name == "every" else ""
        raise GradprobeError(
            f"{name} must be a positive integer{extra}, got {value!r}", f"e.g. {name}=1"
        )


# The live check (findings said while training) is analysis, a layer above the recording
# engine: found by name when a Probe is made, as views are (gradprobe/_views.py), so that
# nothing here imports upward. tests/test_layers.py checks that the entry exists there.
LIVE_CHECK = ("gradprobe.live", "LiveCheck")


def _live_check(on_finding: Callable[[Finding], Any] | None, stop_on: Sequence[str]) -> Any:
    module, name = LIVE_CHECK
    return getattr(importlib.import_module(module), name)(on_finding, stop_on)


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
    chosen = _choose_modules(model, selection)
    return [_make_slot(i, name, module) for i, (name, module) in enumerate(chosen)]


def _choose_modules(
    model: nn.Module, selection: Sequence[str] | ModuleFilter | None, strict: bool = True
) -> list[tuple[str, nn.Module]]:
    """The probed modules, in order. ``strict``: a listed name not in the model is an
    error (at construction; when following a changed model it is just not there)."""
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
        if missing and strict:
            raise GradprobeError(
                f"no modules named {missing} in the model", "see model.named_modules()"
            )
        chosen = [(n, m) for n, m in named if n in set(wanted)]
    return chosen


def _make_slot(i: int, name: str, module: nn.Module) -> _Slot:
    act = activation_of(module)
    hist = act.histogram_range if act else DEFAULT_HISTOGRAM_RANGE
    from_output = act.name if act is not None and _stock_forward(module, act) else None
    inplace = getattr(module, "inplace", False) is True
    return _Slot(
        i, name, type(module).__name__, act, _layout_of(module), hist, from_output, inplace
    )


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


def _theory_of(model: nn.Module) -> dict[str, Any]:
    from .theory.model import describe  # on first use: recording needs no theory

    return describe(model)

"""Probe: attach to any ``nn.Module``, record per-layer statistics of real training.

The Probe is a facade: the public API and the lifecycle (hooks put on and taken off,
flushes, the store, the frame). Its work is done by the components of
:mod:`gradprobe.recording`, each owning its state, over one shared context and a few
events (the map is in that package's docstring); what is measured of a tensor is in the
site reducers (:mod:`gradprobe.sites`, :mod:`gradprobe.reduce`), and
:mod:`gradprobe.stats` is the one place a statistic is declared.

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
                                returns (gradprobe/recording/optstep.py)
    optimizer step post-hook    update norms; the step's row is closed

All of it stays on the device, in a :class:`~gradprobe.buffer.StepBuffer`; every
``flush_every`` recorded steps (and at ``frame()``/``close()``) the buffer is copied
to the host once, finalised into long-form rows and appended to the store. On steps
that ``every`` skips, no module or gradient hook is on the model.

The Probe holds names and slot indices, not modules: hooks reach its components through
a weak reference, and a ``weakref.finalize`` removes them if the Probe is dropped unclosed.

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

import importlib
import os
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from .buffer import StepBuffer
from .errors import GradprobeError
from .finding import Finding
from .recording.bindings import ModuleFilter, select_modules, trainable_parameters
from .recording.clock import AUTO_BURST, AUTO_EVERY, AUTO_FIRST, auto_cadence
from .recording.context import Context
from .recording.engine import Engine
from .recording.hookup import warn_compiled
from .recording.meta import Progress, describe, now, optimizer_meta, theory_of
from .recording.sequences import sequence_sites
from .recording.tensors import first_float_tensor
from .run import Run
from .shards import ShardedNorms
from .stats import PRESETS, STATISTICS, Plan
from .step import _loggable
from .store import Store

__all__ = ["LIVE_CHECK", "Probe", "is_compiled", "unwrap_model"]

# Kept importable here (docs/recording.md names it).
_first_float_tensor = first_float_tensor
_AUTO = (AUTO_FIRST, AUTO_EVERY, AUTO_BURST)
# The statistics measured at sequence-only slots (blocks, the final projection).
_SEQUENCE_FORWARD_STATS = frozenset({"token_cosine", "logit_max", "logit_z"})


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


class Probe:
    """Records per-layer gradient, error-signal and activation statistics during training.

    Args:
        model: the network (DDP/DataParallel/compiled wrappers are unwrapped for names).
        optimizer: its ``step()`` marks a step (hooks, so the loop does not change);
            without one, call :meth:`step` after each update.
        every: ``"auto"`` (the default): every step for the first
            ``gradprobe.recording.clock.AUTO_FIRST`` (20) steps, then every ``AUTO_EVERY``-th
            (50th), with the gradients' norms (``grad_norm``, ``global_grad_norm`` and
            its pre-clip value, their NaN/Inf flags) recorded at *every* step as a
            sentinel: a step whose gradients are not finite shows in those rows exactly,
            and the ``AUTO_BURST`` (20) steps after it are recorded in full (see
            docs/recording.md, "Cadence"). Or an integer k: every k-th step in full, the
            others cost nothing (``every=1``: every step).
        store: a run directory to stream to (see :mod:`gradprobe.store`).
        stats: ``"cheap"``, ``"default"``, ``"full"`` (adds activation histograms), or a
            list of statistic names from ``gradprobe.stats.STATISTICS``.
        modules: which modules to probe: by default every leaf, every module with
            parameters of its own and every ``…Attention`` module; or a list of qualified
            names; or a predicate ``(name, module) -> bool``.
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
        self.every = every
        self.flush_every = flush_every
        self.stats = _resolve_stats(stats)
        self.histograms = stats == "full"
        # NaN/Inf: exact counts of entries under "full"; elsewhere a flag that the norms
        # carry at no extra pass (gradprobe/reduce.py).
        self.exact_counts = stats == "full"
        self.label = label
        inner = unwrap_model(model)
        slots, sites = _slots(inner, modules, self.stats)
        param_names, params = trainable_parameters(inner)
        # What every component shares (gradprobe/recording/context.py).
        ctx = self._ctx = Context(
            stats=self.stats,
            plan=Plan.of(self.stats),  # what the hooks measure, from the statistics' needs
            every=every,
            auto=every == "auto",
            flush_every=flush_every,
            histograms=self.histograms,
            exact_counts=self.exact_counts,
            compiled=is_compiled(model),
            distributed=distributed,
            sync_ranks=sync_ranks,  # the group is looked up when the first step closes
            process_group=process_group,
            model_ref=weakref.ref(inner),
            optimizer_ref=weakref.ref(optimizer) if optimizer is not None else None,
            scaler_ref=weakref.ref(scaler) if scaler is not None else None,
            slots=slots,
            params=params,
            param_names=param_names,
            # FSDP2: sharded parameters, whose norms add up over the ranks at each step.
            shards=ShardedNorms(params, inner),
            # Findings said while training, from each flush's host rows (gradprobe/live.py).
            live=_live_check(on_finding, stop_on),
            progress=Progress(),
        )
        ctx.buffer = self.buffer = StepBuffer(
            len(slots),
            len(params),
            dead_window=dead_window,
            histogram_bins=histogram_bins if self.histograms else 0,
        )
        # The components, each owning its state, wired (gradprobe/recording/engine.py).
        engine = self._engine = Engine.build(ctx, inner, modules, sites)
        ctx.meta = describe(ctx, inner, self._settings(), label, config)
        if optimizer is not None:
            ctx.meta["optimizer"] = optimizer_meta(optimizer)
        ctx.meta["probe"].update(scaler=scaler is not None, compiled=ctx.compiled, world_size=1)
        # The structure and init statistics the theory predicts from (theory.compare).
        ctx.guard(lambda: ctx.meta.update(theory=theory_of(inner)), "the theory's description")
        # Every rank holds the combined statistics; one writes them.
        rank_zero = not distributed or torch.distributed.get_rank() == 0
        ctx.live.warn = rank_zero  # every rank sees the same rows: one says it
        ctx.store = Store(store, ctx.meta) if store is not None and rank_zero else None
        if ctx.compiled:
            warn_compiled()
        engine.hookup.register(inner, optimizer)
        # If the Probe is dropped without close(), its hooks must not outlive it.
        self._finalizer = engine.hookup.finalizer(self)
        if optimizer is None and ctx.plan.update:
            engine.updates.take()

    def _settings(self) -> dict[str, Any]:
        return {
            "every": self.every,
            **({"cadence": auto_cadence()} if self._ctx.auto else {}),
            "flush_every": self.flush_every,
            "stats": list(self.stats),
            "dead_window": self.buffer.dead_window,
            "histogram_bins": self.buffer.histogram_bins,
        }

    # ================================================================ public API
    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def meta(self) -> dict[str, Any]:
        return {**self._ctx.meta, **self._ctx.progress.of(self._ctx)}

    @property
    def closed(self) -> bool:
        return self._ctx.closed

    @property
    def compiled(self) -> bool:
        """Whether the model is compiled (known at construction, or when dynamo first
        traced one of the Probe's hooks)."""
        return self._ctx.compiled

    @property
    def step_index(self) -> int:
        """The step in progress (the number of steps closed so far)."""
        return self._ctx.step_index

    def step(self) -> None:
        """Mark the end of a step when no optimizer was given (after the update)."""
        if self._ctx.optimizer_ref is not None:
            raise GradprobeError(
                "Probe.step() was called but the Probe watches an optimizer",
                "its step() already marks each step: remove the call to probe.step()",
            )
        if self._ctx.closed:
            return
        self._engine.step.manual_step()

    def frame(self) -> pd.DataFrame:
        """All recorded rows so far (columns step, name, stat, value); flushes the buffer.

        Under DDP the flush is collective: call it on every rank (each gets the same rows)."""
        if not self._ctx.closed:
            self._engine.scaler.poll()
        return self._engine.rows.frame()

    def run(self) -> Run:
        """What has been recorded so far, as a :class:`~gradprobe.run.Run`."""
        store = self._ctx.store
        return Run(self.meta, self.frame(), path=store.path if store else None)

    def add_listener(self, listener: Callable[[pd.DataFrame], None]) -> Callable[[], None]:
        """Call ``listener(rows)`` with the rows of every flush, on the host; returns its remover.

        Live writers (e.g. :mod:`gradprobe.integrations.tensorboard`) use it: they see each
        step once, when it is flushed, and cost the training loop nothing in between.
        """
        return self._engine.rows.add_listener(listener)

    def log(self, **scalars: Tensor | float) -> None:
        """Record scalars of the training step as ``(model)`` rows: ``probe.log(loss=loss)``.

        A tensor (one element) stays on its device, detached, until the flush: logging
        costs no host sync. Python and NumPy numbers are taken as they are. A step's row
        is the mean of the values logged for it (its micro-batches: log each one's own
        loss, not divided by the accumulation steps), and under DDP the mean over the
        ranks that logged it.

        Which step a value belongs to: the step in progress if the model (or any probed
        module) has run a forward pass under grad since the last optimizer step, or if the
        value is a tensor computed under grad since then (its autograd graph is newer than
        the step's close); otherwise (logged after ``optimizer.step()``, before the next
        forward) the step that just closed. Values
        for steps that an integer ``every`` does not record are dropped (``"auto"`` keeps
        them: every step has its sentinel rows), as are values logged after
        :meth:`close`. ``lr`` is read from the optimizer at each step; log it yourself
        only when the Probe watches no optimizer.
        """
        ctx = self._ctx
        reads_lr = ctx.optimizer_ref is not None
        values = {name: _loggable(name, value, reads_lr) for name, value in scalars.items()}
        if ctx.closed or not values:
            return
        step = ctx.step_index
        passes = self._engine.passes
        if (
            step not in (passes.trained_step, passes.forward_step)
            and step > 0
            and not passes.made_in_this_step(scalars.values())
        ):
            step -= 1  # no training pass since the optimizer step: the loss is that step's
        if not self._engine.clock.records(step) and not ctx.auto:
            return  # (under "auto" every step has rows: the sentinel's)
        for name, value in values.items():
            ctx.buffer.log(step, name, value)

    def close(self) -> None:
        """Remove every hook, flush, finish the store. Idempotent."""
        ctx, engine = self._ctx, self._engine
        if ctx.closed:
            return
        engine.scaler.poll()  # a last step the scaler skipped
        ctx.closed = True
        engine.hookup.remove()
        self._finalizer.detach()
        engine.rows.flush(final=True)  # never raises
        if ctx.store is not None:
            store = ctx.store
            ctx.guard(lambda: store.close(**ctx.progress.of(ctx), finished=now()), "close (store)")
        engine.release()

    # ================================================================ for the integrations
    def _add_meta(self, **entries: Any) -> None:
        """Keep ``entries`` in the run's meta (and the store's): a trainer's configuration."""
        self._ctx.meta.update(entries)
        if self._ctx.store is not None:
            self._ctx.store.update_meta(**entries)

    @property
    def _live(self) -> Any:
        """The live check: the findings said while training (gradprobe/live.py)."""
        return self._ctx.live


# ==================================================================== helpers
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


def _slots(
    inner: nn.Module, modules: Sequence[str] | ModuleFilter | None, stats: tuple[str, ...]
) -> tuple[list[Any], Any]:
    """The probed modules' slots, then the sequence-only ones (blocks, the final
    projection: recording/sequences.py) where the selection is the default and a
    statistic measured there is asked for; and the sequence sites."""
    slots = select_modules(inner, modules)
    extra, sites = sequence_sites(inner, slots, explicit=modules is not None)
    if set(stats) & _SEQUENCE_FORWARD_STATS:
        slots = slots + extra
    return slots, sites


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

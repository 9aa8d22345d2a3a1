"""What the recording components share, and the events they tell each other.

The Probe (:mod:`gradprobe.probe`) is a facade over components that each own their state
(the map is in :mod:`gradprobe.recording`). They share one :class:`Context`: the
configuration (which statistics, what the hooks measure, the cadence), the bindings (the
probed modules' slots and the parameters, which grow when the model changes), the
buffer, the step's clock state (``step_index``, ``recording``, ``closed``), the meta and
the store, and the weak references to the model, the optimizer and the scaler. Nothing
else of a component is read by another: what one must tell the others is an event
(:data:`EVENTS`), and what one must ask of another is a public method of a collaborator it
was given when the Probe was made.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..hooks import warn_once

__all__ = ["EVENTS", "Context", "inside_backward"]


def inside_backward() -> bool:
    """Whether this thread is running a backward pass: autograd's current graph task.

    A module's forward that runs inside backward is activation checkpointing recomputing
    it (``torch.utils.checkpoint``, either ``use_reentrant``), not a new pass.
    """
    return torch._C._current_graph_task_id() != -1


# The events, what each says, and what is passed with it. Handlers run in the order they
# subscribed (the order the Probe makes its components in).
EVENTS = {
    # The forward's outputs are complete (the pass ended, backward began, the gradients
    # are marked, the step closes, an in-place module is about to write over its input):
    # what is held for a batched reduction is reduced now.
    "forward_ended": (),
    # A backward pass that accumulated into the model's parameters has ended.
    "backward_ended": (),
    # A backward pass accumulates into a parameter for its first time (the parameter).
    "backward_accumulating": ("param",),
    # The gradients were marked at a backward pass's end / found discarded since (the
    # slots whose records before the mark are dropped).
    "gradients_marked": (),
    "gradients_discarded": ("slots",),
    # The step is closing: what waits for its end is recorded now (held outputs, units
    # whose layout was not known in their hook). A failure discards the step.
    "step_closing": (),
    # The step's records were dropped (``skipped``: the GradScaler skipped the step;
    # else its close failed).
    "step_discarded": ("step", "skipped"),
    # The step closed: ``step_index`` and ``recording`` are the next step's.
    "step_closed": ("step",),
    # The model changed: about to bind it (closed steps are flushed with the old widths),
    # and bound (the parameters new since).
    "model_changing": (),
    "model_rebound": ("new_params",),
    # The sequence sites of the model as it is now (emitted before model_rebound).
    "sequence_sites": ("sites",),
}


class Context:
    """The recording engine's shared configuration and state (see the module's docstring).

    Set once: ``stats``, ``plan`` (:class:`gradprobe.stats.Plan`: what the hooks
    measure), ``every``/``auto``, ``flush_every``, ``histograms``, ``exact_counts``,
    ``distributed``, ``sync_ranks``, ``process_group`` and the weak references. Bindings
    (:mod:`gradprobe.follow` appends to them): ``slots``, ``params``, ``param_names``,
    ``retired_slots``, ``retired_params``, ``shards``. The step: ``step_index``,
    ``recording``, ``closed``; ``pass_open`` (inside the probed model's forward),
    ``searching`` (the optimizer's later evaluations of a closure), ``unfollowed`` (a model
    change that could not be followed: nothing more is recorded), ``compiled``.
    """

    def __init__(self, **config: Any) -> None:
        self.stats: tuple[str, ...] = ()
        self.plan: Any = None
        self.every: int | str = "auto"
        self.auto = False
        self.flush_every = 50
        self.histograms = False
        self.exact_counts = False
        self.compiled = False
        self.distributed = False
        self.sync_ranks: bool | None = None
        self.process_group: Any = None
        self.model_ref: Callable[[], Any] = lambda: None
        self.optimizer_ref: weakref.ref[Any] | None = None
        self.scaler_ref: weakref.ref[Any] | None = None
        # The owner every Entry (gradprobe.hooks) calls: the hook registration component.
        self.owner_ref: weakref.ref[Any] | None = None
        self.slots: list[Any] = []
        self.params: list[Any] = []
        self.param_names: list[str] = []
        self.retired_slots: set[int] = set()
        self.retired_params: set[int] = set()
        self.shards: Any = None
        self.buffer: Any = None
        self.meta: dict[str, Any] = {}
        self.progress: Any = None  # what is learned while training (recording/meta.py)
        self.store: Any = None
        self.live: Any = None  # findings said while training (gradprobe/live.py)
        self.step_index = 0
        self.recording = True
        self.closed = False
        self.pass_open = False
        self.searching = 0
        self.unfollowed = False
        # One warning per place (gradprobe.hooks.warn_once): failures, and what cannot be
        # read (a module with no floating-point output, a transform, ...).
        self.failed_where: set[str] = set()
        self.unreadable: set[str] = set()
        for name, value in config.items():
            if not hasattr(self, name):
                raise TypeError(f"Context has no {name!r}")
            setattr(self, name, value)
        self._handlers: dict[str, list[weakref.WeakMethod[Any]]] = {e: [] for e in EVENTS}

    # ------------------------------------------------------------ events
    def on(self, event: str, handler: Callable[..., Any]) -> None:
        """Call ``handler`` (a component's bound method) at each ``event``. Held weakly:
        a component subscribed does not outlive the Probe that made it."""
        self._handlers[event].append(weakref.WeakMethod(handler))  # type: ignore[arg-type]

    def emit(self, event: str, *args: Any) -> None:
        """Tell the subscribed components, in the order they subscribed. A handler's
        failure is the caller's (each entry point goes through the one guard)."""
        for ref in self._handlers[event]:
            handler = ref()
            if handler is not None:
                handler(*args)

    # ------------------------------------------------------------ the guard
    def guard(self, fn: Callable[[], object], where: str) -> bool:
        """Run a piece of the Probe's work; a failure is one warning, never the user's error."""
        try:
            fn()
        except Exception as exc:  # never into the user's loop
            warn_once(self.failed_where, where, exc)
            return False
        return True

    def guard_params(self, fn: Callable[[], object], where: str) -> None:
        """:meth:`guard`, and a failure leaves the parameters' statistics out of the step."""
        if not self.guard(fn, where):
            self.guard(self.gap_params, f"{where} (marking the gap)")

    def gap_params(self) -> None:
        self.buffer.set_param_host(list(range(len(self.params))), "param_gap")

    def module_failed(self, k: int, where: str, exc: BaseException) -> None:
        """The Probe's work on module ``k`` failed: one warning, and a gap for its step."""
        warn_once(self.failed_where, f"{where} of module {self.slots[k].name!r}", exc)
        self.buffer.set_host(k, "gap", 1)

    def raise_if_asked(self) -> None:
        """``stop_on``: the one place the Probe raises into training, because the user asked
        (gradprobe.hooks.Entry lets :class:`~gradprobe.StopTraining` through, nothing else)."""
        stop = self.live.take_stop() if self.live.stop is not None else None
        if stop is not None:
            raise stop

    def optimizer(self) -> Any:
        return self.optimizer_ref() if self.optimizer_ref is not None else None

    def scaler(self) -> Any:
        return self.scaler_ref() if self.scaler_ref is not None else None

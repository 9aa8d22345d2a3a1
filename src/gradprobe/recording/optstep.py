"""The optimizer step: what it applies is read at its pre-hook, or when its closure returns.

:class:`OptimizerStep` handles the optimizer's step pre- and post-hooks and
``probe.step()`` (no optimizer): it follows the model, polls the scaler, records the
learning rate, the parameters' statistics (or the "auto" sentinel) and the update
snapshot before the update, the update ratio after it, and closes the step.

*A closure* (``optimizer.step(closure)``: Lightning, LBFGS): the step pre-hook runs
before the closure has made the gradients. The pre-hook hands the optimizer a closure
that calls the user's and then reads the gradients, when the first evaluation returns
(after Lightning's clipping, which runs inside it). Later evaluations in the same step
(LBFGS's line search and inner iterations) are the optimizer's own search at other
parameters: they are not recorded (``ctx.searching``).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..hooks import Entry, Site
from .context import Context

__all__ = ["OptimizerStep"]

# The optimizer's entry points (gradprobe.hooks.Entry guards each; the owner is the hook
# registration, gradprobe/recording/hookup.py, whose ``step`` is this component).
STEP_PRE_SITE = Site("the optimizer step (pre-hook)", "params", passes_result=True)
STEP_POST_SITE = Site("the optimizer step (post-hook)", "step")
# The closure's entry points. Like every other, each goes through the one guard: a
# failure is a warning and a gap, and a training step compiled whole (its closure traced
# by dynamo) runs them eagerly outside the graph.
_CLOSURE_SITE = Site("the optimizer step's closure (reading the step)", "params")
_SEARCH_SITE = Site("the optimizer step's closure (its later evaluations)", "none")


def step_pre_hook(owner: Any, optimizer: Any, args: Any, kwargs: Any) -> Any:
    if _compiled_autograd():
        owner.without_backward_hooks("compiled autograd (torch._dynamo.config.compiled_autograd)")
    # None, or (args, kwargs) with the closure watched: the one entry point whose result
    # PyTorch uses (its Site passes it on; a failure passes None).
    return owner.step.before_step(args, kwargs)


def step_post_hook(owner: Any, optimizer: Any, args: Any, kwargs: Any) -> None:
    owner.step.after_step()


def _compiled_autograd() -> bool:
    """Whether dynamo compiles backward passes (its hooks then run inside a compiled graph
    whose gradient accumulation and end the Probe does not see)."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and getattr(dynamo.config, "compiled_autograd", False) is True


def _closure_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, Any]:
    """Where the closure of an ``optimizer.step`` call is (-1: a keyword, else its place
    in ``args``, which begin with the optimizer itself), and the closure; (0, None) if
    there is none."""
    closure = kwargs.get("closure")
    if callable(closure):
        return -1, closure
    at = 1 if args and isinstance(args[0], torch.optim.Optimizer) else 0
    if len(args) > at and callable(args[at]):
        return at, args[at]
    return 0, None


def _read_after_closure(owner: Any) -> None:
    if not owner.ctx.closed:
        owner.step.closure_returned()


def _search_begins(owner: Any) -> None:
    owner.ctx.searching += 1


def _search_ends(owner: Any) -> None:
    owner.ctx.searching = max(0, owner.ctx.searching - 1)


def _watched(ref: weakref.ref[Any], closure: Callable[..., Any]) -> Callable[..., Any]:
    """The user's closure, and the Probe's reading of the gradients when it returns."""
    evaluations = [0]
    returned = Entry(_read_after_closure, ref, _CLOSURE_SITE)
    begins = Entry(_search_begins, ref, _SEARCH_SITE)
    ends = Entry(_search_ends, ref, _SEARCH_SITE)

    def closure_watched(*args: Any, **kwargs: Any) -> Any:
        first = evaluations[0] == 0
        evaluations[0] += 1
        if not first:  # the optimizer's own search at other parameters: not recorded
            begins()
            try:
                return closure(*args, **kwargs)
            finally:
                ends()
        result = closure(*args, **kwargs)  # the user's: its errors are the user's
        returned()
        return result

    return closure_watched


class OptimizerStep:
    """The step's reading and close. Collaborators: ``params`` (ParamStats), ``sentinel``
    (SentinelRoute: a step the cadence does not record), ``updates``
    (UpdateSnapshot), ``scaler`` (ScalerWatch), ``follow`` (Follow: the model as it is),
    ``clock`` (StepClock: the close), ``note_time`` (the rows' wall-clock anchors)."""

    def __init__(
        self,
        ctx: Context,
        *,
        params: Any,
        sentinel: Any,
        updates: Any,
        scaler: Any,
        follow: Any,
        clock: Any,
        note_time: Callable[[int], None],
    ) -> None:
        self.ctx = ctx
        self._params = params
        self._sentinel = sentinel
        self._updates = updates
        self._scaler = scaler
        self._follow = follow
        self._clock = clock
        self._note_time = note_time
        # The step's reading of the gradients waits for its closure (see before_step).
        self._work_pending = False
        self._want_update = ctx.plan.update
        ctx.on("step_closed", self._on_step_closed)

    def _on_step_closed(self, step: int) -> None:
        self._work_pending = False

    # ------------------------------------------------------------ the pre-hook
    def before_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The optimizer step pre-hook: with a closure, hand the optimizer one that reads
        the gradients when it returns; else read them now. Never raises."""
        ctx = self.ctx
        try:
            at, closure = _closure_of(args, kwargs)
        except Exception:
            at, closure = 0, None
        if closure is None or ctx.closed or not (ctx.recording or ctx.auto):
            ctx.guard(self._on_step_pre, "the optimizer step (pre-hook)")
            return None
        self._follow.follow_or_stop("the optimizer step (following the model)")
        self._scaler.poll()
        if "lr" in ctx.stats and (ctx.recording or ctx.auto):
            ctx.guard(self._record_lr, "optimizer step (learning rate)")
        self._work_pending = True
        watched = _watched(ctx.owner_ref, closure)
        if at < 0:
            return args, {**kwargs, "closure": watched}
        return (*args[:at], watched, *args[at + 1 :]), kwargs

    def closure_returned(self) -> None:
        """The first evaluation of the step's closure returned: its gradients are the
        step's (after clipping inside it, as Lightning's)."""
        if self._work_pending:
            self._work_pending = False
            self._read_step()  # never raises: each part is guarded

    def _on_step_pre(self) -> None:
        """The optimizer step begins, with no closure: its gradients are there."""
        ctx = self.ctx
        if ctx.closed:
            return
        self._follow.follow_or_stop("the optimizer step (following the model)")
        self._scaler.poll()
        if (ctx.recording or ctx.auto) and "lr" in ctx.stats:
            ctx.guard(self._record_lr, "optimizer step (learning rate)")
        self._read_step()

    def _read_step(self, snapshot: bool = True) -> None:
        """The gradients the step applies (before the update): at the step pre-hook, or
        when the step's closure returned. ``snapshot``: also copy the parameters for
        ``update_ratio`` (not once the update has happened)."""
        ctx = self.ctx
        if ctx.recording:
            ctx.guard_params(self._params.record, "optimizer step (gradients)")
            if self._want_update and snapshot:
                ctx.guard_params(self._updates.take, "optimizer step (snapshot)")
        elif ctx.auto:
            ctx.guard_params(self._sentinel.at_step, "optimizer step (sentinel)")

    # ------------------------------------------------------------ the post-hook
    def after_step(self) -> None:
        """The optimizer step post-hook: the update ratio, and the step's close."""
        ctx = self.ctx
        self._clock.closing_step = ctx.step_index  # should the close fail: which step
        if not ctx.closed:
            self._note_time(ctx.step_index)
        self._on_step_post()
        ctx.raise_if_asked()

    def _on_step_post(self) -> None:
        ctx = self.ctx
        if ctx.closed:
            return
        if self._work_pending:
            # The optimizer never called the closure it was given: the gradients it saw
            # are still there, but the parameters have moved (no update_ratio).
            self._work_pending = False
            self._updates.drop()  # (one left by a step that raised is not this step's)
            self._read_step(snapshot=False)
        if ctx.recording and self._want_update and self._updates.taken:
            ctx.guard_params(self._updates.record, "optimizer step (update ratio)")
        self._scaler.stepped()
        self._clock.end_step()

    # ------------------------------------------------------------ probe.step()
    def manual_step(self) -> None:
        """``probe.step()``: the end of a step when no optimizer is watched."""
        ctx = self.ctx
        self._follow.follow_or_stop("probe.step (following the model)")
        self._scaler.poll()
        if ctx.recording:
            ctx.guard_params(self._params.record, "probe.step")
            if self._want_update and self._updates.taken:
                ctx.guard_params(self._updates.record, "probe.step (update ratio)")
        elif ctx.auto:
            ctx.guard_params(self._sentinel.at_step, "probe.step (sentinel)")
        self._scaler.stepped()
        self._note_time(ctx.step_index)
        self._clock.end_step()
        if ctx.recording and self._want_update:
            ctx.guard_params(self._updates.take, "probe.step (snapshot)")
        ctx.raise_if_asked()

    # ------------------------------------------------------------ the learning rate
    def _record_lr(self) -> None:
        """Each param group's learning rate: host numbers (a tensor rate, as capturable
        optimizers keep it, is logged as a tensor: no sync). ``lr`` is the largest; with
        groups at different rates each one's is ``lr/<i>`` too."""
        ctx = self.ctx
        optimizer = ctx.optimizer()
        if optimizer is None:
            return
        rates = [g["lr"] for g in optimizer.param_groups if "lr" in g]
        if not rates:
            return
        log = partial(ctx.buffer.log, ctx.step_index, complete=True)
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

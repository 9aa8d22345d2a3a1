"""The probed model's passes: which forward passes are trained, and what a module hook does.

:class:`Passes` decides, once per pass of the probed model (hooks on the model itself),
whether its modules are recorded (docs/recording.md, "Training passes and eval()"), and
for each module hook's call whether to skip it, record it, or (a forward run again
inside backward by activation checkpointing) register only its owed error hooks.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import torch

from ..hooks import warn_gap
from .context import Context, inside_backward

__all__ = ["RECOMPUTE", "RECORD", "SKIP", "Passes"]

# What a module hook does with a call (Passes.call_mode).
SKIP, RECORD, RECOMPUTE = 0, 1, 2

# The torch.func transforms a call can run inside (functorch's TransformType), as users
# write them.
_TRANSFORMS = {
    "Vmap": "torch.func.vmap",
    "Grad": "torch.func.grad (or vjp, jacrev)",
    "Jvp": "torch.func.jvp (or jacfwd)",
    "Functionalize": "torch.func.functionalize",
}


# The number the next autograd node made on this thread will take (torch's
# at::sequence_number; None in a torch without the binding).
_next_sequence_nr = getattr(torch._C._autograd, "_get_sequence_nr", None)
# How many of a logged tensor's nearest graph nodes must be newer than the step's close.
_NEWER_NODES = 32
# A leaf's AccumulateGrad node carries no creation number (the largest one).
_NO_NUMBER = 1 << 62


def _graph_newer(node: Any, since: int) -> bool:
    """Whether the graph from ``node`` has only nodes numbered ``since`` or later among its
    ``_NEWER_NODES`` nearest ones (breadth first), and at least one."""
    if node is None:
        return False
    seen, queue, found = {id(node)}, deque([node]), 0
    while queue and found < _NEWER_NODES:
        node = queue.popleft()
        number = node._sequence_nr()
        if number < _NO_NUMBER:
            if number < since:
                return False  # an older graph: made before the step closed
            found += 1
        for parent, _ in node.next_functions:
            if parent is not None and id(parent) not in seen:
                seen.add(id(parent))
                queue.append(parent)
    return found > 0


class Passes:
    """The pass state. ``follow``: the model followed and frozen modules found at a
    pass's start (gradprobe/recording/follow.py)."""

    def __init__(self, ctx: Context, follow: Any) -> None:
        self.ctx = ctx
        self._follow = follow
        # Autograd's sequence number when the last step closed: a logged tensor whose
        # graph was made since is of the step in progress (see made_in_this_step).
        self._closed_at_nr = -1
        self._closed_on_thread = -1
        ctx.on("step_closed", self._on_step_closed)
        self._pass_trained = False
        self.trained_step = -1  # the last step with a recorded pass
        # The last step in which a probed module ran under grad (which step log() is for).
        self.forward_step = -1
        self._eval_grad_step: int | None = None  # a step with eval() passes under grad

    def _on_step_closed(self, step: int) -> None:
        if _next_sequence_nr is not None:
            self._closed_at_nr = _next_sequence_nr()
            self._closed_on_thread = threading.get_ident()

    def made_in_this_step(self, values: Any) -> bool:
        """Whether autograd says a computation under grad ran since the last step closed,
        for values logged now: a logged tensor's graph made since (the nodes nearest to it,
        up to ``_NEWER_NODES``, all numbered after the close), or, for values with no
        graph, any node made since. A loss logged before backward is then the step in
        progress's even where no hook saw its forward (a sentinel step of a loop that calls
        the model's parts, not the model), while ``loss * k`` or ``loss.exp()`` logged
        after ``optimizer.step()`` (a new node on an old graph) is the step that closed.
        Host numbers, no device op. Autograd numbers its nodes per thread: only on the
        thread that closed the step."""
        if (
            _next_sequence_nr is None
            or self._closed_at_nr < 0
            or threading.get_ident() != self._closed_on_thread
        ):
            return False
        try:  # log() is the user's call: a graph this cannot read is the hooks' rule
            nodes = [n for n in (getattr(v, "grad_fn", None) for v in values) if n is not None]
            if nodes:
                return any(_graph_newer(node, self._closed_at_nr) for node in nodes)
            return _next_sequence_nr() > self._closed_at_nr
        except Exception:
            return False

    def trained_now(self) -> bool:
        """A pass is trained if gradients are enabled and the probed model is in train()
        mode; a submodule's own flag (frozen BatchNorm, a backbone in eval()) does not count."""
        model = self.ctx.model_ref()
        return model is not None and model.training and torch.is_grad_enabled()

    def on_pass_start(self) -> None:
        """The probed model's forward begins: decide, once for the whole pass, whether
        its modules are recorded (see docs/recording.md, "Training passes and eval()")."""
        if inside_backward():
            return  # the model itself recomputed by checkpointing: not a pass
        ctx = self.ctx
        if self.forward_step != ctx.step_index and torch.is_grad_enabled():
            self.forward_step = ctx.step_index  # a forward under grad in this step (log())
        self._check_trained_in_eval()  # before this pass counts
        self._follow.at_pass_start()
        ctx.pass_open = True
        self._pass_trained = self.trained_now()
        if self._pass_trained:
            self.trained_step = ctx.step_index
            if ctx.recording:  # modules frozen for this pass (a GAN's D while G trains)
                ctx.guard(self._follow.update_frozen, "the start of the model's forward (frozen)")
        elif torch.is_grad_enabled():
            self._eval_grad_step = ctx.step_index

    def on_pass_end(self) -> None:
        ctx = self.ctx
        ctx.emit("forward_ended")
        if not inside_backward():
            ctx.pass_open = False

    def _check_trained_in_eval(self) -> None:
        """Say once if the model is trained in eval() mode: then nothing of its modules is
        recorded. Host-side: a step ended after an eval() pass under grad, with no trained
        pass in that step."""
        step = self._eval_grad_step
        if step is None or self.ctx.step_index <= step:
            return
        self._eval_grad_step = None
        if self.trained_step != step:
            warn_gap(
                self.ctx.unreadable,
                "trained in eval",
                "gradprobe: the model is in eval() mode with gradients enabled and an optimizer "
                "step followed: passes in eval() mode are not recorded (as validation and "
                "saliency maps are not), so its modules have no rows. To record training "
                "in eval() mode, keep the model in train() and put the submodules that must "
                "not change in eval() (frozen BatchNorm, no dropout): the computation is the "
                "same, and a submodule's own mode does not stop recording",
            )

    def call_mode(self) -> int:
        """What a module hook does with this call: skip it, record it, or (a forward run
        again inside backward by activation checkpointing) register only owed hooks."""
        ctx = self.ctx
        if self.forward_step != ctx.step_index and torch.is_grad_enabled():
            self.forward_step = ctx.step_index  # a forward under grad in this step (log())
        if ctx.closed or not ctx.recording or ctx.searching:
            return SKIP
        transform = torch._C._functorch.peek_interpreter_stack()
        if transform is not None:
            self._skip_transform(transform)
            return SKIP
        if inside_backward():
            # The first run of this forward was recorded; this one must not double it.
            return RECOMPUTE if self.trained_now() else SKIP
        if ctx.pass_open:
            return RECORD if self._pass_trained else SKIP
        # A submodule called outside the model's forward: the same rule, judged now.
        return RECORD if self.trained_now() else SKIP

    def _skip_transform(self, transform: Any) -> None:
        """A call inside a ``torch.func`` transform is left out, with one warning per kind
        of transform (docs/recording.md, "Transforms")."""
        kind = str(transform.key()).rpartition(".")[2]
        name = _TRANSFORMS.get(kind, kind)
        warn_gap(
            self.ctx.unreadable,
            f"transform {kind}",
            f"gradprobe: modules called inside {name} are not recorded: their tensors are the "
            "transform's wrappers (per-sample slices of a batch under vmap, a level of "
            "differentiation under grad), which statistics of the step would mix up or carry "
            "out of the transform. Passes outside it are recorded as usual, and so are the "
            "parameters' statistics at the optimizer step",
        )

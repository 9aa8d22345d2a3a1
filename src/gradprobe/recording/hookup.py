"""Hook registration, and the one guard every entry point goes through.

:class:`Hookup` registers every hook the Probe puts on the user's model and optimizer,
each an :class:`~gradprobe.hooks.Entry` whose owner is this component (a weak reference:
the hooks never keep the Probe alive). The entry points are the module-level functions
below: each routes a call to the component that does the work (``passes``, ``capture``,
``errors``, ``params``, ``scaler``, ``step``). A failure anywhere in that work is
:meth:`Hookup._entry_failed`: one warning naming the site, and a gap in what the site
feeds; dynamo tracing an entry point is :meth:`Hookup._entry_traced`.

Module hooks and gradient hooks are on the model only while a recorded step runs (a hook
that returns at once still costs its call and takes the module off PyTorch's fast path:
≈ +10 % on a 12×256 MLP), and always on a compiled model (each change of its hooks would
recompile it).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ..hooks import GradprobeWarning, HookSet, Site, warn_gap, warn_once
from ..recurrent import carry_slots, record_carry
from ..stats import STATISTICS
from ..traversals import GAP_BOTH_SIDES, GAP_INPUT_SIDE
from .attn import AttentionCapture
from .context import Context, inside_backward
from .optstep import STEP_POST_SITE, STEP_PRE_SITE, step_post_hook, step_pre_hook
from .passes import RECOMPUTE, RECORD

__all__ = ["Hookup"]

# The entry points of the model's modules: what a failure is called, and what it leaves
# out of the step.
PRE_SITE = Site("forward pre-hook", "module")
_FORWARD_SITE = Site("forward hook", "module")
# A sequence-only slot (a block, the final projection: gradprobe/recording/sequences.py).
_SEQUENCE_SITE = Site("forward hook (sequence statistics)", "module")
# The pass decides what every module records: a failure leaves every module out. Traced
# (a compiled model) the end does nothing: held outputs are reduced when backward begins or
# the step closes. The start runs outside the graph where there are module hooks (they
# break the graph anyway): it tells the Probe the model is compiled before dynamo reads
# the modules' hook tables, which it reads once (hooks put on later would be ignored).
# Without module hooks (modules=[]) it does nothing either: each module hook would judge
# its call by the same rule (Passes.call_mode), and the post-accumulate hooks say that a
# trained pass ran (log()), so such a model compiles whole, fullgraph=True included.
_PASS_START_SITE = Site("the start of the model's forward", "modules")
_PASS_START_UNHOOKED_SITE = Site("the start of the model's forward", "modules", "skip")
_PASS_END_SITE = Site("the end of the model's forward", "modules", "skip")
# Exits the attention watch a submodule called on its own entered (attn.py): nothing to leave out.
_ATTENTION_EXIT_SITE = Site("the end of a probed module's forward (attention)", "none", "skip")
# Pre-clip norms and which passes' error signals count (both feed the step's rows).
_ACCUMULATED_SITE = Site("a gradient-accumulated hook", "params")
_FULL_PARAM_SITE = Site("a gradient-accumulated hook (error signals)", "all_errors")


def _pre_hook(owner: Hookup, k: int, module: nn.Module, args: Any, kwargs: Any) -> None:
    if owner.ctx.scaler_ref is not None:
        owner.scaler.poll()  # the first forward of an iteration closes a skipped step
    mode = owner.passes.call_mode()
    if mode == RECORD:
        if not owner.ctx.pass_open:  # called outside the model's forward (m.backbone(x))
            owner.attention.start_at(k, module, _attention_exit_hook, _ATTENTION_EXIT_SITE)
        owner.attention.enter_module(k)  # the calls of attention it makes are its own
        capture = owner.capture
        capture.open_call(k)  # what this call records can be taken back (drop_failed_call)
        capture.on_pre(k, module, args, kwargs)
    elif mode == RECOMPUTE:
        owner.errors.on_recomputed_pre(k, args, kwargs)


def _forward_hook(
    owner: Hookup, k: int, module: nn.Module, args: Any, kwargs: Any, output: Any
) -> None:
    owner.attention.exit_module(k)
    mode = owner.passes.call_mode()
    if mode == RECORD:
        capture = owner.capture
        if not capture.begin_forward(k):
            return  # its pre-hook failed: the call is left out (drop_failed_call)
        capture.on_forward(k, module, output)
        if k in owner.sequence.forward_slots:
            owner.sequence.on_forward(k, output)
        if k in owner.carry_slots:
            ctx = owner.ctx
            name = ctx.slots[k].name
            record_carry(ctx.buffer, k, name, module, args, kwargs, output, ctx.unreadable)
        capture.end_forward(k)
    elif mode == RECOMPUTE:
        owner.errors.on_recomputed(k, output)


def _attention_exit_hook(
    owner: Hookup, k: int, module: nn.Module, args: Any, kwargs: Any, output: Any
) -> None:
    owner.attention.stop_at(k)


def _sequence_hook(
    owner: Hookup, k: int, module: nn.Module, args: Any, kwargs: Any, output: Any
) -> None:
    """A sequence-only slot: its sequence statistics, nothing else."""
    if owner.passes.call_mode() == RECORD and k in owner.sequence.forward_slots:
        owner.sequence.on_forward(k, output)


def _pass_start_hook(owner: Hookup, key: int, module: nn.Module, args: Any, kwargs: Any) -> None:
    # A forward inside a torch.func transform is no pass of the step: its modules are left
    # out (Passes.call_mode), and nothing of the step's bookkeeping may see its wrapped tensors.
    if not owner.ctx.closed and torch._C._functorch.peek_interpreter_stack() is None:
        if owner.ctx.scaler_ref is not None:
            owner.scaler.poll()  # the first forward of an iteration closes a skipped step
        owner.passes.on_pass_start()
        # Last: a failure before it leaves no watch entered.
        owner.attention.start(module, owner.passes.trained_now())


def _pass_end_hook(
    owner: Hookup, key: int, module: nn.Module, args: Any, kwargs: Any, output: Any
) -> None:
    owner.attention.stop()  # first: whatever fails after, the watch is exited
    ctx = owner.ctx
    if not ctx.closed and torch._C._functorch.peek_interpreter_stack() is None:
        owner.passes.on_pass_end()
        if not inside_backward() and ctx.shards.awaiting_unsharded and ctx.plan.error:
            owner.hook_unsharded_params()  # FSDP2 made them in this forward


def _post_accumulate_hook(owner: Hookup, param: Tensor) -> None:
    ctx = owner.ctx
    sentinel = owner.sentinel
    if sentinel.armed:  # a sentinel step's short route (recording/sentinel.py)
        owner.passes.forward_step = ctx.step_index
        if not sentinel.pending:  # (tested here: this runs for every parameter)
            sentinel.on_accumulated()
        return
    if ctx.scaler_ref is not None:
        owner.scaler.poll()
    owner.passes.forward_step = ctx.step_index  # a trained pass ran in this step (log())
    # It runs for every parameter in every backward, recorded or not (the "auto"
    # cadence's sentinel): what it has to do is tested here, before any call. Error
    # signals are kept only at recorded steps, so only they need the passes noted (and
    # the gradients marked when the pass ends: follow.py, discarded passes).
    if ctx.recording:
        owner.errors.note_accumulation(param)
    params = owner.params
    if (ctx.plan.preclip or ctx.recording) and not params.backward_pending:
        params.on_post_accumulate()


def _accumulated_hook(owner: Hookup, param: Tensor) -> None:
    """A backward pass accumulated into one of FSDP2's full parameters."""
    owner.errors.note_accumulation()


def _remove_all(*hooksets: HookSet) -> None:
    for hooks in hooksets:
        hooks.remove()


class Hookup:
    """The hooks, and where each entry point's work goes. The routes (public: the entry
    points read them): ``passes``, ``capture`` (forward), ``errors`` (error signals),
    ``sequence`` (blocks' token geometry, the final projection's logits), ``params``,
    ``sentinel`` (the short route of a step the cadence does not record),
    ``scaler``, ``step`` (the optimizer step); ``attention`` (made here: the watch around a
    pass, the probed-module stack); ``clock`` closes a step whose
    close failed."""

    def __init__(self, ctx: Context, model: nn.Module, **routes: Any) -> None:
        self.ctx = ctx
        self.passes = routes["passes"]
        self.capture = routes["capture"]
        self.errors = routes["errors"]
        self.params = routes["params"]
        self.sentinel = routes["sentinel"]
        self.scaler = routes["scaler"]
        self.step = routes["step"]
        # The attention watch is entered and fed by these entry points only: made here.
        self.attention = AttentionCapture(ctx)
        self.sequence = routes["sequence"]
        self._clock = routes["clock"]
        ctx.owner_ref = weakref.ref(self)
        self._hooks = HookSet()
        # Module and gradient hooks, on the model only for recorded steps.
        self._step_hooks = HookSet()
        self._step_hooks_on = False
        self._param_hooks_kept = False  # "auto": the gradient hooks stay on at every step
        # Gated recurrent modules whose carry gates are measured (gradprobe.recurrent).
        self.carry_slots: frozenset[int] = frozenset()
        self._find_carry_slots(model)
        ctx.on("step_closed", self._on_step_closed)
        ctx.on("model_rebound", self._on_model_rebound)

    def finalizer(self, probe: Any) -> weakref.finalize:
        """If ``probe`` is dropped without close(), its hooks must not outlive it."""
        return weakref.finalize(probe, _remove_all, self._hooks, self._step_hooks)

    # ------------------------------------------------------------ registration
    def register(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        ref, hooks = self.ctx.owner_ref, self._hooks
        # Every hook is an Entry (gradprobe.hooks): a failure is a warning and a gap, and
        # dynamo never traces it, whenever the model is compiled. Module hooks are
        # ModuleHooks: they pickle and deep-copy as inert no-ops, so the model can be
        # saved or copied while probed.
        self._attach_step_hooks()
        site = _PASS_START_SITE if self.module_hooks_wanted() else _PASS_START_UNHOOKED_SITE
        hooks.on_module_pre(model, _pass_start_hook, ref, site, -1, prepend=True)
        # Registered last, so that it closes the pass after the model's own forward hook;
        # always called, so that a forward that raises closes it too.
        hooks.on_module(model, _pass_end_hook, ref, _PASS_END_SITE, -1, always_call=True)
        if optimizer is not None:
            hooks.on_step(optimizer, step_pre_hook, ref, STEP_PRE_SITE)
            hooks.on_step(optimizer, step_post_hook, ref, STEP_POST_SITE, post=True)

    def _attach_step_hooks(self, new_params: list[Tensor] | None = None) -> None:
        """The hooks that record a step: on each probed module, and on each parameter's
        gradient accumulation. ``new_params``: parameters bound since (a changed model)
        whose gradient hooks, kept on at every step, are still to be put on."""
        ctx = self.ctx
        ref, hooks = ctx.owner_ref, self._step_hooks
        model = ctx.model_ref()
        if model is None:
            return
        by_name = dict(model.named_modules())
        module_hooks = self.module_hooks_wanted()
        slots = ctx.slots if module_hooks else []
        if ctx.compiled:
            slots = self._compiled_slots(slots)
        for slot in slots:
            module = by_name.get(slot.name)
            if module is None or slot.index in ctx.retired_slots:
                continue
            if slot.sequence_only:
                if slot.index in self.sequence.forward_slots:
                    hooks.on_module(module, _sequence_hook, ref, _SEQUENCE_SITE, slot.index)
                continue
            hooks.on_module_pre(module, _pre_hook, ref, PRE_SITE, slot.index)
            hooks.on_module(module, _forward_hook, ref, _FORWARD_SITE, slot.index)
        # Post-accumulate hooks also tell which backward passes count for error signals,
        # and where gradients a pass made were discarded before the step (follow.py).
        # Under every="auto" they stay on at every step: the sentinel's pre-clip norms.
        wanted = ctx.plan.preclip or ctx.plan.error or module_hooks
        if wanted and (not self._param_hooks_kept or new_params):
            kept = ctx.auto
            for p in new_params if self._param_hooks_kept and new_params else ctx.params:
                if p.requires_grad:
                    (self._hooks if kept else hooks).on_accumulated(
                        p, _post_accumulate_hook, ref, _ACCUMULATED_SITE
                    )
            self._param_hooks_kept = kept
        self._step_hooks_on = True

    def module_hooks_wanted(self) -> bool:
        """Statistics the user did not ask for cost nothing: no module statistic, no hook."""
        ctx = self.ctx
        module_stats = {n for n, st in STATISTICS.items() if st.module is not None}
        return bool(ctx.slots) and bool(module_stats & set(ctx.stats) or ctx.histograms)

    def _compiled_slots(self, slots: list[Any]) -> list[Any]:
        """The modules hooked while the model is compiled: not those that work in place.
        A graph break beside an in-place op (each hook is one) makes a graph that mutates
        its input, which aot_autograd cannot always differentiate (an in-place SiLU's
        backward then raises in the user's backward, with any graph break there): their
        statistics are left out, with one warning."""
        inplace = [s.name for s in slots if s.inplace]
        if inplace:
            # Their pre-hook no longer reduces the held outputs before they are written
            # over: every module's outputs are reduced in its hook from now on.
            self.capture.reduce_in_hooks()
            warn_gap(
                self.ctx.unreadable,
                "compiled in place",
                f"gradprobe: the model is compiled, and modules {inplace} work in place: a "
                "hook breaks the graph beside an in-place op, which compiled autograd cannot "
                "always differentiate, so these modules are not hooked and their statistics "
                "are not recorded while the model is compiled (use inplace=False to have them)",
            )
        return [s for s in slots if not s.inplace]

    def _on_step_closed(self, step: int) -> None:
        self._sync_step_hooks()

    def _sync_step_hooks(self) -> None:
        """Put the step hooks on for a recorded step, take them off for the others. Not
        for a compiled model: each change of its hooks would recompile it."""
        ctx = self.ctx
        wanted = ctx.recording or ctx.compiled
        if wanted and not self._step_hooks_on:
            self._attach_step_hooks()
        elif not wanted and self._step_hooks_on and not inside_backward():
            self._step_hooks.remove()
            self._step_hooks_on = False

    def _find_carry_slots(self, model: nn.Module | None = None) -> None:
        """The gated recurrent modules among the live slots (at the start, and when the
        model changed: a module added or replaced)."""
        ctx = self.ctx
        model = model if model is not None else ctx.model_ref()
        if not ctx.plan.carry or model is None:
            return
        by_name = dict(model.named_modules())
        live = [
            (s.index, by_name[s.name])
            for s in ctx.slots
            if s.index not in ctx.retired_slots and s.name in by_name
        ]
        self.carry_slots = carry_slots(live)

    def _on_model_rebound(self, new_params: list[Tensor]) -> None:
        """Every module hook again (a retired slot's module may still run under another
        name: a wrapped layer), and gradient hooks on the new parameters."""
        self._find_carry_slots()  # a recurrent module added or replaced is measured too
        was_on = self._step_hooks_on
        if was_on:
            self._step_hooks.remove()
            self._step_hooks_on = False
        kept = self._param_hooks_kept  # "auto": gradient hooks on at every step
        if was_on or (kept and new_params):
            self._attach_step_hooks(new_params if kept else None)

    def hook_unsharded_params(self) -> None:
        """Hook FSDP2's full parameters, which it makes at its first all-gather: backward
        accumulates into them, and without gradient sync only into them, so they say
        which backward passes count for error signals (the sharded ones' hooks fire only
        where FSDP2 reduce-scatters)."""
        ref = self.ctx.owner_ref
        for full in self.ctx.shards.new_unsharded():
            self._hooks.on_accumulated(full, _accumulated_hook, ref, _FULL_PARAM_SITE)

    def remove(self) -> None:
        """Every hook off (close)."""
        guard = self.ctx.guard
        guard(self._hooks.remove, "close (removing hooks)")
        guard(self._step_hooks.remove, "close (removing hooks)")
        guard(self.attention.close, "close (attention)")
        self._step_hooks_on = False

    # ------------------------------------------------------------ the guard
    @property
    def _failed_where(self) -> set[str]:
        """Where failures were said (gradprobe.hooks: should telling the owner fail too)."""
        return self.ctx.failed_where

    def _entry_failed(self, site: Site, key: int, exc: BaseException) -> None:
        """An entry point failed (gradprobe.hooks.Entry): one warning naming the site, and
        a gap in what the site feeds, for this step."""
        ctx = self.ctx
        slots, buffer = ctx.slots, ctx.buffer
        one = site.gap in ("module", "errors", "input_errors") and 0 <= key < len(slots)
        where = f"{site.where} of module {slots[key].name!r}" if one else site.where
        warn_once(ctx.failed_where, where, exc)
        step = ctx.step_index
        if site.gap == "module":
            # One call failed: it is taken back, the module's other calls stay.
            if not self.capture.drop_failed_call(key, site is PRE_SITE):
                buffer.set_host(key, "gap", 1)
        elif site.gap == "modules":
            for k in range(len(slots)):
                buffer.set_host(k, "gap", 1)
        elif site.gap in ("errors", "input_errors", "all_errors"):
            level = GAP_INPUT_SIDE if site.gap == "input_errors" else GAP_BOTH_SIDES
            self.errors.leave_out([key] if site.gap != "all_errors" else range(len(slots)), level)
        elif site.gap in ("params", "step"):
            ctx.gap_params()
        if site.gap == "step" and self._clock.closing_step == step and not ctx.closed:
            self._clock.end_step()  # never raises; the step count moves on, as the optimizer's did

    def _entry_traced(self, site: Site) -> None:
        """Dynamo traced an entry point (it ran outside the graph all the same): the model
        is compiled, whenever that happened. Say so once, and keep the hooks on from now:
        each change of them would recompile the model (see _sync_step_hooks)."""
        ctx = self.ctx
        if not ctx.compiled:
            ctx.compiled = True
            ctx.meta["probe"]["compiled"] = True
            warn_compiled()
            # Put the module hooks on now (traced at a step the cadence does not record,
            # they are off), those of in-place modules off (see _compiled_slots), while
            # dynamo has yet to trace the modules: it resumes after this graph break and
            # reads their hook tables then.
            if self._step_hooks_on and not inside_backward():
                self._step_hooks.remove()
                self._step_hooks_on = False
            self._sync_step_hooks()

    def without_backward_hooks(self, why: str) -> None:
        """The backward passes of this step ran where the Probe's backward hooks are not
        seen whole: every module's error statistics are left out of it, with one warning."""
        warn_gap(
            self.ctx.unreadable,
            why,
            f"gradprobe: {why} runs backward passes as compiled graphs, whose gradient "
            "accumulation and end the Probe does not see: error_norm, error_gain and "
            "global_grad_norm_preclip are not recorded while it is on (the other statistics "
            "are)",
        )
        self.errors.leave_out(range(len(self.ctx.slots)), GAP_BOTH_SIDES)


def warn_compiled() -> None:
    warnings.warn(
        "gradprobe: the model is compiled (torch.compile). The statistics are recorded, "
        "except the attention statistics (attn_*), which are a gap in compiled regions "
        "(docs/attention.md). The module hooks run outside the compiled graphs, so the "
        "graph breaks at each probed module and fusion across modules is lost (and "
        "fullgraph=True cannot hold). To keep the graph whole, probe parameters only "
        "(modules=[]: grad/param norms, update ratios, global and pre-clip norms need no "
        "module hooks), probe a few modules (modules=[...]), or take the full per-layer "
        "statistics on a short uncompiled run.",
        GradprobeWarning,
        stacklevel=3,
    )

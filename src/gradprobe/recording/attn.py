"""Attention capture: the attention statistics of each probed module, on recorded steps.

:class:`AttentionCapture` enters one :class:`~gradprobe.attention.AttentionWatch` around
the probed model's forward on a recorded, trained pass (the root's forward pre-hook
enters it, its forward hook exits it: both entry points of :mod:`.hookup`, through the
one guard; a submodule called outside the model's forward enters it at its own pre-hook
and exits it at an always-called forward hook), and keeps the stack of probed modules running (their pre-hooks push, their
forward hooks pop), so that each ``scaled_dot_product_attention`` call is attributed to
the innermost probed module that made it. Each call's per-head
:class:`~gradprobe.attention.AttentionCall` (device tensors) waits in the step's list of
its module; when the step closes each module's calls are summarised
(:func:`~gradprobe.attention.summarise`) and handed to the buffer as one record of kind
``attn`` (and, for the per-head statistics, one per-head table), copied to the host with
everything else at the flush. No ``.item()``, no Python branch on a device value.

Not entered (a gap for that pass, never a changed model): a compiled model (dynamo would
trace the mode; compiled regions are a gap anyway), a forward that could take the fused
inference path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``
(:func:`~gradprobe.attention.fast_path_at_risk`: one warning), a forward recomputed by
activation checkpointing (its calls counted once, at the first run), the optimizer's
later evaluations of a closure. A call whose measurement failed (the watch warns once)
leaves its module's attention statistics out of the step: the component counts the calls
the watch attributed and the calls it received, and a module whose counts differ records
nothing for the step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from ..attention import AttentionCall, AttentionWatch, fast_path_at_risk, summarise
from ..hooks import HookSet, Site, warn_gap, warn_once
from ..stats import STATISTICS
from .context import Context, inside_backward

__all__ = ["AttentionCapture"]

# Steps a model that made no attention call in a watched step goes unwatched (attn.py's
# ``_idle``): small enough that a model starting to call attention later is seen soon.
IDLE_RETRY = 64

_HEAD_STATS = ("attn_head_logit_max", "attn_head_entropy", "attn_head_entropy_min")


class AttentionCapture:
    """The watch around a recorded pass, the probed-module stack, the step's calls."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.wanted = ctx.plan.attention
        self._heads = any(STATISTICS[s].heads is not None for s in ctx.stats if s in STATISTICS)
        self._watch: AttentionWatch | None = None
        self._stack: list[int] = []  # probed modules running, innermost last
        self._by_name: dict[str, int] = {}
        # The step's calls per module, and how many the watch attributed to each (a call
        # attributed but never received failed part-way: the module is a gap).
        self._calls: dict[int, list[AttentionCall]] = defaultdict(list)
        self._attributed: dict[int, int] = defaultdict(int)
        # Each module's (calls, attributed) when the gradients were marked: the calls of
        # passes whose gradients were discarded are dropped, as the buffer's (follow.py).
        self._mark: dict[int, tuple[int, int]] = {}
        self._unattributed = 0  # calls made while no probed module ran (said once)
        # Attention modules (class name "…Attention") that ran watched in this step, and
        # the modules running when a watched call was made: one that ran without a call
        # inside it computes its attention without SDPA (said once per module).
        self._attention_slots: frozenset[int] = frozenset()
        self._ran: set[int] = set()
        self._inside: set[int] = set()
        # A submodule called outside the model's forward (a backbone, then a head) enters
        # the watch at its own pre-hook: the slot that did, and the always-called forward
        # hooks that exit it (kept until the step closes: a hook removed while PyTorch runs
        # the always-called hooks of a forward that raised would break that loop).
        self._opener: int | None = None
        self._exits = HookSet()
        self._exit_slots: set[int] = set()
        # A model that made no attention call in a watched step (an MLP, a CNN) is not
        # watched again until it changes, or for IDLE_RETRY steps: the watch sees every
        # torch call of the forward, a cost (bench/RESULTS.md: +1.2 ms on a 10 ms MLP
        # step) for nothing to measure. Trying again now and then catches a model that
        # starts calling attention later without changing.
        self._entered = False  # the watch was entered in this step
        self._seen = 0  # attention calls the watch saw in this step
        self._idle = 0  # steps left without the watch (0: watch)
        ctx.on("gradients_marked", self._on_gradients_marked)
        ctx.on("gradients_discarded", self._on_gradients_discarded)
        ctx.on("step_closing", self._on_step_closing)
        ctx.on("step_discarded", self._on_step_discarded)
        ctx.on("model_rebound", self._on_model_rebound)

    # ------------------------------------------------------------ the pass
    def start(self, model: nn.Module, trained: bool) -> None:
        """The probed model's forward begins (its trained state already judged)."""
        ctx = self.ctx
        if not self._may_start(trained):
            return
        if fast_path_at_risk(model):
            warn_gap(
                ctx.unreadable,
                "attention fast path",
                "gradprobe: a forward of the model could take the fused inference path of "
                "nn.MultiheadAttention / nn.TransformerEncoderLayer (eval mode with grad off "
                "or frozen parameters), which watching its attention would turn off: the "
                "attention statistics of such passes are not recorded",
            )
            return
        self._stack.clear()
        watch = AttentionWatch(self._current, self._sink, warned=ctx.unreadable)
        watch.__enter__()
        self._watch = watch  # set once entered: stop() exits only what was entered
        self._entered = True

    def _may_start(self, trained: bool) -> bool:
        ctx = self.ctx
        return not (
            not self.wanted
            or self._idle > 0
            or self._watch is not None
            or not trained
            or not ctx.recording
            or ctx.closed
            or ctx.searching
            or ctx.compiled  # (and no hook put on a compiled model: it would recompile)
            or inside_backward()
        )

    def start_at(
        self, k: int, module: nn.Module, exit_hook: Callable[..., None], site: Site
    ) -> None:
        """Probed module ``k`` is called outside the model's forward, recorded, and no watch
        is entered: enter one for this call (``exit_hook``, always called, exits it at the
        end of the call, through :meth:`stop_at`)."""
        if not self._may_start(True):
            return
        if k not in self._exit_slots:  # first: never a watch entered without its exit
            self._exits.on_module(module, exit_hook, self.ctx.owner_ref, site, k, always_call=True)
            self._exit_slots.add(k)
        self.start(module, True)
        if self._watch is not None:
            self._opener = k

    def stop_at(self, k: int) -> None:
        """The call of probed module ``k`` ended (or raised): exit the watch if it entered it."""
        if self._opener == k:
            self.stop()

    def close(self) -> None:
        """The Probe closes: the watch exited, its exit hooks off."""
        self.stop()
        self._exits.remove()
        self._exit_slots.clear()

    def stop(self) -> None:
        """The probed model's forward ended (or raised): exit the watch."""
        self._opener = None
        watch, self._watch = self._watch, None
        self._stack.clear()
        if watch is not None:
            watch.__exit__(None, None, None)

    def enter_module(self, k: int) -> None:
        """A recorded call of probed module ``k`` begins (its pre-hook)."""
        if self._watch is not None:
            self._stack.append(k)
            if k in self._attention_slots_now():
                self._ran.add(k)

    def _attention_slots_now(self) -> frozenset[int]:
        slots = self.ctx.slots
        if len(self._by_name) != len(slots):  # the model changed: slots were added
            self._by_name = {s.name: s.index for s in slots}
            self._attention_slots = frozenset(
                s.index for s in slots if s.type.endswith("Attention") and not s.sequence_only
            )
        return self._attention_slots

    def exit_module(self, k: int) -> None:
        """A call of probed module ``k`` ended (its forward hook): pop it and anything above
        it left by a call that raised."""
        stack = self._stack
        if stack and k in stack:
            del stack[len(stack) - 1 - stack[::-1].index(k) :]

    def _current(self) -> str | None:
        self._seen += 1
        if not self._stack:
            self._unattributed += 1
            return None
        k = self._stack[-1]
        self._attributed[k] += 1
        self._inside.update(self._stack)
        return self.ctx.slots[k].name

    def _sink(self, name: str, call: AttentionCall) -> None:
        self._attention_slots_now()  # the names of the slots, the model changed or not
        self._calls[self._by_name[name]].append(call)

    # ------------------------------------------------------------ the step
    def _on_gradients_marked(self) -> None:
        self._mark = {k: (len(c), self._attributed[k]) for k, c in self._calls.items()}

    def _on_gradients_discarded(self, dropped: set[int]) -> None:
        for k in dropped & self._mark.keys():
            n, attributed = self._mark[k]
            self._calls[k] = self._calls[k][n:]
            self._attributed[k] -= attributed
        self._mark = {}

    def _on_step_discarded(self, step: int, skipped: bool) -> None:
        self._ran.clear()
        self._inside.clear()
        self._calls.clear()
        self._attributed.clear()
        self._mark = {}

    def _on_model_rebound(self, new_params: list[object]) -> None:
        self._idle = 0  # a changed model may call attention now: watch it again

    def _note_idle(self) -> None:
        """After a step: whether the next ones are watched (see ``_idle``)."""
        if self._idle > 0:
            self._idle -= 1
        elif self._entered and self._seen == 0:
            self._idle = IDLE_RETRY
        self._entered, self._seen = False, 0

    def _on_step_closing(self) -> None:
        self._note_idle()
        if not (
            self._calls or self._attributed or self._mark or self._unattributed
            or self._ran or self._inside or self._exit_slots
        ):  # fmt: skip
            return  # nothing of attention in this step (most steps: nothing to build anew)
        if self._opener is None and self._exit_slots:
            self._exits.remove()
            self._exit_slots.clear()
        calls, self._calls = self._calls, defaultdict(list)
        attributed, self._attributed = self._attributed, defaultdict(int)
        self._mark = {}
        if self._unattributed:
            self._unattributed = 0
            warn_gap(
                self.ctx.unreadable,
                "attention unattributed",
                "gradprobe: the model called attention (scaled_dot_product_attention) "
                "outside every probed module, so those calls are not recorded. A module "
                "whose class name ends in 'Attention' is probed by default; to record "
                "another, name the module that makes the call in Probe(modules=[...])",
            )
        self._warn_bypassed()
        for k, module_calls in calls.items():
            if not module_calls or attributed.get(k, 0) != len(module_calls):
                continue  # a call failed (the watch warned): the module is a gap
            try:
                self._record(k, module_calls)
            except Exception as exc:  # never the user's training: a gap and a warning
                warn_once(
                    self.ctx.failed_where,
                    f"the attention statistics of module {self.ctx.slots[k].name!r}",
                    exc,
                )

    def _warn_bypassed(self) -> None:
        """An attention module that ran watched with no SDPA call inside it: said once."""
        ran, self._ran = self._ran, set()
        inside, self._inside = self._inside, set()
        for k in sorted(ran - inside):
            slot = self.ctx.slots[k]
            warn_gap(
                self.ctx.unreadable,
                f"attention bypasses sdpa {slot.name}",
                f"gradprobe: module {slot.name!r} ({slot.type}) computes its attention without "
                "F.scaled_dot_product_attention (a softmax written by hand, Hugging Face "
                "attn_implementation='eager', a custom kernel), so its attention statistics "
                "(attn_logit_max, attn_entropy) are not recorded; docs/attention.md lists "
                "the paths that are measured (nanoGPT: flash=True; Hugging Face: "
                "attn_implementation='sdpa')",
            )

    def _record(self, k: int, calls: list[AttentionCall]) -> None:
        """Summarise a module's calls of the step into the buffer (device tensors)."""
        out = summarise(calls)
        weight = torch.stack([c.weight.sum() for c in calls]).sum()
        total = torch.stack([c.entropy_sum.sum() for c in calls]).sum()
        # NaN must not reach a max fold or a max over ranks: where nothing was measured it
        # is -inf (left out by the weight's mask); a NaN logit of measured rows (the model
        # diverged) is +inf, non-finite as it was.
        measured = weight > 0
        top = out["attn_logit_max"]
        top = torch.where(measured, torch.where(top.isnan(), torch.inf, top), -torch.inf)
        floor = torch.where(measured, -out["attn_entropy_min"], -torch.inf)
        device = weight.device
        buffer = self.ctx.buffer
        buffer.record("attn", k, device, len(calls), top, total, weight, floor)
        if self._heads and "attn_head_entropy" in out:
            table = torch.stack([out[name] for name in _HEAD_STATS])
            buffer.record_heads(k, device, table)

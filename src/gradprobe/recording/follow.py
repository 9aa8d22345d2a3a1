"""What the step applies: gradients discarded before the step, modules frozen, a model that changes.

One rule (docs/recording.md, "One rule: what the step applies"): a step's statistics are
those of the gradients the optimizer step applies. (A closure's: gradprobe/recording/
optstep.py.)

- *A gradient discarded before the step* (``zero_grad()`` of one optimizer between its
  backward and its step: a GAN's discriminator after the generator's backward went
  through it): when a backward pass ends, which tensor each ``.grad`` is and its version
  are noted (host numbers). At the next pass start, and at the first accumulation of
  the next backward, a ``.grad`` that is ``None``, another tensor, or changed in place
  says that the passes before were discarded: the statistics of the modules whose
  parameters they were are dropped (:meth:`StepBuffer.drop_before`).
- *Modules frozen for a pass* (all their parameters ``requires_grad=False`` now, though
  trainable when bound): not recorded in it.
- *A model that changes* (a head replaced, a module added or wrapped, parameters added):
  a cheap signature of the module tree and the parameters is compared once per step;
  on a change, new modules and parameters are bound (appended: rows of a replaced one
  continue under its name from the step of the change), gone ones retired.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..hooks import warn_gap
from .bindings import choose_modules, make_slot, trainable_parameters
from .context import Context, inside_backward
from .meta import module_info
from .sequences import follow_sites

__all__ = ["Follow", "model_signature"]


def model_signature(model: nn.Module, parameters: bool = True) -> tuple[int, ...]:
    """Which module and parameter objects the model holds, in order (host ids, no walk of
    any tensor): equal from step to step unless the model was changed. ``parameters``:
    False under FSDP2, which registers the full or the sharded tensors by turns."""
    # The module tree walked by hand, at every step: modules() and parameters() build every
    # module's dotted name on the way (~70 of the ~90 µs this took on a 25-module MLP).
    # One flat tuple (each module's id, then its parameters'), built with as few Python
    # steps a module as can be: ~6 µs there. Shared modules are visited once, as modules()
    # does; a shared parameter may appear twice, which changes nothing: the signature is
    # only compared with itself.
    ids: list[int] = []
    seen: set[int] = set()
    stack: list[nn.Module | None] = [model]
    pop, push, add = stack.pop, stack.extend, ids.append
    while stack:
        module = pop()
        if module is None:  # a child registered as None
            continue
        key = id(module)
        if key in seen:
            continue
        seen.add(key)
        add(key)
        if parameters and module._parameters:
            ids.extend(map(id, module._parameters.values()))  # (None: one id, stable)
        if module._modules:
            push(reversed(module._modules.values()))
    return tuple(ids)


class Follow:
    """The bindings kept true to the model, and which passes' records count."""

    def __init__(self, ctx: Context, model: nn.Module, selection: Any, sites: Any = None) -> None:
        self.ctx = ctx
        self._selection, self._sites = selection, sites  # sites: recording/sequences.py
        self._signature = model_signature(model, not ctx.shards)
        self._followed_step = -1  # the last step whose model was compared
        # When the last backward pass of the step ended: each .grad's tensor (weakly) and
        # version, by parameter index, and where the step's records then stood.
        self._grad_marker: dict[int, tuple[weakref.ref[Tensor], int]] | None = None
        self._grad_mark: Any = None
        self._bound_modules = [weakref.ref(m) for m in _slot_modules(model, ctx.slots)]
        self._param_index = {id(p): i for i, p in enumerate(ctx.params)}
        # Which parameters were trainable when bound, and each module's: its own, or those
        # of the smallest module around it that has some (see _owners_of).
        self._trainable_at_bind = [p.requires_grad for p in ctx.params]
        self._owners = self._owners_of(model)
        # Modules whose parameters are all frozen now (trainable when bound): not recorded.
        self._requires_grad_now: tuple[bool, ...] = tuple(self._trainable_at_bind)
        self._frozen_slots: frozenset[int] = frozenset()
        ctx.on("backward_ended", self._on_backward_ended)
        ctx.on("backward_accumulating", self._on_backward_accumulating)
        ctx.on("step_closed", self._on_step_closed)

    # ------------------------------------------------------------ events
    def _on_backward_ended(self) -> None:
        ctx = self.ctx
        if ctx.closed or ctx.searching or ctx.unfollowed:
            return
        if ctx.recording:
            ctx.guard(self._mark_gradients, "end of backward (gradients' marker)")

    def _on_backward_accumulating(self, param: Tensor) -> None:
        if self._grad_marker is not None and not self.ctx.searching:
            self._check_discarded(param)

    def _on_step_closed(self, step: int) -> None:
        # Passes of this step cannot be discarded by a later zero_grad.
        self._grad_marker, self._grad_mark = None, None

    def at_pass_start(self) -> None:
        """The probed model's forward begins: the model as it is now (once per step), and
        were the gradients of the passes before discarded?"""
        ctx = self.ctx
        if self._followed_step != ctx.step_index:
            self.follow_or_stop("the start of the model's forward (following)")
        if self._grad_marker is not None and not ctx.searching:
            ctx.guard(self._check_discarded, "the start of the model's forward (gradients)")

    # ------------------------------------------------------------ discarded gradients
    def _mark_gradients(self) -> None:
        ctx = self.ctx
        ctx.emit("forward_ended")
        marker = {}
        retired = ctx.retired_params
        for i, p in enumerate(ctx.params):
            g = p.grad
            if g is not None and i not in retired:
                marker[i] = (weakref.ref(g), g._version)
        self._grad_marker = marker
        self._grad_mark = ctx.buffer.mark()
        ctx.emit("gradients_marked")

    def _check_discarded(self, current: Tensor | None = None) -> None:
        """Were gradients of the passes before the last mark discarded since (``None``,
        another tensor, or changed in place)? ``current``: the parameter whose
        accumulation is running now (one in-place add expected on it)."""
        marker = self._grad_marker
        if marker is None:
            return
        params = self.ctx.params
        now = self._param_index.get(id(current)) if current is not None else None
        # Under data parallelism collectives write gradients without a version bump, DDP's
        # buckets with more than one, and DDP swaps .grad for views of rebuilt buckets
        # (after its first iteration): there, only a gradient set to None is discarded.
        alone = not self.ctx.distributed
        reset = []
        for i, (ref, version) in marker.items():
            g = params[i].grad
            if i == now:
                if not alone or torch.is_grad_enabled() or g is None or g.layout != torch.strided:
                    continue  # create_graph (or sparse) accumulates out of place: unknown
                version += 1
            if g is None or (alone and (ref() is not g or g._version != version)):
                reset.append(i)
        if current is not None:
            # This backward's first accumulation: its end marks again. Until then a later
            # one (a nested backward of a reentrant checkpoint, after others of the
            # outer pass have accumulated) would compare against an outdated marker.
            self._grad_marker = None
        if reset:
            self._drop_discarded(reset)

    def _drop_discarded(self, reset: list[int]) -> None:
        """Drop what the passes before the mark recorded for the modules whose parameters
        (their own, or those of the smallest module around them with trainable ones)
        had their gradient discarded."""
        mark, self._grad_marker, self._grad_mark = self._grad_mark, None, None
        slots = self._owning_slots(set(reset))
        if not slots or mark is None:
            return
        self.ctx.buffer.drop_before(mark, np.asarray(slots, dtype=np.int64))
        self.ctx.emit("gradients_discarded", set(slots))

    def _owners_of(self, model: nn.Module) -> list[frozenset[int]]:
        """Per slot, the parameters whose gradient its passes make: those under the
        smallest module around it (itself included) that holds parameters trainable when
        bound; a module under none of them (a frozen backbone's), all of them."""
        index = self._param_index
        trainable = self._trainable_at_bind
        under: dict[str, set[int]] = defaultdict(set)
        for name, p in model.named_parameters():
            i = index.get(id(p))
            if i is None or not trainable[i]:
                continue
            parts = name.split(".")[:-1]
            for j in range(len(parts) + 1):
                under[".".join(parts[:j])].add(i)
        everything = frozenset(under.get("", ()))
        owners = []
        for slot in self.ctx.slots:
            parts = slot.name.split(".") if slot.name else []
            owned = everything
            for j in range(len(parts), -1, -1):
                found = under.get(".".join(parts[:j]))
                if found:
                    owned = frozenset(found)
                    break
            owners.append(owned)
        return owners

    def _owning_slots(self, params: set[int]) -> list[int]:
        """The live slots whose passes make a gradient of one of ``params``."""
        retired = self.ctx.retired_slots
        return [k for k, owned in enumerate(self._owners) if owned & params and k not in retired]

    # ------------------------------------------------------------ frozen modules
    def update_frozen(self) -> None:
        """At a recorded pass's start: the modules all of whose parameters are frozen now,
        though trainable when bound (a GAN's D while G trains, Lightning's
        ``toggle_optimizer``): the pass reaches none of the gradients their steps apply,
        so they are not recorded in it. Host flags; recomputed only when they change."""
        now = tuple(p.requires_grad for p in self.ctx.params)
        if now == self._requires_grad_now:
            return
        self._requires_grad_now = now
        frozen = {
            i
            for i, (bound, live) in enumerate(zip(self._trainable_at_bind, now))
            if bound and not live
        }
        self._frozen_slots = frozenset(
            k for k, owned in enumerate(self._owners) if owned and owned <= frozen
        )

    def slot_frozen(self, k: int) -> bool:
        """Whether module ``k``'s call is one its parameters are frozen for: inside a
        pass, as judged at the pass's start; a call outside the model's forward (a loop
        or a LightningModule's ``training_step`` calling submodules), now, from its own
        parameters (a few flags: the first trainable one ends the look)."""
        if self.ctx.pass_open:
            return k in self._frozen_slots
        owned = self._owners[k] if k < len(self._owners) else ()
        params = self.ctx.params
        return bool(owned) and not any(params[i].requires_grad for i in owned)

    # ------------------------------------------------------------ a model that changes
    def follow_or_stop(self, where: str) -> None:
        """Follow the model (:meth:`_follow_model`); should that fail, the Probe's slots,
        parameters, buffer and hooks may be half bound to the new model: this step's
        statistics become gaps and nothing more is recorded (absent, never wrong), with
        one warning that says so."""
        ctx = self.ctx
        # Followed already in this step (its first pass): the optimizer step's call ends here.
        if ctx.unfollowed or self._followed_step == ctx.step_index:
            return
        if ctx.guard(self._follow_model, where):
            return
        ctx.unfollowed = True
        ctx.recording = False
        warn_gap(
            ctx.failed_where,
            "model not followed",
            "gradprobe: the model changed and the Probe failed to follow the change (the "
            "warning before says where): it records nothing from this step on. Training is "
            "not affected; make a new Probe to go on recording",
        )
        ctx.guard(self._mark_everything_a_gap, f"{where} (marking the gap)")

    def _mark_everything_a_gap(self) -> None:
        buffer = self.ctx.buffer
        for k in range(buffer.n_slots):
            buffer.set_host(k, "gap", 1)
        buffer.set_param_host(list(range(buffer.n_params)), "param_gap")

    def _follow_model(self) -> None:
        """Once per step (its first pass, or its optimizer step, or ``probe.step()``):
        bind what the model holds now if it changed since."""
        ctx = self.ctx
        model = ctx.model_ref()
        if model is None or ctx.closed or inside_backward():
            return
        if self._followed_step == ctx.step_index:
            return
        self._followed_step = ctx.step_index
        signature = model_signature(model, not ctx.shards)
        if signature == self._signature:
            return
        self._signature = signature
        if ctx.shards:
            warn_gap(
                ctx.failed_where,
                "model changed (sharded)",
                "gradprobe: the model's modules changed, and it holds sharded "
                "(FSDP2) parameters, whose shards the Probe binds once: the changed ones are "
                "not followed. Make a new Probe after the change",
            )
            return
        self._rebind(model)

    def _rebind(self, model: nn.Module) -> None:
        ctx = self.ctx
        ctx.emit("model_changing")  # closed steps are flushed with the old widths
        slots, params, param_names = ctx.slots, ctx.params, ctx.param_names
        # Modules: a (name, object) pair already bound keeps its slot; any other is new.
        bound = {
            (s.name, id(ref())): s.index
            for s, ref in zip(slots, self._bound_modules)
            if s.index not in ctx.retired_slots and ref() is not None and not s.sequence_only
        }
        chosen = choose_modules(model, self._selection, strict=False)
        kept = set()
        new_modules = []
        for name, module in chosen:
            k = bound.get((name, id(module)))
            if k is not None:
                kept.add(k)
                continue
            slot = make_slot(len(slots), name, module)
            slots.append(slot)
            self._bound_modules.append(weakref.ref(module))
            new_modules.append((slot, module))
            kept.add(slot.index)
        # Blocks and the final projection, as at construction (sequence-only slots kept).
        refs, explicit = self._bound_modules, self._selection is not None
        sites = self._sites = follow_sites(ctx, model, refs, kept, explicit, self._sites)
        ctx.retired_slots |= {s.index for s in slots} - kept
        # A retired module's units are no longer tracked (it never runs again).
        ctx.buffer.units_off |= ctx.retired_slots
        # Parameters, the same way; a retired one's tensor is let go (an empty stand-in).
        retired = ctx.retired_params
        live = {(name, id(params[i])): i for i, name in enumerate(param_names) if i not in retired}
        names, found = trainable_parameters(model)
        kept_params = set()
        new_params = []
        for name, p in zip(names, found):
            i = live.get((name, id(p)))
            if i is None:
                i = len(params)
                params.append(p)
                param_names.append(name)
                new_params.append(p)
            kept_params.add(i)
        for i in set(range(len(params))) - kept_params - ctx.retired_params:
            ctx.retired_params.add(i)
            params[i] = torch.empty(0)
        self._param_index = {id(p): i for i, p in enumerate(params) if i not in ctx.retired_params}
        fresh = {id(p) for p in new_params}
        self._trainable_at_bind = [
            p.requires_grad if id(p) in fresh else bound
            for p, bound in zip(params, self._trainable_at_bind + [False] * len(new_params))
        ]
        self._owners = self._owners_of(model)
        self._requires_grad_now, self._frozen_slots = (), frozenset()
        ctx.buffer.grow(len(slots), len(params))
        self._grad_marker = None  # other parameters: nothing of before is comparable
        _describe_new(self.ctx, new_modules, names, found, fresh)
        # Hooks again, on the new modules and parameters (gradprobe/recording/hookup.py).
        ctx.emit("sequence_sites", sites)  # before the hooks go on again
        ctx.emit("model_rebound", new_params)


def _slot_modules(model: nn.Module, slots: list[Any]) -> list[nn.Module]:
    by_name = dict(model.named_modules())
    return [by_name[s.name] for s in slots]


def _describe_new(
    ctx: Context,
    new_modules: list[tuple[Any, nn.Module]],
    names: list[str],
    params: list[Tensor],
    fresh: set[int],
) -> None:
    """The meta (and the store's) of the modules and parameters a model change added."""
    for slot, module in new_modules:
        ctx.meta["modules"].append(module_info(slot, module, ctx.histograms))
    for name, p in zip(names, params):
        if id(p) in fresh:
            ctx.meta["parameters"].append(
                {"name": name, "shape": list(p.shape), "numel": p.numel()}
            )
    if ctx.store is not None:
        store = ctx.store
        ctx.guard(
            lambda: store.update_meta(parameters=ctx.meta["parameters"]),
            "the store's meta (a changed model)",
        )

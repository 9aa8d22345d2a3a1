"""What the step applies: closures, gradients discarded before the step, a model that changes.

:class:`Follow` is a part of :class:`gradprobe.Probe` (a mixin; the Probe owns the state
it reads). One rule (docs/recording.md, "One rule: what the step applies"): a step's
statistics are those of the gradients the optimizer step applies.

- *A closure* (``optimizer.step(closure)``: Lightning, LBFGS): the step pre-hook runs
  before the closure has made the gradients. The pre-hook hands the optimizer a closure
  that calls the user's and then reads the gradients, when the first evaluation returns
  (after Lightning's clipping, which runs inside it). Later evaluations in the same step
  (LBFGS's line search and inner iterations) are the optimizer's own search at other
  parameters: they are not recorded.
- *A gradient discarded before the step* (``zero_grad()`` of one optimizer between its
  backward and its step: a GAN's discriminator after the generator's backward went
  through it): when a backward pass ends, which tensor each ``.grad`` is and its version
  are noted (host numbers). At the next pass start, and at the first accumulation of
  the next backward, a ``.grad`` that is ``None``, another tensor, or changed in place
  says that the passes before were discarded: the statistics of the modules whose
  parameters they were are dropped (:meth:`StepBuffer.drop_before`).
- *A model that changes* (a head replaced, a module added or wrapped, parameters added):
  a cheap signature of the module tree and the parameters is compared once per step;
  on a change, new modules and parameters are bound (appended: rows of a replaced one
  continue under its name from the step of the change), gone ones retired.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .capture import _inside_backward
from .hooks import Entry, Site, warn_gap

if TYPE_CHECKING:

    from .probe import Probe

__all__ = ["Follow", "model_signature"]


def model_signature(
    model: nn.Module, parameters: bool = True
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Which module and parameter objects the model holds, in order (host ids, no walk of
    any tensor): equal from step to step unless the model was changed. ``parameters``:
    False under FSDP2, which registers the full or the sharded tensors by turns."""
    params = tuple(map(id, model.parameters())) if parameters else ()
    return tuple(map(id, model.modules())), params


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


# The closure's entry points into the Probe. Like every other, each goes through the one
# guard (gradprobe.hooks.Entry): a failure is a warning and a gap, and a training step
# compiled whole (its closure traced by dynamo) runs them eagerly outside the graph.
_CLOSURE_SITE = Site("the optimizer step's closure (reading the step)", "params")
_SEARCH_SITE = Site("the optimizer step's closure (its later evaluations)", "none")


def _read_after_closure(probe: Probe) -> None:
    if not probe._closed:
        probe._closure_returned()


def _search_begins(probe: Probe) -> None:
    probe._searching += 1


def _search_ends(probe: Probe) -> None:
    probe._searching = max(0, probe._searching - 1)


def _watched(ref: weakref.ref[Probe], closure: Callable[..., Any]) -> Callable[..., Any]:
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


class Follow:
    def _init_follow(self, model: nn.Module, selection: Any) -> None:
        self._selection = selection
        self._signature = model_signature(model, not self._shards)
        # The step's reading of the gradients waits for its closure (see _before_step).
        self._step_work_pending = False
        self._searching = 0
        # When the last backward pass of the step ended: each .grad's tensor (weakly) and
        # version, by parameter index, and where the step's records then stood.
        self._grad_marker: dict[int, tuple[weakref.ref[Tensor], int]] | None = None
        self._grad_mark: Any = None
        self._deferred_mark = 0
        self._retired_params: set[int] = set()
        self._retired_slots: set[int] = set()
        self._bound_modules = [weakref.ref(m) for m in _slot_modules(model, self._slots)]
        self._param_index = {id(p): i for i, p in enumerate(self._params)}
        # Which parameters were trainable when bound, and each module's: its own, or those
        # of the smallest module around it that has some (see _owners_of).
        self._trainable_at_bind = [p.requires_grad for p in self._params]
        self._owners = self._owners_of(model)
        # Modules whose parameters are all frozen now (trainable when bound): not recorded.
        self._requires_grad_now: tuple[bool, ...] = tuple(self._trainable_at_bind)
        self._frozen_slots: frozenset[int] = frozenset()
        # A change of the model that could not be followed (binding it failed part-way):
        # nothing bound can be trusted from then on, so nothing more is recorded.
        self._unfollowed = False

    # ================================================================ closures
    def _before_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The optimizer step pre-hook: with a closure, hand the optimizer one that reads
        the gradients when it returns; else read them now. Never raises."""
        try:
            at, closure = _closure_of(args, kwargs)
        except Exception:
            at, closure = 0, None
        if closure is None or self._closed or not (self._recording or self._auto):
            self._guard(self._on_step_pre, "the optimizer step (pre-hook)")
            return None
        self._follow_or_stop("the optimizer step (following the model)")
        self._poll_scaler()
        if "lr" in self.stats and (self._recording or self._auto):
            self._guard(self._record_lr, "optimizer step (learning rate)")
        self._step_work_pending = True
        watched = _watched(self._ref, closure)
        if at < 0:
            return args, {**kwargs, "closure": watched}
        return (*args[:at], watched, *args[at + 1 :]), kwargs

    def _closure_returned(self) -> None:
        """The first evaluation of the step's closure returned: its gradients are the
        step's (after clipping inside it, as Lightning's)."""
        if self._step_work_pending:
            self._step_work_pending = False
            self._read_step()  # never raises: each part is guarded

    # ================================================================ discarded gradients
    def _after_backward(self) -> None:
        """A backward pass that accumulated into the model's parameters ended (after DDP's
        own callbacks): the pre-clip norms, and where the gradients and records stand."""
        self._backward_pending = False
        if self._closed or self._searching or self._unfollowed:
            return
        if self._want_preclip:
            self._guard_params(self._record_preclip, "the end of backward (pre-clip norms)")
        if self._recording:
            self._guard(self._mark_gradients, "end of backward (gradients' marker)")

    def _mark_gradients(self) -> None:
        if self._held or self._watched:
            self._reduce_held()
        marker = {}
        for i, p in enumerate(self._params):
            g = p.grad
            if g is not None and i not in self._retired_params:
                marker[i] = (weakref.ref(g), g._version)
        self._grad_marker = marker
        self._grad_mark = self.buffer.mark()
        self._deferred_mark = len(self._deferred_units)

    def _check_discarded(self, current: Tensor | None = None) -> None:
        """Were gradients of the passes before the last mark discarded since (``None``,
        another tensor, or changed in place)? ``current``: the parameter whose
        accumulation is running now (one in-place add expected on it)."""
        marker = self._grad_marker
        if marker is None:
            return
        now = self._param_index.get(id(current)) if current is not None else None
        # Under data parallelism collectives write gradients without a version bump, DDP's
        # buckets with more than one, and DDP swaps .grad for views of rebuilt buckets
        # (after its first iteration): there, only a gradient set to None is discarded.
        alone = not self._distributed
        reset = []
        for i, (ref, version) in marker.items():
            g = self._params[i].grad
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
        self.buffer.drop_before(mark, np.asarray(slots, dtype=np.int64))
        dropped = set(slots)
        n = self._deferred_mark
        self._deferred_units = [
            entry
            for i, entry in enumerate(self._deferred_units)
            if i >= n or entry[0] not in dropped
        ]

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
        for slot in self._slots:
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
        return [
            k
            for k, owned in enumerate(self._owners)
            if owned & params and k not in self._retired_slots
        ]

    def _update_frozen(self) -> None:
        """At a recorded pass's start: the modules all of whose parameters are frozen now,
        though trainable when bound (a GAN's D while G trains, Lightning's
        ``toggle_optimizer``): the pass reaches none of the gradients their steps apply,
        so they are not recorded in it. Host flags; recomputed only when they change."""
        now = tuple(p.requires_grad for p in self._params)
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

    def _slot_frozen(self, k: int) -> bool:
        """Whether module ``k``'s call is one its parameters are frozen for: inside a
        pass, as judged at the pass's start; a call outside the model's forward (a loop
        or a LightningModule's ``training_step`` calling submodules), now, from its own
        parameters (a few flags: the first trainable one ends the look)."""
        if self._pass_open:
            return k in self._frozen_slots
        owned = self._owners[k] if k < len(self._owners) else ()
        params = self._params
        return bool(owned) and not any(params[i].requires_grad for i in owned)

    # ================================================================ a model that changes
    def _follow_or_stop(self, where: str) -> None:
        """Follow the model (:meth:`_follow_model`); should that fail, the Probe's slots,
        parameters, buffer and hooks may be half bound to the new model: this step's
        statistics become gaps and nothing more is recorded (absent, never wrong), with
        one warning that says so."""
        if self._unfollowed or self._guard(self._follow_model, where):
            return
        self._unfollowed = True
        self._recording = False
        warn_gap(
            self._failed_where,
            "model not followed",
            "gradprobe: the model changed and the Probe failed to follow the change (the "
            "warning before says where): it records nothing from this step on. Training is "
            "not affected; make a new Probe to go on recording",
        )
        self._guard(self._mark_everything_a_gap, f"{where} (marking the gap)")

    def _mark_everything_a_gap(self) -> None:
        for k in range(self.buffer.n_slots):
            self.buffer.set_host(k, "gap", 1)
        self.buffer.set_param_host(list(range(self.buffer.n_params)), "param_gap")

    def _follow_model(self) -> None:
        """Once per step (its first pass, or its optimizer step, or ``probe.step()``):
        bind what the model holds now if it changed since."""
        model = self._model_ref()
        if model is None or self._closed or _inside_backward():
            return
        if self._followed_step == self.step_index:
            return
        self._followed_step = self.step_index
        signature = model_signature(model, not self._shards)
        if signature == self._signature:
            return
        self._signature = signature
        if self._shards:
            warn_gap(
                self._failed_where,
                "model changed (sharded)",
                "gradprobe: the model's modules changed, and it holds sharded "
                "(FSDP2) parameters, whose shards the Probe binds once: the changed ones are "
                "not followed. Make a new Probe after the change",
            )
            return
        self._rebind(model)

    def _rebind(self, model: nn.Module) -> None:
        from .probe import _choose_modules, _make_slot, _trainable_parameters

        self._flush()  # closed steps have the old widths
        # Modules: a (name, object) pair already bound keeps its slot; any other is new.
        bound = {
            (s.name, id(ref())): s.index
            for s, ref in zip(self._slots, self._bound_modules)
            if s.index not in self._retired_slots and ref() is not None
        }
        chosen = _choose_modules(model, self._selection, strict=False)
        kept = set()
        new_modules = []
        for name, module in chosen:
            k = bound.get((name, id(module)))
            if k is not None:
                kept.add(k)
                continue
            slot = _make_slot(len(self._slots), name, module)
            self._slots.append(slot)
            self._bound_modules.append(weakref.ref(module))
            new_modules.append((slot, module))
            kept.add(slot.index)
        self._retired_slots |= {s.index for s in self._slots} - kept
        # A retired module's units are no longer tracked (it never runs again).
        self.buffer.units_off |= self._retired_slots
        # Parameters, the same way; a retired one's tensor is let go (an empty stand-in).
        live = {
            (name, id(self._params[i])): i
            for i, name in enumerate(self._param_names)
            if i not in self._retired_params
        }
        names, params = _trainable_parameters(model)
        kept_params = set()
        new_params = []
        for name, p in zip(names, params):
            i = live.get((name, id(p)))
            if i is None:
                i = len(self._params)
                self._params.append(p)
                self._param_names.append(name)
                new_params.append(p)
            kept_params.add(i)
        for i in set(range(len(self._params))) - kept_params - self._retired_params:
            self._retired_params.add(i)
            self._params[i] = torch.empty(0)
        self._param_index = {
            id(p): i for i, p in enumerate(self._params) if i not in self._retired_params
        }
        fresh = {id(p) for p in new_params}
        self._trainable_at_bind = [
            p.requires_grad if id(p) in fresh else bound
            for p, bound in zip(self._params, self._trainable_at_bind + [False] * len(new_params))
        ]
        self._owners = self._owners_of(model)
        self._requires_grad_now, self._frozen_slots = (), frozenset()
        self.buffer.grow(len(self._slots), len(self._params))
        self._grad_marker = None  # other parameters: nothing of before is comparable
        self._preclip, self._grad_versions, self._snapshot = {}, {}, None
        self._describe_new(model, new_modules, names, params, new_params)
        # Hooks: every module hook again (a retired slot's module may still run under
        # another name: a wrapped layer), and gradient hooks on the new parameters.
        was_on = self._step_hooks_on
        if was_on:
            self._step_hooks.remove()
            self._step_hooks_on = False
        kept = self._param_hooks_kept  # "auto": gradient hooks on at every step
        if was_on or (kept and new_params):
            self._attach_step_hooks(new_params if kept else None)

    def _describe_new(
        self,
        model: nn.Module,
        new_modules: list[tuple[Any, nn.Module]],
        names: list[str],
        params: list[Tensor],
        new_params: list[Tensor],
    ) -> None:
        for slot, module in new_modules:
            self._meta["modules"].append(self._module_info(slot, module))
        fresh = {id(p) for p in new_params}
        for name, p in zip(names, params):
            if id(p) in fresh:
                self._meta["parameters"].append(
                    {"name": name, "shape": list(p.shape), "numel": p.numel()}
                )
        if self._store is not None:
            store = self._store
            self._guard(
                lambda: store.update_meta(parameters=self._meta["parameters"]),
                "the store's meta (a changed model)",
            )


def _slot_modules(model: nn.Module, slots: list[Any]) -> list[nn.Module]:
    by_name = dict(model.named_modules())
    return [by_name[s.name] for s in slots]

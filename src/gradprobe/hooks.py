"""HookSet and Entry: every callable gradprobe hands to PyTorch, guarded in one place.

gradprobe runs inside the user's program through *entry points*: forward pre-hooks and
forward hooks of modules, hooks of tensors and of autograd nodes (pre-hooks too),
parameters' post-accumulate-grad hooks, optimizer step pre- and post-hooks, and callbacks
queued on autograd's engine for the end of a backward pass. Each of them is an
:class:`Entry`, made here and nowhere else (``tests/test_guard.py`` checks that no other
module calls a ``register_*hook`` or ``queue_callback``). An Entry is the one guard:

- whatever the Probe's work raises (any ``Exception``) becomes one
  :class:`GradprobeWarning` naming the site (:func:`warn_once`), and the owner leaves a gap
  for what that site feeds (:class:`Site` says which: a module, its error signals, the
  parameters, every module of the step); the user's program never sees it, and the
  hook returns ``None``, so inputs, outputs and gradients stay the user's;
- dynamo never traces the Probe's work. Whether a model is compiled is not a property
  of the model: the user compiles it mid-run, calls ``model.compile()``, compiles a
  submodule or the whole training step. An Entry asks at each call
  (``torch.compiler.is_compiling()``, a flag dynamo folds to ``True`` while it traces):
  traced, it leaves the graph (``torch._compile._disable_dynamo``, the lazy form of
  ``torch.compiler.disable``: a graph break) and runs eagerly, as it does when
  called from eager code, and tells the owner (``owner._entry_traced(site)``) that the
  model is compiled (the Probe then keeps its hooks on at every step: dynamo reads a
  module's hook tables when it traces it, and ignores hooks put on later). A
  :class:`Site` may instead do nothing when traced (``when_traced="skip"``).

The callables stored in a module's hook tables are :class:`ModuleHook` objects, because
those tables travel with the module: ``torch.save(model)``, ``pickle`` and
``copy.deepcopy`` copy them. A copied or unpickled :class:`ModuleHook` is an
:class:`InertHook`, a no-op that records nothing and deletes itself from the copy's hook
tables the first time the copy runs (a deep copy made in this process is also cleaned
when the Probe closes). So a probed model stays picklable and copyable, and no copy ever
feeds the Probe. Any other Entry copied or unpickled (a parameter's hook, deep-copied
with it) is an inert no-op as well.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch.utils.hooks import RemovableHandle

from .errors import StopTraining

__all__ = [
    "Entry",
    "GradprobeWarning",
    "HookSet",
    "InertHook",
    "ModuleHook",
    "Site",
    "at_backward_end",
    "on_node",
    "on_node_pre",
    "on_tensor",
    "warn_gap",
    "warn_once",
]

F = TypeVar("F", bound=Callable[..., Any])


class GradprobeWarning(UserWarning):
    """Something the user should know while training goes on: a hook failed (the statistic
    has a gap), or the Probe cannot work at full strength here (a compiled model)."""


# What an entry point's failure leaves out of the step (the owner marks it):
#   "module"        the module's call: its records are taken back, its other calls stay;
#                   the module's statistics where that cannot be (key: its slot)
#   "errors"        the module's error signals, error_norm and error_gain (key: its slot)
#   "input_errors"  the module's error_gain (key: its slot)
#   "all_errors"    every module's error signals
#   "modules"       every module's statistics
#   "params"        the parameters' statistics and the global norms
#   "step"          as "params", and the step closes all the same (the step's close failed)
#   "none"          nothing recorded depends on it (the owner's own bookkeeping)
Gap = Literal["module", "errors", "input_errors", "all_errors", "modules", "params", "step", "none"]


@dataclass(frozen=True)
class Site:
    """A kind of entry point: what the warning calls it, what its failure leaves out, and
    what it does when dynamo traces it: run eagerly outside the graph (``"escape"``, a
    graph break), or nothing (``"skip"``: work that the other entry points make up for,
    so that a model probed with ``modules=[]`` compiles with ``fullgraph=True``).
    ``passes_result``: the entry returns what its work returns (an optimizer step
    pre-hook that hands the optimizer a watched closure); every other entry returns
    ``None``, so inputs, outputs and gradients stay the user's. A failure returns ``None``."""

    where: str
    gap: Gap
    when_traced: Literal["escape", "skip"] = "escape"
    passes_result: bool = False


class Entry:
    """One entry point of the owner (a Probe, a callback) into the user's program.

    Called by PyTorch as ``entry(*args)``, it calls ``fn(owner, *bound, *args)`` with the
    owner resolved from a weak reference (gone: nothing happens), and returns ``None``
    (``fn``'s result where the :class:`Site` passes it on): a failure is
    ``owner._entry_failed(site, key, exc)`` (a warning and a gap), never the user's error;
    only :class:`~gradprobe.StopTraining`, raised because the user asked for it, passes. Traced by dynamo, it runs
    eagerly outside the graph (see the module's docstring).
    """

    __slots__ = ("__weakref__", "_bound", "_fn", "_key", "_owner_ref", "_site")

    def __init__(
        self,
        fn: Callable[..., Any],
        owner_ref: weakref.ref[Any],
        site: Site,
        key: int = -1,
        *bound: Any,
    ) -> None:
        self._fn = fn
        self._owner_ref = owner_ref
        self._site = site
        self._key = key
        self._bound = bound

    def __call__(self, *args: Any) -> Any:
        # Nothing here may be traced but this test: dynamo reconstructs a weak reference
        # as its referent at a graph break (the Probe called as if it were the reference).
        if _is_compiling():
            if self._site.when_traced == "skip":
                return None
            return _untraced(self, args)
        if _dynamo_callback() is not None:
            # Eager code run by a compiled function around a graph break (the closure of a
            # training step compiled whole): dynamo would compile each frame the Probe's work
            # opens. Run it with dynamo off, as a traced entry does.
            return _untraced(self, args)
        return self._enter(args, False)

    def _enter(self, args: tuple[Any, ...], traced: bool) -> Any:
        owner = self._owner_ref()
        if owner is None:
            return None
        try:
            if traced:
                owner._entry_traced(self._site)
            result = self._fn(owner, *self._bound, *args)
        except StopTraining:
            raise  # the one exception the user asked for (Probe(stop_on=...))
        except Exception as exc:  # the one guard: never into the user's program
            _failed(owner, self._site, self._key, exc)
            return None
        return result if self._site.passes_result else None

    def __reduce__(self) -> tuple[type[InertEntry], tuple[()]]:
        return (InertEntry, ())  # a copy (a deep-copied parameter's hook) records nothing

    def __deepcopy__(self, memo: dict[int, Any]) -> InertEntry:
        return InertEntry()


class InertEntry:
    """What an :class:`Entry` becomes in a copy: a no-op."""

    __slots__ = ()

    def __call__(self, *args: Any) -> None:
        return None

    def __reduce__(self) -> tuple[type[InertEntry], tuple[()]]:
        return (InertEntry, ())


# torch.compiler.is_compiling, which dynamo folds to True while it traces (looked up once:
# this test runs at every hook call).
_is_compiling = torch.compiler.is_compiling
# The frame callback dynamo has set (None in plain eager code and under its disable()): a
# C function of torch's, so asking costs no import of dynamo (~15 ns).
_dynamo_callback = torch._C._dynamo.eval_frame.get_eval_frame_callback


def _enter_untraced(entry: Entry, args: tuple[Any, ...]) -> Any:
    return entry._enter(args, True)


# torch.compiler.disable, imported on its first call (a traced one): importing dynamo costs
# ~1 s, which a process that never compiles must not pay. Dynamo sees a function of torch's
# own that it does not trace: a graph break, then this runs eagerly with dynamo off.
try:
    from torch._compile import _disable_dynamo

    _untraced = _disable_dynamo(_enter_untraced)
except ImportError:  # pragma: no cover - another torch: the public form, made when traced

    def _untraced(entry: Entry, args: tuple[Any, ...]) -> Any:
        return torch.compiler.disable(_enter_untraced)(entry, args)


def _failed(owner: Any, site: Site, key: int, exc: BaseException) -> None:
    """Tell the owner (a warning and a gap); should that fail too, one plain warning."""
    try:
        owner._entry_failed(site, key, exc)
    except Exception as again:
        seen = getattr(owner, "_failed_where", None)
        warn_once(seen if isinstance(seen, set) else set(), site.where, again)


# A module's hook tables that may hold a ModuleHook, and the tables keyed by the same ids.
_HOOK_TABLES = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
}


class InertHook:
    """What a :class:`ModuleHook` becomes in a copy of the module: records nothing.

    Called (as a forward pre-hook or forward hook of the copy), it returns ``None``, which
    leaves inputs and outputs unchanged, and deletes the inert hooks of the module and of
    its submodules, which may never run (``MultiheadAttention``'s ``out_proj``, an unused
    branch) and would keep theirs for good (torch iterates over a snapshot of the module's
    own tables, and no submodule's table is being walked while the module's hooks run, so
    this is safe mid-call). Called while an
    exception is being handled (torch runs always-called forward hooks after a forward
    raised, walking the live table), it stays, harmless, until the next call.
    """

    __slots__ = ()

    def __call__(self, module: Any, *args: Any) -> None:
        if sys.exc_info()[1] is not None:
            return  # see above: the table may be being iterated
        with contextlib.suppress(Exception):  # a copy must run whatever its tables hold
            for submodule in module.modules() if hasattr(module, "modules") else (module,):
                remove_inert_hooks(submodule)

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:
        return (InertHook, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> InertHook:
        return InertHook()


def remove_inert_hooks(module: Any, only: InertHook | None = None) -> int:
    """Delete :class:`InertHook` entries (``only`` that one) from ``module``'s hook tables."""
    removed = 0
    for table_name, side_tables in _HOOK_TABLES.items():
        table = getattr(module, table_name, None)
        if not table:
            continue
        for key, hook in list(table.items()):
            if not isinstance(hook, InertHook) or (only is not None and hook is not only):
                continue
            del table[key]
            for side_name in side_tables:
                getattr(module, side_name, {}).pop(key, None)
            removed += 1
    return removed


class ModuleHook(Entry):
    """An :class:`Entry` that gradprobe stores in one module's hook table.

    It calls ``fn(owner, key, module, *args)`` and holds only what is safe to keep in a
    user's module: a weak reference to the owner (the Probe), a key (a slot index), and a
    weak reference to the module it was registered on. Called with any other module (a
    shallow ``copy.copy`` shares the hook tables) it does nothing. Pickled or deep-copied
    with the module it becomes an :class:`InertHook`; a deep copy made in this process is
    remembered by the owner's :class:`HookSet`, whose :meth:`HookSet.remove` cleans it too.
    """

    __slots__ = ("_hookset_ref", "_module_ref")

    def __init__(
        self,
        fn: Callable[..., Any],
        owner_ref: weakref.ref[Any],
        site: Site,
        key: int,
        module: Any,
        hookset: HookSet,
    ) -> None:
        super().__init__(fn, owner_ref, site, key, key)
        self._module_ref = weakref.ref(module)
        self._hookset_ref = weakref.ref(hookset)

    def _enter(self, args: tuple[Any, ...], traced: bool) -> None:
        if not args or args[0] is not self._module_ref():  # by identity: a copy is not ours
            return None
        return super()._enter(args, traced)

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:  # type: ignore[override]
        # The hook travels with torch.save(model)/pickle: what arrives is inert.
        return (InertHook, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> InertHook:  # type: ignore[override]
        # copy.deepcopy(model) has put the copy of our module in memo before its hook
        # tables: hand it to the HookSet, which deletes the inert copies at close().
        module = self._module_ref()
        hookset = self._hookset_ref()
        copied = memo.get(id(module)) if module is not None else None
        if copied is not None and hookset is not None:
            hookset.add_copy(copied)
        return InertHook()


class HookSet:
    """Registers every hook the owner keeps across steps, each an :class:`Entry`, and
    holds their handles; :meth:`remove` is idempotent and leaves nothing behind.

    It also remembers (weakly) modules deep-copied from a probed one in this process, so
    that :meth:`remove` deletes the inert hooks their copies carry as well.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._copies: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    # ------------------------------------------------------------ registration
    def on_module_pre(
        self,
        module: Any,
        fn: Callable[..., Any],
        owner_ref: weakref.ref[Any],
        site: Site,
        key: int,
        prepend: bool = False,
    ) -> None:
        """``fn(owner, key, module, args, kwargs)`` before each call of ``module``."""
        hook = ModuleHook(fn, owner_ref, site, key, module, self)
        self.add(module.register_forward_pre_hook(hook, prepend=prepend, with_kwargs=True))

    def on_module(
        self,
        module: Any,
        fn: Callable[..., Any],
        owner_ref: weakref.ref[Any],
        site: Site,
        key: int,
        always_call: bool = False,
    ) -> None:
        """``fn(owner, key, module, args, kwargs, output)`` after each call of ``module``."""
        hook = ModuleHook(fn, owner_ref, site, key, module, self)
        self.add(module.register_forward_hook(hook, with_kwargs=True, always_call=always_call))

    def on_step(
        self,
        optimizer: Any,
        fn: Callable[..., Any],
        owner_ref: weakref.ref[Any],
        site: Site,
        post: bool = False,
    ) -> None:
        """``fn(owner, optimizer, args, kwargs)`` before (``post``: after) each step."""
        entry = Entry(fn, owner_ref, site)
        register = optimizer.register_step_post_hook if post else optimizer.register_step_pre_hook
        self.add(register(entry))

    def on_accumulated(
        self, param: Any, fn: Callable[..., Any], owner_ref: weakref.ref[Any], site: Site
    ) -> None:
        """``fn(owner, param)`` each time a backward pass accumulates into ``param.grad``."""
        self.add(param.register_post_accumulate_grad_hook(Entry(fn, owner_ref, site)))

    def add_copy(self, module: Any) -> None:
        """A deep copy of a probed module, whose inert hooks :meth:`remove` deletes."""
        with contextlib.suppress(TypeError):  # not weak-referenceable: see InertHook
            self._copies[id(module)] = module

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        copies = list(self._copies.values())
        self._copies.clear()
        for module in copies:
            remove_inert_hooks(module)

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# Hooks of one autograd graph: not held (they die with it), guarded all the same.
def on_tensor(
    tensor: Any,
    fn: Callable[..., Any],
    owner_ref: weakref.ref[Any],
    site: Site,
    key: int,
    *bound: Any,
) -> None:
    """``fn(owner, *bound, grad)`` when the gradient of ``tensor`` is computed."""
    tensor.register_hook(Entry(fn, owner_ref, site, key, *bound))


def on_node_pre(
    node: Any,
    fn: Callable[..., Any],
    owner_ref: weakref.ref[Any],
    site: Site,
    key: int,
    *bound: Any,
) -> None:
    """``fn(owner, *bound, grad_outputs)`` before the autograd ``node`` runs."""
    node.register_prehook(Entry(fn, owner_ref, site, key, *bound))


def on_node(
    node: Any,
    fn: Callable[..., Any],
    owner_ref: weakref.ref[Any],
    site: Site,
    key: int,
    *bound: Any,
) -> None:
    """``fn(owner, *bound, grad_inputs, grad_outputs)`` after the autograd ``node`` ran."""
    node.register_hook(Entry(fn, owner_ref, site, key, *bound))


def at_backward_end(
    fn: Callable[..., Any], owner_ref: weakref.ref[Any], site: Site, key: int = -1, *bound: Any
) -> None:
    """``fn(owner, *bound)`` when the current backward pass has finished (all of it)."""
    torch.autograd.Variable._execution_engine.queue_callback(
        Entry(fn, owner_ref, site, key, *bound)
    )


def warn_once(seen: set[str], where: str, exc: BaseException) -> None:
    """One warning per place: a hook that fails every step must not flood the log.

    ``where`` names the piece of the Probe's work that failed (a module's hook, the step
    boundary, a flush, a collective, the store), never the user's code.
    """
    warn_gap(
        seen,
        where,
        f"gradprobe: its work at {where} failed ({type(exc).__name__}: {exc}); "
        "its statistics have a gap there, training is not affected",
    )


def warn_gap(seen: set[str], key: str, message: str) -> None:
    """Warn ``message`` once per ``key``: a statistic left out, and why."""
    if key in seen:
        return
    seen.add(key)
    warnings.warn(message, GradprobeWarning, stacklevel=4)

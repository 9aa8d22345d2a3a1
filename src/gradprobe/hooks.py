"""HookSet: every hook handle gradprobe registers, held and removed in one place.

Handles come from ``register_forward_pre_hook``/``register_forward_hook`` on modules
and ``register_step_pre_hook``/``register_step_post_hook`` on optimizers. Tensor hooks
on activations are not held: they belong to one autograd graph and die with it.

A hook that fails never reaches the user's training loop: the Probe catches it and
:func:`warn_once` turns it into one warning per place (and the Probe leaves a gap).

The callables stored in a module's hook tables are :class:`ModuleHook` objects, because
those tables travel with the module: ``torch.save(model)``, ``pickle`` and
``copy.deepcopy`` copy them. A copied or unpickled :class:`ModuleHook` is an
:class:`InertHook`, a no-op that records nothing and deletes itself from the copy's hook
tables the first time the copy runs (a deep copy made in this process is also cleaned
when the Probe closes). So a probed model stays picklable and copyable, and no copy ever
feeds the Probe.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from torch.utils.hooks import RemovableHandle

__all__ = ["GradprobeWarning", "HookSet", "InertHook", "ModuleHook", "warn_gap", "warn_once"]

F = TypeVar("F", bound=Callable[..., Any])


class GradprobeWarning(UserWarning):
    """Something the user should know while training goes on: a hook failed (the statistic
    has a gap), or the Probe cannot work at full strength here (a compiled model)."""


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


class ModuleHook:
    """A forward (pre-)hook that gradprobe stores in one module's hook table.

    It calls ``call(owner_ref, key, module, *args)`` and holds only what is safe to keep
    in a user's module: a weak reference to the owner (the Probe), a key (a slot index),
    and a weak reference to the module it was registered on. Called with any other module
    (a shallow ``copy.copy`` shares the hook tables) it does nothing. Pickled or deep-copied
    with the module it becomes an :class:`InertHook`; a deep copy made in this process is
    remembered by the owner's :class:`HookSet`, whose :meth:`HookSet.remove` cleans it too.
    """

    __slots__ = ("__weakref__", "_call", "_hookset_ref", "_key", "_module_ref", "_owner_ref")

    def __init__(
        self,
        call: Callable[..., Any],
        owner_ref: weakref.ref[Any],
        key: int,
        module: Any,
        hookset: HookSet,
    ) -> None:
        self._call = call
        self._owner_ref = owner_ref
        self._key = key
        self._module_ref = weakref.ref(module)
        self._hookset_ref = weakref.ref(hookset)

    def __call__(self, module: Any, *args: Any) -> Any:
        if module is not self._module_ref():  # compared by identity: a copy is not ours
            return None
        return self._call(self._owner_ref, self._key, module, *args)

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:
        # The hook travels with torch.save(model)/pickle: what arrives is inert.
        return (InertHook, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> InertHook:
        # copy.deepcopy(model) has put the copy of our module in memo before its hook
        # tables: hand it to the HookSet, which deletes the inert copies at close().
        module = self._module_ref()
        hookset = self._hookset_ref()
        copied = memo.get(id(module)) if module is not None else None
        if copied is not None and hookset is not None:
            hookset.add_copy(copied)
        return InertHook()


class HookSet:
    """Owns hook handles; :meth:`remove` is idempotent and leaves nothing behind.

    It also remembers (weakly) modules deep-copied from a probed one in this process, so
    that :meth:`remove` deletes the inert hooks their copies carry as well.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._copies: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

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

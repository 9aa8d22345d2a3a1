"""HookSet: every hook handle gradprobe registers, held and removed in one place.

Handles come from ``register_forward_pre_hook``/``register_forward_hook`` on modules
and ``register_step_pre_hook``/``register_step_post_hook`` on optimizers. Tensor hooks
on activations are not held: they belong to one autograd graph and die with it.

A hook that fails never reaches the user's training loop: the Probe catches it and
:func:`warn_once` turns it into one warning per place (and the Probe leaves a gap).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from torch.utils.hooks import RemovableHandle

__all__ = ["GradprobeWarning", "HookSet", "warn_once"]

F = TypeVar("F", bound=Callable[..., Any])


class GradprobeWarning(UserWarning):
    """Something the user should know while training goes on: a hook failed (the statistic
    has a gap), or the Probe cannot work at full strength here (a compiled model)."""


class HookSet:
    """Owns hook handles; :meth:`remove` is idempotent and leaves nothing behind."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def warn_once(seen: set[str], where: str, exc: BaseException) -> None:
    """One warning per place: a hook that fails every step must not flood the log."""
    if where in seen:
        return
    seen.add(where)
    warnings.warn(
        f"gradprobe: a hook at {where} failed ({type(exc).__name__}: {exc}); "
        "its statistics have a gap there, training is not affected",
        GradprobeWarning,
        stacklevel=3,
    )

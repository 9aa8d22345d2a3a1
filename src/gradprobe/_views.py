"""Views of data objects, resolved by name when they are used.

A :class:`~gradprobe.run.Run` and :class:`~gradprobe.diagnose.Findings` are data: they
must not import the modules that draw or render them (those import the data, and a data
layer that imports its views makes a cycle). ``Run.plot()`` and the notebook's
``_repr_html_`` look their view up here by name, at call time, as pandas resolves
``DataFrame.plot`` to its plotting backend. The table is data, so a test can check that
every entry names a view that exists and that nothing else reaches upward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["VIEWS", "reason", "view"]

# name -> (module, function); each function takes the data object first.
VIEWS: dict[str, tuple[str, str]] = {
    "plot": ("gradprobe.plots", "draw"),  # Run.plot(name, ...): a matplotlib Figure
    "run_html": ("gradprobe.html", "run_html"),  # Run._repr_html_
    "findings_html": ("gradprobe.html", "findings_notebook_html"),  # Findings._repr_html_
}


def view(name: str) -> Callable[..., Any]:
    """The function that shows ``name``, imported now (matplotlib and HTML on first use)."""
    module, function = VIEWS[name]
    return getattr(importlib.import_module(module), function)


def reason(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

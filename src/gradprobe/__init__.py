"""gradprobe: see, measure and fix vanishing and exploding gradients in PyTorch.

The flow of data: model → :class:`Probe` → store (run directory) → :class:`Run`
(:func:`load`) → diagnose / plots / report. See ``shared/design.md``.

The public names are imported on first use (PEP 562), not by ``import gradprobe``:
torch, pandas, pyarrow and the mean-field theory cost seconds to import, and
``gradprobe --help`` or ``import gradprobe.errors`` needs none of them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ provides these
    from . import theory
    from .activations import ACTIVATIONS, Activation, activation_of
    from .diagnose import Finding, Findings, diagnose
    from .errors import GradprobeError, StopTraining
    from .probe import Probe
    from .report import report
    from .run import Run, load
    from .stats import STATISTICS

# Public name -> (submodule that defines it, attribute of that submodule; None: the
# submodule itself).
_LAZY_NAMES: dict[str, tuple[str, str | None]] = {
    "ACTIVATIONS": ("activations", "ACTIVATIONS"),
    "Activation": ("activations", "Activation"),
    "activation_of": ("activations", "activation_of"),
    "Finding": ("diagnose", "Finding"),
    "Findings": ("diagnose", "Findings"),
    "diagnose": ("diagnose", "diagnose"),
    "GradprobeError": ("errors", "GradprobeError"),
    "StopTraining": ("errors", "StopTraining"),
    "Probe": ("probe", "Probe"),
    "report": ("report", "report"),
    "Run": ("run", "Run"),
    "load": ("run", "load"),
    "STATISTICS": ("stats", "STATISTICS"),
    "theory": ("theory", None),
}

__all__ = [
    "ACTIVATIONS",
    "STATISTICS",
    "Activation",
    "Finding",
    "Findings",
    "GradprobeError",
    "Probe",
    "Run",
    "StopTraining",
    "__version__",
    "activation_of",
    "diagnose",
    "load",
    "report",
    "theory",
]


def __getattr__(name: str) -> Any:
    try:
        submodule, attribute = _LAZY_NAMES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(f"{__name__}.{submodule}")
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later look-ups find it without calling __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type: keeps ``gradprobe.diagnose`` and ``gradprobe.report`` functions.

    The import system binds every submodule it loads as an attribute of its package. The
    eager package then rebound ``diagnose`` and ``report`` to the functions of the same
    name; a lazy package must instead refuse the submodule whenever it is loaded (by
    ``from gradprobe.diagnose import ...`` in a user's code or in gradprobe itself), or
    ``gradprobe.diagnose(run)`` would find a module.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        lazy = _LAZY_NAMES.get(name)
        if (
            lazy is not None
            and lazy[1] is not None
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{lazy[0]}"
        ):
            value = getattr(value, lazy[1])
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

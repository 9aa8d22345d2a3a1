"""gradprobe: see, measure and fix vanishing and exploding gradients in PyTorch.

The flow of data: model → :class:`Probe` → store (run directory) → :class:`Run`
(:func:`load`) → diagnose / plots / report. See ``shared/design.md``.
"""

from . import theory
from ._version import __version__
from .activations import ACTIVATIONS, Activation, activation_of
from .diagnose import Finding, Findings, diagnose
from .errors import GradprobeError
from .probe import Probe
from .report import report
from .run import Run, load
from .stats import STATISTICS

__all__ = [
    "ACTIVATIONS",
    "STATISTICS",
    "Activation",
    "Finding",
    "Findings",
    "GradprobeError",
    "Probe",
    "Run",
    "__version__",
    "activation_of",
    "diagnose",
    "load",
    "report",
    "theory",
]

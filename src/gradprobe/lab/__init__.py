"""The lab: every remedy demonstrated and measured on small real data, reproducibly.

Shared builders: :mod:`.data` (digits, the adding problem), :mod:`.models` (MLPs, residual
MLPs, CNNs, recurrent nets with named inits) and :mod:`.training` (``fit``: one training
run under a Probe). Each experiment is one module holding one
:class:`~gradprobe.lab.experiment.Experiment`; :data:`EXPERIMENTS` lists them, in the order
of concepts.md. :mod:`.runner` trains a grid in a process pool and writes its results;
``gradprobe lab list`` and ``gradprobe lab run NAME|all`` are the command line.
"""

from __future__ import annotations

from . import depth
from .experiment import Experiment, RunConfig, RunResult, Verdict

__all__ = ["EXPERIMENTS", "Experiment", "RunConfig", "RunResult", "Verdict"]

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (depth.EXPERIMENT,)}

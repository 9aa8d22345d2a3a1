"""The lab: every remedy demonstrated and measured on small real data, reproducibly.

Shared builders: :mod:`.data` (digits, the adding problem), :mod:`.models` (MLPs, residual
MLPs, CNNs, recurrent nets with named inits) and :mod:`.training` (``fit``: one training
run under a Probe). Each experiment is one module holding one
:class:`~gradprobe.lab.experiment.Experiment`; :data:`EXPERIMENTS` lists them, in the order
of docs/concepts.md. :mod:`.runner` trains a grid in a process pool and writes its results;
``gradprobe lab list`` and ``gradprobe lab run NAME|all`` are the command line.
"""

from __future__ import annotations

from . import activations as _activations
from . import attention as _attention
from . import channels as _channels
from . import clipping as _clipping
from . import depth as _depth
from . import dying_relu as _dying_relu
from . import init as _init
from . import isometry as _isometry
from . import normalization as _normalization
from . import optimizers as _optimizers
from . import pretraining as _pretraining
from . import recurrent as _recurrent
from . import residual as _residual
from .experiment import Experiment, RunConfig, RunResult, Verdict

__all__ = ["EXPERIMENTS", "Experiment", "RunConfig", "RunResult", "Verdict"]

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        _depth.EXPERIMENT,
        _activations.EXPERIMENT,
        _init.EXPERIMENT,
        _isometry.EXPERIMENT,
        _normalization.EXPERIMENT,
        _residual.EXPERIMENT,
        _recurrent.EXPERIMENT,
        _clipping.EXPERIMENT,
        _optimizers.EXPERIMENT,
        _pretraining.EXPERIMENT,
        _dying_relu.EXPERIMENT,
        _channels.EXPERIMENT,
        _attention.EXPERIMENT,
    )
}

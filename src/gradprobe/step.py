"""Where a step begins and ends: the names kept at this path, and what ``Probe.log`` accepts.

The step's work is in components of the recording engine (:mod:`gradprobe.recording`):
the step clock and the cadence (:mod:`gradprobe.recording.clock`, where ``AUTO_*`` and
``SPIKE_BURST_*`` are defined), the parameters' statistics
(:mod:`gradprobe.recording.params`), the update snapshot
(:mod:`gradprobe.recording.updates`), the scaler (:mod:`gradprobe.recording.scaler`) and
the optimizer step (:mod:`gradprobe.recording.optstep`). This module keeps their public
constants importable as ``gradprobe.step.AUTO_EVERY`` and so on (tests, docs, bench):
their values only; to change the cadence's constants, set them on
:mod:`gradprobe.recording.clock`, which is where they are read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from .errors import GradprobeError
from .recording.clock import (
    AUTO_BURST,
    AUTO_EVERY,
    AUTO_FIRST,
    SPIKE_BURST_FACTOR,
    SPIKE_BURST_MIN,
    SPIKE_BURST_WINDOW,
)
from .recording.scaler import scale_marker as _scale_marker
from .stats import STATISTICS

__all__ = [
    "AUTO_BURST",
    "AUTO_EVERY",
    "AUTO_FIRST",
    "SPIKE_BURST_FACTOR",
    "SPIKE_BURST_MIN",
    "SPIKE_BURST_WINDOW",
]

_scale_marker = _scale_marker  # kept at its old path


def _loggable(name: str, value: Any, reads_lr: bool) -> Tensor | float:
    """A value for :meth:`Probe.log`: a detached one-element tensor, or a float."""
    if not name.isidentifier() and not name.startswith("lr/"):
        raise GradprobeError(
            f"cannot log {name!r}: names are identifiers", "e.g. probe.log(loss=loss)"
        )
    if (name == "lr" and reads_lr) or (name in STATISTICS and STATISTICS[name].logged is None):
        raise GradprobeError(
            f"cannot log {name!r}: the Probe records it itself",
            "log the loss and other values of your own under their own names",
        )
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise GradprobeError(
                f"cannot log {name!r}: a tensor of shape {tuple(value.shape)} is not one real "
                "number",
                f"log a scalar, e.g. probe.log({name}=loss) with loss = loss_fn(out, y)",
            )
        return value.detach()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise GradprobeError(
            f"cannot log {name!r}: a {type(value).__name__} is not a number",
            f"log a tensor or a float, e.g. probe.log({name}=loss)",
        )
    return float(value)

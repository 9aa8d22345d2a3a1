"""Statistics, declared once as data, and the pure reductions behind them.

A *statistic* (``STATISTICS``) is what lands in the frame: ``error_norm`` of a
module, ``grad_norm`` of a parameter. It is finalised at flush time, on the host,
from *partials* (``PARTIALS``): sums and counts that hooks accumulate on the
device while a step runs. Each partial says how two partial values combine:
across repeated calls of a module in one step, across the micro-batches of a
gradient-accumulation step, and across data-parallel ranks. So a module called
twice, accumulation and DDP need no code of their own: they all ``sum`` (or
``max``) the same partials, and the statistic is a function of the combined sums.

Three scopes: ``module`` (a row per probed module), ``parameter`` (a row per
parameter) and ``model`` (one row per step under the pseudo-name :data:`MODEL_NAME`,
for what belongs to the whole step: the global gradient norm before and after
clipping, whether the step was clipped, whether a ``GradScaler`` skipped it).

*Logged* values are ``(model)`` rows too: the scalars a training loop hands to
``Probe.log`` (the loss), and each param group's learning rate, read at the optimizer
step. Each is kept as two partials per name (``log_sum``, ``log_count``), which add up
across the values logged in one step (micro-batches) and across ranks, and its
statistic is their ratio, the mean (:func:`logged_mean`).

What a hook reduces per call, and how those per-call values fold into the partials,
is in :mod:`gradprobe.buffer`.

The catalogue (:mod:`.catalogue`) is the one place a statistic is entered: its
finaliser and the measures it ``needs`` (:mod:`.measures`: what the hooks take, at
which site, and how each per-call field folds into the partials of :mod:`.partials`).
What a Probe measures (:class:`Plan`), the buffer's fields, the fold, the DDP and shard
combines and the presets all derive from those entries.
"""

from __future__ import annotations

from .catalogue import HEAD_COLUMNS, PRESETS, STATISTICS, Plan, Statistic, finalize, logged_mean
from .measures import FOLDS, MEASURES, Measure
from .partials import CLIP_RTOL, MODEL_NAME, PARTIALS, SAT_THRESHOLD, Partial, model_partials

__all__ = [
    "CLIP_RTOL",
    "FOLDS",
    "HEAD_COLUMNS",
    "MEASURES",
    "MODEL_NAME",
    "PARTIALS",
    "PRESETS",
    "SAT_THRESHOLD",
    "STATISTICS",
    "Measure",
    "Partial",
    "Plan",
    "Statistic",
    "finalize",
    "logged_mean",
    "model_partials",
]

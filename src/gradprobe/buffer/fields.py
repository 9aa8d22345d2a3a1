"""What a step's records hold: the fields of each kind of call, the partials they fold
into, and one closed step as the drain reads it. Shared by the buffer's parts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from ..stats import FOLDS, PARTIALS
from ..stats.partials import MODULE_HOST_PARTIALS

__all__ = [
    "ADDITIVE_HOST",
    "FIELDS",
    "MODULE_PARTIALS",
    "PARAM_PARTIALS",
    "PARAM_PARTIAL_SET",
    "ClosedStep",
    "StepRecord",
]

# What a hook records per call, by kind: the fields of its 0-d results, in order, as the
# catalogue's folds name them (stats.FOLDS: a new field is one line there).
FIELDS: dict[str, tuple[str, ...]] = {
    kind: tuple(field for _, field, _ in folds) for kind, folds in FOLDS.items()
}
MODULE_PARTIALS = [n for n, p in PARTIALS.items() if p.scope == "module"]
PARAM_PARTIALS = [n for n, p in PARTIALS.items() if p.scope == "parameter"]
PARAM_PARTIAL_SET = frozenset(PARAM_PARTIALS)
# Counts the host adds up per call (calls, entries): what a dropped pass takes back.
ADDITIVE_HOST = [n for n in MODULE_HOST_PARTIALS if PARTIALS[n].combine == "sum"]


@dataclass
class StepRecord:
    """One closed step on one device: a flat vector and how to read it on the host."""

    flat: Tensor
    layout: list[tuple[str, np.ndarray, np.ndarray, int]]  # kind, slots, counts, length


# A closed step: its number, host partials (modules, parameters, model), records per device.
ClosedStep = tuple[int, np.ndarray, dict[str, np.ndarray], dict[str, float], list[StepRecord]]

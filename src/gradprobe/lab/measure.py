"""Numbers the experiments read off a probed run: error-signal ratios, per-layer means.

Everything here is a pure function of a :class:`~gradprobe.run.Run` (or a model and a
batch), so experiments stay short and the same quantity means the same thing everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..run import Run
from .training import FitResult

__all__ = [
    "TINY",
    "curve",
    "error_profile",
    "final_train_metrics",
    "first_last_ratio",
    "layer_mean",
    "layers",
    "log10",
    "probe_every",
]

# Floor for log10 of a ratio that underflowed float32 to 0 (below the smallest subnormal).
TINY = 1e-45


def log10(x: float) -> float:
    """log10 with an underflowed 0 mapped to log10(TINY) and NaN kept."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return math.nan
    return math.log10(max(float(x), TINY))


def probe_every(steps: int, points: int = 30) -> int:
    """Record about ``points`` steps of a run (always including step 1, the init)."""
    return max(1, steps // points)


def layers(run: Run, prefix: str) -> list[str]:
    """Probed modules whose name starts with ``prefix`` (e.g. ``"fc"``, ``"act"``), in
    forward order; ``fc`` never matches the output layer ``out``."""
    return [n for n in run.modules if n.split(".")[-1].startswith(prefix)]


def error_profile(run: Run, names: Sequence[str], at: str = "init") -> np.ndarray:
    """``error_norm`` of ``names`` at the first recorded step (``"init"``) or averaged in
    log space over the last quarter of the recorded steps (``"end"``)."""
    table = run.table("error_norm", list(names))
    if table.empty:
        return np.full(len(names), np.nan)
    if at == "init":
        return table.iloc[0].to_numpy(dtype=float)
    tail = table.iloc[-max(1, len(table) // 4) :].to_numpy(dtype=float)
    with np.errstate(divide="ignore"):
        return 10.0 ** np.nanmean(np.log10(np.maximum(tail, TINY)), axis=0)


def first_last_ratio(run: Run, names: Sequence[str], at: str = "init") -> float:
    """‖δ‖ at the first of ``names`` over ‖δ‖ at the last (see :func:`error_profile`)."""
    prof = error_profile(run, names, at)
    if len(prof) < 2 or not np.isfinite(prof[-1]) or prof[-1] == 0:
        return math.nan
    return float(prof[0] / prof[-1])


def layer_mean(run: Run, stat: str, names: Sequence[str], last: float = 0.25) -> float:
    """Mean of ``stat`` over ``names`` and over the last fraction ``last`` of recorded steps."""
    table = run.table(stat, list(names))
    if table.empty:
        return math.nan
    tail = table.iloc[-max(1, math.ceil(len(table) * last)) :]
    return float(np.nanmean(tail.to_numpy(dtype=float)))


def curve(fit: FitResult, column: str) -> list[float]:
    """One column of a learning curve, as a list of floats."""
    return [float(v) for v in fit.history[column].to_numpy()]


@torch.no_grad()
def final_train_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Loss and error rate on the whole training set, in eval mode (classification)."""
    was = model.training
    model.eval()
    try:
        out = model(x)
        loss = float(nn.functional.cross_entropy(out, y))
        err = float((out.argmax(dim=1) != y).float().mean())
    finally:
        model.train(was)
    return {"train_loss_full": loss, "train_error": err}


def history_frame(fit: FitResult) -> pd.DataFrame:
    """The learning curve (step, train_loss, val_loss, val_acc)."""
    return fit.history.copy()


def fit_run(
    config: Any,
    model: nn.Module,
    data: Any,
    store: Any,
    *,
    steps: int,
    points: int = 30,
    stats: str = "default",
    **kwargs: Any,
) -> FitResult:
    """:func:`~gradprobe.lab.training.fit` for a lab run: seeded by the config, labelled
    with its parameters, recording about ``points`` steps (step 1, the init, always)."""
    from .training import fit

    return fit(
        model,
        data,
        steps=steps,
        seed=config.seed,
        store=store,
        label=config.label,
        config=config.as_dict(),
        eval_every=max(1, steps // 20),
        probe={"every": probe_every(steps, points), "stats": stats, "flush_every": 200},
        **kwargs,
    )

"""The optimizer's side: stalled layers, unstable updates, steps a GradScaler skipped,
clipping that sets the step, and parameters that get no gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..run import Run
from ..stats import MODEL_NAME
from .findings import Finding
from .selectors import _g, _names, _table, _update_medians
from .thresholds import (
    CLIPPED_FRAC,
    SKIPPED_CRITICAL_FRAC,
    SKIPPED_FRAC,
    SKIPPED_STREAK,
    STALL_FACTOR,
    STALL_REFERENCE_QUANTILE,
    STALLED_CRITICAL_SHARE,
    UNSTABLE_UPDATE_RATIO,
    UNUSED_FRAC,
    UPDATE_RATIO_EXPLODING,
)

# Where a gradient goes missing, most often (what the finding suggests to look at).
UNUSED_HINTS = (
    "a branch the forward never runs (a module built but not called, a flag that is off)",
    "a tensor detached on the way to the loss (.detach(), .data, .item(), .numpy(), "
    "torch.no_grad())",
    "activation checkpointing with use_reentrant=True after a frozen input: no input "
    "requires grad, so the segment's parameters get none (use_reentrant=False)",
    "a parameter left out of the loss (an auxiliary head whose loss is not added)",
    "meant to be frozen: set requires_grad=False or leave it out of the optimizer",
)


def detect_stalled(run: Run) -> Finding | None:
    """Weights whose updates stay orders of magnitude below those of the other layers."""
    med = _update_medians(run)
    if len(med) < 3:
        return None
    reference = float(med.quantile(STALL_REFERENCE_QUANTILE))
    if reference <= 0:
        return None
    stalled = [n for n in med.index if med[n] < STALL_FACTOR * reference]
    if not stalled:
        return None
    zero = [n for n in stalled if med[n] == 0]
    severity = "critical" if len(stalled) >= len(med) * STALLED_CRITICAL_SHARE else "warning"
    summary = (
        f"{len(stalled)} of {len(med)} weight matrices barely move: {_names(stalled)} have a median "
        f"update ‖Δw‖/‖w‖ of {_g(float(med[stalled].max()))} or less, against {_g(reference)} for "
        f"the active layers (90th percentile; below {_g(STALL_FACTOR)} of it)"
        + (f"; {len(zero)} do not change at all in float32." if zero else ".")
    )
    return Finding(
        "stalled",
        severity,
        tuple(stalled),
        summary,
        {
            "update_ratio": {n: float(med[n]) for n in stalled},
            "reference": reference,
            "exactly_zero": zero,
            "threshold_factor": STALL_FACTOR,
        },
    )


def detect_unstable_updates(run: Run) -> Finding | None:
    """Weights whose typical update is ≥ 10% of the weight (but below the exploding level)."""
    med = _update_medians(run)
    hit = [n for n in med.index if UNSTABLE_UPDATE_RATIO <= med[n] < UPDATE_RATIO_EXPLODING]
    if not hit:
        return None
    worst = max(hit, key=lambda n: med[n])
    summary = (
        f"{len(hit)} weight(s) change by {_g(float(med[worst]))} of their norm per step at `{worst}` "
        f"(median over recent steps; above {_g(UNSTABLE_UPDATE_RATIO)}, where ~1e-3 trains stably): "
        f"{_names(hit)}."
    )
    return Finding(
        "unstable_updates",
        "warning",
        tuple(hit),
        summary,
        {
            "update_ratio": {n: float(med[n]) for n in hit},
            "threshold": UNSTABLE_UPDATE_RATIO,
        },
    )


def _longest_streak(flags: np.ndarray) -> int:
    best = current = 0
    for flag in flags:
        current = current + 1 if flag else 0
        best = max(best, current)
    return best


def detect_skipped_steps(run: Run) -> Finding | None:
    """A GradScaler skipped many steps, or many in a row: gradients overflow in low precision."""
    skipped = run.model_series("skipped")
    if skipped.empty:
        return None
    flags = skipped.to_numpy() > 0
    count, total, streak = int(flags.sum()), len(flags), _longest_streak(flags)
    if count == 0 or (count / total <= SKIPPED_FRAC and streak < SKIPPED_STREAK):
        return None
    first = int(skipped.index[flags][0])
    summary = (
        f"The GradScaler skipped {count} of {total} recorded steps ({count / total:.0%}; "
        f"{streak} in a row at most, the first at step {first}): the scaled gradients held "
        "inf/NaN, so those updates never happened."
    )
    return Finding(
        "skipped_steps",
        "critical" if count / total > SKIPPED_CRITICAL_FRAC else "warning",
        (MODEL_NAME,),
        summary,
        {
            "skipped": count,
            "recorded": total,
            "longest_streak": streak,
            "first_step": first,
            "threshold_frac": SKIPPED_FRAC,
            "threshold_streak": SKIPPED_STREAK,
        },
    )


def detect_clipped(run: Run) -> Finding | None:
    """Clipping cut the gradient norm on most steps: the step size is max_norm, not the gradient."""
    clipped = run.model_series("clipped")
    if clipped.empty:
        return None
    frac = float(clipped.mean())
    if frac <= CLIPPED_FRAC:
        return None
    steps = clipped.index[clipped.to_numpy() > 0]
    pre = run.model_series("global_grad_norm_preclip").reindex(steps)
    post = run.model_series("global_grad_norm").reindex(steps)
    med_pre, med_post = float(np.nanmedian(pre)), float(np.nanmedian(post))
    factor = med_pre / med_post if med_post > 0 else math.inf
    summary = (
        f"Gradient clipping cut the norm at {frac:.0%} of {len(clipped)} recorded steps: median "
        f"{_g(med_pre)} before clipping, {_g(med_post)} after (×{_g(factor)} smaller). A logger "
        "that shows one norm hides this; the optimizer mostly sees the clipping threshold."
    )
    return Finding(
        "clipped",
        "warning" if frac > 0.9 or factor > 100 else "info",
        (MODEL_NAME,),
        summary,
        {
            "clipped_frac": frac,
            "median_preclip": med_pre,
            "median_postclip": med_post,
            "threshold": CLIPPED_FRAC,
        },
    )


def detect_unused_parameters(run: Run) -> Finding | None:
    """Parameters the optimizer holds for training that receive no gradient.

    Read from ``grad_missing`` (a row where the optimizer held the parameter with
    ``requires_grad`` but ``.grad`` was None at the step); the steps counted are those
    whose parameters were measured (a ``grad_norm`` or ``grad_missing`` row).
    """
    missing = _table(run, "grad_missing")
    if missing.empty:
        return None
    grads = _table(run, "grad_norm")
    measured = missing.index.union(grads.index)
    total = len(measured)
    rows = []
    for name in missing.columns:
        steps = missing.index[missing[name].fillna(0).to_numpy() > 0]
        count = len(steps)
        if count == 0 or count / total < UNUSED_FRAC:
            continue
        had = grads[name].dropna().index if name in grads.columns else pd.Index([])
        last_grad = int(had.max()) if len(had) else None
        later = steps[steps > last_grad] if last_grad is not None else steps
        if len(later) == 0:
            continue  # missing early (a branch switched on after warm-up), used since: fine
        rows.append((name, count, int(later.min()), last_grad))
    if not rows:
        return None
    never = [r for r in rows if r[3] is None]
    names = [r[0] for r in rows]
    counts = sorted({r[1] for r in rows})
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    first = min(r[2] for r in rows)
    summary = (
        f"{len(rows)} parameter{'s' if len(rows) > 1 else ''} the optimizer trains "
        f"received no gradient on {span} of {total} recorded steps (since step {first}): "
        f"{_names(names)}"
        + (f"; {len(never)} never had one" if never else "")
        + ". Backward never reaches them, so the optimizer never changes them."
    )
    return Finding(
        "unused_parameters",
        "warning" if never else "info",
        tuple(names),
        summary,
        {
            "parameters": {
                name: {"missing_steps": count, "since_step": since, "last_grad_step": last}
                for name, count, since, last in rows
            },
            "recorded_steps": total,
            "threshold_frac": UNUSED_FRAC,
            "hints": list(UNUSED_HINTS),
        },
    )

"""Unstable training, read over steps from the logged loss and the global gradient norm:
spikes, divergence, setbacks, oscillation and plateaus.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..run import Run
from ..stats import MODEL_NAME
from .findings import Finding
from .selectors import _g, _loss, _running_median, _smoothed, _steps_text, _table, _total_grad_norm
from .thresholds import (
    DIVERGENCE_FACTOR,
    DIVERGENCE_GIVEBACK,
    GRAD_SPIKE_CRITICAL_COUNT,
    GRAD_SPIKE_CRITICAL_FACTOR,
    GRAD_SPIKE_FACTOR,
    INSTABILITY_CRITICAL_SETBACKS,
    INSTABILITY_GIVEBACK,
    INSTABILITY_LEARNED,
    INSTABILITY_RECOVER,
    INSTABILITY_SETBACKS,
    LOSS_SPIKE_FACTOR,
    LOSS_SPIKE_MADS,
    LOSS_WINDOW,
    MIN_LOSS_STEPS,
    OSCILLATION_AMPLITUDE,
    OSCILLATION_AUTOCORR,
    PLATEAU_DECREASE,
    PLATEAU_LEVEL,
    SPIKE_WINDOW,
)

# What a loss-based finding says when the loss was not logged.
LOSS_NOT_LOGGED = (
    "needs the loss: call probe.log(loss=loss) at each step (the Lightning and Hugging Face "
    "callbacks log it)"
)


def detect_grad_norm_spike(run: Run) -> Finding | None:
    """The global gradient norm (before clipping) jumps far above its running median."""
    norm = _total_grad_norm(run)
    if len(norm) < SPIKE_WINDOW // 2:
        return None
    median = _running_median(norm)
    ratio = norm / median
    # A median of 0 (gradients gated off during a warm-up) makes no ratio: no spike.
    hit = ratio[(ratio >= GRAD_SPIKE_FACTOR) & np.isfinite(norm) & (median > 0)]
    if hit.empty:
        return None
    steps = [int(s) for s in hit.index]
    worst = int(ratio.loc[hit.index].idxmax())
    first = _first_jumped(run, steps[0])
    summary = (
        f"The global gradient norm jumped to {_g(float(norm[worst]))} at step {worst} "
        f"(×{_g(float(ratio[worst]))} its running median {_g(float(median[worst]))}); "
        f"{len(steps)} spike(s) ≥ ×{_g(GRAD_SPIKE_FACTOR)} in {len(norm)} recorded steps, at "
        f"steps {_steps_text(steps)}."
    )
    if first:
        summary += (
            " At the first spike, the gradients that jumped first: "
            + ", ".join(f"`{n}` (×{_g(r)} at step {s})" for n, s, r in first[:4])
            + (f" and {len(first) - 4} more" if len(first) > 4 else "")
            + "."
        )
    return Finding(
        "grad_norm_spike",
        "critical"
        if float(ratio[worst]) >= GRAD_SPIKE_CRITICAL_FACTOR
        or len(steps) >= GRAD_SPIKE_CRITICAL_COUNT
        else "warning",
        tuple(n for n, _, _ in first) or (MODEL_NAME,),
        summary,
        {
            "first_jumped": {n: {"step": s, "ratio": r} for n, s, r in first},
            "steps": steps,
            "grad_norm": [float(norm[s]) for s in steps],
            "running_median": [float(median[s]) for s in steps],
            "ratio": [float(ratio[s]) for s in steps],
            "worst_step": worst,
            "threshold": GRAD_SPIKE_FACTOR,
            "window": SPIKE_WINDOW,
        },
    )


def _first_jumped(run: Run, spike: int) -> list[tuple[str, int, float]]:
    """The parameters whose gradient norm jumped first around a global spike at ``spike``.

    Read from the per-parameter ``grad_norm`` (recorded at every step, under the default
    cadence too): each parameter's norm against the median of its own SPIKE_WINDOW steps
    before; a parameter jumped when that ratio reached GRAD_SPIKE_FACTOR within the window
    ending at the spike. Earliest first, then the largest jump. When none jumped that much
    alone (many moved together), the three largest ratios at the spike.
    ``[(name, step, ratio)]``.
    """
    grads = _table(run, "grad_norm")
    if grads.empty or spike not in grads.index:
        return []
    window = grads.loc[:spike].iloc[-SPIKE_WINDOW:]
    median = grads.apply(_running_median)  # each parameter's own, by the one spike rule
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (grads / median).loc[window.index]
    ratio = ratio.where(median.loc[window.index] > 0)
    jumped = []
    for name in ratio.columns:
        over = ratio[name][ratio[name] >= GRAD_SPIKE_FACTOR]
        if not over.empty:
            jumped.append((name, int(over.index[0]), float(ratio[name].loc[over.index[0]])))
    if jumped:
        return sorted(jumped, key=lambda t: (t[1], -t[2]))
    at = ratio.loc[spike].dropna().sort_values(ascending=False).iloc[:3]
    return [(str(n), spike, float(r)) for n, r in at.items() if r > 1]


def detect_divergence(run: Run) -> Finding | None:
    """The loss becomes NaN/Inf, or rises back and stays up: training undoes itself."""
    loss = _loss(run)
    if loss.empty:
        return None
    bad = loss[~np.isfinite(loss)]
    if not bad.empty:
        first = int(bad.index[0])
        before = loss[(loss.index < first) & np.isfinite(loss)]
        last_finite = (
            f"; its last finite value was {_g(float(before.iloc[-1]))} at step {int(before.index[-1])}"
            if not before.empty
            else ""
        )
        summary = (
            f"The loss became {'NaN' if np.isnan(bad.iloc[0]) else 'infinite'} at step {first} "
            f"and is non-finite at {len(bad)} of {len(loss)} recorded steps{last_finite}."
        )
        return Finding(
            "divergence",
            "critical",
            (MODEL_NAME,),
            summary,
            {
                "mode": "nonfinite",
                "first_step": first,
                "nonfinite_steps": len(bad),
                "recorded": len(loss),
            },
        )
    if len(loss) < MIN_LOSS_STEPS:
        return None
    smooth = _smoothed(loss)
    start = float(smooth.iloc[LOSS_WINDOW - 1])  # median of the first LOSS_WINDOW losses
    best_step = int(smooth.idxmin())
    best = float(smooth[best_step])
    end = float(smooth.iloc[-1])
    gained = start - best
    rose = end - best
    if not (best > 0 and end >= DIVERGENCE_FACTOR * best):
        return None
    if not (rose >= DIVERGENCE_GIVEBACK * gained or end > start):
        return None
    summary = (
        f"The loss diverged: from {_g(start)} at the start it fell to {_g(best)} (step "
        f"{best_step}), then rose to {_g(end)} by step {int(smooth.index[-1])} (×{_g(end / best)} "
        f"its best; medians of {LOSS_WINDOW} steps)."
    )
    return Finding(
        "divergence",
        "critical" if end > start else "warning",
        (MODEL_NAME,),
        summary,
        {
            "mode": "rising",
            "start": start,
            "best": best,
            "best_step": best_step,
            "end": end,
            "end_step": int(smooth.index[-1]),
            "threshold_factor": DIVERGENCE_FACTOR,
            "threshold_giveback": DIVERGENCE_GIVEBACK,
        },
    )


def detect_loss_spike(run: Run) -> Finding | None:
    """Single steps whose loss jumps far above its running median."""
    loss = _loss(run)
    loss = loss[np.isfinite(loss)]
    if len(loss) < SPIKE_WINDOW // 2:
        return None
    median = _running_median(loss)
    mad = (loss - median).abs().rolling(SPIKE_WINDOW, min_periods=3).median().shift(1)
    ratio = loss / median
    spikes = (ratio >= LOSS_SPIKE_FACTOR) & (loss - median >= LOSS_SPIKE_MADS * mad) & (median > 0)
    hit = loss[spikes]
    if hit.empty:
        return None
    steps = [int(s) for s in hit.index]
    worst = int(ratio[spikes].idxmax())
    summary = (
        f"The loss jumped to {_g(float(loss[worst]))} at step {worst} (×{_g(float(ratio[worst]))} "
        f"its running median {_g(float(median[worst]))}); {len(steps)} spike(s) in {len(loss)} "
        f"recorded steps, at steps {_steps_text(steps)}."
    )
    return Finding(
        "loss_spike",
        "warning",
        (MODEL_NAME,),
        summary,
        {
            "steps": steps,
            "loss": [float(loss[s]) for s in steps],
            "running_median": [float(median[s]) for s in steps],
            "worst_step": worst,
            "threshold_factor": LOSS_SPIKE_FACTOR,
            "threshold_mads": LOSS_SPIKE_MADS,
        },
    )


def _setbacks(loss: pd.Series) -> tuple[float, list[tuple[int, float, float]]]:
    """The loss's start, and its setbacks: ``(step, best before, loss at the step)``."""
    smooth = _smoothed(loss)
    values, steps = smooth.to_numpy(), smooth.index.to_numpy()
    finite = loss[np.isfinite(loss)]
    start = float(finite.iloc[:LOSS_WINDOW].median())
    best, inside, mark = float(values[0]), False, (0.0, 0.0)
    found: list[tuple[int, float, float]] = []
    for t in range(1, len(values)):
        gained = start - best
        if not inside and gained >= INSTABILITY_LEARNED * start:
            if values[t] - best >= INSTABILITY_GIVEBACK * gained:
                inside, mark = True, (best, gained)
                found.append((int(steps[t]), best, float(finite.loc[steps[t]])))
        elif inside and values[t] <= mark[0] + INSTABILITY_RECOVER * mark[1]:
            inside = False
        if not inside:
            best = min(best, float(values[t]))
    return start, found


def detect_loss_instability(run: Run) -> Finding | None:
    """The loss keeps jumping back towards where it started: progress lost again and again
    (a step size at the edge of stability), not one spike and not a final divergence."""
    loss = _loss(run)
    loss = loss[np.isfinite(loss)]
    if len(loss) < MIN_LOSS_STEPS or float(loss.iloc[:LOSS_WINDOW].median()) <= 0:
        return None
    start, setbacks = _setbacks(loss)
    if len(setbacks) < INSTABILITY_SETBACKS:
        return None
    jumps = ", ".join(f"{_g(b)} → {_g(v)} at step {s}" for s, b, v in setbacks[:4])
    more = f" and {len(setbacks) - 4} more" if len(setbacks) > 4 else ""
    summary = (
        f"The loss keeps jumping back towards its start ({_g(start)}): {len(setbacks)} times it "
        f"gave back at least {INSTABILITY_GIVEBACK:.0%} of what it had gained ({jumps}{more}; "
        f"best level before the jump → loss at it). The steps are at the edge of stability."
    )
    return Finding(
        "loss_instability",
        "critical" if len(setbacks) >= INSTABILITY_CRITICAL_SETBACKS else "warning",
        (MODEL_NAME,),
        summary,
        {
            "start": start,
            "steps": [s for s, _, _ in setbacks],
            "best_before": [b for _, b, _ in setbacks],
            "loss": [v for _, _, v in setbacks],
            "threshold_learned": INSTABILITY_LEARNED,
            "threshold_giveback": INSTABILITY_GIVEBACK,
            "threshold_setbacks": INSTABILITY_SETBACKS,
        },
    )


def detect_oscillation(run: Run) -> Finding | None:
    """The loss goes up and down in a rhythm (anti-correlated with itself), with large swings."""
    loss = _loss(run)
    loss = loss[np.isfinite(loss)]
    if len(loss) < MIN_LOSS_STEPS:
        return None
    span = 2 * LOSS_WINDOW + 1
    trend = loss.rolling(span, center=True, min_periods=span).mean()
    resid = (loss - trend).dropna()
    if len(resid) < MIN_LOSS_STEPS // 2 or float(resid.std()) == 0:
        return None
    values = resid.to_numpy() - resid.mean()
    denom = float((values**2).sum())
    autocorr = {
        lag: float((values[:-lag] * values[lag:]).sum()) / denom
        for lag in range(1, LOSS_WINDOW + 1)
    }
    lag = min(autocorr, key=autocorr.__getitem__)
    level = float(np.median(np.abs(loss.loc[resid.index])))
    amplitude = float(resid.std()) / level if level > 0 else math.inf
    if autocorr[lag] > OSCILLATION_AUTOCORR or amplitude < OSCILLATION_AMPLITUDE:
        return None
    summary = (
        f"The loss oscillates: it swings by ±{amplitude:.0%} of its level ({_g(level)}) around "
        f"its trend, up and down with a period of about {2 * lag} steps (autocorrelation "
        f"{autocorr[lag]:.2f} at lag {lag}), over steps {int(resid.index[0])}–"
        f"{int(resid.index[-1])}."
    )
    return Finding(
        "oscillation",
        "warning",
        (MODEL_NAME,),
        summary,
        {
            "autocorrelation": autocorr[lag],
            "lag": lag,
            "period": 2 * lag,
            "amplitude": amplitude,
            "level": level,
            "first_step": int(resid.index[0]),
            "last_step": int(resid.index[-1]),
            "threshold_autocorr": OSCILLATION_AUTOCORR,
            "threshold_amplitude": OSCILLATION_AMPLITUDE,
        },
    )


def detect_plateau(run: Run) -> Finding | None:
    """The loss stopped decreasing while still far from where it started: it is not learning."""
    loss = _loss(run)
    loss = loss[np.isfinite(loss)]
    if len(loss) < MIN_LOSS_STEPS:
        return None
    start = float(loss.iloc[:LOSS_WINDOW].median())
    half = loss.iloc[len(loss) // 2 :]
    quarter = len(half) // 2
    before, after = float(half.iloc[:quarter].median()), float(half.iloc[quarter:].median())
    if start <= 0 or after < before * (1 - PLATEAU_DECREASE) or after < PLATEAU_LEVEL * start:
        return None
    summary = (
        f"The loss has not decreased over the last {len(half)} recorded steps (steps "
        f"{int(half.index[0])}–{int(half.index[-1])}: median {_g(before)}, then {_g(after)}), at "
        f"{after / start:.0%} of its starting level {_g(start)}: the model is not learning."
    )
    return Finding(
        "plateau",
        "warning",
        (MODEL_NAME,),
        summary,
        {
            "start": start,
            "before": before,
            "after": after,
            "first_step": int(half.index[0]),
            "last_step": int(half.index[-1]),
            "threshold_decrease": PLATEAU_DECREASE,
            "threshold_level": PLATEAU_LEVEL,
        },
    )

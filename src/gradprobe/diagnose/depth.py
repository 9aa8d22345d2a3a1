"""Depth and the error signal: the depth profile, and vanishing over depth and through time.

See the package's docstring for how depth is read (the error signal at the layers with
weights, on the signal path, in forward order).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..run import Run
from .findings import Finding
from .selectors import (
    _g,
    _off_signal_path,
    _recent,
    _since,
    _table,
    _under,
    is_weight_layer,
    norm_modules,
)
from .sequence import vanishing_time_error
from .thresholds import (
    CARRY_CRITICAL_LOG10,
    CARRY_GATE_MEAN,
    CARRY_MEMORY_STEPS,
    MIN_DEPTH_LAYERS,
    TIME_ERROR_DECAY,
    VANISHING_CRITICAL_RATIO,
    VANISHING_FACTOR,
    VANISHING_RATIO,
)

# The smallest positive float32: an error norm of 0 means every entry underflowed.
_FLOAT32_TINY = 1.4e-45


@dataclass(frozen=True)
class DepthProfile:
    """The error signal over depth: layers with weights, input first.

    ``error`` holds the median over steps of each layer's ‖dL/dz‖; ``factor`` is the
    fitted per-layer change toward the input (< 1 shrinks, > 1 grows); ``ratio`` is
    first/last; ``r2`` how well a constant factor explains the profile.
    """

    layers: tuple[str, ...]
    error: tuple[float, ...]
    factor: float
    ratio: float
    r2: float
    fitted_layers: int
    steps: int

    @property
    def first(self) -> str:
        return self.layers[0]

    @property
    def last(self) -> str:
        return self.layers[-1]

    def evidence(self) -> dict[str, object]:
        """The profile's numbers as a finding's evidence (vanishing and exploding alike)."""
        return {
            "factor_per_layer": self.factor,
            "first_last_ratio": self.ratio,
            "first": self.first,
            "last": self.last,
            "r2": self.r2,
            "layers": list(self.layers),
            "error_norm": list(self.error),
        }


def depth_profile(run: Run, first_steps: int | None = None) -> DepthProfile | None:
    """The error signal at each layer with weights, and its fitted per-layer factor.

    ``first_steps``: only the first recorded steps (1: the network as initialised).
    ``None`` when ``error_norm`` was not recorded or fewer than two layers have it.
    """
    table = _table(run, "error_norm")
    if first_steps is not None:
        table = table.iloc[:first_steps]
    if table.empty:
        return None
    # The probed root ("", a model with parameters of its own such as a ViT's class token)
    # is the whole network, not a layer at some depth.
    off_path = _off_signal_path(run)
    modules = [n for n in run.modules if n and n in table.columns and not _under(n, off_path)]
    norms = norm_modules(run)
    layers = [n for n in modules if is_weight_layer(run.module_info(n), norms)]
    if len(layers) < 2:  # no layers with weights (all functional?): every module, as recorded
        layers = modules
    if len(layers) < 2:
        return None
    values = table[layers].to_numpy(dtype=float)
    values = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(divide="ignore"):
        logs = np.log10(np.maximum(values, _FLOAT32_TINY))
    with warnings.catch_warnings():  # a layer whose signal is NaN/Inf at every step: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        med = (
            np.nanmedian(logs, axis=0) if np.isfinite(logs).any() else np.full(len(layers), np.nan)
        )
    keep = np.isfinite(med)
    if keep.sum() < 2:
        return None
    layers = [n for n, k in zip(layers, keep) if k]
    med = med[keep]
    error = 10.0**med
    error = np.where(error <= _FLOAT32_TINY * 1.0001, 0.0, error)
    positive = error > 0
    depth = np.arange(len(layers), dtype=float)
    factor, r2 = math.nan, math.nan
    if positive.sum() >= 2:
        x, y = depth[positive], med[positive]
        slope, intercept = np.polyfit(x, y, 1)
        factor = float(10.0 ** (-slope))  # slope is per layer toward the output
        resid = y - (slope * x + intercept)
        total = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    last = error[-1]
    ratio = float(error[0] / last) if last > 0 else math.inf
    return DepthProfile(
        tuple(layers),
        tuple(float(e) for e in error),
        factor,
        ratio,
        r2,
        int(positive.sum()),
        len(table),
    )


# ---------------------------------------------------------------- detectors
def detect_vanishing(run: Run) -> Finding | None:
    """The error signal shrinks by a steady factor per layer toward the input (depth), a
    gated recurrent module's carry gates cut it at every step back (time), or a recurrent
    output's error signal itself falls over its positions going back (time_error)."""
    names: list[str] = []
    sentences: list[str] = []
    evidence: dict[str, Any] = {"modes": []}
    critical = False
    p = depth_profile(run)
    if (
        p is not None
        and p.fitted_layers >= MIN_DEPTH_LAYERS
        and p.ratio <= VANISHING_RATIO
        and p.factor < VANISHING_FACTOR
    ):
        last = p.error[-1]
        names += [n for n, e in zip(p.layers, p.error) if e < VANISHING_RATIO * last]
        critical |= p.ratio <= VANISHING_CRITICAL_RATIO
        evidence["modes"].append("depth")
        evidence.update(
            p.evidence(),
            steps=p.steps,
            threshold_ratio=VANISHING_RATIO,
            threshold_factor=VANISHING_FACTOR,
        )
        sentences.append(
            f"The error signal shrinks ×{_g(p.factor)} per layer toward the input "
            f"(fitted over {p.fitted_layers} layers with weights, R² = {p.r2:.2f}); layer "
            f"`{p.first}` receives {_g(p.ratio)} of what `{p.last}` receives, and {len(names)} "
            f"of {len(p.layers)} layers get less than {_g(VANISHING_RATIO)} of it."
        )
    through_time = _vanishing_through_time(run)
    if through_time:
        evidence["modes"].append("time")
        evidence["through_time"] = through_time
        evidence.update(
            threshold_memory_steps=CARRY_MEMORY_STEPS, threshold_gate_mean=CARRY_GATE_MEAN
        )
        for name, t in through_time.items():
            names.append(name)
            critical |= t["log10_carried"] <= CARRY_CRITICAL_LOG10
            sentences.append(
                f"`{name}`'s {t['gate']} gates average {_g(t['carry_gate_mean'])}: the "
                f"{t['path']} carries the error signal back ≈{_g(t['memory_steps'])} steps "
                f"(it falls by e each {_g(t['memory_steps'])} steps), on sequences of "
                f"{_g(t['seq_len'])}: across one, it is multiplied by "
                f"≈1e{t['log10_carried']:.0f}."
            )
    time_error = vanishing_time_error(run)
    if time_error:
        evidence["modes"].append("time_error")
        evidence["time_error"] = time_error
        evidence.update(threshold_time_ratio=VANISHING_RATIO, threshold_decay=TIME_ERROR_DECAY)
        for name, t in time_error.items():
            names += [name] if name not in names else []
            critical |= t["first_last_ratio"] <= VANISHING_CRITICAL_RATIO
            per_step = (
                f", ≈{t['decades_per_step']:.2g} decade(s) lost per step back"
                if math.isfinite(t["decades_per_step"])
                else ""
            )
            sentences.append(
                f"Through time in `{name}`: the error signal ‖dL/dy[:, t]‖ averages "
                f"{_g(t['error_first'])} over the first quarter of the sequence against "
                f"{_g(t['error_last'])} over the last (×{_g(t['first_last_ratio'])}"
                f"{per_step}): the first positions hardly learn from the loss."
            )
    if "depth" in evidence["modes"]:
        _theory_beside(run, sentences, evidence)
    if not sentences:
        return None
    return Finding(
        "vanishing",
        "critical" if critical else "warning",
        tuple(names),
        " ".join(sentences),
        evidence,
    )


def _theory_beside(run: Run, sentences: list[str], evidence: dict[str, Any]) -> None:
    """The theory's prediction for this model at init beside the first recorded step
    (``theory.compare``: "theory: ×0.57 per layer; measured at step 0: ×0.571"), where the
    run holds one; evidence["theory"] gets the numbers. Never fails the diagnosis."""
    try:
        from ..theory.model import compare

        c = compare(run)
    except Exception:  # an unreadable prediction is no reason to lose the finding
        return
    if not c.covered or not c.line:
        return
    evidence["theory"] = {
        "predicted_per_layer": c.predicted_per_layer,
        "measured_per_layer": c.measured_per_layer,
        "step": c.step,
    }
    sentences.append(f"At initialisation, {c.line} (mean-field theory, this model's weights).")


def _vanishing_through_time(run: Run) -> dict[str, dict[str, Any]]:
    """Gated recurrent modules whose carry gates forget within a step (see
    ``CARRY_MEMORY_STEPS``): per module, medians over the last half of the steps."""
    memory, gate, length = (_table(run, s) for s in ("memory_steps", "carry_gate_mean", "seq_len"))
    if memory.empty or gate.empty or length.empty:
        return {}
    memory_now, gate_now, length_now = (_recent(t).median() for t in (memory, gate, length))
    found: dict[str, dict[str, Any]] = {}
    for name in run.modules:
        if not all(name in t.index for t in (memory_now, gate_now, length_now)):
            continue
        m, g, n = float(memory_now[name]), float(gate_now[name]), float(length_now[name])
        if not (m < CARRY_MEMORY_STEPS and g < CARRY_GATE_MEAN and n > 1):
            continue
        # ∏ f over the seq_len − 1 steps between the last position and the first.
        log10_carried = -(n - 1) / m / math.log(10) if m > 0 else -math.inf
        if log10_carried > math.log10(VANISHING_RATIO):
            continue
        gru = "GRU" in str(run.module_info(name).get("type", ""))
        found[name] = {
            "carry_gate_mean": g,
            "memory_steps": m,
            "seq_len": n,
            "log10_carried": log10_carried,
            "gate": "update" if gru else "forget",
            "path": "leaky path of the hidden state" if gru else "cell state",
            "since_step": _since(-memory[name], -CARRY_MEMORY_STEPS, strict=True),
        }
    return found

"""diagnose: from recorded statistics to findings, each with its numbers and ranked remedies.

Every detector is a pure function of a :class:`~gradprobe.run.Run` (its long-form
frame and its meta) that returns a :class:`Finding` or ``None``; they are listed, as
data, in :data:`DETECTORS`. :func:`diagnose` runs them all, attaches the remedies
that fit the model (:func:`gradprobe.remedies.rank_remedies`) and returns a
:class:`Findings` list, most severe first.

How depth is read
-----------------
Vanishing and exploding are judged on ``error_norm``, the back-propagated signal
‖dL/d(output)‖, not on weight-gradient norms: under Glorot's "standard" init with
zero biases a 50-layer tanh net loses ~12 decades of error signal while its weight
gradients stay flat across layers. To compare like with like, the *depth profile*
takes the error signal at the output of each **layer with weights** (Linear, Conv,
recurrent, embedding; normalisation layers left out) on the path the error signal takes
(parallel branches such as LoRA adapters, and parametrizations, listed in the run's meta
``architecture``, left out), in forward execution order:
that is dL/dz, the pre-activation error each weight gradient is built from
(dL/dW = dL/dz · xᵀ). Per layer, the median over the recorded steps of log10
‖dL/dz‖ is used (robust to a single odd batch), and a least-squares line over depth
gives the factor by which the signal changes per layer toward the input.

Thresholds are the named constants below, each with its reason; ``docs/findings.md``
lists them.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from html import escape
from typing import Any

import numpy as np
import pandas as pd

from ._views import view
from .errors import GradprobeError
from .remedies import RankedRemedy, Remedy, model_profile, rank_remedies
from .run import Run, load
from .stats import MODEL_NAME
from .story import tell

__all__ = [
    "CARRY_GATE_MEAN",
    "CARRY_MEMORY_STEPS",
    "CLIPPED_FRAC",
    "DEAD_CHANNEL_FRAC",
    "DEAD_UNIT_FRAC",
    "DETECTORS",
    "DIVERGENCE_FACTOR",
    "DIVERGENCE_GIVEBACK",
    "EXPLODING_FACTOR",
    "EXPLODING_GROWTH",
    "EXPLODING_RATIO",
    "FINDINGS_JSON_SCHEMA",
    "GRAD_SPIKE_FACTOR",
    "INSTABILITY_GIVEBACK",
    "INSTABILITY_LEARNED",
    "INSTABILITY_RECOVER",
    "INSTABILITY_SETBACKS",
    "LOSS_SPIKE_FACTOR",
    "LOSS_SPIKE_MADS",
    "LOSS_WINDOW",
    "MIN_DEPTH_LAYERS",
    "MIN_LOSS_STEPS",
    "NEGATIVE_PREACT_SIGMAS",
    "OSCILLATION_AMPLITUDE",
    "OSCILLATION_AUTOCORR",
    "PLATEAU_DECREASE",
    "PLATEAU_LEVEL",
    "SATURATION_FRAC",
    "SKIPPED_FRAC",
    "SKIPPED_STREAK",
    "SPIKE_WINDOW",
    "STALL_FACTOR",
    "UNSTABLE_UPDATE_RATIO",
    "UNUSED_FRAC",
    "UNUSED_HINTS",
    "UPDATE_RATIO_EXPLODING",
    "VANISHING_FACTOR",
    "VANISHING_RATIO",
    "Checked",
    "DepthProfile",
    "Detector",
    "Finding",
    "Findings",
    "depth_profile",
    "diagnose",
    "key_numbers",
    "no_findings_note",
    "run_facts",
]

# ---------------------------------------------------------------- thresholds
# Vanishing: the first layer with weights receives less than 1/100 of the error signal
# of the last one — two decades lost. Healthy 30-layer nets (He-init ReLU, critical
# tanh, residual ReLU) measure 0.2–1.6; a 20-layer default-init sigmoid net ~1e-12.
VANISHING_RATIO = 1e-2
# ... and the fitted per-layer factor is below 0.9: the loss is a steady shrinkage over
# depth (10% or more per layer), not one bottleneck layer.
VANISHING_FACTOR = 0.9
# Vanishing through time, in a gated recurrent module (LSTM, GRU, their cells): the error
# carried back along the cell (LSTM) or leaky (GRU) path is multiplied by the carry gate at
# every step, so its memory is −1/mean(log f) steps (stat ``memory_steps``). It vanishes when
# that memory is under half a step (the carried error cut by e² ≈ 7 or more per step: forget
# bias 0, PyTorch's default, gives ≈1.4 steps, +1 ≈3, −20 ≈0.05) ...
CARRY_MEMORY_STEPS = 0.5
# ... the arithmetic mean gate is below 0.1 too (units that keep their state, f ≈ 1, lift it:
# a model that carries its memory in a few units is not flagged for the many that forget) ...
CARRY_GATE_MEAN = 0.1
# ... and across the sequence (seq_len − 1 steps back) the carried error falls below
# VANISHING_RATIO, as over depth: two decades lost between the last position and the first.
# Exploding over depth: the first layer receives 10× the last one's error signal, and
# the fitted factor grows it by ≥ 5% per layer. A healthy net does not amplify the
# signal on its way down; a 30-layer tanh net with σ_w² = 4 measures ×1.13/layer, ~40×.
EXPLODING_RATIO = 10.0
EXPLODING_FACTOR = 1.05
# Exploding over steps: the total gradient norm rises 1000-fold above its level in the
# first quarter of the run. Training noise moves it by a few times, not by decades.
EXPLODING_GROWTH = 1e3
# An update as large as the weight itself (‖Δw‖/‖w‖ ≥ 1) replaces the weight in one step.
UPDATE_RATIO_EXPLODING = 1.0
# Updates of ≥ 10% of a weight per step are far above the ~1e-3 that trains stably
# (Karpathy's rule of thumb): the learning rate is too high for that layer.
UNSTABLE_UPDATE_RATIO = 0.1
# A layer is saturated when ≥ 25% of its entries have |f'(z)| < 1% of max |f'| (stats.SAT_THRESHOLD):
# a quarter of its error signal is cut a hundredfold or more.
SATURATION_FRAC = 0.25
# Dead units: ≥ 50% of a layer's features output 0 for every sample over the dead
# window. He-init 30-layer ReLU nets measure up to ~30% per layer (inputs become
# correlated with depth), a ReLU net with bias −10 measures 100%.
DEAD_UNIT_FRAC = 0.5
# Dead channels: a channel is zero at every position of every sample (thousands of
# entries per batch), which chance does not produce, so one dead channel is a finding.
DEAD_CHANNEL_FRAC = 0.0  # strictly above: any dead channel
# Stalled: a weight's update ratio is below 1/1000 of that of the network's active layers
# (the 90th percentile over weights, so that it holds when most layers are stalled): that
# layer learns a thousand times more slowly than the rest.
STALL_FACTOR = 1e-3
STALL_REFERENCE_QUANTILE = 0.9
# Mixed precision: a GradScaler skips the step when the scaled gradients overflow, then
# lowers its scale. A few early skips are how it finds the scale; more than 10% of the
# recorded steps, or 5 in a row, means the gradients themselves overflow.
SKIPPED_FRAC = 0.1
SKIPPED_STREAK = 5
# Clipping that cuts the norm on more than half of the steps sets the step size itself:
# the optimizer mostly sees max_norm, not the gradient.
CLIPPED_FRAC = 0.5
# A parameter the optimizer trains that gets no gradient on more than half of the recorded
# steps: a branch taken now and then (mixture of experts, stochastic depth) misses some
# steps; one that misses most, or all, is cut off from the loss.
UNUSED_FRAC = 0.5
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
# ---- unstable training, read from the logged loss and the global gradient norm over steps
# Running medians are taken over the SPIKE_WINDOW recorded steps before each one (at least
# a quarter of it must be there): long enough that one odd batch does not move them.
SPIKE_WINDOW = 20
# A gradient-norm spike: the pre-clip global norm ≥ 10× its running median. Minibatch noise
# moves it by 2–5× in healthy runs (a 20-layer He-init ReLU MLP at a stable rate: ≤ 5×);
# a deep ReLU net at too high a rate jumps 10–100×.
GRAD_SPIKE_FACTOR = 10.0
# A loss spike: the loss ≥ 3× its running median and ≥ 10 median absolute deviations above
# it. Minibatch losses are skewed (a hard batch doubles the loss of a well-trained model),
# so the factor alone would flag noise near 0; the deviation bound alone, noise of a flat run.
LOSS_SPIKE_FACTOR = 3.0
LOSS_SPIKE_MADS = 10.0
# The loss is judged on medians of LOSS_WINDOW recorded steps (odd batches do not count),
# and only with MIN_LOSS_STEPS recorded losses: fewer say nothing about a trend.
LOSS_WINDOW = 5
MIN_LOSS_STEPS = 20
# Divergence: the smoothed loss ends ≥ 1.5× its best level and has given back at least half
# of what it had gained from the start (or is above the start): noise at a low loss moves it
# a few percent, a run that diverges loses what it learned.
DIVERGENCE_FACTOR = 1.5
DIVERGENCE_GIVEBACK = 0.5
# Oscillation: the loss, less its trend (a running mean of 2·LOSS_WINDOW+1 steps), is
# anti-correlated with itself at some lag ≤ LOSS_WINDOW (autocorrelation ≤ −0.5: it goes up
# and down in a rhythm), with swings ≥ 10% of its level. Minibatch noise is uncorrelated
# (|autocorrelation| ≲ 0.25 over 40+ steps), so it does not read as oscillation.
OSCILLATION_AUTOCORR = -0.5
OSCILLATION_AMPLITUDE = 0.1
# Plateau: over the last half of the run the loss did not decrease by 2% (medians of its
# two quarters), while it is still at ≥ 50% of its starting level: a run that has not
# learned, not one that converged.
PLATEAU_DECREASE = 0.02
PLATEAU_LEVEL = 0.5
# Loss instability: the loss keeps jumping back towards where it started. A setback: the
# smoothed loss (LOSS_WINDOW medians) gives back ≥ 70% of what it had gained, once it had
# gained ≥ 25% of its start; it ends when the loss comes back within 25% of the gain of its
# best. Two setbacks or more make the finding. Calibrated on a 20-layer He-init ReLU MLP on
# digits (SGD, batch 32, 300 steps, 5 seeds each): at lr 0.005 and 0.01 ≤ 1 setback per run;
# at 0.05, 1–2 (4 of 5 runs with 2).
INSTABILITY_LEARNED = 0.25
INSTABILITY_GIVEBACK = 0.7
INSTABILITY_RECOVER = 0.25
INSTABILITY_SETBACKS = 2
# What a loss-based finding says when the loss was not logged.
LOSS_NOT_LOGGED = (
    "needs the loss: call probe.log(loss=loss) at each step (the Lightning and Hugging Face "
    "callbacks log it)"
)
# Depth profiles need at least this many layers with a positive error signal to fit a
# per-layer factor; fewer, and a line through them says nothing about depth.
MIN_DEPTH_LAYERS = 4
# The smallest positive float32: an error norm of 0 means every entry underflowed.
_FLOAT32_TINY = 1.4e-45

SEVERITIES = ("info", "warning", "critical")
_SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}
# Within one severity, causes before consequences.
KIND_ORDER = (
    "nonfinite",
    "exploding",
    "vanishing",
    "saturation",
    "dead_units",
    "dead_channels",
    "stalled",
    "unstable_updates",
    "skipped_steps",
    "clipped",
    "unused_parameters",
    "divergence",
    "grad_norm_spike",
    "loss_instability",
    "loss_spike",
    "oscillation",
    "plateau",
)

_NORM_TYPES = (
    "BatchNorm",
    "SyncBatchNorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "RMSNorm",
    "LocalResponseNorm",
)


# ---------------------------------------------------------------- findings
@dataclass(frozen=True)
class Finding:
    """One diagnosed problem: what (``kind``), how bad, where (``names``), the numbers, the fixes."""

    kind: str
    severity: str
    names: tuple[str, ...]
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remedies: tuple[RankedRemedy, ...] = ()
    # The story (gradprobe.story): the kind of the root finding that explains this one
    # (None: it is a root), and, for a root, the kinds it explains.
    cause: str | None = None
    consequences: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (see :data:`FINDINGS_JSON_SCHEMA`)."""
        return {
            "kind": self.kind,
            "severity": self.severity,
            "names": list(self.names),
            "summary": self.summary,
            "evidence": _jsonable(self.evidence),
            "remedies": [r.to_dict() for r in self.remedies],
            "cause": self.cause,
            "consequences": list(self.consequences),
        }


@dataclass(frozen=True)
class Checked:
    """What a diagnosis looked at: recorded steps, probed modules, statistics, detectors run."""

    steps: int
    modules: int
    statistics: tuple[str, ...]
    detectors: tuple[str, ...]


class Findings(list):  # list[Finding]; a plain list subclass so it prints and compares as one
    """The findings of one run, most severe first; shows as a table in a notebook.

    ``run_name`` names the run; ``skipped`` maps detectors that could not run to why
    (a statistic that was not recorded); ``checked`` says what :func:`diagnose` looked
    at (:class:`Checked`), so that an empty list can say what "no problems" covers.
    """

    def __init__(
        self,
        items: Iterable[Finding] = (),
        *,
        run_name: str = "",
        skipped: dict[str, str] | None = None,
        checked: Checked | None = None,
    ) -> None:
        super().__init__(items)
        self.run_name = run_name
        self.skipped = dict(skipped or {})
        self.checked = checked

    @property
    def kinds(self) -> list[str]:
        return [f.kind for f in self]

    def of(self, kind: str) -> Finding | None:
        """The finding of that kind, if any."""
        return next((f for f in self if f.kind == kind), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run_name,
            "findings": [f.to_dict() for f in self],
            "skipped": dict(self.skipped),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def _repr_html_(self) -> str:
        """The findings in a notebook: a table with their numbers and remedies; never raises
        (Jupyter would print a traceback): on failure, the plain repr and the reason."""
        try:
            return view("findings_html")(self)  # gradprobe.html: data does not import views
        except Exception as exc:  # a display must never raise into Jupyter
            return (
                f"<pre>{escape(list.__repr__(self))}</pre><p>gradprobe could not show these "
                f"findings as HTML ({escape(type(exc).__name__)}: {escape(str(exc))})</p>"
            )


def _statistic_names(names: Iterable[str]) -> list[str]:
    """Statistic names for a sentence: the histogram bins ``hist_00``… as one entry."""
    names = list(names)
    bins = [n for n in names if n.startswith("hist_")]
    shown = [n for n in names if not n.startswith("hist_")]
    if bins:
        shown.append(f"hist_* ({len(bins)} bins)")
    return shown


def no_findings_note(findings: Findings) -> str:
    """The sentence shown when nothing was found: what was checked, and what could not be.

    One text for the report (:func:`findings_html`) and ``gradprobe diagnose``, so that
    "no problems found" always says what it covers.
    """
    note = "no problems found"
    checked = findings.checked
    if checked is not None:
        statistics = _statistic_names(checked.statistics)
        note += (
            f" in {checked.steps} recorded step{'s' if checked.steps != 1 else ''}"
            f" of {checked.modules} module{'s' if checked.modules != 1 else ''}:"
            f" {len(checked.detectors)} detectors ({', '.join(checked.detectors)})"
            f" checked {len(statistics)} statistics ({', '.join(statistics)})"
        )
    if findings.skipped:
        note += (
            f"; {len(findings.skipped)} checks skipped ("
            + "; ".join(f"{k}: {v}" for k, v in findings.skipped.items())
            + ")"
        )
    return note


# ---------------------------------------------------------------- JSON schema
FINDINGS_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "gradprobe diagnose --json",
    "type": "object",
    "required": ["run", "findings", "skipped"],
    "additionalProperties": False,
    "properties": {
        "run": {"type": "string"},
        "skipped": {"type": "object", "additionalProperties": {"type": "string"}},
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["kind", "severity", "names", "summary", "evidence", "remedies"],
                "additionalProperties": False,
                "properties": {
                    "kind": {"type": "string", "enum": list(KIND_ORDER)},
                    "severity": {"type": "string", "enum": list(SEVERITIES)},
                    "names": {"type": "array", "items": {"type": "string"}},
                    "summary": {"type": "string", "minLength": 1},
                    "evidence": {"type": "object"},
                    "cause": {"enum": [*KIND_ORDER, None]},  # a kind, or null for a root
                    "consequences": {
                        "type": "array",
                        "items": {"type": "string", "enum": list(KIND_ORDER)},
                    },
                    "remedies": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["key", "name", "why", "code", "score", "fit"],
                            "additionalProperties": False,
                            "properties": {
                                "key": {"type": "string"},
                                "name": {"type": "string"},
                                "why": {"type": "string"},
                                "code": {"type": "string"},
                                "score": {"type": "number"},
                                "fit": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}


# ---------------------------------------------------------------- helpers
def _jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become None (JSON has no NaN/Inf)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value if value is None or isinstance(value, str) else str(value)


def _g(value: float) -> str:
    """A number for a sentence: 2 significant digits, 0 as 0."""
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2g}"


def _names(names: list[str], limit: int = 4) -> str:
    quoted = [f"`{n}`" for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(quoted) + more


def _table(run: Run, stat: str) -> pd.DataFrame:
    return run.table(stat) if stat in set(run.stats) else pd.DataFrame()


def _recent(table: pd.DataFrame) -> pd.DataFrame:
    """The last half of the recorded steps (at least one): the run's current state."""
    n = len(table)
    return table.iloc[n // 2 :] if n > 1 else table


def _weights(run: Run) -> list[str]:
    """Weight matrices and kernels (≥ 2 dimensions): biases and norm scales start at 0 or 1,
    so their update ratios say little. For the same reason, weights initialised to 0
    (Fixup's and SkipInit's last layer of a residual branch) are left out: growing from 0,
    ‖Δw‖/‖w‖ is ∞, then about 1/steps, which is growth, not instability."""
    weights = [p["name"] for p in run.meta.get("parameters", []) if len(p.get("shape", [])) >= 2]
    norms = _table(run, "param_norm")
    if norms.empty:
        return weights
    first = norms.iloc[0]
    return [w for w in weights if not (w in first.index and first[w] == 0)]


def _since(series: pd.Series, threshold: float, strict: bool = False) -> int | None:
    """First step of the trailing streak where ``series`` is ≥ (or >) ``threshold``."""
    values = series.dropna()
    ok = (values > threshold) if strict else (values >= threshold)
    if ok.empty or not bool(ok.iloc[-1]):
        return None
    bad = np.nonzero(~ok.to_numpy())[0]
    start = bad[-1] + 1 if len(bad) else 0
    return int(values.index[start])


def _is_weight_layer(info: dict[str, Any]) -> bool:
    t = str(info.get("type", ""))
    return int(info.get("parameters", 0) or 0) > 0 and not any(t.startswith(n) for n in _NORM_TYPES)


# ---------------------------------------------------------------- depth profile
def _off_signal_path(run: Run) -> tuple[str, ...]:
    """Modules not on the path the error signal takes through depth (meta["architecture"]):
    parallel branches added to another module's output (adapters such as LoRA's A and B),
    and parametrizations (their output is a weight, not a signal)."""
    arch = run.meta.get("architecture") or {}
    return tuple(str(n) for key in ("branches", "parametrizations") for n in arch.get(key) or ())


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


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
    layers = [n for n in modules if _is_weight_layer(run.module_info(n))]
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
    """The error signal shrinks by a steady factor per layer toward the input (depth), or
    a gated recurrent module's carry gates cut it at every step back (through time)."""
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
        critical |= p.ratio <= 1e-6
        evidence["modes"].append("depth")
        evidence.update(
            factor_per_layer=p.factor,
            first_last_ratio=p.ratio,
            first=p.first,
            last=p.last,
            r2=p.r2,
            layers=list(p.layers),
            error_norm=list(p.error),
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
            critical |= t["log10_carried"] <= -6
            sentences.append(
                f"`{name}`'s {t['gate']} gates average {_g(t['carry_gate_mean'])}: the "
                f"{t['path']} carries the error signal back ≈{_g(t['memory_steps'])} steps "
                f"(it falls by e each {_g(t['memory_steps'])} steps), on sequences of "
                f"{_g(t['seq_len'])}: across one, it is multiplied by "
                f"≈1e{t['log10_carried']:.0f}."
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
        from .theory.model import compare

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


def _total_grad_norm(run: Run) -> pd.Series:
    # Clipping hides growth from the norm the optimizer sees: read it before clipping.
    preclip = run.model_series("global_grad_norm_preclip")
    if not preclip.empty:
        return preclip.where(np.isfinite(preclip), np.inf)
    table = _table(run, "grad_norm")
    if table.empty:
        return pd.Series(dtype=float)
    values = table.to_numpy(dtype=float)
    # A NaN/Inf gradient is an infinitely large one for this purpose.
    values = np.where(np.isfinite(values), values, np.inf)
    total = np.sqrt(np.nansum(np.square(values), axis=1))
    return pd.Series(total, index=table.index)


def detect_exploding(run: Run) -> Finding | None:
    """The error signal grows per layer toward the input, or over steps; or updates swamp weights."""
    sentences: list[str] = []
    names: list[str] = []
    evidence: dict[str, Any] = {"modes": []}
    critical = False

    p = depth_profile(run)
    if (
        p is not None
        and p.fitted_layers >= MIN_DEPTH_LAYERS
        and p.ratio >= EXPLODING_RATIO
        and p.factor >= EXPLODING_FACTOR
    ):
        last = p.error[-1]
        grown = [n for n, e in zip(p.layers, p.error) if e >= EXPLODING_RATIO * last]
        names += grown
        critical |= p.ratio >= 1e6
        evidence["modes"].append("depth")
        evidence.update(
            factor_per_layer=p.factor,
            first_last_ratio=p.ratio,
            first=p.first,
            last=p.last,
            r2=p.r2,
            layers=list(p.layers),
            error_norm=list(p.error),
        )
        sentences.append(
            f"The error signal grows ×{_g(p.factor)} per layer toward the input (fitted over "
            f"{p.fitted_layers} layers with weights); layer `{p.first}` receives {_g(p.ratio)}× "
            f"what `{p.last}` receives."
        )
    else:
        # At init: a net without normalisation that explodes there (a deep residual net
        # with He-init branches: ×√2 per block) is changed within a few steps (its huge
        # first updates kill units), so the median over steps no longer shows it.
        p0 = depth_profile(run, first_steps=1)
        if (
            p0 is not None
            and p0.fitted_layers >= MIN_DEPTH_LAYERS
            and p0.ratio >= EXPLODING_RATIO
            and p0.factor >= EXPLODING_FACTOR
        ):
            last = p0.error[-1]
            names += [n for n, e in zip(p0.layers, p0.error) if e >= EXPLODING_RATIO * last]
            critical |= p0.ratio >= 1e6
            evidence["modes"].append("init")
            evidence.update(
                factor_per_layer=p0.factor,
                first_last_ratio=p0.ratio,
                first=p0.first,
                last=p0.last,
                r2=p0.r2,
                layers=list(p0.layers),
                error_norm=list(p0.error),
                init_step=int(run.steps[0]),
            )
            sentences.append(
                f"At the first recorded step (step {int(run.steps[0])}) the error signal grows "
                f"×{_g(p0.factor)} per layer toward the input (fitted over {p0.fitted_layers} "
                f"layers with weights); layer `{p0.first}` receives {_g(p0.ratio)}× what "
                f"`{p0.last}` receives."
            )

    total = _total_grad_norm(run)
    if len(total) >= 3:
        n_base = max(1, len(total) // 4)
        base = float(np.median(total.iloc[:n_base]))
        later = total.iloc[n_base:]
        peak = float(later.max())
        growth = peak / base if base > 0 else (math.inf if peak > 0 else 0.0)
        if growth >= EXPLODING_GROWTH:
            peak_step = int(later.idxmax())
            critical |= growth >= 1e6
            evidence["modes"].append("steps")
            evidence.update(
                grad_norm_growth=growth,
                grad_norm_start=base,
                grad_norm_peak=peak,
                peak_step=peak_step,
            )
            sentences.append(
                f"The total gradient norm rises from {_g(base)} over the first {n_base} recorded "
                f"steps to {_g(peak)} at step {peak_step} (×{_g(growth)})."
            )

    updates = _table(run, "update_ratio")
    weights = [w for w in _weights(run) if w in updates.columns]
    if weights:
        worst = updates[weights].replace([np.inf], np.nan).max()
        huge = worst[worst >= UPDATE_RATIO_EXPLODING].sort_values(ascending=False)
        if not huge.empty:
            first_step = int(updates[huge.index].ge(UPDATE_RATIO_EXPLODING).any(axis=1).idxmax())
            names += [n for n in huge.index if n not in names]
            critical |= float(huge.iloc[0]) >= 10
            evidence["modes"].append("updates")
            evidence.update(
                update_ratio_max=float(huge.iloc[0]),
                update_ratio_params=list(huge.index),
                update_ratio_first_step=first_step,
            )
            sentences.append(
                f"{len(huge)} weight(s) took an update at least as large as the weight itself "
                f"(‖Δw‖/‖w‖ up to {_g(float(huge.iloc[0]))} at `{huge.index[0]}`, first at step "
                f"{first_step})."
            )
    if sentences:
        _theory_beside(run, sentences, evidence)
    if not sentences:
        return None
    return Finding(
        "exploding",
        "critical" if critical else "warning",
        tuple(names),
        " ".join(sentences),
        evidence,
    )


def detect_nonfinite(run: Run) -> Finding | None:
    """NaN/Inf: the first step, and the first layer, where it appears, and in which pass:
    a forward output, or a backward signal (born in the module's own backward, or
    arriving from above it)."""
    first = run.first_nonfinite()
    if first is None:
        first = _first_nonfinite_value(run)
    if first is None:
        return None
    step, name, stat = first
    frame = run.frame()
    at = frame[
        (frame["step"] == step)
        & frame["stat"].isin(["nonfinite", "error_nonfinite"])
        & (frame["value"] > 0)
    ]
    count = at[(at["name"] == name) & (at["stat"] == stat)]["value"]
    where = {
        "nonfinite": "the forward output of" if name in run.modules else "the gradient of",
        "error_nonfinite": "the backward error signal (dL/d output) that reaches",
        "error_gain": "the backward pass of",
    }.get(stat, f"the {stat} of")
    origin = "forward" if stat == "nonfinite" and name in run.modules else "backward"
    if stat == "error_gain":
        where_detail = (
            ": its dL/d(output) is finite, the gradient it sends to its input is not "
            "(a forward that is finite but a backward that is not, e.g. the sqrt of a "
            "negative in an untaken torch.where branch)"
        )
    elif stat == "error_nonfinite":
        where_detail = (
            ": it is non-finite already above it (the loss, or code between it and the "
            "next probed module)"
        )
    else:
        where_detail = ""
    affected = sorted(
        set(at["name"]) | {name}, key=lambda n: (run.modules + run.parameters + [n]).index(n)
    )
    summary = (
        f"NaN/Inf first appears at step {step} in {where} `{name}`"
        + (f" ({int(count.iloc[0])} entries)" if not count.empty else "")
        + where_detail
        + f"; {len(affected)} module(s)/parameter(s) are non-finite at that step."
    )
    return Finding(
        "nonfinite",
        "critical",
        (name,),
        summary,
        {
            "step": step,
            "name": name,
            "stat": stat,
            "origin": origin,
            "affected": affected,
            "count": float(count.iloc[0]) if not count.empty else None,
        },
    )


def _first_nonfinite_value(run: Run) -> tuple[int, str, str] | None:
    """Without NaN/Inf counts: the first statistic whose value itself is not finite."""
    frame = run.frame()
    bad = frame[~np.isfinite(frame["value"].to_numpy()) & ~frame["stat"].isin(["update_ratio"])]
    if bad.empty:
        return None
    step = int(bad["step"].min())
    at = bad[bad["step"] == step]
    order = {n: i for i, n in enumerate(run.modules + run.parameters)}
    row = min(at.itertuples(), key=lambda r: order.get(r.name, len(order)))
    return step, str(row.name), str(row.stat)


def detect_saturation(run: Run) -> Finding | None:
    """Layers whose activations sit where f'(z) is almost 0 for much of the batch."""
    table = _table(run, "sat_frac")
    if table.empty:
        return None
    current = _recent(table).median()
    hit = [n for n in run.modules if n in current.index and current[n] >= SATURATION_FRAC]
    if not hit:
        return None
    since = {n: _since(table[n], SATURATION_FRAC) for n in hit}
    worst = max(hit, key=lambda n: current[n])
    severity = "critical" if current[worst] >= 0.75 else "warning"
    summary = (
        f"{len(hit)} activation layer(s) are saturated: {_names(hit)}; in `{worst}` "
        f"{current[worst]:.0%} of the entries have |f'(z)| below 1% of its maximum "
        f"(threshold {SATURATION_FRAC:.0%})"
        + (f", since step {since[worst]}." if since[worst] is not None else ".")
    )
    return Finding(
        "saturation",
        severity,
        tuple(hit),
        summary,
        {
            "sat_frac": {n: float(current[n]) for n in hit},
            "since_step": since,
            "threshold": SATURATION_FRAC,
        },
    )


def _unit_kind(run: Run, name: str) -> str:
    """'channel' when the module's output is a conv feature map, else 'unit' (features).

    The Probe records what each module's units resolved to (meta ``units``). Runs
    without it: element-wise modules inherit from the nearest earlier layer with weights
    (or a Flatten) in forward order, as norms and pools keep the layout they receive.
    """
    recorded = run.module_info(name).get("units")
    if recorded is not None:
        return "channel" if recorded == "channel" else "unit"
    order = run.modules
    i = order.index(name) if name in order else -1
    for j in range(i, -1, -1):
        info = run.module_info(order[j])
        t = str(info.get("type", ""))
        if t.startswith("Conv"):
            return "channel"
        if t == "Flatten" or (info.get("layout") == "last" and not t.startswith(_NORM_TYPES)):
            return "unit"
    return "unit"


def _dead_state(run: Run) -> tuple[pd.Series, pd.DataFrame, str] | None:
    """Current dead fraction per module, the per-batch series, and which statistic decided."""
    per_batch = _table(run, "dead_frac")
    window = _table(run, "dead_window_frac")
    if per_batch.empty and window.empty:
        return None
    if not window.empty:
        # Already "0 in every batch of the last `dead_window` steps": take its latest value.
        current = window.ffill().iloc[-1]
        source = "dead_window_frac"
    else:
        # Without the window, a unit counts as dead if it was 0 in every recent batch.
        current = _recent(per_batch).min()
        source = "dead_frac"
    return current, per_batch if not per_batch.empty else window, source


def _candidates(run: Run, names: Iterable[str]) -> list[str]:
    """Activation modules that can die when the model has any; otherwise every module."""
    from .activations import ACTIVATIONS

    names = list(names)
    acts = [
        n
        for n in names
        if (a := run.module_info(n).get("activation")) in ACTIVATIONS and ACTIVATIONS[a].can_die
    ]
    return acts or names


def _detect_dead(run: Run, kind: str) -> Finding | None:
    state = _dead_state(run)
    if state is None:
        return None
    current, series, source = state
    want = "channel" if kind == "dead_channels" else "unit"
    threshold = DEAD_CHANNEL_FRAC if want == "channel" else DEAD_UNIT_FRAC
    strict = want == "channel"
    names = [n for n in run.modules if n in current.index and math.isfinite(current[n])]
    names = [n for n in _candidates(run, names) if _unit_kind(run, n) == want]
    hit = [n for n in names if (current[n] > threshold if strict else current[n] >= threshold)]
    if not hit:
        return None
    since = {n: _since(series[n], threshold, strict) if n in series.columns else None for n in hit}
    worst = max(hit, key=lambda n: current[n])
    word = "channels" if want == "channel" else "units"
    fed_by = {n: _fed_by(run, n) for n in hit}
    # Only where the layer with weights feeds the activation directly (no norm between):
    # then its recorded output is the activation's input.
    order = run.modules
    direct = {
        n: f for n, f in fed_by.items() if f and n in order and order[order.index(n) - 1] == f
    }
    negative = _negative_inputs(run, direct)
    severity = "critical" if current[worst] >= 0.9 else "warning"
    rule = (
        f"0 at every position of every sample over the last "
        f"{run.meta.get('probe', {}).get('dead_window', '?')} recorded steps"
        if source == "dead_window_frac"
        else "0 for every sample of each recent batch"
    )
    summary = (
        f"{len(hit)} layer(s) have dead {word}: {_names(hit)}; in `{worst}` "
        f"{current[worst]:.0%} of the {word} are {rule}"
        + (f", since step {since[worst]}" if since[worst] is not None else "")
        + (f" (fed by `{fed_by[worst]}`)." if fed_by[worst] else ".")
    )
    if negative:
        # What the run measured at the layer feeding them: the evidence, and where to look.
        layer, (mean, std) = next(iter(negative.items()))
        summary += (
            f" Every pre-activation of `{layer}` is negative: mean {mean:.3g}, std {std:.2g} "
            f"(recorded output of `{layer}`): check its bias and initialisation, or the step "
            "size that drove it there."
        )
    return Finding(
        kind,
        severity,
        tuple(hit),
        summary,
        {
            "dead_frac": {n: float(current[n]) for n in hit},
            "since_step": since,
            "fed_by": fed_by,
            "statistic": source,
            "threshold": threshold,
            "negative_preactivation": {
                layer: {"mean": mean, "std": std} for layer, (mean, std) in negative.items()
            },
        },
    )


# Every pre-activation negative: the mean lies this many standard deviations below 0
# (for a Gaussian, 1 entry in 3.5 million above 0 at 5σ): a ReLU after it outputs 0.
NEGATIVE_PREACT_SIGMAS = 5.0


def _negative_inputs(run: Run, fed_by: dict[str, str]) -> dict[str, tuple[float, float]]:
    """Layers feeding dead units whose recorded outputs (act_mean, act_std; medians over
    the recent steps) lie wholly below 0: ``{layer: (mean, std)}``, most negative first."""
    means, stds = _table(run, "act_mean"), _table(run, "act_std")
    if means.empty or stds.empty:
        return {}
    mean_now, std_now = _recent(means).median(), _recent(stds).median()
    found: dict[str, tuple[float, float]] = {}
    for layer in dict.fromkeys(fed_by.values()):
        if layer not in mean_now.index or layer not in std_now.index:
            continue
        m, sd = float(mean_now[layer]), float(std_now[layer])
        if math.isfinite(m) and math.isfinite(sd) and m < 0 and m + NEGATIVE_PREACT_SIGMAS * sd < 0:
            found[layer] = (m, sd)
    return dict(sorted(found.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-30)))


def _fed_by(run: Run, name: str) -> str | None:
    """The nearest earlier layer with weights: where the dead units' inputs come from."""
    order = run.modules
    if name not in order:
        return None
    for j in range(order.index(name) - 1, -1, -1):
        if _is_weight_layer(run.module_info(order[j])):
            return order[j]
    return None


def detect_dead_units(run: Run) -> Finding | None:
    """Features that output 0 for every sample: no error signal flows back through them."""
    return _detect_dead(run, "dead_units")


def detect_dead_channels(run: Run) -> Finding | None:
    """Conv channels that are 0 at every position of every sample."""
    return _detect_dead(run, "dead_channels")


def _update_medians(run: Run) -> pd.Series:
    updates = _table(run, "update_ratio")
    weights = [w for w in _weights(run) if w in updates.columns]
    if not weights:
        return pd.Series(dtype=float)
    return _recent(updates[weights]).replace([np.inf, -np.inf], np.nan).median().dropna()


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
    severity = "critical" if len(stalled) >= len(med) / 2 else "warning"
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
        "critical" if count / total > 0.5 else "warning",
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


# ---------------------------------------------------------------- unstable training
def _running_median(series: pd.Series) -> pd.Series:
    """The median of the SPIKE_WINDOW values before each one (NaN where too few)."""
    finite = series.where(np.isfinite(series))
    return finite.rolling(SPIKE_WINDOW, min_periods=max(3, SPIKE_WINDOW // 4)).median().shift(1)


def _steps_text(steps: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f" and {len(steps) - limit} more" if len(steps) > limit else "")


def _loss(run: Run) -> pd.Series:
    return run.model_series("loss")


def _smoothed(loss: pd.Series) -> pd.Series:
    """Running median of LOSS_WINDOW steps, ending at each step (finite losses only)."""
    finite = loss[np.isfinite(loss)]
    return finite.rolling(LOSS_WINDOW, min_periods=1).median()


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
        "critical" if float(ratio[worst]) >= 100 or len(steps) >= 5 else "warning",
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
    median = (
        grads.where(np.isfinite(grads))
        .rolling(SPIKE_WINDOW, min_periods=max(3, SPIKE_WINDOW // 4))
        .median()
        .shift(1)
    )
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
        "critical" if len(setbacks) >= 2 * INSTABILITY_SETBACKS else "warning",
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


@dataclass(frozen=True)
class Detector:
    """A registered check: the finding kind it produces, the function, the statistics it reads."""

    kind: str
    fn: Callable[[Run], Finding | None]
    requires: tuple[str, ...]  # any one of them suffices
    doc: str
    # Why it was skipped when none of ``requires`` is in the run, for values the Probe
    # cannot measure itself (the loss): they are logged, not recorded by a preset.
    unrecorded: str = ""


DETECTORS: dict[str, Detector] = {
    d.kind: d
    for d in [
        Detector(
            "nonfinite",
            detect_nonfinite,
            ("nonfinite", "error_nonfinite", "error_norm", "grad_norm"),
            "first step and first layer where NaN/Inf appears",
        ),
        Detector(
            "exploding",
            detect_exploding,
            ("error_norm", "grad_norm", "update_ratio"),
            "error signal growing per layer toward the input, gradient norm growing over "
            "steps, or updates as large as the weights",
        ),
        Detector(
            "vanishing",
            detect_vanishing,
            ("error_norm", "memory_steps"),
            "error signal shrinking by a steady factor per layer toward the input, or cut "
            "at every step back through time by an LSTM's/GRU's carry gates",
        ),
        Detector(
            "saturation",
            detect_saturation,
            ("sat_frac",),
            "activation layers with many entries where |f'(z)| < 1% of its maximum",
        ),
        Detector(
            "dead_units",
            detect_dead_units,
            ("dead_frac", "dead_window_frac"),
            "features that output 0 for every sample",
        ),
        Detector(
            "dead_channels",
            detect_dead_channels,
            ("dead_frac", "dead_window_frac"),
            "conv channels that are 0 at every position of every sample",
        ),
        Detector(
            "stalled",
            detect_stalled,
            ("update_ratio",),
            "weights updated orders of magnitude less than the others",
        ),
        Detector(
            "unstable_updates",
            detect_unstable_updates,
            ("update_ratio",),
            "weights whose update is ≥ 10% of the weight at every step",
        ),
        Detector(
            "skipped_steps",
            detect_skipped_steps,
            ("skipped",),
            "mixed precision: the GradScaler skipped many steps, or many in a row",
        ),
        Detector(
            "clipped",
            detect_clipped,
            ("clipped",),
            "gradient clipping active on most steps (norms before and after clipping)",
        ),
        Detector(
            "unused_parameters",
            detect_unused_parameters,
            ("grad_missing",),
            "parameters the optimizer trains that receive no gradient",
        ),
        Detector(
            "divergence",
            detect_divergence,
            ("loss",),
            "the loss becomes NaN/Inf, or rises back well above its best level",
            LOSS_NOT_LOGGED,
        ),
        Detector(
            "grad_norm_spike",
            detect_grad_norm_spike,
            ("global_grad_norm_preclip", "global_grad_norm", "grad_norm"),
            "the global gradient norm (before clipping) jumps far above its running median",
        ),
        Detector(
            "loss_instability",
            detect_loss_instability,
            ("loss",),
            "the loss jumping back towards its start again and again, losing its progress",
            LOSS_NOT_LOGGED,
        ),
        Detector(
            "loss_spike",
            detect_loss_spike,
            ("loss",),
            "single steps whose loss jumps far above its running median",
            LOSS_NOT_LOGGED,
        ),
        Detector(
            "oscillation",
            detect_oscillation,
            ("loss",),
            "the loss going up and down in a rhythm with large swings",
            LOSS_NOT_LOGGED,
        ),
        Detector(
            "plateau",
            detect_plateau,
            ("loss",),
            "the loss not decreasing over the last half of the run, far from where it started",
            LOSS_NOT_LOGGED,
        ),
    ]
}


# ---------------------------------------------------------------- entry points
def as_run(source: Any) -> Run:
    """A Run from a Run, a Probe (what it recorded so far) or a run directory path."""
    if isinstance(source, Run):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load(source)
    if hasattr(source, "run") and callable(source.run):
        return source.run()
    raise GradprobeError(
        f"cannot diagnose a {type(source).__name__}",
        "pass a Run (gradprobe.load(path)), a Probe, or a run directory",
    )


def diagnose(run_or_probe: Any) -> Findings:
    """Run every detector on a run (or a Probe, or a run directory); findings, most severe first.

    Raises :class:`GradprobeError` when nothing was recorded.
    """
    run = as_run(run_or_probe)
    if run.empty:
        raise GradprobeError(
            f"the run {run.name!r} has no recorded steps",
            "train for at least one optimizer step under the Probe (or call probe.step())",
        )
    stats = set(run.stats)
    profile = model_profile(run.meta)
    found: list[Finding] = []
    skipped: dict[str, str] = {}
    ran: list[str] = []  # for the "no problems found" note: what was actually checked
    for kind, det in DETECTORS.items():
        if not stats & set(det.requires):
            if det.unrecorded:
                skipped[kind] = det.unrecorded
                continue
            asked = set(run.meta.get("probe", {}).get("stats", []))
            if not asked & set(det.requires):
                # Recorded but absent means nothing to measure (no saturating activation
                # in a ReLU net): not a gap. Not recorded at all is one, and is said.
                skipped[kind] = (
                    f"needs {' or '.join(det.requires)}: record it with Probe(..., stats='default')"
                )
            continue
        ran.append(kind)
        try:
            finding = det.fn(run)
        except Exception as exc:  # one detector's failure must not take the others with it
            ran.pop()
            skipped[kind] = f"could not be judged: {type(exc).__name__}: {exc}"
            continue
        if finding is not None:
            remedies = _evidence_remedies(finding) + tuple(rank_remedies(finding.kind, profile))
            found.append(
                Finding(
                    finding.kind,
                    finding.severity,
                    finding.names,
                    finding.summary,
                    finding.evidence,
                    remedies,
                )
            )
    found.sort(key=lambda f: (-_SEVERITY_RANK[f.severity], KIND_ORDER.index(f.kind)))
    facts = run_facts(run, profile, found)
    found = tell(found, profile, facts, KIND_ORDER, SEVERITIES)
    checked = Checked(
        steps=len(run.steps),
        modules=len(run.modules),
        statistics=tuple(run.stats),
        detectors=tuple(ran),
    )
    return Findings(found, run_name=run.name, skipped=skipped, checked=checked)


def _evidence_remedies(finding: Finding) -> tuple[RankedRemedy, ...]:
    """Actions the finding's own numbers point to, ahead of the catalogue's: a layer whose
    every pre-activation is negative is fixed where it is (its bias, its init, or the step
    that pushed it there), not by changing the activation after it."""
    negative = finding.evidence.get("negative_preactivation") or {}
    out = []
    for layer, v in negative.items():
        remedy = Remedy(
            "fix_preactivation",
            f"Fix the layer feeding them: `{layer}`",
            f"every pre-activation of `{layer}` is negative (mean {v['mean']:.3g}, std "
            f"{v['std']:.2g}), so the ReLU after it outputs 0 and passes no error back: reset "
            "its bias and re-initialise it, or lower the step size if training drove it there",
            f"layer = model.get_submodule({layer!r})\n"
            "if layer.bias is not None:\n"
            "    nn.init.zeros_(layer.bias)\n"
            "nn.init.kaiming_normal_(layer.weight, nonlinearity='relu')",
            treats={finding.kind: 1.0},
        )
        out.append(RankedRemedy(remedy, 2.0, "the run's own numbers: its outputs lie below 0"))
    return tuple(out[:1])


def run_facts(run: Run, profile: Any, found: Iterable[Finding]) -> dict[str, Any]:
    """What the run shows that a remedy could contradict (gradprobe.story.contradicted)."""
    med = _update_medians(run)
    updates = _table(run, "update_ratio")
    weights = [w for w in _weights(run) if w in updates.columns]
    largest = updates[weights].replace([np.inf, -np.inf], np.nan).max().max() if weights else 0.0
    clipped = run.model_series("clipped")
    config = run.meta.get("config") or {}
    # What a trainer was configured to do (the Lightning/HF callbacks store it): its
    # clipping is in place whether or not it cut this run's steps.
    trainer = run.meta.get("trainer") or {}
    clip_keys = ("gradient_clip_val", "max_grad_norm", "clip_norm", "clip_value")
    trainer_clips = any(
        isinstance(trainer.get(k), (int, float)) and trainer[k] > 0 for k in clip_keys
    )
    kinds = {f.kind for f in found}
    return {
        # The typical update, or any that reached the weight's size (one step replaces it).
        "max_update_ratio": max(
            float(med.max()) if len(med) else 0.0,
            float(largest) if np.isfinite(largest) and largest >= UPDATE_RATIO_EXPLODING else 0.0,
        ),
        "clipping_acted": bool(len(clipped) and float(clipped.fillna(0).max()) > 0)
        or config.get("clip_norm") is not None
        or config.get("clip_value") is not None
        or trainer_clips,
        "unstable_loss": bool(kinds & {"divergence", "loss_instability", "oscillation"}),
        "adam": any(profile.has(t) for t in ("optimizer:adam", "optimizer:adamw")),
    }


def key_numbers(run: Run) -> dict[str, float]:
    """The numbers a comparison table shows for a run, computed whatever was found."""
    p = depth_profile(run)
    out: dict[str, float] = {
        "steps": float(len(run.steps)),
        "first_last_error_ratio": p.ratio if p else math.nan,
        "error_factor_per_layer": p.factor if p else math.nan,
    }
    state = _dead_state(run)
    if state is not None:
        current = state[0]
        cands = _candidates(run, [n for n in run.modules if n in current.index])
        out["max_dead_frac"] = float(current[cands].max()) if cands else math.nan
    sat = _table(run, "sat_frac")
    out["max_sat_frac"] = float(_recent(sat).median().max()) if not sat.empty else math.nan
    med = _update_medians(run)
    out["median_update_ratio"] = float(med.median()) if len(med) else math.nan
    return out


# The notebook and report HTML moved to gradprobe.html (a view; analysis does not import
# views). Their old names here still work, resolved on first use for code written before.
_MOVED_TO_HTML = ("NOTEBOOK_CSS", "findings_html", "inline_code")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_HTML:
        from . import html

        return getattr(html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

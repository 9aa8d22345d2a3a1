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

Thresholds are named data with their reasons (:data:`THRESHOLDS`, in
:mod:`gradprobe.diagnose.thresholds`); ``docs/findings.md`` lists them.

The package
-----------
``findings`` (the model: Finding, Findings, their order, the JSON schema), ``thresholds``,
``selectors`` (what detectors and plots read from a run), one module per family of
detectors (``depth``, ``explosion``, ``units``, ``updates``, ``instability``, ``attention``;
``sequence`` is the error signal over a recurrent output's positions, a mode of
``vanishing``), ``facts``
(key numbers, facts for the story), and here the registry: :data:`DETECTORS` and
:func:`diagnose`. Every name of the former module ``gradprobe.diagnose`` is importable
from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import GradprobeError
from ..remedies import model_profile, rank_remedies
from ..run import Run, load
from ..story import tell
from .attention import (
    detect_attention_entropy_collapse,
    detect_attention_logit_growth,
    detect_output_logit_divergence,
    detect_rank_collapse,
    has_attention,
)
from .depth import DepthProfile, depth_profile, detect_vanishing
from .explosion import detect_exploding, detect_nonfinite
from .facts import _evidence_remedies, key_numbers, run_facts
from .findings import (
    _SEVERITY_RANK,
    FINDINGS_JSON_SCHEMA,
    KIND_ORDER,
    SEVERITIES,
    Checked,
    Finding,
    Findings,
    no_findings_note,
)
from .instability import (
    LOSS_NOT_LOGGED,
    detect_divergence,
    detect_grad_norm_spike,
    detect_loss_instability,
    detect_loss_spike,
    detect_oscillation,
    detect_plateau,
)
from .selectors import is_weight_layer, norm_modules, unit_candidates, weight_names
from .sequence import TIME_ERROR_STATS
from .thresholds import (
    CARRY_GATE_MEAN,
    CARRY_MEMORY_STEPS,
    CLIPPED_FRAC,
    DEAD_CHANNEL_FRAC,
    DEAD_UNIT_FRAC,
    DIVERGENCE_FACTOR,
    DIVERGENCE_GIVEBACK,
    EXPLODING_FACTOR,
    EXPLODING_GROWTH,
    EXPLODING_RATIO,
    GRAD_SPIKE_FACTOR,
    INSTABILITY_GIVEBACK,
    INSTABILITY_LEARNED,
    INSTABILITY_RECOVER,
    INSTABILITY_SETBACKS,
    LOSS_SPIKE_FACTOR,
    LOSS_SPIKE_MADS,
    LOSS_WINDOW,
    MIN_DEPTH_LAYERS,
    MIN_LOSS_STEPS,
    NEGATIVE_PREACT_SIGMAS,
    OSCILLATION_AMPLITUDE,
    OSCILLATION_AUTOCORR,
    PLATEAU_DECREASE,
    PLATEAU_LEVEL,
    SATURATION_FRAC,
    SKIPPED_FRAC,
    SKIPPED_STREAK,
    SPIKE_WINDOW,
    STALL_FACTOR,
    STALL_REFERENCE_QUANTILE,
    THRESHOLDS,
    UNSTABLE_UPDATE_RATIO,
    UNUSED_FRAC,
    UPDATE_RATIO_EXPLODING,
    VANISHING_FACTOR,
    VANISHING_RATIO,
    Threshold,
)
from .units import (
    detect_dead_channels,
    detect_dead_units,
    detect_saturation,
)
from .updates import (
    UNUSED_HINTS,
    detect_clipped,
    detect_skipped_steps,
    detect_stalled,
    detect_unstable_updates,
    detect_unused_parameters,
)

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
    "STALL_REFERENCE_QUANTILE",
    "THRESHOLDS",
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
    "Threshold",
    "as_run",
    "depth_profile",
    "detect_attention_entropy_collapse",
    "detect_attention_logit_growth",
    "detect_clipped",
    "detect_dead_channels",
    "detect_dead_units",
    "detect_divergence",
    "detect_exploding",
    "detect_grad_norm_spike",
    "detect_loss_instability",
    "detect_loss_spike",
    "detect_nonfinite",
    "detect_oscillation",
    "detect_output_logit_divergence",
    "detect_plateau",
    "detect_rank_collapse",
    "detect_saturation",
    "detect_skipped_steps",
    "detect_stalled",
    "detect_unstable_updates",
    "detect_unused_parameters",
    "detect_vanishing",
    "diagnose",
    "is_weight_layer",
    "key_numbers",
    "no_findings_note",
    "norm_modules",
    "run_facts",
    "unit_candidates",
    "weight_names",
]


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
    # Whether the model has what the check reads (attention, for the attention checks):
    # where it does not, a missing statistic is nothing to measure, not a gap to report.
    applies: Callable[[Run], bool] | None = None


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
            ("error_norm", "memory_steps", *TIME_ERROR_STATS),
            "error signal shrinking by a steady factor per layer toward the input, cut "
            "at every step back through time by an LSTM's/GRU's carry gates, or falling "
            "over a recurrent output's positions going back",
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
            "attention_logit_growth",
            detect_attention_logit_growth,
            ("attn_logit_max",),
            "the largest attention logit grows over steps until the softmax is one-hot",
            applies=has_attention,
        ),
        Detector(
            "output_logit_divergence",
            detect_output_logit_divergence,
            ("logit_z", "logit_max"),
            "the output logits drift: log Z far from its start, or the largest logit grown tenfold",
            applies=has_attention,
        ),
        Detector(
            "attention_entropy_collapse",
            detect_attention_entropy_collapse,
            ("attn_entropy",),
            "attention entropy, averaged over a module's heads, falling towards 0 in training",
            applies=has_attention,
        ),
        Detector(
            "rank_collapse",
            detect_rank_collapse,
            ("token_cosine",),
            "token vectors of the deepest blocks pointing the same way (cosine near 1)",
            applies=has_attention,
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
            if det.applies is not None and not det.applies(run):
                continue  # the model has nothing this check reads: no gap
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


# The notebook and report HTML moved to gradprobe.html (a view; analysis does not import
# views). Their old names here still work, resolved on first use for code written before.
_MOVED_TO_HTML = ("NOTEBOOK_CSS", "findings_html", "inline_code")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_HTML:
        from .. import html

        return getattr(html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

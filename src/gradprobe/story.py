"""The diagnosis as one story: root causes first, their consequences under them, and advice
that the run itself does not contradict (issue 22 §1; ``docs/findings.md``, "How the story
is built").

Detectors find symptoms independently; :func:`tell` links them. A finding is a
*consequence* of another present in the same run when the other explains it
(:data:`EXPLAINED_BY`, most direct first) and, where both carry the step they began, it
did not begin before it: a loss stuck at its start is what vanishing, dead units or steps
too large produce; steps as large as the weights explain dead units that appear after
them, spikes, oscillation and divergence. Each consequence names its *root* (following
the chain to a finding nothing else explains) in ``Finding.cause``; the root lists them
in ``Finding.consequences``.

Then the advice is read against the run's evidence (:func:`contradicted`): an action the
same run contradicts is dropped, never ranked — a larger learning rate when updates reach
a tenth of the weights or more, or the loss jumps back up; clipping when clipping already
cut the run's gradients (or the optimizer is Adam-like and the updates, not the
gradients, are too large: Adam's step is about ``lr`` per weight whatever the gradient's
scale); an activation or norm the model already has (:mod:`gradprobe.remedies`). When the
evidence is the step size itself, lowering the learning rate is the first action.

This module works on findings as data (any frozen dataclass with the fields of
:class:`gradprobe.diagnose.Finding`) and imports nothing from :mod:`gradprobe.diagnose`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .remedies import ModelProfile, RankedRemedy

__all__ = ["EXPLAINED_BY", "STEP_SIZE_KINDS", "contradicted", "story_lines", "tell"]

# The kinds that mean "the steps are too large" when their evidence is the update size.
STEP_SIZE_KINDS = ("exploding", "unstable_updates")

# consequence kind -> the kinds that explain it, most direct first. Read: "a plateau is
# explained by vanishing, or by dead units, ..., or by steps too large".
EXPLAINED_BY: dict[str, tuple[str, ...]] = {
    # Inside the Transformer (Wortsman et al. 2023): the attention and output logits grow
    # at too high a rate, so steps as large as the weights explain them; a one-hot
    # softmax is where a head's entropy goes, and logits that large spike the gradient
    # and the loss, and make NaN/Inf.
    "attention_logit_growth": ("exploding", "unstable_updates"),
    "output_logit_divergence": ("exploding", "unstable_updates"),
    "attention_entropy_collapse": ("attention_logit_growth", "exploding", "unstable_updates"),
    # Rows that are one-hot on the same key give every token the same vector.
    "rank_collapse": (
        "attention_logit_growth",
        "attention_entropy_collapse",
        "exploding",
        "unstable_updates",
    ),
    "nonfinite": (
        "exploding",
        "unstable_updates",
        "grad_norm_spike",
        "attention_logit_growth",
        "output_logit_divergence",
    ),
    "grad_norm_spike": (
        "exploding",
        "unstable_updates",
        "attention_logit_growth",
        "output_logit_divergence",
    ),
    "loss_spike": (
        "grad_norm_spike",
        "exploding",
        "unstable_updates",
        "nonfinite",
        "attention_logit_growth",
        "output_logit_divergence",
    ),
    "loss_instability": (
        "grad_norm_spike",
        "exploding",
        "unstable_updates",
        "attention_logit_growth",
        "attention_entropy_collapse",
        "output_logit_divergence",
    ),
    "divergence": (
        "nonfinite",
        "grad_norm_spike",
        "exploding",
        "unstable_updates",
        "skipped_steps",
        "attention_logit_growth",
        "output_logit_divergence",
    ),
    "oscillation": ("exploding", "unstable_updates"),
    "clipped": ("exploding", "grad_norm_spike"),
    "skipped_steps": ("exploding", "nonfinite"),
    # Units pushed out of their working range by steps as large as the weights.
    "saturation": ("exploding", "unstable_updates"),
    "dead_units": ("exploding", "unstable_updates"),
    "dead_channels": ("exploding", "unstable_updates"),
    # Dead units pass no error signal back: the layers below them receive none.
    "vanishing": ("dead_channels", "dead_units"),
    # Tokens that are one vector leave the queries' and keys' gradients nothing to act on.
    "stalled": (
        "vanishing",
        "dead_channels",
        "dead_units",
        "saturation",
        "unused_parameters",
        "exploding",
        "unstable_updates",
        "rank_collapse",
    ),
    "plateau": (
        "vanishing",
        "dead_channels",
        "dead_units",
        "saturation",
        "exploding",
        "unstable_updates",
        "nonfinite",
        "divergence",
        "loss_instability",
        "grad_norm_spike",
        "oscillation",
        "stalled",
        "skipped_steps",
        "unused_parameters",
        "attention_logit_growth",
        "attention_entropy_collapse",
        "output_logit_divergence",
        "rank_collapse",
    ),
}

# Remedies that lower the step size; first for a finding whose evidence is the step size.
# Lowering the rate comes first, warmup with it (it keeps the first steps small only):
# as a lower peak rate for Adam-trained and Transformer models (their schedules have a
# peak), as a smaller rate or decay otherwise.
_LOWER_STEP_PEAK = {"lower_peak_lr": 1.0, "lr_schedule": 0.5, "lr_warmup": 0.5}
_LOWER_STEP_PLAIN = {"lr_schedule": 1.0, "lower_peak_lr": 0.3, "lr_warmup": 0.3}
# An update of a tenth of the weight or more is no "too small" step (diagnose's
# UNSTABLE_UPDATE_RATIO): a larger learning rate contradicts it.
_LARGE_UPDATE = 0.1
_ADAM = ("optimizer:adam", "optimizer:adamw", "optimizer:nadam", "optimizer:radam")


def _start(finding: Any) -> float | None:
    """The step a finding began, where its evidence says."""
    e = finding.evidence
    for key in ("update_ratio_first_step", "first_step", "step"):
        if isinstance(e.get(key), (int, float)):
            return float(e[key])
    since = e.get("since_step")
    if isinstance(since, Mapping):
        steps = [float(v) for v in since.values() if isinstance(v, (int, float))]
        return min(steps) if steps else None
    if isinstance(e.get("steps"), Sequence) and e["steps"]:
        return float(min(e["steps"]))
    return None


def _step_size_evidence(finding: Any) -> bool:
    """The finding's own numbers say the steps are too large (updates ≥ weight or ≥ 10%)
    while the gradients themselves are not exploding (over depth, at init, over steps):
    then the learning rate, not the gradient, is what makes the steps too large."""
    if finding.kind == "unstable_updates":
        return True
    modes = set(finding.evidence.get("modes", []))
    return finding.kind == "exploding" and modes == {"updates"}


def _kills_units(finding: Any) -> bool:
    """Steps too large, or a net that explodes at init (its first huge updates push units
    out of their working range, as the init mode of ``exploding`` says)."""
    modes = set(finding.evidence.get("modes", []))
    return _step_size_evidence(finding) or (
        finding.kind == "exploding" and bool(modes & {"init", "updates"})
    )


def _explains(cause: Any, effect: Any) -> bool:
    if cause.kind not in EXPLAINED_BY.get(effect.kind, ()):
        return False
    # Only steps that are too large explain units killed by them; a layer dead before
    # the first large step (a bias of -10) is its own cause.
    killed = effect.kind in ("saturation", "dead_units", "dead_channels")
    if cause.kind in STEP_SIZE_KINDS and killed and not _kills_units(cause):
        return False
    if effect.kind == "vanishing":
        # Dead units cut the error signal below them: only if they sit where it vanishes.
        layers = effect.evidence.get("layers") or []
        fed = [v for v in (cause.evidence.get("fed_by") or {}).values() if v]
        if layers and fed and not set(fed) & set(layers):
            return False
    a, b = _start(cause), _start(effect)
    return a is None or b is None or a <= b


def contradicted(key: str, finding: Any, facts: Mapping[str, Any]) -> str | None:
    """Why the run contradicts remedy ``key`` for ``finding`` (None: it does not).

    ``facts``: what the run shows, from :func:`run_facts` in :mod:`gradprobe.diagnose`:
    ``max_update_ratio``, ``clipping_acted``, ``unstable_loss``, ``adam``.
    """
    if key == "raise_lr":
        if facts.get("max_update_ratio", 0.0) >= _LARGE_UPDATE:
            return (
                f"updates already reach {facts['max_update_ratio']:.2g} of the weights' norm "
                "in one step"
            )
        if facts.get("unstable_loss"):
            return "the loss already jumps back up: the steps are not too small"
    if key == "grad_clipping":
        if facts.get("clipping_acted"):
            return "clipping already cut the gradient norm on this run's steps"
        if facts.get("adam") and _step_size_evidence(finding):
            return (
                "the optimizer is Adam-like: its update is about lr per weight whatever the "
                "gradient's norm, so clipping does not shrink it"
            )
    return None


def _rerank(finding: Any, profile: ModelProfile, facts: Mapping[str, Any]) -> tuple[Any, ...]:
    peak = profile.architecture == "transformer" or bool(facts.get("adam"))
    bonus = _LOWER_STEP_PEAK if peak else _LOWER_STEP_PLAIN
    ranked: list[RankedRemedy] = []
    for r in finding.remedies:
        if contradicted(r.key, finding, facts) is not None:
            continue
        if _step_size_evidence(finding) and r.key in bonus:
            r = dataclasses.replace(
                r,
                score=r.score + bonus[r.key],
                fit=r.fit + "; the run's updates are too large for its weights",
            )
        ranked.append(r)
    ranked.sort(key=lambda r: -r.score)
    return tuple(ranked)


def tell(
    findings: Sequence[Any],
    profile: ModelProfile,
    facts: Mapping[str, Any],
    order: Sequence[str],
    severities: Sequence[str],
) -> list[Any]:
    """Findings linked as cause and effect, roots first; contradicted remedies dropped.

    ``order`` (kinds) and ``severities`` (lowest first) break ties: among roots, the most
    severe leads, then the one that explains most findings, then ``order``.
    """
    items = [dataclasses.replace(f, remedies=_rerank(f, profile, facts)) for f in findings]
    by_kind = {f.kind: f for f in items}

    def direct(f: Any) -> Any | None:
        for kind in EXPLAINED_BY.get(f.kind, ()):
            cause = by_kind.get(kind)
            if cause is not None and cause is not f and _explains(cause, f):
                return cause
        return None

    def root(f: Any) -> Any | None:
        seen = {f.kind}
        cause = direct(f)
        while cause is not None:
            up = direct(cause)
            if up is None or up.kind in seen:
                return cause
            seen.add(cause.kind)
            cause = up
        return None

    roots = {f.kind: root(f) for f in items}
    consequences = {
        f.kind: tuple(
            g.kind for g in items if (r := roots[g.kind]) is not None and r.kind == f.kind
        )
        for f in items
    }

    def rank(f: Any) -> tuple[float, ...]:
        return (
            -float(severities.index(f.severity)),
            -float(len(consequences[f.kind])),
            float(order.index(f.kind)) if f.kind in order else math.inf,
        )

    linked = [
        dataclasses.replace(
            f,
            cause=roots[f.kind].kind if roots[f.kind] is not None else None,
            consequences=consequences[f.kind],
        )
        for f in items
    ]
    if linked and all(f.cause is not None for f in linked):
        # Only a cycle in EXPLAINED_BY could leave no root: then no finding explains
        # another, and each stands alone (the graph has none; this keeps it true).
        linked = [dataclasses.replace(f, cause=None, consequences=()) for f in linked]
    head = sorted((f for f in linked if f.cause is None), key=rank)
    place = {f.kind: i for i, f in enumerate(head)}
    tail = sorted(
        (f for f in linked if f.cause is not None),
        key=lambda f: (
            place.get(f.cause, len(head)),
            -severities.index(f.severity),
            order.index(f.kind) if f.kind in order else len(order),
        ),
    )
    return head + tail


def story_lines(findings: Sequence[Any], *, remedies: int = 3) -> list[str]:
    """The story as plain text (``gradprobe diagnose``): each root with its one recommended
    action, other options and the consequences under it."""
    lines: list[str] = []
    roots = [f for f in findings if f.cause is None]
    for i, root in enumerate(roots):
        head = "Root cause" if i == 0 else "Also found"
        lines.append(f"{head}: {root.kind} ({root.severity}) — {root.summary}")
        if root.remedies:
            first = root.remedies[0]
            lines.append(f"  Do this first: {first.name} — {first.why}")
            lines += [f"      {line}" for line in first.code.splitlines()]
            others = [r.name for r in root.remedies[1:remedies]]
            if others:
                lines.append("  Other options: " + "; ".join(others))
        under = [f for f in findings if f.cause == root.kind]
        if under:
            lines.append("  Consequences (they follow from it; fix it first):")
            lines += [f"    - {f.kind} ({f.severity}): {f.summary}" for f in under]
        lines.append("")
    return lines[:-1] if lines else lines


@dataclass
class Headline:
    """The story's head: the root finding, its one recommended action (its first remedy),
    the findings that follow from it, and the others."""

    root: Any = None  # a Finding
    action: Any = None  # a RankedRemedy
    consequences: list[Any] = field(default_factory=list)
    others: list[Any] = field(default_factory=list)


def headline(findings: Sequence[Any]) -> Headline:
    """Read the head off ``findings`` in :func:`~gradprobe.diagnose`'s order (roots first):
    the one place the root, its action and its consequences are picked (the CLI, the
    notebook, the report's box, the callbacks and the demo all read it here)."""
    root = next((f for f in findings if f.cause is None), None)
    if root is None:
        return Headline(None, others=list(findings))
    consequences = [f for f in findings if f is not root and f.cause == root.kind]
    others = [f for f in findings if f is not root and f not in consequences]
    return Headline(root, root.remedies[0] if root.remedies else None, consequences, others)

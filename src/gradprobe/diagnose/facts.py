"""Numbers of a run beside its findings: the key numbers a comparison table shows, the facts
a remedy could contradict (gradprobe.story), and the remedies a finding's own numbers point to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..remedies import RankedRemedy, Remedy
from ..run import Run
from .depth import depth_profile
from .findings import Finding
from .selectors import _dead_state, _recent, _table, _update_medians, unit_candidates, weight_names
from .thresholds import UPDATE_RATIO_EXPLODING


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
    weights = [w for w in weight_names(run) if w in updates.columns]
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
        cands = unit_candidates(run, [n for n in run.modules if n in current.index])
        out["max_dead_frac"] = float(current[cands].max()) if cands else math.nan
    sat = _table(run, "sat_frac")
    out["max_sat_frac"] = float(_recent(sat).median().max()) if not sat.empty else math.nan
    med = _update_medians(run)
    out["median_update_ratio"] = float(med.median()) if len(med) else math.nan
    return out

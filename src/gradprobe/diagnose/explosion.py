"""Explosion: the error signal growing over depth, the gradient norm over steps, updates as
large as the weights; and the first NaN/Inf.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..run import Run
from .depth import _theory_beside, depth_profile
from .findings import Finding
from .selectors import _g, _table, _total_grad_norm, weight_names
from .thresholds import (
    EXPLODING_CRITICAL_GROWTH,
    EXPLODING_CRITICAL_RATIO,
    EXPLODING_FACTOR,
    EXPLODING_GROWTH,
    EXPLODING_RATIO,
    MIN_DEPTH_LAYERS,
    UPDATE_RATIO_CRITICAL,
    UPDATE_RATIO_EXPLODING,
)


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
        critical |= p.ratio >= EXPLODING_CRITICAL_RATIO
        evidence["modes"].append("depth")
        evidence.update(p.evidence())
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
            critical |= p0.ratio >= EXPLODING_CRITICAL_RATIO
            evidence["modes"].append("init")
            evidence.update(p0.evidence(), init_step=int(run.steps[0]))
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
            critical |= growth >= EXPLODING_CRITICAL_GROWTH
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
    weights = [w for w in weight_names(run) if w in updates.columns]
    if weights:
        worst = updates[weights].replace([np.inf], np.nan).max()
        huge = worst[worst >= UPDATE_RATIO_EXPLODING].sort_values(ascending=False)
        if not huge.empty:
            first_step = int(updates[huge.index].ge(UPDATE_RATIO_EXPLODING).any(axis=1).idxmax())
            names += [n for n in huge.index if n not in names]
            critical |= float(huge.iloc[0]) >= UPDATE_RATIO_CRITICAL
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

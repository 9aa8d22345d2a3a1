"""The ``gradprobe theory TOPIC`` numbers beyond the plain MLP: plain dicts (for ``--json``)
and their rich tables. Each topic calls its theory's module; nothing here is a formula."""

from __future__ import annotations

import math
from typing import Any

from ..errors import GradprobeError
from .finite_width import width_spread
from .gated import gated_memory, gated_memory_efold
from .isometry import jacobian_spread, spectrum_moments
from .meanfield import _resolve, critical_weight_var
from .residual import residual_growth

__all__ = ["TOPICS", "compute_topic", "render_topic"]

TOPICS = ("meanfield", "residual", "width", "isometry", "gated")


def _need(value: Any, option: str, topic: str, example: str) -> Any:
    if value is None:
        raise GradprobeError(f"`theory {topic}` needs {option}", f"e.g. {option} {example}")
    return value


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def compute_topic(topic: str, **kw: Any) -> dict[str, Any]:
    """The numbers of one topic from the CLI's options (``None`` where not given)."""
    if topic == "residual":
        depth = _need(kw.get("depth"), "--depth", topic, "16")
        gain = kw.get("gain") if kw.get("gain") is not None else 1.0
        alphas = [kw["alpha"]] if kw.get("alpha") is not None else [1.0, 1.0 / math.sqrt(depth)]
        rows = []
        for a in alphas:
            growth = residual_growth(a, depth, gain)
            rows.append(
                {
                    "alpha": a,
                    "growth": _finite_or_none(growth),
                    "per_block": math.sqrt(1.0 + a * a * gain),
                }
            )
        return {"topic": topic, "depth": depth, "gain": gain, "rows": rows}
    if topic == "width":
        width = _need(kw.get("width"), "--width", topic, "64")
        depth = _need(kw.get("depth"), "--depth", topic, "20")
        second = width_spread(width, depth)
        return {
            "topic": topic,
            "width": width,
            "depth": depth,
            "mean_ratio": 1.0,
            "second_moment": _finite_or_none(second),
            "ratio_std": _finite_or_none(math.sqrt(max(second - 1.0, 0.0))),
        }
    if topic == "isometry":
        act = _resolve(_need(kw.get("activation"), "--activation", topic, "tanh"))
        depth = _need(kw.get("depth"), "--depth", topic, "32")
        bias_var = kw.get("bias_var") or 0.0
        weight_var = kw.get("weight_var")
        if weight_var is None:
            weight_var = critical_weight_var(act, bias_var)
        inits = [kw["init"]] if kw.get("init") else ["gaussian", "orthogonal"]
        q, mu1, mu2 = spectrum_moments(act, weight_var, bias_var)
        return {
            "topic": topic,
            "activation": act.name,
            "weight_var": weight_var,
            "bias_var": bias_var,
            "depth": depth,
            "q_star": q,
            "mu1": mu1,
            "mu2": mu2,
            "chi1": weight_var * mu1,
            "spread": {
                i: jacobian_spread(act, weight_var, bias_var, depth=depth, init=i) for i in inits
            },
        }
    if topic == "gated":
        b = _need(kw.get("forget_bias"), "--forget-bias", topic, "1.0")
        return {
            "topic": topic,
            "forget_bias": b,
            "gate": 1.0 / (1.0 + math.exp(-b)),
            "memory": _finite_or_none(gated_memory(b)),
            "memory_efold": _finite_or_none(gated_memory_efold(b)),
        }
    raise GradprobeError(f"unknown theory topic {topic!r}", f"use one of: {', '.join(TOPICS)}")


def render_topic(d: dict[str, Any]) -> Any:
    """A rich table of :func:`compute_topic`'s numbers (rich is imported only here)."""
    from rich.table import Table

    def g(x: float | None) -> str:
        return "∞" if x is None else f"{x:.6g}"

    topic = d["topic"]
    if topic == "residual":
        t = Table(
            title=f"residual net, {d['depth']} blocks, branch gain g = {d['gain']:g}: "
            "E‖x_L‖²/‖x_0‖² = (1 + α²g)^L (Hanin & Rolnick 2018; Marion et al. 2025)"
        )
        for col in ("α", "growth over the net", "‖signal‖ factor per block"):
            t.add_column(col, justify="right")
        for r in d["rows"]:
            t.add_row(f"{r['alpha']:.4g}", g(r["growth"]), f"×{r['per_block']:.4g}")
        return t
    if topic == "width":
        t = Table(
            title=f"ReLU net at He init, width {d['width']}, depth {d['depth']}: "
            "R = ‖x_L‖²/‖x_0‖² (Hanin & Rolnick 2018)"
        )
        t.add_column("quantity")
        t.add_column("value", justify="right")
        t.add_row("E[R]", "1")
        t.add_row("E[R²] = (1 + 5/n)^L", g(d["second_moment"]))
        t.add_row("std of R over seeds", g(d["ratio_std"]))
        return t
    if topic == "isometry":
        t = Table(
            title=f"{d['activation']}, σ_w² = {d['weight_var']:.6g}, σ_b² = {d['bias_var']:g}, "
            f"depth {d['depth']}: var/mean² of JJᵀ's eigenvalues (Pennington et al. 2017)"
        )
        t.add_column("quantity")
        t.add_column("value", justify="right")
        t.add_row("q*", g(d["q_star"]))
        t.add_row("χ₁ = σ_w² μ₁", g(d["chi1"]))
        t.add_row("μ₂/μ₁²", g(d["mu2"] / d["mu1"] ** 2))
        for init, v in d["spread"].items():
            t.add_row(f"spread, {init} weights", g(v))
        return t
    t = Table(title=f"gated unit, forget-gate bias {d['forget_bias']:g} (Tallec & Ollivier 2018)")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("gate σ(b_f)", g(d["gate"]))
    t.add_row("memory T = 1 + e^(b_f) (steps)", g(d["memory"]))
    t.add_row("e-fold memory −1/log σ(b_f) (the Probe's memory_steps)", g(d["memory_efold"]))
    return t

"""The mean-field numbers for the ``gradprobe theory`` command: a summary, its table, a plot."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..activations import Activation
from ..errors import GradprobeError
from .inits import he_init, pytorch_default_init, xavier_init
from .meanfield import (
    ActivationLike,
    _check_depth,
    _check_variances,
    _resolve,
    chi1,
    critical_weight_var,
    depth_scale,
    fixed_point,
    predict_error_profile,
    predict_log10_error_ratio,
)

__all__ = ["TheorySummary", "plot_error_profiles", "render_summary", "summary"]
# ---------------------------------------------------------------- summary for the CLI


@dataclass(frozen=True)
class TheorySummary:
    """The mean-field numbers for one activation and initialisation (see the module doc).

    ``depth_scale`` is ξ_c (correlation); ``inf`` means a diverging q* or an infinite
    depth scale at criticality; a ``nan`` critical σ_w² means χ₁ jumps across 1 (no
    critical line at this σ_b²).
    """

    activation: str
    weight_var: float
    bias_var: float
    q_star: float
    chi1: float
    depth_scale: float
    critical_weight_var: float
    depth: int | None = None
    predicted_log10_error_ratio: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become ``None``; the depth keys only with a depth."""
        out = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }
        if self.depth is None:
            del out["depth"], out["predicted_log10_error_ratio"]
        return out


def _critical_or_nan(act: Activation, bias_var: float) -> float:
    try:
        return critical_weight_var(act, bias_var)
    except GradprobeError:  # no critical line at this bias variance: reported as such
        return math.nan


def summary(
    activation: ActivationLike,
    weight_var: float,
    bias_var: float = 0.0,
    depth: int | None = None,
    q0: float = 1.0,
) -> TheorySummary:
    """q*, χ₁, ξ_c, the critical σ_w² and, with a depth, the predicted log10 error ratio."""
    act = _resolve(activation)
    _check_variances(weight_var, bias_var)
    if depth is not None:
        _check_depth(depth)
    return TheorySummary(
        activation=act.name,
        weight_var=float(weight_var),
        bias_var=float(bias_var),
        q_star=fixed_point(act, weight_var, bias_var),
        chi1=chi1(act, weight_var, bias_var),
        depth_scale=depth_scale(act, weight_var, bias_var),
        critical_weight_var=_critical_or_nan(act, bias_var),
        depth=depth,
        predicted_log10_error_ratio=(
            None
            if depth is None
            else predict_log10_error_ratio(act, weight_var, bias_var, depth, q0)
        ),
    )


def render_summary(s: TheorySummary) -> Any:
    """A rich table of a :class:`TheorySummary` (rich is imported only here)."""
    from rich.table import Table

    table = Table(
        title=f"mean-field theory: {s.activation}, σ_w² = {s.weight_var:g}, σ_b² = {s.bias_var:g}"
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    phase = (
        "critical"
        if abs(s.chi1 - 1) < 1e-6
        else ("ordered: vanishing" if s.chi1 < 1 else "chaotic: exploding")
    )
    table.add_row("q*", f"{s.q_star:.6g}", "fixed point of the pre-activation second moment")
    table.add_row("χ₁", f"{s.chi1:.6g}", f"per-layer factor of ‖error‖² at q* ({phase})")
    table.add_row("ξ_c", f"{s.depth_scale:.6g}", "correlation depth scale (layers)")
    critical = "none" if math.isnan(s.critical_weight_var) else f"{s.critical_weight_var:.6g}"
    table.add_row(
        "critical σ_w²",
        critical,
        f"χ₁ = 1 at σ_b² = {s.bias_var:g}"
        + (" (χ₁ jumps across 1: no critical line)" if critical == "none" else ""),
    )
    if s.depth is not None and s.predicted_log10_error_ratio is not None:
        table.add_row(
            f"log10 ‖δ¹‖/‖δ^{s.depth}‖",
            f"{s.predicted_log10_error_ratio:.4g}",
            f"first over last hidden layer's error norm, depth {s.depth}",
        )
    return table


def plot_error_profiles(
    activation: ActivationLike,
    path: str,
    *,
    bias_var: float = 0.0,
    depth: int = 30,
    width: int = 256,
    weight_var: float | None = None,
) -> dict[str, np.ndarray]:
    """PNG of the predicted error norm of each hidden layer, relative to the last.

    One curve per initialisation: PyTorch default, Xavier, He and the critical σ_w²
    (plus ``weight_var`` if given), all square layers of ``width``. Returns the curves
    (log10 ‖δ^l‖/‖δ^depth‖, l = 1 … depth) keyed by label.
    """
    act = _resolve(activation)
    _check_depth(depth)
    inits = {
        "PyTorch default": pytorch_default_init(width).weight_var,
        "Xavier": xavier_init(width, width).weight_var,
        "He": he_init(width).weight_var,
        "critical": _critical_or_nan(act, bias_var),
    }
    inits = {label: v for label, v in inits.items() if math.isfinite(v)}
    if weight_var is not None:
        inits["given"] = weight_var
    curves = {
        f"{label} (σ_w²={v:.3g})": predict_error_profile(act, v, bias_var, depth)
        for label, v in inits.items()
    }
    # Agg unless a backend was chosen (a notebook keeps its own)
    from .._mpl import pyplot as _pyplot

    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = np.arange(1, depth + 1)
    for label, curve in curves.items():
        ax.plot(layers, 10.0 ** np.clip(curve, -300, 300), marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("hidden layer l (1 = nearest the input)")
    ax.set_ylabel(r"predicted $\|\partial L/\partial h^l\| \,/\, \|\partial L/\partial h^L\|$")
    ax.set_title(f"{act.name}, σ_b² = {bias_var:g}, depth {depth}: mean-field prediction")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return curves

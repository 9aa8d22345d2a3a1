"""Residual networks: how the branch scale α decides whether the signal grows with depth.

A residual network x_(l+1) = x_l + α·f_l(x_l) whose branches f_l have independent weights
with zero mean multiplies the expected squared norm of its signal by (1 + α²·g) per block,
where g = E‖f(x)‖²/‖x‖² is the branch's second-moment gain: the cross term 2α⟨x, f(x)⟩
has zero mean because f's last weight matrix is independent of x. So over L blocks

    E‖x_L‖² / ‖x_0‖² = (1 + α²·g)^L

(Hanin & Rolnick 2018, "How to start training: the effect of initialization and
architecture"; Marion et al., "Scaling ResNets in the large-depth regime", JMLR 2025).
The error signal going back obeys the same law with the branch's backward gain: for a
branch W₂·ReLU(W₁·x) with He-initialised W₁ (Var = 2/fan_in) and Var(W₂) = 1/fan_in,
both gains are exactly 1 in expectation (ReLU's sign symmetry makes its mask independent
of the weights' second moments), at every width.

α = 1 therefore grows like 2^L; α = 1/√L keeps the growth at (1 + g/L)^L → e^g, O(1)
at any depth.
"""

from __future__ import annotations

import math

from ..errors import GradprobeError

__all__ = ["branch_gain", "residual_growth"]


def _positive(value: float, what: str, example: str, *, zero_ok: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        raise GradprobeError(
            f"{what} must be a {'non-negative' if zero_ok else 'positive'} number, got {value!r}",
            f"pass e.g. {example}",
        )
    return float(value)


def residual_growth(alpha: float, depth: int, gain: float = 1.0) -> float:
    """E‖x_L‖²/‖x_0‖² = (1 + α²·gain)^depth for ``depth`` residual blocks of branch scale α.

    ``gain`` is the branch's second-moment gain g = E‖f(x)‖²/‖x‖² (1 for a
    ReLU branch W₂·ReLU(W₁x) with He W₁ and Var(W₂) = 1/fan_in; see :func:`branch_gain`).
    The same number predicts the squared norm of the error signal from the last block's
    output back to the first block's input when g is the branch's backward gain.
    ``math.inf`` where the number overflows.
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise GradprobeError(
            f"branch scale α must be a finite number, got {alpha!r}", "pass e.g. 1.0 or 1/√depth"
        )
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise GradprobeError(
            f"depth must be a whole number of blocks ≥ 0, got {depth!r}", "pass e.g. 16"
        )
    g = _positive(gain, "branch gain", "1.0", zero_ok=True)
    try:
        return (1.0 + alpha * alpha * g) ** depth
    except OverflowError:
        return math.inf


def branch_gain(
    first_weight_var: float, second_weight_var: float, act_second_moment: float
) -> float:
    """g for a branch W₂·φ(W₁·x): σ_w1² · E[φ(u)²]/E[u²] · σ_w2² with u ~ N(0, q).

    ``act_second_moment`` is E[φ(u)²]/q (½ for ReLU, any q). A ReLU branch with
    σ_w1² = 2 (He) and σ_w2² = 1 has g = 1.
    """
    a = _positive(first_weight_var, "σ_w² of the branch's first layer", "2.0")
    b = _positive(second_weight_var, "σ_w² of the branch's second layer", "1.0")
    m = _positive(act_second_moment, "E[φ(u)²]/E[u²]", "0.5 (ReLU)", zero_ok=True)
    return a * m * b

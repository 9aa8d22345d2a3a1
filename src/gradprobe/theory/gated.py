"""Gated recurrence: how long a unit whose carry gate sits at σ(b_f) remembers.

An LSTM's cell state is multiplied by the forget gate f = σ(b_f + W·[x; h]) at every
step (a GRU's leaky path by its update gate z), so with the gate near σ(b_f) the carried
signal and error decay like f^k. Tallec & Ollivier (2018, "Can recurrent neural networks
warp time?") read this as a characteristic forgetting time

    T = 1/(1 − σ(b_f)) = 1 + e^(b_f)

and set b_f ~ log U(1, T_max − 1) (chrono initialisation) to spread the units' memories
over the sequence lengths that matter. PyTorch's default puts b_f near 0: T ≈ 2 steps.

The Probe measures ``memory_steps`` = −1/mean(log f): the steps after which the carried
error has fallen by e. For a gate pre-activation g ~ N(b_f, s²) that is
:func:`gated_memory_efold` = −1/E[log σ(g)], which equals −1/log σ(b_f) at s = 0 and
T − ½ + O(1/T) for large b_f: the same clock as T, read at e instead of at 1/T.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import GradprobeError
from .meanfield import gaussian_expectation

__all__ = ["chrono_forget_bias", "gated_memory", "gated_memory_efold"]


def _finite(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise GradprobeError(
            f"{what} must be a finite number, got {value!r}", "pass e.g. --forget-bias 1.0"
        )
    return float(value)


def gated_memory(forget_bias: float) -> float:
    """T = 1 + e^(b_f) = 1/(1 − σ(b_f)): the characteristic memory, in steps (Tallec & Ollivier)."""
    b = _finite(forget_bias, "forget-gate bias")
    return math.inf if b > 700 else 1.0 + math.exp(b)


def gated_memory_efold(forget_bias: float | Sequence[float], preact_std: float = 0.0) -> float:
    """−1/E[log σ(g)], g ~ N(b_f, s²): the Probe's ``memory_steps`` at init.

    ``forget_bias`` may be one number or one per unit (chrono init): the expectation is
    then also over the units, as the Probe's mean of log f is. ``preact_std`` s is the
    spread the gate's weights add to the bias (0 for the bias alone).
    """
    s = _finite(preact_std, "gate pre-activation std")
    if s < 0:
        raise GradprobeError(f"gate pre-activation std must be ≥ 0, got {preact_std!r}")
    biases = [forget_bias] if isinstance(forget_bias, (int, float)) else list(forget_bias)
    if not biases:
        raise GradprobeError("need at least one forget-gate bias")
    logs = [
        gaussian_expectation(
            torch.nn.functional.logsigmoid, s * s, mean=_finite(b, "forget-gate bias")
        )
        for b in biases
    ]
    mean_log = sum(logs) / len(logs)
    return math.inf if mean_log == 0.0 else -1.0 / mean_log


def chrono_forget_bias(
    hidden: int, t_max: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Chrono initialisation's forget-gate biases: log U(1, T_max − 1), one per unit (float64).

    The input gate's bias is their negative (Tallec & Ollivier 2018, §4).
    """
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise GradprobeError(f"hidden size must be a whole number ≥ 1, got {hidden!r}")
    t = _finite(t_max, "T_max")
    if t <= 2:
        raise GradprobeError(
            f"T_max must exceed 2, got {t_max!r}", "pass the longest dependency, e.g. 100"
        )
    u = torch.rand(hidden, generator=generator, dtype=torch.float64)
    return torch.log(1.0 + u * (t - 2.0))

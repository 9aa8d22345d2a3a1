"""Finite width: the seed-to-seed spread of the signal's norm in a ReLU net at He init.

For a fully connected ReLU net x_l = ReLU(W_l x_(l−1)) with W_l ~ N(0, 2/n) of output
width n, one layer multiplies the squared norm by Y = (2/n)·Σ_i B_i z_i² (B_i ~ Bernoulli(½)
whether unit i is active, z_i ~ N(0, 1)), whose law does not depend on the input. The
layers are independent, so R = ‖x_L‖²/‖x_0‖² has E[R] = 1 and

    E[R²] = (E[Y²])^L = (1 + 5/n)^L

exactly (Hanin & Rolnick 2018, "How to start training"): the spread over seeds grows
exponentially in depth/width, and a net with L/n not small is a lottery at init.
:func:`ratio_moment` gives every moment E[R^k], e.g. E[R⁴] for the Monte Carlo
standard error of a measured E[R²].
"""

from __future__ import annotations

import math

from ..errors import GradprobeError

__all__ = ["ratio_moment", "width_spread"]


def _check(width: int, depth: int) -> None:
    for value, what in ((width, "width"), (depth, "depth")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GradprobeError(
                f"{what} must be a whole number ≥ 1, got {value!r}",
                "pass e.g. --width 64 --depth 10",
            )


def width_spread(width: int, depth: int) -> float:
    """E[R²] = (1 + 5/n)^L for R = ‖x_L‖²/‖x_0‖² of a ReLU net of width n at He init."""
    _check(width, depth)
    return math.exp(depth * math.log1p(5.0 / width))


def ratio_moment(width: int, depth: int, k: int) -> float:
    """E[R^k] = (E[Y^k])^L, E[Y^k] computed exactly from Y = (2/n)·Σ_i B_i z_i².

    E[(B z²)^j] = (2j − 1)!!/2 for j ≥ 1; the moments of the sum follow by expanding
    the power of a sum of n independent copies (a polynomial convolution).
    """
    _check(width, depth)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise GradprobeError(f"moment order must be a whole number ≥ 0, got {k!r}")
    # one term's raw moments m_j = E[T^j], T = B·z²
    m = [1.0] + [math.prod(range(1, 2 * j, 2)) / 2.0 for j in range(1, k + 1)]
    # E[S^k] for S = Σ of n iid T: by the exponential generating function, power n
    egf = [m[j] / math.factorial(j) for j in range(k + 1)]
    total = [1.0] + [0.0] * k
    for _ in range(width):
        total = [sum(total[i] * egf[j - i] for i in range(j + 1)) for j in range(k + 1)]
    e_y = total[k] * math.factorial(k) * (2.0 / width) ** k
    return e_y**depth

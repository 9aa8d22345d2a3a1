"""Rules of thumb: the σ_w² = fan_in·Var(W) of the common weight initialisations."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GradprobeError

__all__ = ["InitVariance", "he_init", "pytorch_default_init", "xavier_init"]

# ---------------------------------------------------------------- rules of thumb


@dataclass(frozen=True)
class InitVariance:
    """A weight initialisation's variance: ``var`` = Var(W), ``weight_var`` = fan_in·Var(W) = σ_w²."""

    name: str
    var: float
    weight_var: float


def _check_fans(*fans: int) -> None:
    for fan in fans:
        if isinstance(fan, bool) or not isinstance(fan, int) or fan < 1:
            raise GradprobeError(f"fan-in/fan-out must be a positive integer, got {fan!r}")


def xavier_init(fan_in: int, fan_out: int, gain: float = 1.0) -> InitVariance:
    """Xavier/Glorot (Glorot & Bengio 2010): Var(W) = gain² · 2/(fan_in + fan_out).

    Balances the forward and backward variance for activations with φ'(0) = 1 (tanh);
    σ_w² = 1 for square layers and gain 1.
    """
    _check_fans(fan_in, fan_out)
    var = gain * gain * 2.0 / (fan_in + fan_out)
    return InitVariance("xavier", var, fan_in * var)


def he_init(fan_in: int, negative_slope: float = 0.0) -> InitVariance:
    """He/Kaiming (He et al. 2015), fan-in mode: Var(W) = 2 / ((1 + a²) · fan_in).

    ``a`` is the negative slope of a (leaky) ReLU; σ_w² = 2 for ReLU, which is its
    critical line χ₁ = 1.
    """
    _check_fans(fan_in)
    var = 2.0 / ((1.0 + negative_slope * negative_slope) * fan_in)
    return InitVariance("he", var, fan_in * var)


def pytorch_default_init(fan_in: int) -> InitVariance:
    """PyTorch's default ``nn.Linear``/``nn.Conv`` weights: kaiming_uniform_(a=√5).

    U(−1/√fan_in, 1/√fan_in), so Var(W) = 1/(3·fan_in) and σ_w² = 1/3 — below the
    critical σ_w² of every registered activation, hence vanishing in deep plain nets.
    """
    _check_fans(fan_in)
    var = 1.0 / (3.0 * fan_in)
    return InitVariance("pytorch_default", var, fan_in * var)

"""The activation registry: each element-wise activation gradprobe knows, as plain data.

An entry says what the activation *is* (``fn``), how it gates the error signal
on the way down (``derivative``: the Hadamard factor f'(z) of docs/concepts.md §1), the
largest value that factor can take (``max_derivative``), whether it saturates
(f' → 0 for large |z|, the cause of vanishing gradients) and whether a unit can
die (output exactly 0 with f' = 0 over a whole region, so no signal comes back).

``fn`` and ``derivative`` take a tensor ``z`` and keyword parameters read from a
module by ``params``: so ``nn.LeakyReLU(0.2)`` and ``nn.ELU(alpha=0.5)`` are seen
with their own slopes, and a ``PReLU`` with its learned one.

What the Probe can see
----------------------
* Activation **modules** (``nn.Sigmoid``, ``nn.ReLU(inplace=True)``, ``nn.ReLU6``
  via ``nn.Hardtanh``, ...) are recognised by type, subclasses included
  (:func:`activation_of`). Their gate statistics (``gate_mean``, ``sat_frac``)
  are computed from the module's input z, read before an in-place module
  overwrites it.
* **Functional** calls (``torch.relu(x)``, ``F.gelu(x)`` inside a ``forward``)
  are not modules, so no hook sees them: their effect is folded into the
  enclosing module's ``error_gain`` and output statistics. Replace them by the
  module form to get per-activation statistics.
* The non-linearities inside fused recurrent layers (``nn.RNN(nonlinearity=...)``,
  the gates of ``nn.LSTM``/``nn.GRU``) run in C++ and are not visible either;
  :func:`activation_of` reports the RNN's declared non-linearity for metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .kinds import module_kind, types_applying

__all__ = ["ACTIVATIONS", "Activation", "activation_of", "get_activation"]

Params = Mapping[str, Any]
_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


@dataclass(frozen=True)
class Activation:
    """One element-wise activation: its function, its derivative and what they imply."""

    name: str
    fn: Callable[..., Tensor]
    derivative: Callable[..., Tensor]
    max_derivative: float
    saturates: bool
    can_die: bool
    module_types: tuple[type[nn.Module], ...]
    params: Callable[[nn.Module], dict[str, Any]] = field(default=lambda m: {})
    default_params: Mapping[str, Any] = field(default_factory=dict)
    # Points where f' is not smooth: quadrature over a Gaussian must split there.
    kinks: tuple[float, ...] = ()
    # A range that holds almost all outputs of a healthy layer: histogram bins go here.
    histogram_range: tuple[float, float] = (-4.0, 4.0)
    used_in: str = ""
    # f' takes negative values (GELU and SiLU dip below 0 for z below about -0.75):
    # saturation is judged on |f'(z)|, so the dip is not read as "saturated".
    signed_derivative: bool = False

    def gate(self, z: Tensor, params: Params | None = None) -> Tensor:
        """f'(z) with this activation's parameters (defaults unless given)."""
        return self.derivative(z, **{**self.default_params, **(params or {})})

    def __call__(self, z: Tensor, params: Params | None = None) -> Tensor:
        return self.fn(z, **{**self.default_params, **(params or {})})


# ---- derivatives, written out so that tests can check them against autograd ----


def _sigmoid_d(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _tanh_d(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return 1 - t * t


def _relu_d(z: Tensor) -> Tensor:
    return (z > 0).to(z.dtype)


def _leaky_fn(z: Tensor, negative_slope: float | Tensor) -> Tensor:
    return torch.where(z > 0, z, z * negative_slope)


def _leaky_d(z: Tensor, negative_slope: float | Tensor) -> Tensor:
    one = torch.ones_like(z)
    return torch.where(z > 0, one, one * negative_slope)


def _prelu_params(m: nn.Module) -> dict[str, Any]:
    weight = m.weight.detach()  # type: ignore[union-attr]
    return {"negative_slope": weight}


def _prelu_slope_for(z: Tensor, slope: float | Tensor) -> float | Tensor:
    """A PReLU's weight has one entry, or one per channel (dimension 1 of z)."""
    if isinstance(slope, Tensor) and slope.numel() > 1 and z.dim() >= 2:
        shape = [1] * z.dim()
        shape[1] = slope.numel()
        return slope.reshape(shape)
    if isinstance(slope, Tensor):
        return slope.reshape(())
    return slope


def _prelu_fn(z: Tensor, negative_slope: float | Tensor) -> Tensor:
    return _leaky_fn(z, _prelu_slope_for(z, negative_slope))


def _prelu_d(z: Tensor, negative_slope: float | Tensor) -> Tensor:
    return _leaky_d(z, _prelu_slope_for(z, negative_slope))


def _elu_fn(z: Tensor, alpha: float) -> Tensor:
    return torch.where(z > 0, z, alpha * torch.expm1(z))


def _elu_d(z: Tensor, alpha: float) -> Tensor:
    return torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(z))


def _selu_fn(z: Tensor) -> Tensor:
    return _SELU_SCALE * torch.where(z > 0, z, _SELU_ALPHA * torch.expm1(z))


def _selu_d(z: Tensor) -> Tensor:
    return _SELU_SCALE * torch.where(z > 0, torch.ones_like(z), _SELU_ALPHA * torch.exp(z))


def _silu_d(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _gelu_fn(z: Tensor, approximate: str = "none") -> Tensor:
    return torch.nn.functional.gelu(z, approximate=approximate)


def _gelu_d(z: Tensor, approximate: str = "none") -> Tensor:
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        inner = c * (z + 0.044715 * z**3)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    cdf = 0.5 * (1 + torch.erf(z / _SQRT_2))
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
    return cdf + z * pdf


def _softplus_fn(z: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return torch.nn.functional.softplus(z, beta=beta, threshold=threshold)


def _softplus_d(z: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    # PyTorch switches to the identity above the threshold; so does its derivative.
    return torch.where(z * beta > threshold, torch.ones_like(z), torch.sigmoid(beta * z))


def _hardtanh_fn(z: Tensor, min_val: float = -1.0, max_val: float = 1.0) -> Tensor:
    return torch.clamp(z, min_val, max_val)


def _hardtanh_d(z: Tensor, min_val: float = -1.0, max_val: float = 1.0) -> Tensor:
    return ((z > min_val) & (z < max_val)).to(z.dtype)


def _softsign_fn(z: Tensor) -> Tensor:
    return z / (1 + z.abs())


def _softsign_d(z: Tensor) -> Tensor:
    d = 1 + z.abs()
    return 1 / (d * d)


# The maxima of f' where it is not simply 1: found by solving f''(z) = 0.
_SILU_MAX_DERIVATIVE = 1.0998393201289  # at z ≈ 2.39936
_GELU_MAX_DERIVATIVE = 0.5 * (1 + math.erf(1.0)) + _SQRT_2 * _INV_SQRT_2PI * math.exp(-1.0)

ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation(
        "sigmoid",
        torch.sigmoid,
        _sigmoid_d,
        0.25,
        saturates=True,
        can_die=False,
        module_types=types_applying("sigmoid"),
        histogram_range=(0.0, 1.0),
        used_in="binary output",
    ),
    "tanh": Activation(
        "tanh",
        torch.tanh,
        _tanh_d,
        1.0,
        saturates=True,
        can_die=False,
        module_types=types_applying("tanh"),
        histogram_range=(-1.0, 1.0),
        used_in="RNNs",
    ),
    "relu": Activation(
        "relu",
        torch.relu,
        _relu_d,
        1.0,
        saturates=False,
        can_die=True,
        module_types=types_applying("relu"),
        kinks=(0.0,),
        histogram_range=(0.0, 6.0),
        used_in="hidden layers",
    ),
    "leaky_relu": Activation(
        "leaky_relu",
        _leaky_fn,
        _leaky_d,
        1.0,
        saturates=False,
        can_die=False,
        module_types=types_applying("leaky_relu"),
        params=lambda m: {"negative_slope": m.negative_slope},
        default_params={"negative_slope": 0.01},
        kinks=(0.0,),
        histogram_range=(-1.0, 6.0),
        used_in="hidden layers",
    ),
    "prelu": Activation(
        "prelu",
        _prelu_fn,
        _prelu_d,
        1.0,
        saturates=False,
        can_die=False,
        module_types=types_applying("prelu"),
        params=_prelu_params,
        default_params={"negative_slope": 0.25},
        kinks=(0.0,),
        histogram_range=(-2.0, 6.0),
        used_in="hidden layers (learned slope)",
    ),
    "elu": Activation(
        "elu",
        _elu_fn,
        _elu_d,
        1.0,
        saturates=True,
        can_die=False,
        module_types=types_applying("elu"),
        params=lambda m: {"alpha": m.alpha},
        default_params={"alpha": 1.0},
        kinks=(0.0,),
        histogram_range=(-1.0, 6.0),
        used_in="hidden layers",
    ),
    "selu": Activation(
        "selu",
        _selu_fn,
        _selu_d,
        _SELU_SCALE * _SELU_ALPHA,
        saturates=True,
        can_die=False,
        module_types=types_applying("selu"),
        kinks=(0.0,),
        histogram_range=(-2.0, 6.0),
        used_in="self-normalising MLPs",
    ),
    "silu": Activation(
        "silu",
        torch.nn.functional.silu,
        _silu_d,
        _SILU_MAX_DERIVATIVE,
        saturates=True,
        can_die=False,
        module_types=types_applying("silu"),
        histogram_range=(-1.0, 6.0),
        used_in="deep CNNs, NLP (Swish)",
        signed_derivative=True,
    ),
    "gelu": Activation(
        "gelu",
        _gelu_fn,
        _gelu_d,
        _GELU_MAX_DERIVATIVE,
        saturates=True,
        can_die=False,
        module_types=types_applying("gelu"),
        params=lambda m: {"approximate": m.approximate},
        default_params={"approximate": "none"},
        histogram_range=(-1.0, 6.0),
        used_in="Transformers (BERT, GPT)",
        signed_derivative=True,
    ),
    "softplus": Activation(
        "softplus",
        _softplus_fn,
        _softplus_d,
        1.0,
        saturates=True,
        can_die=False,
        module_types=types_applying("softplus"),
        params=lambda m: {"beta": m.beta, "threshold": m.threshold},
        default_params={"beta": 1.0, "threshold": 20.0},
        histogram_range=(0.0, 6.0),
        used_in="smooth ReLU, positive outputs",
    ),
    "hardtanh": Activation(
        "hardtanh",
        _hardtanh_fn,
        _hardtanh_d,
        1.0,
        saturates=True,
        can_die=False,
        module_types=types_applying("hardtanh"),
        params=lambda m: {"min_val": m.min_val, "max_val": m.max_val},
        default_params={"min_val": -1.0, "max_val": 1.0},
        kinks=(-1.0, 1.0),
        histogram_range=(-1.0, 1.0),
        used_in="cheap tanh (ReLU6 is a Hardtanh on [0, 6])",
    ),
    "softsign": Activation(
        "softsign",
        _softsign_fn,
        _softsign_d,
        1.0,
        saturates=True,
        can_die=False,
        module_types=types_applying("softsign"),
        kinks=(0.0,),
        histogram_range=(-1.0, 1.0),
        used_in="cheap tanh",
    ),
}

# Other names people use for the same function.
ALIASES: dict[str, str] = {"swish": "silu", "logistic": "sigmoid", "lrelu": "leaky_relu"}


def get_activation(name: str) -> Activation:
    """The registry entry for ``name`` (aliases such as ``swish`` accepted).

    Raises :class:`gradprobe.errors.GradprobeError` naming the known activations.
    """
    from .errors import GradprobeError

    key = ALIASES.get(name.lower(), name.lower())
    if key not in ACTIVATIONS:
        raise GradprobeError(
            f"unknown activation {name!r}",
            f"use one of: {', '.join(sorted(ACTIVATIONS))}",
        )
    return ACTIVATIONS[key]


def activation_of(module: nn.Module) -> Activation | None:
    """The registry entry for an activation module, or ``None``.

    The most specific type wins (``nn.ReLU6`` is a ``nn.Hardtanh``), so subclasses of
    the activation modules are recognised too (:func:`gradprobe.kinds.module_kind`).
    """
    name = module_kind(module).activation
    return ACTIVATIONS[name] if name is not None else None


def recurrent_nonlinearity(module: nn.Module) -> str | None:
    """The declared non-linearity of a fused recurrent layer (not hookable): metadata only."""
    kind = module_kind(module)
    if kind.cell:
        return None
    if kind.recurrent == "rnn":
        return str(module.nonlinearity)
    if kind.recurrent in ("lstm", "gru"):
        return "sigmoid gates, tanh cell"
    return None

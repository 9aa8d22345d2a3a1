"""Dynamical isometry: the spread of the input-output Jacobian's singular values.

For a deep net h^l = W^l φ(h^(l−1)) + b^l whose pre-activations sit at the fixed point q*,
the input-output Jacobian J = ∏ W^l D^l (D = diag φ'(h)) has, in the wide limit, a
spectrum of JJᵀ whose mean is χ₁^L and whose relative variance is

    var/mean² = L·(μ₂/μ₁² − 1 − s₁),    μ_k = E[φ'(√q* z)^(2k)],

with s₁ the first S-transform coefficient of WWᵀ: −1 for Gaussian weights, 0 for
orthogonal ones (Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep
learning through dynamical isometry", eq. 17). So Gaussian weights give L·μ₂/μ₁² ≥ L,
growing with depth whatever φ; orthogonal weights give L·(μ₂/μ₁² − 1), which is 0 only
when φ'(h)² does not vary: tanh near q* → 0 (σ_w² → 1⁺, small σ_b²) is close to
isometric, ReLU never is (φ'² ∈ {0, 1}: μ₂/μ₁² = 2, spread L). The ratio is invariant to
scaling W, so it holds off criticality too (where the mean is χ₁^L rather than 1).

:func:`jacobian_moments` measures the same number on a real net with random projections:
tr(JJᵀ) = E‖Jᵀv‖², tr((JJᵀ)²) = E‖JJᵀv‖² for v ~ N(0, I) (Hutchinson), by one vjp and one
jvp per probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import GradprobeError
from .meanfield import (
    ActivationLike,
    Params,
    _check_depth,
    _check_variances,
    _moments,
    _nodes,
    _resolve,
    fixed_point,
)

__all__ = ["JacobianMoments", "jacobian_moments", "jacobian_spread", "spectrum_moments"]

# s₁ of WWᵀ's S-transform, by weight distribution (Pennington et al. 2017, §2.4).
_S1 = {"gaussian": -1.0, "orthogonal": 0.0}


def spectrum_moments(
    activation: ActivationLike, weight_var: float, bias_var: float = 0.0, *, params: Params = None
) -> tuple[float, float, float]:
    """(q*, μ₁, μ₂) with μ_k = E[φ'(√q* z)^(2k)]; at q* = 0 the limit q → 0⁺. For a
    positively homogeneous φ (ReLU) μ_k does not depend on q, so an infinite q* (σ_w² a
    hair above critical, as measured from real weights) still has its moments."""
    act = _resolve(activation)
    _check_variances(weight_var, bias_var)
    q = fixed_point(act, weight_var, bias_var, params=params)
    if not math.isfinite(q) and _moments_at(act, 1.0, params) == _moments_at(act, 100.0, params):
        # a positively homogeneous φ (ReLU): D's law, hence the spread, is the same at every q
        return q, *_moments_at(act, 1.0, params)
    if not math.isfinite(q):
        raise GradprobeError(
            f"{act.name} at σ_w² = {weight_var:g}, σ_b² = {bias_var:g} has no finite fixed point q*"
            " (the signal grows without bound), so the Jacobian's spectrum has no limit",
            "pick σ_w² at or below the critical value",
        )
    return q, *_moments_at(act, q, params)


def _moments_at(act: Any, q: float, params: Params) -> tuple[float, float]:
    """(μ₁, μ₂) at the pre-activation second moment q."""
    scale = math.sqrt(max(q, 1e-280))
    z, w = _nodes(torch.zeros(1).numpy(), scale, act.kinks)
    d2 = act.gate(torch.from_numpy(scale * z[0]), params).to(torch.float64) ** 2
    wt = torch.from_numpy(w[0])
    return float((wt * d2).sum()), float((wt * d2 * d2).sum())


def jacobian_spread(
    activation: ActivationLike,
    weight_var: float,
    bias_var: float = 0.0,
    *,
    depth: int,
    init: Literal["gaussian", "orthogonal"] = "gaussian",
    q_start: float | None = None,
    params: Params = None,
) -> float:
    """var/mean² of the eigenvalues of JJᵀ over ``depth`` layers: L·(μ₂/μ₁² − 1 − s₁).

    s₁ = −1 for Gaussian weights (``init="gaussian"``), 0 for orthogonal ones.

    With ``q_start`` the pre-activations start at that second moment instead of q* and
    follow the length map; each layer then adds its own μ₂(q_l)/μ₁(q_l)² − 1 − s₁. (The
    relative variances of free factors add: for free X, Y, φ((XY)²)/φ(XY)² − 1 =
    (φ(X²)/φ(X)² − 1) + (φ(Y²)/φ(Y)² − 1); so the sum is exact in the wide limit, and at
    q_start = q* it is the formula above.)
    """
    if init not in _S1:
        raise GradprobeError(
            f"unknown weight distribution {init!r}", "use 'gaussian' or 'orthogonal'"
        )
    _check_depth(depth)
    if q_start is None:
        _q, mu1, mu2 = spectrum_moments(activation, weight_var, bias_var, params=params)
        if mu1 <= 0:
            raise GradprobeError("φ'(h) is 0 almost everywhere at q*: the Jacobian is 0")
        return depth * (mu2 / (mu1 * mu1) - 1.0 - _S1[init])
    act = _resolve(activation)
    _check_variances(weight_var, bias_var)
    if not (isinstance(q_start, (int, float)) and math.isfinite(q_start) and q_start >= 0):
        raise GradprobeError(f"q_start must be a non-negative number, got {q_start!r}")
    total, q = 0.0, float(q_start)
    for _ in range(depth):
        mu1, mu2 = _moments_at(act, q, params)
        if mu1 <= 0:
            raise GradprobeError(f"φ'(h) is 0 almost everywhere at q = {q:g}: the Jacobian is 0")
        total += mu2 / (mu1 * mu1) - 1.0 - _S1[init]
        q = weight_var * _moments(act, q, params)[0] + bias_var
    return total


@dataclass(frozen=True)
class JacobianMoments:
    """tr(JJᵀ)/n and tr((JJᵀ)²)/n (n = output size), their relative spread, and the standard
    errors of the two Hutchinson estimates over ``probes`` random vectors."""

    m1: float
    m2: float
    spread: float
    m1_se: float
    m2_se: float
    probes: int


def jacobian_moments(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    probes: int = 64,
    generator: torch.Generator | None = None,
) -> JacobianMoments:
    """The moments of JJᵀ for J = ∂fn/∂x at ``x`` (one sample, a vector), by Hutchinson.

    For each v ~ N(0, I) in the output space: u = Jᵀv (vjp), a = Ju (jvp); then
    vᵀJJᵀv = ‖u‖² estimates tr(JJᵀ) and ‖a‖² estimates tr((JJᵀ)²). spread = m2/m1² − 1.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 2:
        raise GradprobeError(f"probes must be a whole number ≥ 2, got {probes!r}")
    x = x.detach()
    out, vjp_fn = torch.func.vjp(fn, x)
    n = out.numel()
    t1, t2 = [], []
    for _ in range(probes):
        v = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        (u,) = vjp_fn(v)
        _, a = torch.func.jvp(fn, (x,), (u,))
        t1.append(float(u.pow(2).sum()) / n)
        t2.append(float(a.pow(2).sum()) / n)
    t1_t, t2_t = torch.tensor(t1, dtype=torch.float64), torch.tensor(t2, dtype=torch.float64)
    m1, m2 = float(t1_t.mean()), float(t2_t.mean())
    return JacobianMoments(
        m1=m1,
        m2=m2,
        spread=m2 / (m1 * m1) - 1.0,
        m1_se=float(t1_t.std() / math.sqrt(probes)),
        m2_se=float(t2_t.std() / math.sqrt(probes)),
        probes=probes,
    )

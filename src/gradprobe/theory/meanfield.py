"""Mean-field theory of signal propagation: what gradients *should* do at initialisation.

A fully connected network of ``depth`` hidden layers of equal width N,

    h^1 = W^1 x + b^1,     h^l = W^l φ(h^(l-1)) + b^l   (l = 2 … depth),
    W^l_ij ~ N(0, σ_w² / N),    b^l_i ~ N(0, σ_b²),

followed by a linear read-out, is described for large N by a few scalar maps
(Poole et al. 2016, "Exponential expressivity in deep neural networks through
transient chaos"; Schoenholz et al. 2017, "Deep information propagation").

Conventions used throughout this module
---------------------------------------
* ``weight_var`` is σ_w² = fan_in · Var(W) and ``bias_var`` is σ_b² = Var(b).
  PyTorch's default ``nn.Linear`` has Var(W) = 1/(3·fan_in), i.e. σ_w² = 1/3.
* ``q`` is the second moment of one pre-activation, q^l = E[(h^l_i)²].
  The **length map** is  q^l = L(q^(l-1)) = σ_w² E_z[φ(√q^(l-1) z)²] + σ_b²,
  z ~ N(0, 1), and q* is its fixed point (:func:`fixed_point`).
* ``q0`` is the mean square of the network's input entries, (1/N₀)‖x‖²
  (1 for standardised data), so the first hidden pre-activation has
  q^1 = σ_w² q0 + σ_b².
* The error signal of layer l is δ^l = dL/dh^l, the gradient with respect to the
  output of the l-th hidden ``Linear`` — what :class:`gradprobe.Probe` records as
  ``error_norm`` for that module. Going down one layer,
  δ^l = φ'(h^l) ∘ (W^(l+1))ᵀ δ^(l+1), so in the mean-field limit
      ‖δ^l‖² / ‖δ^(l+1)‖² = χ(q^l) = σ_w² E_z[φ'(√q^l z)²].
  χ₁ is this factor at the fixed point (:func:`chi1`); χ₁ < 1 is the ordered
  (vanishing) phase, χ₁ > 1 the chaotic (exploding) phase, χ₁ = 1 criticality.

Gaussian expectations are computed by Gauss–Legendre quadrature on pieces of the
range |z| ≤ 12, split at the activation's kinks (``Activation.kinks``) and on
a grid fine in both z and the activation's own variable √q·z, which keeps them
accurate to about 1e-13 for every registered activation (plain Gauss–Hermite
is not: it is 1.6 % off for softsign). The test suite checks them against mpmath.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from ..activations import Activation, get_activation
from ..errors import GradprobeError

__all__ = [
    "c_star",
    "chi1",
    "chi_c",
    "correlation_map",
    "critical_weight_var",
    "depth_scale",
    "fixed_point",
    "gaussian_expectation",
    "length_map",
    "length_map_slope",
    "predict_error_profile",
    "predict_error_ratio",
    "predict_log10_error_ratio",
]

ActivationLike = str | Activation
Params = Mapping[str, Any] | None

# Quadrature layout: |z| ≤ _Z_MAX (the Gaussian mass beyond is ~1e-32), a break
# every _Z_STEP in z, and breaks at these values of the activation's argument
# u = mean + scale·z, where the registered activations change shape.
_Z_MAX = 12.0
_Z_STEP = 1.0
_U_BREAKS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0)
_GL_NODES = 24
# Below this q the limit q → 0⁺ is taken (a kink at 0 is then averaged over both sides).
_Q_TINY = 1e-280
# Above this q the length map is taken to have no finite fixed point.
_Q_HUGE = 1e15


def _brentq(f: Callable[[float], float], a: float, b: float, **kw: Any) -> float:
    """scipy's Brent root finder, imported on first use (keeps ``import gradprobe`` light)."""
    from scipy.optimize import brentq

    return float(brentq(f, a, b, **kw))


def _resolve(activation: ActivationLike) -> Activation:
    return activation if isinstance(activation, Activation) else get_activation(activation)


def _check_variances(weight_var: float, bias_var: float) -> None:
    if not (isinstance(weight_var, (int, float)) and math.isfinite(weight_var) and weight_var > 0):
        raise GradprobeError(
            f"weight variance must be a positive number, got {weight_var!r}",
            "pass σ_w² = fan_in·Var(W), e.g. 1.0 (Xavier), 2.0 (He), 0.333 (PyTorch default)",
        )
    if not (isinstance(bias_var, (int, float)) and math.isfinite(bias_var) and bias_var >= 0):
        raise GradprobeError(
            f"bias variance must be a non-negative number, got {bias_var!r}",
            "pass σ_b² = Var(b), e.g. 0.0 for zero biases",
        )


def _check_depth(depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise GradprobeError(
            f"depth must be a whole number of hidden layers ≥ 1, got {depth!r}",
            "pass e.g. --depth 10",
        )


def _check_q0(q0: float) -> None:
    if not (isinstance(q0, (int, float)) and math.isfinite(q0) and q0 >= 0):
        raise GradprobeError(
            f"input second moment q0 must be a non-negative number, got {q0!r}",
            "pass the mean square of the input entries (1.0 for standardised data)",
        )


# ---------------------------------------------------------------- Gaussian expectations


_GL_X, _GL_W = np.polynomial.legendre.leggauss(_GL_NODES)


def _nodes(
    mean: np.ndarray, scale: float | np.ndarray, kinks: Sequence[float], n: int = _GL_NODES
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes z and weights w (shape [M, K]) with Σ_k w g(mean + scale·z) ≈ E_z[g(mean + scale·z)].

    One row per entry of ``mean``; ``scale`` is one number or one per row. Each row's
    range |z| ≤ _Z_MAX is cut at a grid in z, at the points where u = mean + scale·z
    crosses _U_BREAKS and the kinks, and each piece gets an n-point Gauss–Legendre rule
    times the normal density. Cuts outside the range are clipped to its ends, leaving
    pieces of zero width (so is every u-cut of a row whose scale is 0).
    """
    gl_x, gl_w = (_GL_X, _GL_W) if n == _GL_NODES else np.polynomial.legendre.leggauss(n)
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), mean.shape)
    grid = np.arange(-_Z_MAX, _Z_MAX + 0.5 * _Z_STEP, _Z_STEP)
    u_cuts = np.array(sorted({*_U_BREAKS, *(-u for u in _U_BREAKS), *kinks}), dtype=np.float64)
    positive = scale > 0
    safe_scale = np.where(positive, scale, 1.0)
    mapped = np.clip((u_cuts[None, :] - mean[:, None]) / safe_scale[:, None], -_Z_MAX, _Z_MAX)
    mapped = np.where(positive[:, None], mapped, -_Z_MAX)
    cuts = np.sort(np.concatenate([np.broadcast_to(grid, (mean.size, grid.size)), mapped], 1), 1)
    lo, hi = cuts[:, :-1], cuts[:, 1:]
    half, mid = 0.5 * (hi - lo), 0.5 * (hi + lo)
    z = mid[..., None] + half[..., None] * gl_x  # [M, pieces, n]
    w = half[..., None] * gl_w * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return z.reshape(mean.size, -1), w.reshape(mean.size, -1)


def gaussian_expectation(
    g: Callable[[torch.Tensor], torch.Tensor],
    variance: float,
    *,
    mean: float = 0.0,
    kinks: Sequence[float] = (),
) -> float:
    """E[g(u)] for u ~ N(mean, variance), by piecewise Gauss–Legendre quadrature.

    ``g`` takes and returns a float64 tensor (element-wise); ``kinks`` are values of
    u where g or its derivatives jump, at which the integral is split. Accurate to
    about 1e-13 for the registered activations, their derivatives and products.
    """
    if variance < 0 or not math.isfinite(variance):
        raise GradprobeError(f"variance must be non-negative, got {variance!r}")
    scale = math.sqrt(max(variance, _Q_TINY))
    z, w = _nodes(np.array([mean]), scale, kinks)
    u = torch.from_numpy(mean + scale * z[0])
    values = g(u).to(torch.float64).numpy()
    return float(np.dot(w[0], values))


def _moments(act: Activation, q: float, params: Params) -> tuple[float, float, float]:
    """(E[φ(u)²], E[φ'(u)²], E[z φ(u) φ'(u)] / √q) for u = √q z, one quadrature."""
    scale = math.sqrt(max(q, _Q_TINY))
    z, w = _nodes(np.zeros(1), scale, act.kinks)
    zt = torch.from_numpy(z[0])
    u = scale * zt
    f = act(u, params).to(torch.float64)
    d = act.gate(u, params).to(torch.float64)
    wt = torch.from_numpy(w[0])
    e_f2 = float((wt * f * f).sum())
    e_d2 = float((wt * d * d).sum())
    e_slope = float((wt * zt * f * d).sum()) / scale
    return e_f2, e_d2, e_slope


def _second_moments(act: Activation, qs: np.ndarray, params: Params) -> np.ndarray:
    """E[φ(√q z)²] for each q in ``qs``, in one batched quadrature (see :func:`_moments`)."""
    qs = np.asarray(qs, dtype=np.float64).reshape(-1)
    scales = np.sqrt(np.maximum(qs, _Q_TINY))
    z, w = _nodes(np.zeros(qs.size), scales, act.kinks)
    f = act(torch.from_numpy(scales[:, None] * z), params).to(torch.float64)
    return (torch.from_numpy(w) * f * f).sum(dim=1).numpy()


def _slopes_at_zero(act: Activation, params: Params) -> tuple[float, float]:
    """(φ'(0⁻), φ'(0⁺)): one-sided slopes, which decide what a network does as q → 0."""
    ends = act.gate(torch.tensor([-1e-12, 1e-12], dtype=torch.float64), params)
    return float(ends[0]), float(ends[1])


def _is_linear_at_zero(act: Activation, params: Params) -> bool:
    """φ'(0⁻) = φ'(0⁺): as q → 0 the network becomes linear (tanh, softsign, silu …)."""
    left, right = _slopes_at_zero(act, params)
    return abs(left - right) <= 1e-9 * max(abs(left), abs(right), 1e-300)


def length_map(
    activation: ActivationLike, weight_var: float, bias_var: float, q: float, params: Params = None
) -> float:
    """L(q) = σ_w² E_z[φ(√q z)²] + σ_b²: the next layer's pre-activation second moment."""
    act = _resolve(activation)
    _check_variances(weight_var, bias_var)
    return weight_var * _moments(act, q, params)[0] + bias_var


def length_map_slope(
    activation: ActivationLike, weight_var: float, bias_var: float, q: float, params: Params = None
) -> float:
    """dL/dq = σ_w² E[φ'(u)² + φ(u)φ''(u)], u = √q z (Schoenholz et al. 2017, eq. 5).

    Computed without φ'' by Gaussian integration by parts, as σ_w² E[z φ(u) φ'(u)]/√q,
    which is exact for the continuous, piecewise smooth registered activations.
    """
    act = _resolve(activation)
    _check_variances(weight_var, bias_var)
    return weight_var * _moments(act, q, params)[2]


def _chi(act: Activation, weight_var: float, q: float, params: Params) -> float:
    """χ(q) = σ_w² E[φ'(√q z)²]; at q = ∞ the limit σ_w² (φ'(+∞)² + φ'(−∞)²)/2."""
    if math.isinf(q):
        ends = act.gate(torch.tensor([-1e8, 1e8], dtype=torch.float64), params)
        return weight_var * float((ends**2).mean())
    return weight_var * _moments(act, q, params)[1]


# fixed_point walks from its start on a geometric grid of this many points per doubling
# (so two roots closer than a factor 2^(1/4) ≈ 1.19 can be missed), in batches.
_WALK_STEPS_PER_DOUBLING = 4
_WALK_BATCH = 16
# Below this q the downward walk stops: the remaining root, if any, is found in [0, q].
_Q_FLOOR = 1e-30
# With L(0) = 0, a root below this is q* = 0 seen through rounding (critical tanh: the
# relative gap −2q falls below the tolerance near q ~ 1e-14, yet q^l → 0 like 1/l).
_Q_ZERO = 1e-10
# |L(q) − q| at most this times q is taken as a root: rounding, not a direction of travel.
_GAP_RTOL = 1e-14


def fixed_point(
    activation: ActivationLike,
    weight_var: float,
    bias_var: float,
    *,
    q_start: float | None = None,
    params: Params = None,
) -> float:
    """q*: the fixed point of the length map reached by iterating it from ``q_start``.

    The default start is q^1 = σ_w² + σ_b², the first layer of a network fed
    standardised data (Poole et al. 2016, eq. 3).

    How: the length map L is non-decreasing in q for every registered activation (the
    test suite checks L'(q) ≥ 0 on a wide grid), so iterating it from q moves towards
    the nearest root of L(q) − q in the direction of sign(L(q) − q) and stops there.
    The solver walks that way on a geometric grid (4 points per doubling), brackets the
    first sign change and refines it with Brent's method: the root returned is the
    attractor of the start, never a farther root in a wide bracket. |L(q) − q| within
    rounding (1e-14·q) counts as a root.

    Degenerate cases:

    * ``math.inf`` when q^l grows without bound (unbounded φ in the chaotic phase,
      e.g. relu with σ_w² > 2); the walk gives up above 1e15.
    * 0 when the signal dies out: L(0) = 0 (φ(0) = 0 and σ_b² = 0) and L(q) < q below
      the start, e.g. tanh with σ_w² ≤ 1 (at σ_w² = 1 q^l → 0 like 1/l).
    * q_start itself when L(q_start) = q_start, e.g. a positively homogeneous φ (relu,
      leaky_relu, prelu) with σ_b² = 0 at its critical σ_w², where every q is fixed.
    * Where the length map has several attractors the start decides; the default is
      what a network fed standardised data does.
    """
    act = _resolve(activation)
    _check_variances(weight_var, bias_var)
    if q_start is not None and not (
        isinstance(q_start, (int, float)) and math.isfinite(q_start) and q_start >= 0
    ):
        raise GradprobeError(
            f"q_start must be a non-negative number, got {q_start!r}",
            "pass the second moment of the first layer's pre-activations, e.g. 1.0",
        )
    q = weight_var + bias_var if q_start is None else float(q_start)
    at_zero = weight_var * float(act(torch.zeros(1, dtype=torch.float64), params)[0]) ** 2
    dies_out = at_zero + bias_var == 0.0  # L(0) = 0

    def gaps(xs: np.ndarray) -> np.ndarray:
        return weight_var * _second_moments(act, xs, params) + bias_var - xs

    def gap(x: float) -> float:
        return float(gaps(np.array([x]))[0])

    def is_root(x: float, g: float) -> bool:
        return abs(g) <= _GAP_RTOL * max(x, x + g, 1e-300)

    if q == 0.0:  # one step of the map: q^2 = L(0)
        if dies_out:
            return 0.0
        q = at_zero + bias_var
    g_start = gap(q)
    if is_root(q, g_start):
        return q
    up = g_start > 0
    ratio = 2.0 ** ((1.0 if up else -1.0) / _WALK_STEPS_PER_DOUBLING)
    prev = q
    steps = 1
    while True:
        xs = q * ratio ** np.arange(steps, steps + _WALK_BATCH, dtype=np.float64)
        xs = xs[xs <= 2 * _Q_HUGE] if up else xs[xs >= 0.5 * _Q_FLOOR]
        for x, g in zip(xs.tolist(), gaps(xs).tolist(), strict=True):
            if dies_out and not up and x < _Q_ZERO:  # any root left is q* = 0 (see _Q_ZERO)
                return 0.0
            if is_root(x, g):
                return x
            if (g > 0) != up:  # the first sign change: the nearest root lies in between
                lo, hi = (prev, x) if up else (x, prev)
                root = _brentq(gap, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=200)
                return 0.0 if (dies_out and root < _Q_ZERO) else root
            prev = x
        steps += _WALK_BATCH
        if up and prev > _Q_HUGE:
            return math.inf
        if not up and prev < _Q_FLOOR:
            break
    # L(q) < q all the way down to _Q_FLOOR: q* = 0 if L(0) = 0, else the root in (0, prev)
    if dies_out:
        return 0.0
    return _brentq(gap, 0.0, prev, xtol=1e-300, rtol=1e-15, maxiter=200)


def chi1(
    activation: ActivationLike, weight_var: float, bias_var: float, *, params: Params = None
) -> float:
    """χ₁ = σ_w² E_z[φ'(√q* z)²] (Poole et al. 2016; Schoenholz et al. 2017, eq. 4).

    The factor by which the squared error-signal norm is multiplied per layer once
    the pre-activations have reached their fixed point q*. At q* = 0 the limit
    q → 0⁺ is used (relu: σ_w²/2, not 0), at q* = ∞ the limit q → ∞.
    """
    act = _resolve(activation)
    q = fixed_point(act, weight_var, bias_var, params=params)
    return _chi(act, weight_var, q, params)


def correlation_map(
    activation: ActivationLike,
    weight_var: float,
    bias_var: float,
    c: float,
    *,
    q: float | None = None,
    params: Params = None,
) -> float:
    """The correlation map c ↦ (σ_w² E[φ(u₁)φ(u₂)] + σ_b²) / q (Poole et al. 2016, eq. 5).

    (u₁, u₂) are jointly Gaussian with variances q and correlation c; q defaults to q*.
    The two-dimensional expectation is nested: u₁ = √q z₁ outside, u₂ = √q (c z₁ +
    √(1−c²) z₂) inside, each split at the kinks.
    """
    act = _resolve(activation)
    q = fixed_point(act, weight_var, bias_var, params=params) if q is None else q
    e = _pair_expectation(act, q, c, params, derivative=False)
    return (weight_var * e + bias_var) / max(q, _Q_TINY)


def _pair_expectation(
    act: Activation, q: float, c: float, params: Params, derivative: bool
) -> float:
    """E[g(u₁) g(u₂)] with g = φ (or φ'), u₁, u₂ ~ N(0, q) with correlation c."""
    if not -1.0 <= c <= 1.0:
        raise GradprobeError(f"correlation must lie in [-1, 1], got {c!r}")
    g = act.gate if derivative else act.__call__
    scale = math.sqrt(max(q, _Q_TINY))
    z1, w1 = _nodes(np.zeros(1), scale, act.kinks, n=16)
    z1, w1 = z1[0], w1[0]
    keep = w1 > 1e-300
    z1, w1 = z1[keep], w1[keep]
    s = math.sqrt(max(0.0, 1.0 - c * c))
    g1 = g(torch.from_numpy(scale * z1), params).to(torch.float64)
    if s * scale < 1e-12:  # fully (anti-)correlated: u₂ = c·u₁
        g2 = g(torch.from_numpy(c * scale * z1), params).to(torch.float64)
        return float((torch.from_numpy(w1) * g1 * g2).sum())
    means = c * scale * z1
    z2, w2 = _nodes(means, s * scale, act.kinks, n=16)
    u2 = torch.from_numpy(means[:, None] + s * scale * z2)
    inner = (torch.from_numpy(w2) * g(u2, params).to(torch.float64)).sum(dim=1)
    return float((torch.from_numpy(w1) * g1 * inner).sum())


# |gap| of the correlation map at most this counts as a root: its noise is ~1e-16.
_C_GAP_TOL = 1e-12


def c_star(
    activation: ActivationLike, weight_var: float, bias_var: float, *, params: Params = None
) -> float:
    """c*: the fixed point of the correlation map that every pair of inputs converges to.

    Which root that is follows from two facts that hold for every φ (not only the
    monotone ones), with M(c) the correlation map at a finite q* > 0 and gap = M(c) − c:

    * On [0, 1], M(c) = (σ_w² Σ_n a_n² cⁿ + σ_b²)/q* (a_n the Hermite coefficients of
      φ(√q* z)): non-decreasing and convex, with M(1) = 1 and M'(1) = χ₁. So gap(0) =
      (σ_w² E[φ]² + σ_b²)/q* ≥ 0 and gap has at most one root in [0, 1).
    * On [−1, 0], |odd part| ≤ |c|·(its value at 1) gives gap(c) ≥ σ_b²(1 + |c|)/q* ≥ 0:
      every start c⁰ ∈ (−1, 0) moves up. c = −1 is a root only for an odd φ with σ_b² = 0,
      and it repels.

    Hence every start c⁰ ∈ (−1, 1) converges to the same c*: 1 in the ordered phase
    (χ₁ ≤ 1, where gap > 0 on [0, 1)); in the chaotic phase (χ₁ > 1, where gap < 0 just
    below 1) the unique root in [0, 1), which is 0 when E[φ(√q* z)] = 0 and σ_b² = 0
    (odd φ such as tanh, softsign, hardtanh). That root is bracketed in [0, 1 − δ], and a
    gap(0) within rounding (|gap| ≤ 1e-12) is the root 0 itself, never a sign to follow.
    Within δ = 1e-6 of criticality c* is returned as 1.

    Degenerate q*:

    * q* = ∞ (unbounded φ, chaotic length map): 1. Large pre-activations see only φ's
      positively homogeneous asymptote, whose normalised correlation map (the arc-cosine
      kernel of relu) lies above the diagonal on [−1, 1) and so attracts to 1.
    * q* = 0 with a kink at 0 (relu, leaky_relu, prelu, selu; elu with α ≠ 1): φ acts
      as the positively homogeneous map with the same one-sided slopes, whose normalised
      correlation map does not depend on q and attracts to 1: c* = 1.
    * q* = 0 with φ linear at 0 (tanh, softsign, hardtanh, silu, gelu, elu at σ_b² = 0
      in the ordered phase): the pre-activations shrink to 0, the network becomes linear
      and every correlation is preserved to first order, so the limit depends on the
      inputs and there is no unique c*: ``math.nan``. (:func:`chi_c` is then χ₁.)
    """
    act = _resolve(activation)
    q = fixed_point(act, weight_var, bias_var, params=params)
    if math.isinf(q):
        return 1.0
    if q == 0.0:
        return math.nan if _is_linear_at_zero(act, params) else 1.0
    if _chi(act, weight_var, q, params) <= 1.0 + 1e-9:
        return 1.0

    def gap(c: float) -> float:
        return correlation_map(act, weight_var, bias_var, c, q=q, params=params) - c

    hi = None
    for delta in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.5, 1.0):
        if gap(1.0 - delta) < -_C_GAP_TOL:
            hi = 1.0 - delta
            break
    if hi is None:  # too close to criticality to tell c* from 1
        return 1.0
    if hi == 0.0 or gap(0.0) <= _C_GAP_TOL:  # gap(0) ≥ 0 in exact arithmetic
        return 0.0
    return _brentq(gap, 0.0, hi, xtol=1e-13)


def chi_c(
    activation: ActivationLike, weight_var: float, bias_var: float, *, params: Params = None
) -> float:
    """χ_c* = σ_w² E[φ'(u₁) φ'(u₂)] at correlation c* (Schoenholz et al. 2017, eq. 7).

    The slope of the correlation map at its stable fixed point; equals χ₁ when c* = 1,
    and at q* = 0 with φ linear at 0 (c* undefined, see :func:`c_star`), where
    E[φ'(u₁)φ'(u₂)] → φ'(0)² for every correlation.
    """
    act = _resolve(activation)
    q = fixed_point(act, weight_var, bias_var, params=params)
    c = c_star(act, weight_var, bias_var, params=params)
    if math.isnan(c) or c >= 1.0:
        return _chi(act, weight_var, q, params)
    return weight_var * _pair_expectation(act, q, c, params, derivative=True)


def depth_scale(
    activation: ActivationLike,
    weight_var: float,
    bias_var: float,
    *,
    kind: Literal["correlation", "length"] = "correlation",
    params: Params = None,
) -> float:
    """The number of layers over which signals decay to their fixed point, in layers.

    ``kind="correlation"`` (the default, and the one the CLI reports) returns
    ξ_c = −1/ln χ_c* (Schoenholz et al. 2017, eq. 9): how deep correlations between
    inputs, and so gradients, propagate; a network of depth ≲ 6 ξ_c is trainable.
    It is ``math.inf`` at criticality (χ₁ = 1).

    ``kind="length"`` returns ξ_q = −1/ln L'(q*) (eq. 8), the scale over which the
    pre-activation length relaxes to q*; ``math.inf`` when there is no finite q*.
    """
    act = _resolve(activation)
    _check_variances(weight_var, bias_var)
    if kind == "length":
        q = fixed_point(act, weight_var, bias_var, params=params)
        if math.isinf(q):
            return math.inf
        slope = weight_var * _moments(act, max(q, 1e-12), params)[2]
    elif kind == "correlation":
        slope = chi_c(act, weight_var, bias_var, params=params)
    else:
        raise GradprobeError(f"unknown depth scale {kind!r}", "use 'correlation' or 'length'")
    if slope <= 0:
        return 0.0
    if abs(math.log(slope)) < 1e-12:
        return math.inf
    return abs(1.0 / math.log(slope))


def critical_weight_var(
    activation: ActivationLike, bias_var: float = 0.0, *, params: Params = None
) -> float:
    """The σ_w² at which χ₁ = 1 for this σ_b²: the edge of chaos (Schoenholz et al. 2017).

    Initialising on this line keeps the error signal's norm constant with depth to
    first order. Known values: relu 2 (He init), tanh 1 at σ_b² = 0.
    Raises :class:`GradprobeError` if χ₁ does not cross 1 for σ_w² in [1e-4, 1e8], or
    jumps across it (silu and gelu at σ_b² = 0: φ'(0) = ½, so q* = 0 is stable until
    σ_w² is so large that q* is infinite; likewise at small σ_b² > 0).
    """
    act = _resolve(activation)
    _check_variances(1.0, bias_var)

    def gap(log_w: float) -> float:
        return math.log(max(chi1(act, math.exp(log_w), bias_var, params=params), 1e-300))

    grid = np.log(np.geomspace(1e-4, 1e8, 25))
    prev = gap(float(grid[0]))
    for lo, hi in itertools.pairwise(grid):
        cur = gap(float(hi))
        if prev == 0.0:
            return float(math.exp(lo))
        if prev < 0 <= cur or prev > 0 >= cur:
            root = float(math.exp(_brentq(gap, float(lo), float(hi), xtol=1e-13)))
            if abs(gap(math.log(root))) > 1e-6:
                raise GradprobeError(
                    f"χ₁ of {act.name} jumps across 1 at σ_w² ≈ {root:.4g} (σ_b² = {bias_var:g}):"
                    " the finite fixed point q* disappears there and the length map diverges,"
                    " so there is no critical initialisation at this bias variance",
                    "try a larger bias variance, e.g. 0.5",
                )
            return root
        prev = cur
    raise GradprobeError(
        f"χ₁ of {act.name} does not reach 1 for σ_w² in [1e-4, 1e8] at σ_b² = {bias_var}",
        "this activation has no critical initialisation at this bias variance",
    )


# ---------------------------------------------------------------- error-signal predictions


def _q_sequence(
    act: Activation, weight_var: float, bias_var: float, depth: int, q0: float, params: Params
) -> list[float]:
    """q^1 … q^depth from q^1 = σ_w² q0 + σ_b² by the length map."""
    qs = [weight_var * q0 + bias_var]
    for _ in range(depth - 1):
        qs.append(weight_var * _moments(act, qs[-1], params)[0] + bias_var)
    return qs


def predict_error_profile(
    activation: ActivationLike,
    weight_var: float,
    bias_var: float,
    depth: int,
    q0: float = 1.0,
    *,
    params: Params = None,
) -> np.ndarray:
    """log10 ‖δ^l‖/‖δ^depth‖ for l = 1 … depth: the predicted error norm of each hidden layer.

    δ^l = dL/dh^l is the error signal at the output of the l-th hidden ``Linear``
    (see the module docstring). Layer l's factor on the way down is χ(q^l) =
    σ_w² E[φ'(√q^l z)²] with q^l iterated by the length map from q^1 = σ_w² q0 + σ_b²,
    so finite depths and inputs away from q* are predicted, not only χ₁:
        log10 ‖δ^l‖/‖δ^depth‖ = ½ Σ_{k=l}^{depth−1} log10 χ(q^k).
    The last entry is 0.
    """
    act = _resolve(activation)
    _check_variances(weight_var, bias_var)
    _check_depth(depth)
    _check_q0(q0)
    qs = _q_sequence(act, weight_var, bias_var, depth, q0, params)
    half_logs = [0.5 * math.log10(max(_chi(act, weight_var, q, params), 1e-300)) for q in qs[:-1]]
    tail = np.cumsum(half_logs[::-1])[::-1] if half_logs else np.zeros(0)
    return np.append(tail, 0.0)


def predict_log10_error_ratio(
    activation: ActivationLike,
    weight_var: float,
    bias_var: float,
    depth: int,
    q0: float = 1.0,
    *,
    params: Params = None,
) -> float:
    """log10 of :func:`predict_error_ratio`: finite even where the ratio under- or overflows."""
    profile = predict_error_profile(activation, weight_var, bias_var, depth, q0, params=params)
    return float(profile[0])


def predict_error_ratio(
    activation: ActivationLike,
    weight_var: float,
    bias_var: float,
    depth: int,
    q0: float = 1.0,
    *,
    params: Params = None,
) -> float:
    """Predicted ‖δ^1‖ / ‖δ^depth‖: error norm at the first hidden Linear over the last.

    ``depth`` is the number of hidden ``Linear → φ`` layers, so the ratio has
    depth − 1 factors √χ(q^l) (see :func:`predict_error_profile`); ``q0`` is the mean
    square of the input entries. Below 1: vanishing towards the input; above: exploding.
    """
    return 10.0 ** predict_log10_error_ratio(
        activation, weight_var, bias_var, depth, q0, params=params
    )

"""The theories beyond the plain MLP, each against an independent computation in float64:
Monte Carlo nets (residual growth, finite-width spread), the exact Jacobian and autograd's
jvp/vjp (dynamical isometry), and the Probe's measured memory on real LSTMs/GRUs.

Monte Carlo tolerances are 4 standard errors of the estimator (a fixed seed, so the test
is deterministic; 4 SE keeps it from resting on a lucky draw yet fails a wrong formula,
whose error is many SE here). Rounding on another CPU moves a float64 mean by ~1e-15,
far inside that.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradprobe import Probe, theory
from gradprobe.errors import GradprobeError
from reference import recurrent_carry_gates

SE = 4.0  # standard errors allowed to a Monte Carlo estimate


def _gaussian(n_nets: int, rows: int, cols: int, var: float, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n_nets, rows, cols, generator=g, dtype=torch.float64) * math.sqrt(var)


# ---------------------------------------------------------------- residual: (1 + α²g)^L


def _residual_ratios(alpha: float, depth: int, width: int, nets: int, seed: int):
    """Per net: ‖x_L‖²/‖x_0‖² forward and ‖∂(v·x_L)/∂x_0‖²/‖v‖² backward, for blocks
    x ← x + α·W₂ ReLU(W₁ x), W₁ ~ N(0, 2/n) (He), W₂ ~ N(0, 1/n): branch gain 1."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(nets, width, generator=g, dtype=torch.float64, requires_grad=True)
    x = x0
    for _ in range(depth):
        w1 = _gaussian(nets, width, width, 2.0 / width, g)
        w2 = _gaussian(nets, width, width, 1.0 / width, g)
        x = x + alpha * torch.bmm(w2, torch.relu(torch.bmm(w1, x[..., None])))[..., 0]
    v = torch.randn(nets, width, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((v * x).sum(), x0)  # nets do not mix: one grad per net
    fwd = x.detach().pow(2).sum(1) / x0.detach().pow(2).sum(1)
    bwd = grad.pow(2).sum(1) / v.pow(2).sum(1)
    return fwd, bwd


@pytest.mark.parametrize("width", [8, 32])
@pytest.mark.parametrize("depth", [4, 12])
@pytest.mark.parametrize("scaled", [False, True])
def test_residual_growth_forward_and_backward_monte_carlo(width, depth, scaled):
    alpha = 1.0 / math.sqrt(depth) if scaled else 1.0
    predicted = theory.residual_growth(alpha, depth)
    fwd, bwd = _residual_ratios(alpha, depth, width, nets=2000, seed=width * 100 + depth)
    for what, r in (("forward", fwd), ("backward", bwd)):
        se = float(r.std() / math.sqrt(r.numel()))
        assert abs(float(r.mean()) - predicted) <= SE * se, (what, float(r.mean()), predicted, se)
    # the published contrast: α = 1 explodes with depth, α = 1/√L stays O(1) (→ e)
    if scaled:
        assert predicted < math.e
    else:
        assert predicted == 2.0**depth


def test_residual_growth_limits_and_gain():
    assert theory.residual_growth(0.0, 50) == 1.0
    for depth in (10, 100, 10_000):
        assert theory.residual_growth(1 / math.sqrt(depth), depth, gain=2.0) < math.exp(2.0)
    assert theory.residual_growth(1 / math.sqrt(10_000), 10_000, 2.0) == pytest.approx(
        math.exp(2.0),
        rel=2e-4,  # (1 + g/L)^L = e^g (1 − g²/(2L) + …): 2e-4 at L = 10⁴
    )
    assert theory.residual_growth(1.0, 2000) == math.inf
    assert theory.branch_gain(2.0, 1.0, 0.5) == 1.0
    with pytest.raises(GradprobeError, match="depth"):
        theory.residual_growth(1.0, -1)
    with pytest.raises(GradprobeError, match="branch scale"):
        theory.residual_growth(math.nan, 3)


# ---------------------------------------------------------------- finite width: (1 + 5/n)^L


@pytest.mark.parametrize(
    ("width", "depth", "nets"), [(6, 4, 20_000), (16, 10, 20_000), (32, 8, 5000)]
)
def test_width_spread_against_the_spread_over_seeds(width, depth, nets):
    g = torch.Generator().manual_seed(width + depth)
    x = torch.randn(nets, width, generator=g, dtype=torch.float64)
    r = torch.ones(nets, dtype=torch.float64)
    for _ in range(depth):
        y = torch.relu(torch.bmm(_gaussian(nets, width, width, 2.0 / width, g), x[..., None]))[
            ..., 0
        ]
        r = r * y.pow(2).sum(1) / x.pow(2).sum(1)
        # direction only (R is a product); a net whose layer is all zero has R = 0 for
        # good and goes on from any unit vector
        norm = y.norm(dim=1, keepdim=True)
        x = torch.where(norm > 0, y / norm.clamp_min(1e-300), torch.full_like(y, width**-0.5))
    predicted = theory.width_spread(width, depth)
    # The standard error of the mean of R² from the exact E[R⁴] (the sample's own would
    # understate it for this heavy-tailed R).
    se = math.sqrt((theory.ratio_moment(width, depth, 4) - predicted**2) / nets)
    assert abs(float(r.pow(2).mean()) - predicted) <= SE * se
    se1 = math.sqrt((predicted - 1.0) / nets)  # E[R] = 1, Var R = E[R²] − 1
    assert abs(float(r.mean()) - 1.0) <= SE * se1


def test_width_spread_closed_form_and_moments():
    assert theory.width_spread(5, 1) == pytest.approx(2.0, rel=1e-15)
    assert theory.ratio_moment(16, 7, 2) == pytest.approx(theory.width_spread(16, 7), rel=1e-12)
    assert theory.ratio_moment(16, 7, 1) == pytest.approx(1.0, rel=1e-12)
    # grows with depth/width: a 100-layer, width-100 ReLU net has E[R²] ≈ e^5
    assert theory.width_spread(100, 100) == pytest.approx(math.exp(100 * math.log1p(0.05)))
    with pytest.raises(GradprobeError, match="width"):
        theory.width_spread(0, 3)


# ---------------------------------------------------------------- isometry: Jacobian spread


def _net(act: str, wv: float, bv: float, depth: int, n: int, init: str, g: torch.Generator):
    layers = []
    for _ in range(depth):
        if init == "orthogonal":
            q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            w = q * torch.sign(torch.diagonal(r)) * math.sqrt(wv)  # Haar, scaled
        else:
            w = torch.randn(n, n, generator=g, dtype=torch.float64) * math.sqrt(wv / n)
        layers.append((w, torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(bv)))
    phi = {"tanh": torch.tanh, "relu": torch.relu}[act]

    def f(h: torch.Tensor) -> torch.Tensor:
        for w, b in layers:
            h = w @ phi(h) + b
        return h

    return f


@pytest.mark.parametrize(
    ("act", "bias_var", "init"),
    [
        ("relu", 0.0, "gaussian"),
        ("relu", 0.0, "orthogonal"),
        ("tanh", 0.05, "gaussian"),
        ("tanh", 0.05, "orthogonal"),
        ("tanh", 1e-3, "orthogonal"),
    ],
)
def test_jacobian_spread_against_the_exact_jacobian(act, bias_var, init):
    depth, n, seeds = 6, 400, 4
    wv = theory.critical_weight_var(act, bias_var)
    q = theory.fixed_point(act, wv, bias_var)
    spreads = []
    for s in range(seeds):
        g = torch.Generator().manual_seed(s)
        f = _net(act, wv, bias_var, depth, n, init, g)
        x = torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(q)  # at q*
        ev = torch.linalg.svdvals(torch.func.jacrev(f)(x)) ** 2
        spreads.append(float(ev.var(unbiased=False) / ev.mean() ** 2))
    sp = torch.tensor(spreads)
    predicted = theory.jacobian_spread(act, wv, bias_var, depth=depth, init=init)
    # seed-to-seed standard error, plus the wide-limit formula's own error: its leading
    # finite-width correction is of relative order depth/n (1.5 % here)
    tol = SE * float(sp.std()) / math.sqrt(seeds) + predicted * depth / n
    assert abs(float(sp.mean()) - predicted) <= tol, (float(sp.mean()), predicted, tol)


@pytest.mark.parametrize("init", ["gaussian", "orthogonal"])
def test_jacobian_spread_off_the_fixed_point(init):
    # inputs far from q* (q = 1.5 against tanh's q* ≈ 0.1): each layer adds its own term
    depth, n, seeds, bias_var, q0 = 6, 400, 4, 1e-3, 1.5
    wv = theory.critical_weight_var("tanh", bias_var)
    spreads = []
    for s in range(seeds):
        g = torch.Generator().manual_seed(10 + s)
        f = _net("tanh", wv, bias_var, depth, n, init, g)
        x = torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(q0)
        ev = torch.linalg.svdvals(torch.func.jacrev(f)(x)) ** 2
        spreads.append(float(ev.var(unbiased=False) / ev.mean() ** 2))
    sp = torch.tensor(spreads)
    predicted = theory.jacobian_spread("tanh", wv, bias_var, depth=depth, init=init, q_start=q0)
    at_q_star = theory.jacobian_spread("tanh", wv, bias_var, depth=depth, init=init)
    tol = SE * float(sp.std()) / math.sqrt(seeds) + predicted * depth / n  # as above
    assert abs(float(sp.mean()) - predicted) <= tol, (float(sp.mean()), predicted, tol)
    assert predicted > at_q_star  # larger q: φ' varies more, the spectrum spreads more
    q_star = theory.fixed_point("tanh", wv, bias_var)
    assert theory.jacobian_spread(
        "tanh", wv, bias_var, depth=depth, init=init, q_start=q_star
    ) == pytest.approx(at_q_star, rel=1e-9)


def test_isometry_the_published_contrast():
    # ReLU cannot be isometric (spread ≥ depth for any weights); tanh with orthogonal
    # weights near q* → 0 can (spread → 0), with Gaussian weights it cannot (≥ depth).
    for init in ("gaussian", "orthogonal"):
        assert theory.jacobian_spread("relu", 2.0, depth=10, init=init) >= 10
    wv = theory.critical_weight_var("tanh", 1e-4)
    assert theory.jacobian_spread("tanh", wv, 1e-4, depth=10, init="orthogonal") < 0.2
    assert theory.jacobian_spread("tanh", wv, 1e-4, depth=10, init="gaussian") > 10
    with pytest.raises(GradprobeError, match="weight distribution"):
        theory.jacobian_spread("tanh", 1.0, depth=3, init="uniform")
    with pytest.raises(GradprobeError, match="fixed point"):
        theory.jacobian_spread("softplus", 3.0, depth=3)  # q* = ∞, not homogeneous
    # ReLU's spread does not depend on σ_w² (D's law is the same at every q): a measured
    # σ_w² a hair above 2, where q* is infinite, has the same spread
    assert theory.jacobian_spread("relu", 2.01, depth=3) == theory.jacobian_spread(
        "relu", 2.0, depth=3
    )


def test_hutchinson_moments_match_the_exact_jacobian():
    g = torch.Generator().manual_seed(7)
    wv = theory.critical_weight_var("tanh", 0.05)
    f = _net("tanh", wv, 0.05, 4, 64, "gaussian", g)
    x = torch.randn(64, generator=g, dtype=torch.float64)
    a = torch.func.jacrev(f)(x)
    a = a @ a.T
    m1, m2 = float(torch.trace(a)) / 64, float(torch.trace(a @ a)) / 64
    est = theory.jacobian_moments(f, x, probes=200, generator=g)
    assert abs(est.m1 - m1) <= SE * est.m1_se
    assert abs(est.m2 - m2) <= SE * est.m2_se


# ---------------------------------------------------------------- gated: T = 1 + e^(b_f)


def test_gated_memory_closed_forms():
    assert theory.gated_memory(0.0) == 2.0
    assert theory.gated_memory(math.log(99.0)) == pytest.approx(100.0, rel=1e-14)
    assert theory.gated_memory_efold(0.0) == pytest.approx(1 / math.log(2.0), rel=1e-12)
    # the e-fold memory the Probe measures is the same clock as T: T − ½ + O(1/T)
    for b in (4.0, 8.0, 12.0):
        t = theory.gated_memory(b)
        assert abs(t - theory.gated_memory_efold(b) - 0.5) < 1.0 / t
    chrono = theory.chrono_forget_bias(1000, 100.0, generator=torch.Generator().manual_seed(0))
    assert float(chrono.min()) >= 0.0 and float(chrono.max()) <= math.log(99.0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bias", [0.0, 1.0, 3.0, "chrono"])
def test_gated_memory_against_the_probe_on_a_real_net(kind, bias):
    torch.manual_seed(0)
    hidden, feats, length, batch = 128, 4, 30, 16
    module = (nn.LSTM if kind == "lstm" else nn.GRU)(feats, hidden).double()
    rows = slice(hidden, 2 * hidden)  # the forget (LSTM) / update (GRU) gate's rows
    b = (
        theory.chrono_forget_bias(hidden, 30.0, generator=torch.Generator().manual_seed(1))
        if bias == "chrono"
        else torch.full((hidden,), float(bias), dtype=torch.float64)
    )
    with torch.no_grad():
        module.bias_ih_l0[rows] = b
        module.bias_hh_l0[rows] = 0.0
    x = torch.randn(length, batch, feats, dtype=torch.float64)
    with Probe(module) as probe:
        out, _ = module(x)
        out.sum().backward()
        probe.step()
        frame = probe.frame()
    measured = float(frame[(frame.stat == "memory_steps")].value.iloc[0])

    # The prediction: g = b + w·[x_t; h_(t−1)], the weights U(±1/√H) (Var 1/(3H)) adding
    # a Gaussian spread s² = Var(W)·E‖[x_t; h_(t−1)]‖² (h read from the module's output).
    h = out.detach()
    h_prev = torch.cat([torch.zeros_like(h[:1]), h[:-1]])
    sq = x.pow(2).sum(-1).mean() + h_prev.pow(2).sum(-1).mean()
    s = math.sqrt(float(sq) / (3 * hidden))
    predicted = theory.gated_memory_efold(b.tolist(), s)

    # Tolerance: the measured mean of log f averages H units whose weight rows are drawn
    # once, so its standard error is the spread of the units' own means over √H; the
    # gates for that spread come from a hand-written recurrence (reference.py).
    (gates,) = recurrent_carry_gates(module, x)
    per_unit = gates.log().mean(dim=(0, 1))
    se_log = float(per_unit.std() / math.sqrt(hidden))
    mean_log = -1.0 / measured
    assert abs(-1.0 / predicted - mean_log) <= SE * se_log, (measured, predicted)
    if bias != "chrono":  # the characteristic time 1 + e^b is the same clock, within ½ + O(s²)
        assert theory.gated_memory(float(bias)) > measured

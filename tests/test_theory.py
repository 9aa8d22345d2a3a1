"""gradprobe.theory against independent computations: mpmath, Monte Carlo, torch's own init.

The mpmath references below are written from the textbook formulas of each activation,
not from gradprobe's registry, and integrate with tanh-sinh quadrature split at the kinks.
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch

from gradprobe import theory
from gradprobe.activations import ACTIVATIONS
from gradprobe.errors import GradprobeError

mp.mp.dps = 25
_SELU_A = mp.mpf("1.6732632423543772848170429916717")
_SELU_L = mp.mpf("1.0507009873554804934193349852946")


def _sig(h):
    return 1 / (1 + mp.exp(-h))


def _step(h, left, right=1):
    return mp.mpf(right) if h > 0 else mp.mpf(left)


# name -> (f, f', kinks), each at the registry's default parameters.
REFERENCE = {
    "sigmoid": (_sig, lambda h: _sig(h) * (1 - _sig(h)), ()),
    "tanh": (mp.tanh, lambda h: 1 - mp.tanh(h) ** 2, ()),
    "relu": (lambda h: max(h, 0), lambda h: _step(h, 0), (0,)),
    "leaky_relu": (lambda h: h if h > 0 else h / 100, lambda h: _step(h, "0.01"), (0,)),
    "prelu": (lambda h: h if h > 0 else h / 4, lambda h: _step(h, "0.25"), (0,)),
    "elu": (lambda h: h if h > 0 else mp.expm1(h), lambda h: 1 if h > 0 else mp.exp(h), (0,)),
    "selu": (
        lambda h: _SELU_L * (h if h > 0 else _SELU_A * mp.expm1(h)),
        lambda h: _SELU_L * (1 if h > 0 else _SELU_A * mp.exp(h)),
        (0,),
    ),
    "silu": (lambda h: h * _sig(h), lambda h: _sig(h) * (1 + h * (1 - _sig(h))), ()),
    "gelu": (lambda h: h * mp.ncdf(h), lambda h: mp.ncdf(h) + h * mp.npdf(h), ()),
    "softplus": (lambda h: mp.log1p(mp.exp(h)), _sig, ()),
    "hardtanh": (lambda h: max(-1, min(1, h)), lambda h: mp.mpf(1 if -1 < h < 1 else 0), (-1, 1)),
    "softsign": (lambda h: h / (1 + abs(h)), lambda h: 1 / (1 + abs(h)) ** 2, (0,)),
}


def mp_expect(g, q, kinks=()):
    """E[g(√q z)], z ~ N(0, 1), by mpmath quadrature split at 0 and the kinks."""
    s = mp.sqrt(q)
    points = sorted({mp.mpf(0), *(mp.mpf(k) / s for k in kinks)})
    return mp.quad(lambda z: g(s * z) * mp.npdf(z), [-mp.inf, *points, mp.inf])


def test_every_registered_activation_has_a_reference():
    assert set(ACTIVATIONS) <= set(REFERENCE), "add an mpmath reference for the new activation"


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("q", [0.3, 4.0, 49.0])
def test_gaussian_expectations_match_mpmath(name, q):
    act = ACTIVATIONS[name]
    f, d, kinks = REFERENCE[name]
    ref_f2 = float(mp_expect(lambda h: f(h) ** 2, q, kinks))
    ref_d2 = float(mp_expect(lambda h: d(h) ** 2, q, kinks))
    got_f2 = theory.length_map(name, 1.0, 0.0, q)  # σ_w² = 1, σ_b² = 0: E[φ²]
    got_d2 = theory.gaussian_expectation(lambda u: act.gate(u) ** 2, q, kinks=act.kinks)
    assert abs(got_f2 - ref_f2) <= 1e-8 * max(1.0, abs(ref_f2))
    assert abs(got_d2 - ref_d2) <= 1e-8


def test_plain_gauss_hermite_is_not_enough_for_a_kink():
    """Why the quadrature is split: 200-node Gauss–Hermite misses softsign by > 1e-3."""
    x, w = np.polynomial.hermite_e.hermegauss(200)
    hermite = float(np.sum(w * (1 / (1 + np.abs(x)) ** 4)) / math.sqrt(2 * math.pi))
    ref = float(mp_expect(lambda h: 1 / (1 + abs(h)) ** 4, 1.0, (0,)))
    assert abs(hermite - ref) / ref > 1e-3
    got = theory.gaussian_expectation(lambda u: 1 / (1 + u.abs()) ** 4, 1.0, kinks=(0.0,))
    assert abs(got - ref) < 1e-12


@pytest.mark.parametrize("name", ["tanh", "relu", "softsign", "gelu"])
def test_length_map_slope_is_the_derivative_of_the_length_map(name):
    f, _, kinks = REFERENCE[name]
    q = mp.mpf("1.7")
    ref = mp.diff(lambda x: 1.5 * mp_expect(lambda h: f(h) ** 2, x, kinks) + 0.1, q)
    assert theory.length_map_slope(name, 1.5, 0.1, 1.7) == pytest.approx(float(ref), abs=1e-8)


@pytest.mark.parametrize(
    ("name", "weight_var", "bias_var"),
    [("tanh", 1.5, 0.05), ("sigmoid", 1 / 3, 1 / 768), ("elu", 1.2, 0.1), ("softsign", 2.0, 0.2)],
)
def test_fixed_point_and_chi1_match_mpmath(name, weight_var, bias_var):
    f, d, kinks = REFERENCE[name]

    def length(q):
        return weight_var * mp_expect(lambda h: f(h) ** 2, q, kinks) + bias_var

    q_ref = mp.findroot(lambda q: length(q) - q, weight_var + bias_var)
    chi_ref = weight_var * mp_expect(lambda h: d(h) ** 2, q_ref, kinks)
    assert theory.fixed_point(name, weight_var, bias_var) == pytest.approx(float(q_ref), rel=1e-9)
    assert theory.chi1(name, weight_var, bias_var) == pytest.approx(float(chi_ref), rel=1e-9)


# ---------------------------------------------------------------- known values


def test_he_init_is_critical_for_relu():
    assert theory.chi1("relu", 2.0, 0.0) == pytest.approx(1.0, abs=1e-12)
    assert theory.critical_weight_var("relu", 0.0) == pytest.approx(2.0, abs=1e-8)
    assert theory.critical_weight_var("relu", 0.3) == pytest.approx(2.0, abs=1e-6)
    assert math.isinf(theory.depth_scale("relu", 2.0, 0.0))


def test_tanh_critical_line_passes_through_one_at_zero_bias():
    assert theory.critical_weight_var("tanh", 0.0) == pytest.approx(1.0, abs=1e-8)
    # with a bias the critical σ_w² moves up (Schoenholz et al. 2017, Fig. 1)
    crit = theory.critical_weight_var("tanh", 0.05)
    assert crit > 1.0
    assert theory.chi1("tanh", crit, 0.05) == pytest.approx(1.0, abs=1e-9)


def test_sigmoid_at_pytorch_default_init_is_deep_in_the_ordered_phase():
    init = theory.pytorch_default_init(256)
    chi = theory.chi1("sigmoid", init.weight_var, init.var)  # bias var = 1/(3 fan_in) too
    assert chi < 0.05  # σ_w² · E[σ'²] ≤ (1/3)·(1/16)
    _, d, _ = REFERENCE["sigmoid"]
    q = theory.fixed_point("sigmoid", init.weight_var, init.var)
    assert chi == pytest.approx(
        float(init.weight_var * mp_expect(lambda h: d(h) ** 2, q)), rel=1e-9
    )


def test_depth_scales_in_the_ordered_phase():
    # c* = 1, so ξ_c = −1/ln χ₁; at q* = 0 (tanh, σ_b² = 0) L'(0) = σ_w², so ξ_q = −1/ln σ_w².
    chi = theory.chi1("tanh", 1.5, 0.05)
    assert theory.depth_scale("tanh", 1.5, 0.05) == pytest.approx(-1 / math.log(chi), rel=1e-12)
    assert theory.fixed_point("tanh", 0.8, 0.0) == 0.0
    assert theory.depth_scale("tanh", 0.8, 0.0, kind="length") == pytest.approx(
        -1 / math.log(0.8), rel=1e-6
    )


def test_chaotic_phase_correlation_fixed_point():
    # tanh is odd and σ_b² = 0, so c* = 0 and χ_c* = σ_w² E[φ'(u)]² (u₁, u₂ independent).
    q = theory.fixed_point("tanh", 2.5, 0.0)
    assert theory.c_star("tanh", 2.5, 0.0) == pytest.approx(0.0, abs=1e-9)
    _, d, _ = REFERENCE["tanh"]
    chi_c = 2.5 * float(mp_expect(d, q)) ** 2
    assert theory.depth_scale("tanh", 2.5, 0.0) == pytest.approx(-1 / math.log(chi_c), rel=1e-8)


def test_correlation_map_against_monte_carlo():
    q, c, n = 0.7, 0.5, 2_000_000
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, n, generator=gen, dtype=torch.float64)
    u1, u2 = math.sqrt(q) * z1, math.sqrt(q) * (c * z1 + math.sqrt(1 - c * c) * z2)
    for name in ("tanh", "relu", "hardtanh"):
        act = ACTIVATIONS[name]
        prod = act(u1) * act(u2)
        mc = (1.5 * prod.mean() + 0.05) / q
        err = 1.5 * float(prod.std()) / math.sqrt(n) / q
        got = theory.correlation_map(name, 1.5, 0.05, c, q=q)
        assert abs(got - float(mc)) < 5 * err
    # c = 1 is the length map divided by q
    assert theory.correlation_map("tanh", 1.5, 0.05, 1.0, q=q) == pytest.approx(
        theory.length_map("tanh", 1.5, 0.05, q) / q, rel=1e-12
    )


# ---------------------------------------------------------------- initialisation rules


def test_pytorch_default_linear_init_variance():
    torch.manual_seed(0)
    fan_in = 500
    weight = torch.nn.Linear(fan_in, 2000).weight.detach().double()
    init = theory.pytorch_default_init(fan_in)
    assert float(weight.var()) == pytest.approx(init.var, rel=0.02)
    assert init.weight_var == pytest.approx(1 / 3)


def test_xavier_and_he_match_torch_init():
    torch.manual_seed(0)
    fan_in, fan_out = 400, 1000
    w = torch.empty(fan_out, fan_in, dtype=torch.float64)
    torch.nn.init.xavier_normal_(w)
    assert float(w.var()) == pytest.approx(theory.xavier_init(fan_in, fan_out).var, rel=0.02)
    torch.nn.init.kaiming_normal_(w, nonlinearity="relu")
    he = theory.he_init(fan_in)
    assert float(w.var()) == pytest.approx(he.var, rel=0.02)
    assert he.weight_var == pytest.approx(2.0)
    torch.nn.init.kaiming_normal_(w, a=0.2, nonlinearity="leaky_relu")
    assert float(w.var()) == pytest.approx(theory.he_init(fan_in, 0.2).var, rel=0.02)
    assert theory.xavier_init(256, 256).weight_var == pytest.approx(1.0)


# ---------------------------------------------------------------- predictions


def test_prediction_by_hand_for_a_short_relu_net():
    # relu: E[relu(√q z)²] = q/2 and E[relu'²] = 1/2 for every q > 0, so each factor is σ_w²/2.
    got = theory.predict_error_ratio("relu", 1.5, 0.3, depth=5, q0=2.0)
    assert got == pytest.approx((1.5 / 2) ** (4 / 2), rel=1e-12)
    assert theory.predict_error_ratio("tanh", 1.0, 0.0, depth=1) == 1.0


def test_prediction_iterates_the_length_map_not_only_chi1():
    # sigmoid from q0 = 1 is far from q*: the first layers' factors differ from χ₁.
    _, d, _ = REFERENCE["sigmoid"]
    f = REFERENCE["sigmoid"][0]
    wv, bv, depth = 4.0, 0.1, 4
    q = wv * 1.0 + bv
    log_ratio = 0.0
    for _ in range(depth - 1):
        log_ratio += 0.5 * math.log10(float(wv * mp_expect(lambda h: d(h) ** 2, q)))
        q = float(wv * mp_expect(lambda h: f(h) ** 2, q) + bv)
    got = theory.predict_log10_error_ratio("sigmoid", wv, bv, depth)
    assert got == pytest.approx(log_ratio, abs=1e-9)
    at_fixed_point = 0.5 * (depth - 1) * math.log10(theory.chi1("sigmoid", wv, bv))
    assert abs(got - at_fixed_point) > 0.05


# Monte Carlo at init. Tolerance in log10 of the ratio, from two sources:
#  * statistics: per layer ‖δ^l‖²/‖δ^(l+1)‖² is a sum over N units with relative spread
#    ≈ √(2/N), so a seed's log10 ratio over D−1 layers spreads by ≈ 0.434·√((D−1)/(2N));
#    the mean of S seeds by that /√S. We allow 4 of these.
#  * finite width: the mean-field maps are exact only as N → ∞; the leading correction
#    is O(1/N) per layer, so we allow (D−1)/N more.
# For N = 256, S = 6: 0.13 at depth 10 and 0.28 at depth 30 — fluctuations grow with depth.
# (Observed: |difference| ≤ 0.11, largest at depth 30 for tanh and sigmoid.)
MC_CASES = [
    ("tanh", 1.0, 0.05),  # Xavier, ordered phase
    ("relu", 1.5, 0.1),  # below critical: vanishing
    ("sigmoid", 1 / 3, 1 / 768),  # PyTorch default: vanishing by ~25 decades at depth 30
    ("gelu", 1.0, 0.1),
]


@pytest.mark.parametrize("depth", [10, 30])
@pytest.mark.parametrize(("name", "weight_var", "bias_var"), MC_CASES)
def test_prediction_agrees_with_monte_carlo(name, weight_var, bias_var, depth):
    width, seeds = 256, range(6)
    m = theory.measure_error_ratio(name, weight_var, bias_var, depth, width, batch=16, seeds=seeds)
    tol = 4 * 0.434 * math.sqrt((depth - 1) / (2 * width)) / math.sqrt(len(seeds))
    tol += (depth - 1) / width
    assert abs(m.measured_log10 - m.predicted_log10) < tol, m


def test_measurement_uses_the_init_it_was_given():
    model = theory.build_mlp("tanh", 1.7, 0.2, depth=3, width=300)
    hidden = [model[0], model[2], model[4]]
    weights = torch.cat([lin.weight.detach().flatten() for lin in hidden])
    assert float(weights.var()) * 300 == (pytest.approx(1.7, rel=0.03))
    assert float(torch.cat([lin.bias.detach() for lin in hidden]).var()) == pytest.approx(
        0.2, rel=0.2
    )


def test_probe_error_norm_agrees_with_the_autograd_measurement():
    gradprobe = pytest.importorskip("gradprobe")
    probe_cls = getattr(gradprobe, "Probe", None)
    if probe_cls is None:
        pytest.skip("gradprobe.Probe is not available")
    depth, width = 6, 64
    gen = torch.Generator().manual_seed(3)
    model = theory.build_mlp("tanh", 1.5, 0.05, depth, width, generator=gen)
    x = torch.randn(8, width, generator=gen, dtype=torch.float64)
    outs = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            outs[name] = output

        return hook

    handles = [model[2 * i].register_forward_hook(keep(str(2 * i))) for i in range(depth)]
    with probe_cls(model) as probe:
        model(x).sum().backward()
        probe.step()
        frame = probe.frame()
    for h in handles:
        h.remove()
    errors = frame[frame["stat"] == "error_norm"].set_index("name")["value"]
    for name, out in outs.items():
        # At worst a float32 norm of the 8·64 entries (if the Probe reduces in float32):
        # within (n + 3)·eps of the float64 one in any order (tests/numerics.py, norm_rtol).
        rel = (8 * width + 3) * 2.0**-23
        assert errors[name] == pytest.approx(float(out.grad.norm()), rel=rel)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call",
    [
        lambda: theory.chi1("nope", 1.0, 0.0),
        lambda: theory.chi1("tanh", -1.0, 0.0),
        lambda: theory.fixed_point("tanh", 1.0, -0.1),
        lambda: theory.predict_error_ratio("tanh", 1.0, 0.0, depth=0),
        lambda: theory.predict_error_ratio("tanh", 1.0, 0.0, depth=3, q0=-1.0),
        lambda: theory.xavier_init(0, 10),
        lambda: theory.depth_scale("tanh", 1.0, 0.0, kind="other"),
    ],
)
def test_bad_input_raises_gradprobe_error(call):
    with pytest.raises(GradprobeError):
        call()


def test_silu_has_no_critical_line_at_zero_bias():
    # φ'(0) = ½: q* = 0 is stable until σ_w² is so large that q* jumps to ∞, so χ₁ jumps over 1.
    with pytest.raises(GradprobeError, match="jumps across 1"):
        theory.critical_weight_var("silu", 0.0)
    assert math.isnan(theory.summary("silu", 1.0).critical_weight_var)

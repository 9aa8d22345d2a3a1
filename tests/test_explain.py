"""gradprobe.explain: every worked example checked against an independent computation."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from gradprobe import explain
from gradprobe.activations import ACTIVATIONS
from gradprobe.errors import GradprobeError


def test_backprop_gradients_agree_with_autograd_in_float64():
    r = explain.backprop()
    t = {k.split(" = ")[0]: torch.from_numpy(v) for k, v in r.tensors.items()}
    X, y = t["X"], t["y"]
    W1, b1, W2, b2 = (t[k].clone().requires_grad_(True) for k in ("W1", "b1", "W2", "b2"))
    z = W1 @ X + b1
    z.retain_grad()
    loss = (0.5 * (W2 @ torch.sigmoid(z) + b2 - y) ** 2).sum()
    loss.backward()
    checks = {
        "dL/dW1": W1.grad,
        "dL/db1": b1.grad,
        "dL/dW2": W2.grad,
        "dL/db2": b2.grad,
        "dL/dz": z.grad,
    }
    for name, auto in checks.items():
        assert float((t[name] - auto).abs().max()) <= 1e-12, name
    assert max(r.max_abs_diff.values()) <= 1e-12
    assert float(t["L"].sum()) == pytest.approx(float(loss.detach()), abs=1e-15)


def test_backprop_shows_the_sigmoid_gate_bound_and_the_vanishing_chain():
    r = explain.backprop()
    z = torch.from_numpy(r.tensors["z = W1 X + b1"])
    gate = torch.sigmoid(z) * (1 - torch.sigmoid(z))
    assert r.tensors["σ'(z) = σ(z)(1 − σ(z))"] == pytest.approx(gate.numpy(), abs=1e-15)
    assert r.gate_max == pytest.approx(float(gate.max()))
    assert 0 < r.gate_max <= 0.25
    products = [row.product for row in r.chain]
    for row in r.chain:
        assert row.product == pytest.approx(row.autograd, rel=1e-12)  # product = autograd ratio
    assert all(a > b for a, b in itertools.pairwise(products))  # shrinks going down
    first = next(row.layer for row in r.chain if row.product < 1e-3)
    assert r.chain_below == first
    # every factor is at most 0.25 (w = 1), so after k factors the product is ≤ 0.25^k
    assert all(row.product <= 0.25**k for k, row in enumerate(r.chain))


def test_standardize_against_the_statistics_module():
    values = [100, 50, 10, 5, 1]
    s = explain.standardize()
    assert s.mean == pytest.approx(statistics.mean(values))
    assert s.population_variance == pytest.approx(statistics.pvariance(values))
    assert s.sample_variance == pytest.approx(statistics.variance(values))
    assert s.population_std == pytest.approx(statistics.pstdev(values))
    assert s.sample_std == pytest.approx(statistics.stdev(values))
    assert round(s.population_std, 2) == 37.72
    expected = [(v - statistics.mean(values)) / statistics.pstdev(values) for v in values]
    assert s.standardized == pytest.approx(expected)
    assert s.standardized_mean == pytest.approx(0.0, abs=1e-12)
    assert s.standardized_std == pytest.approx(1.0)
    # the widely copied figures match neither definition
    assert s.wrong_variance not in (
        pytest.approx(s.population_variance),
        pytest.approx(s.sample_variance),
    )
    assert s.wrong_std not in (pytest.approx(s.population_std), pytest.approx(s.sample_std))
    # standardising moves every input back where sigmoid's gate is large
    sig = [1 / (1 + math.exp(-x)) for x in expected]
    assert s.sigmoid_gate_standardized == pytest.approx([p * (1 - p) for p in sig])
    assert min(s.sigmoid_gate_standardized) > 0.1 > max(s.sigmoid_gate_raw[:3])


def test_channels_shapes_stats_and_the_dead_channel():
    from sklearn.datasets import load_digits

    c = explain.channels(batch=8)
    assert c.input_shape == (8, 1, 8, 8)
    assert c.weight_shape == (4, 1, 3, 3)
    assert c.output_shape == (8, 4, 8, 8)
    assert c.dead_channels == [c.built_dead] == [3]
    assert c.channel_stats[3]["zero_frac"] == 1.0
    # independent recomputation of the edge and average channels with scipy
    images = load_digits().images[:8] / 16.0
    sobel = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    for channel, kernel in ((0, sobel), (1, sobel.T), (2, np.full((3, 3), 1 / 9))):
        out = np.stack([np.maximum(correlate2d(im, kernel, mode="same"), 0) for im in images])
        stats = c.channel_stats[channel]
        assert stats["mean"] == pytest.approx(out.mean(), rel=1e-5)
        assert stats["std"] == pytest.approx(out.std(), rel=1e-5)
        assert stats["zero_frac"] == pytest.approx((out == 0).mean())
        assert not stats["dead"]


def _crossing(f, lo, hi):
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (f(mid) > 0) == (f(lo) > 0):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def test_activations_cheat_sheet_numbers():
    facts = {f.name: f for f in explain.activations()}
    assert set(facts) == set(ACTIVATIONS)
    for name, f in facts.items():
        if name != "softplus":  # softplus' sup 1 is only reached as z → ∞
            assert f.max_derivative == pytest.approx(ACTIVATIONS[name].max_derivative, rel=1e-8)
    # sigmoid: σ'(z) = 0.0025 where σ = (1 − √0.99)/2
    s = (1 - math.sqrt(0.99)) / 2
    z_sig = math.log(s / (1 - s))
    (lo_s, hi_s), (lo2, hi2) = facts["sigmoid"].saturated
    assert lo_s == -math.inf and hi_s == pytest.approx(z_sig, abs=1e-9)
    assert lo2 == pytest.approx(-z_sig, abs=1e-9) and hi2 == math.inf
    # tanh: 1 − tanh² = 0.01 at atanh(√0.99); elu: e^z = 0.01
    assert facts["tanh"].saturated[1][0] == pytest.approx(math.atanh(math.sqrt(0.99)), abs=1e-9)
    assert facts["elu"].saturated == [(-math.inf, pytest.approx(math.log(0.01), abs=1e-9))]
    # silu's gate crosses zero near z ≈ −1.278: a small saturated island around it
    root = _crossing(
        lambda z: 1 / (1 + math.exp(-z)) * (1 + z * (1 - 1 / (1 + math.exp(-z)))), -2, -1
    )
    assert any(lo < root < hi for lo, hi in facts["silu"].saturated)
    # dead ranges: relu z < 0, hardtanh |z| > 1, none for the others that cannot die
    assert facts["relu"].dead == [(-math.inf, pytest.approx(0.0, abs=1e-9))]
    assert facts["hardtanh"].dead == [
        (-math.inf, pytest.approx(-1.0, abs=1e-9)),
        (pytest.approx(1.0, abs=1e-9), math.inf),
    ]
    for name in ("sigmoid", "tanh", "leaky_relu", "elu", "gelu", "silu", "softsign"):
        assert facts[name].dead == []


def test_activation_plot_is_a_png(tmp_path):
    path = explain.write_figure("activations", out=tmp_path / "figs")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(GradprobeError):
        explain.write_figure("backprop", plot=tmp_path / "x.png")


def test_unknown_topic():
    with pytest.raises(GradprobeError, match="unknown topic"):
        explain.compute("nope")


@pytest.mark.parametrize("topic", sorted(explain.TOPICS))
def test_every_topic_renders(topic):
    from rich.console import Console

    console = Console(width=120, record=True)
    for item in explain.render(topic, explain.compute(topic)):
        console.print(item)
    assert console.export_text().strip()


# ---------------------------------------------------------------- residual and isometry


def test_explain_residual_against_autograd_and_theory():
    from gradprobe import theory

    r = explain.compute("residual")
    assert r.max_abs_diff <= 1e-12  # the hand-written backward pass is autograd's (float64)
    for alpha in (1.0, 1 / math.sqrt(r.depth)):
        assert r.predicted[alpha] == [theory.residual_growth(alpha, k) for k in range(r.depth + 1)]
        # the measured mean over nets at the ends, within 4 standard errors of that mean
        for measured, per_net, predicted in (
            (r.forward[alpha][-1], r.per_net_forward[alpha], r.predicted[alpha][-1]),
            (r.backward[alpha][0], r.per_net_backward[alpha], r.predicted[alpha][-1]),
        ):
            assert measured == pytest.approx(statistics.fmean(per_net), rel=1e-12)
            se = statistics.stdev(per_net) / math.sqrt(len(per_net))
            assert abs(measured - predicted) <= 4 * se
    # the published contrast: α = 1 grows 2^L, α = 1/√L stays below e
    assert r.predicted[1.0][-1] == 2.0**r.depth
    assert r.forward[1 / math.sqrt(r.depth)][-1] < math.e < r.forward[1.0][-1] / 10


def test_explain_isometry_against_autograd_and_theory():
    from gradprobe import theory

    cases = explain.compute("isometry")
    assert {(c.activation, c.init) for c in cases} == {
        (a, i) for a in ("tanh", "relu") for i in ("gaussian", "orthogonal")
    }
    by = {(c.activation, c.init): c for c in cases}
    for c in cases:
        assert c.max_abs_diff <= 1e-12  # the hand product ∏ W·diag(φ') is autograd's Jacobian
        assert c.predicted == theory.jacobian_spread(
            c.activation, c.weight_var, c.bias_var, depth=12, init=c.init
        )
        # the wide-limit formula within its finite-width error: relative order depth/width
        # (12/128 ≈ 9 %) per seed, plus a single net's fluctuation, ~ the same order here
        assert abs(c.exact - c.predicted) <= 2 * 12 / 128 * c.predicted + 0.1
    # the published contrast, measured: orthogonal tanh is near-isometric, ReLU is not
    assert by["tanh", "orthogonal"].exact < 1.0 < 10.0 < by["relu", "orthogonal"].exact
    assert by["tanh", "orthogonal"].exact < by["tanh", "gaussian"].exact / 10
    assert by["relu", "gaussian"].sv_min == 0.0 or by["relu", "gaussian"].sv_min < 1e-6

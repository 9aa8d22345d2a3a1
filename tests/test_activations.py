"""The activation registry against autograd and numerical maxima."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradprobe import ACTIVATIONS, GradprobeError, activation_of
from gradprobe.activations import get_activation
from gradprobe.lab.models import activation_module

Z = torch.linspace(-12, 12, 240_001, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivative_matches_autograd(name):
    act = ACTIVATIONS[name]
    z = Z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(act(z).sum(), z)
    away_from_kinks = torch.ones_like(Z, dtype=torch.bool)
    for k in act.kinks:
        away_from_kinks &= (Z - k).abs() > 1e-9
    assert torch.allclose(act.gate(Z)[away_from_kinks], grad[away_from_kinks], atol=1e-12)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_function_matches_the_torch_module(name):
    module = activation_module(name).double()
    assert torch.allclose(ACTIVATIONS[name](Z, ACTIVATIONS[name].params(module)), module(Z), atol=1e-12)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_max_derivative_is_the_supremum_on_a_fine_grid(name):
    act = ACTIVATIONS[name]
    sup = float(act.gate(torch.linspace(-40, 40, 800_001, dtype=torch.float64)).max())
    # softplus approaches its supremum 1 only as z → ∞ (PyTorch switches to x above 20).
    assert sup == pytest.approx(act.max_derivative, rel=1e-6)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_saturation_and_death_flags_follow_the_derivative(name):
    act = ACTIVATIONS[name]
    far = torch.tensor([-60.0, 60.0], dtype=torch.float64)
    tails = act.gate(far)
    # A vanishing tail derivative means saturation, or death where the output is 0 there too.
    assert (act.saturates or act.can_die) == bool((tails < 0.01 * act.max_derivative).any())
    assert not (act.saturates and act.can_die)
    if act.can_die:
        # Dead: output exactly 0 with a zero derivative over a whole region.
        neg = -torch.linspace(0.1, 50, 100, dtype=torch.float64)
        assert (act(neg) == 0).all() and (act.gate(neg) == 0).all()


def test_modules_are_recognised_by_type_and_subclass():
    assert activation_of(nn.ReLU(inplace=True)).name == "relu"
    assert activation_of(nn.ReLU6()).name == "hardtanh"  # ReLU6 is a Hardtanh on [0, 6]
    assert activation_of(nn.Linear(2, 2)) is None
    assert get_activation("swish").name == "silu"
    with pytest.raises(GradprobeError, match="unknown activation"):
        get_activation("sine")


def test_relu6_gate_uses_its_own_bounds():
    module = nn.ReLU6()
    act = activation_of(module)
    z = torch.tensor([-1.0, 3.0, 7.0])
    assert act.gate(z, act.params(module)).tolist() == [0.0, 1.0, 0.0]

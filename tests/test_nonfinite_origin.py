"""Where a NaN/Inf is born: Run.first_nonfinite() and the nonfinite finding.

Each case is checked against autograd's anomaly mode (which names the backward node
that first returned NaN) or a hand computation of which module made it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from gradprobe import Probe, diagnose


class WhereSqrt(nn.Module):
    """Finite forward, NaN backward: the untaken sqrt branch's gradient is 0 · ∞ = NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x.clamp(min=-1).sqrt(), torch.zeros_like(x))


class WhereLog(nn.Module):
    """The same kind: log of the negatives in the untaken branch (1/x · 0 is finite, but
    log of a negative is NaN in forward too, masked by where; its gradient 0 · (1/x) is
    finite — so this one must NOT be blamed: a control)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x.log(), torch.zeros_like(x))


class InfBackward(torch.autograd.Function):
    """Identity forward; backward returns +Inf everywhere."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class InfGrad(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return InfBackward.apply(x)


class Poison(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


def one_step(model: nn.Module, loss_fn, x: torch.Tensor) -> object:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: NaN grads do not matter
    with Probe(model, opt) as probe:
        opt.zero_grad()
        loss_fn(model(x)).backward()
        opt.step()
        return probe.run()


def anomaly_node(model: nn.Module, loss_fn, x: torch.Tensor) -> str:
    """The backward node anomaly mode names, on an un-probed copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.detect_anomaly():
            try:
                loss_fn(model(x)).backward()
            except RuntimeError as exc:
                return str(exc)
    return ""


def mlp(middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), middle, nn.Linear(6, 3))


def mse(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


@pytest.mark.parametrize("shape", [(8, 4), (3, 5, 4)])
def test_nan_born_in_a_modules_backward_names_that_module(shape):
    model = mlp(WhereSqrt())
    x = torch.randn(*shape)
    twin = copy.deepcopy(model)
    assert "SqrtBackward0" in anomaly_node(twin, mse, x)  # the reference: the sqrt in `1`
    run = one_step(model, mse, x)
    frame = run.frame()
    # Forward is finite everywhere; the NaN is in `1`'s input-side gradient only.
    assert frame[(frame.stat == "nonfinite") & frame.name.isin(["0", "1", "2"])].value.eq(0).all()
    first = run.first_nonfinite()
    assert first == (0, "1", "error_gain")
    assert first.origin == "backward"
    finding = diagnose(run).of("nonfinite")
    assert finding.names == ("1",)
    assert finding.evidence["origin"] == "backward"
    assert "backward pass of `1`" in finding.summary


def test_inf_from_a_custom_backward_names_that_module():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), InfGrad(), nn.Tanh(), nn.Linear(6, 2)
    )
    x = torch.randn(5, 4)
    run = one_step(model, mse, x)
    frame = run.frame()
    # Hand computation: `3`'s output gradient is finite, the one it sends down is +Inf.
    err = frame[(frame.name == "3") & (frame.stat == "error_nonfinite")].value
    assert float(err.iloc[0]) == 0
    assert run.first_nonfinite() == (0, "3", "error_gain")
    assert diagnose(run).of("nonfinite").names == ("3",)


def test_finite_backward_of_a_masked_log_is_not_blamed():
    model = mlp(WhereLog())
    x = torch.randn(8, 4)
    run = one_step(model, mse, x)
    # log of negatives is NaN in forward, but where() masks it: output and gradients finite.
    assert run.first_nonfinite() is None


def test_nan_born_in_forward_is_still_named_as_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Poison(), nn.Linear(6, 2))
    run = one_step(model, mse, torch.randn(4, 4))
    first = run.first_nonfinite()
    assert first == (0, "2", "nonfinite")
    assert first.origin == "forward"
    assert diagnose(run).of("nonfinite").evidence["origin"] == "forward"


def test_nan_in_the_loss_is_the_output_side_of_the_last_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return (out - 10).sqrt().sum()  # out < 10: NaN loss, NaN gradient, born in the loss

    x = torch.randn(4, 4)
    assert "SqrtBackward0" in anomaly_node(mlp(nn.Tanh()), loss_fn, x)
    run = one_step(model, loss_fn, x)
    frame = run.frame()
    assert frame[(frame.stat == "nonfinite") & frame.name.isin(["0", "1", "2"])].value.eq(0).all()
    first = run.first_nonfinite()
    assert first == (0, "2", "error_nonfinite")
    assert first.origin == "backward"
    assert "reaches `2`" in diagnose(run).of("nonfinite").summary


def test_backward_nan_in_a_deeper_module_of_a_conv_net():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        WhereSqrt(),
        nn.Conv2d(3, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    )
    run = one_step(model, mse, torch.randn(2, 1, 8, 8))
    assert run.first_nonfinite() == (0, "1", "error_gain")

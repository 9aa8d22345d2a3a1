"""sat_frac of non-monotone activations (issue 22 §4): GELU's and SiLU's derivative dips
below 0 for z below about −0.75; saturation is |f′(z)| < 1% of max |f′|, checked against
float64 autograd of the torch module itself (not the registry's hand-written derivative)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.stats import SAT_THRESHOLD


def _reference_sat_frac(act: nn.Module, z: torch.Tensor) -> float:
    """Fraction of entries with |f′(z)| < 1% of max |f′|, all in float64 by autograd."""
    z64 = z.double().requires_grad_()
    (d,) = torch.autograd.grad(act.double()(z64).sum(), z64)
    grid = torch.linspace(-20, 20, 400_001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act.double()(grid).sum(), grid)
    peak = float(g.abs().max())
    return float((d.abs() < SAT_THRESHOLD * peak).double().mean())


def _probed_sat_frac(act: nn.Module, z: torch.Tensor) -> float:
    model = nn.Sequential(nn.Identity(), act)
    x = z.clone().requires_grad_()
    with Probe(model, stats=["sat_frac"], every=1) as probe:
        model(x).sum().backward()
        probe.step()
    return float(probe.run().table("sat_frac").iloc[0, 0])


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()])
@pytest.mark.parametrize("centre", [-3.0, -1.5, 0.0])
def test_sat_frac_reads_the_magnitude_of_the_derivative(act: nn.Module, centre: float) -> None:
    torch.manual_seed(0)
    z = centre + 1.5 * torch.randn(64, 256)
    expected = _reference_sat_frac(act, z)
    got = _probed_sat_frac(act.float(), z)
    # Entries whose |f′| lies within float32 rounding of the threshold may count either way:
    # allow one part in 10⁴ of the 16 384 entries (no entry is that close in practice).
    assert got == pytest.approx(expected, abs=1e-4)


def test_gelu_in_its_negative_dip_is_not_saturated() -> None:
    # z in [-2.0, -0.9]: GELU's |f′| is 7–11% of its maximum there, far from saturated.
    z = torch.linspace(-2.0, -0.9, 4096).reshape(16, 256)
    assert _probed_sat_frac(nn.GELU(), z) == 0.0
    assert _reference_sat_frac(nn.GELU(), z) == 0.0

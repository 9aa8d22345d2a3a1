"""Large outputs: zero_frac and dead units from one count of non-zeros per unit
(gradprobe/reduce.py, ``unit_nonzero_counts``), against torch in float64, NaN outputs
included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.recording import kept


def _conv_with_dead_channels() -> nn.Module:
    """Conv → ReLU → Conv with channels 0 and 5 of the first conv built dead (zero weights
    and a negative bias: 0 after the ReLU at every position of every sample)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    with torch.no_grad():
        for c in (0, 5):
            model[0].weight[c] = 0.0
            model[0].bias[c] = -1.0
    return model


def test_large_outputs_zero_frac_and_dead_frac_equal_torch():
    model = _conv_with_dead_channels()
    x = torch.randn(16, 3, 24, 24)  # 16·8·24·24 = 73728 entries: reduced in the hook
    assert model[0](x).numel() > kept.HELD_NUMEL
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Probe(model, opt) as probe:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        frame = probe.frame()
    rows = frame[frame.step == 0]
    with torch.no_grad():
        outputs = {"0": model[0](x), "1": model[1](model[0](x))}
        outputs["2"] = model[2](outputs["1"])
    for name, y in outputs.items():
        got = rows[rows.name == name].set_index("stat").value
        zero_frac = float((y == 0).double().mean())
        dead = float((y.abs().amax(dim=(0, 2, 3)) == 0).double().mean())
        assert got["zero_frac"] == pytest.approx(zero_frac, abs=1e-12), name
        assert got["dead_frac"] == pytest.approx(dead, abs=1e-12), name
    assert rows[(rows.name == "1") & (rows.stat == "dead_frac")].value.item() == pytest.approx(2 / 8)


def test_a_nan_output_has_the_same_units_on_both_paths():
    """A NaN is not 0: a unit holding NaNs is alive and its NaNs count as non-zero (as
    the per-unit max of the other paths says: a NaN max is not 0)."""
    model = _conv_with_dead_channels()
    x = torch.randn(16, 3, 24, 24)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.no_grad():
        model[0].bias[1] = float("nan")  # channel 1: NaN everywhere after the conv
    with Probe(model, opt) as probe:
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        frame = probe.frame()
    rows = frame[frame.step == 0]
    with torch.no_grad():
        y = model[1](model[0](x))
    got = rows[rows.name == "1"].set_index("stat").value
    assert got["nonfinite"] == 1
    assert got["dead_frac"] == pytest.approx(2 / 8)  # channels 0 and 5; not 1 (NaN)
    assert got["zero_frac"] == pytest.approx(float((y == 0).double().mean()), abs=1e-12)

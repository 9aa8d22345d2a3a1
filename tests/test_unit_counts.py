"""Large outputs: zero_frac and dead units from one count of non-zeros per unit
(gradprobe/reduce.py, ``unit_nonzero_counts``), against torch in float64, NaN outputs
included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from allocations import LargestNew
from gradprobe import Probe
from gradprobe.recording import kept
from gradprobe.reduce import unit_nonzero_counts


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


# ---------------------------------------------------------------- the function alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "unit", "buffer"),
    [
        ((1, 37, 50), 2, 3 * 50 + 7),  # 37 samples, 3 a chunk: the last chunk holds 1
        ((1, 10, 13, 9), 2, 13 * 9),  # one sample a chunk (the buffer's least)
        ((1, 5, 4, 6), 3, 4 * 6 * 5 + 1),  # every sample in one chunk; units not last
        ((1, 33, 1), 2, 1 << 18),  # one unit
    ],
)
def test_counts_equal_numpy_across_chunks_with_nan_and_inf(shape, unit, buffer, dtype):
    """Per-unit non-zero counts against numpy's count_nonzero, chunks crossing sample
    boundaries, NaN and ±Inf counted as non-zero (as zero_frac counts them), -0.0 as 0."""
    rng = np.random.default_rng(sum(shape) + unit)
    y = rng.standard_normal(shape)
    y[rng.random(shape) < 0.4] = 0.0
    y.flat[:11] = np.nan
    y.flat[3::17] = np.inf
    y.flat[5::19] = -np.inf
    y.flat[7::23] = -0.0
    t = torch.from_numpy(y).to(dtype)
    ref = t.double().numpy()  # the values the function sees (half-precision rounding included)
    dims = tuple(d for d in range(len(shape)) if d != unit)
    expected = np.count_nonzero(ref, axis=dims)  # NaN is not 0
    got = unit_nonzero_counts(t, unit, torch.empty(buffer))
    assert got.dtype == torch.float64
    assert np.array_equal(got.numpy(), expected.astype(np.float64))


def test_no_intermediate_of_the_outputs_size():
    """The structure of the pass, not its time: every tensor it makes (views aside) holds
    at most a chunk of the buffer's size or the [units] totals, whatever the number of
    samples (the logits' [1024, 50257] became a full-size float32 copy before)."""
    units = 5000
    y = torch.randn(1, 400, units)
    y[:, ::3] = 0.0
    buffer = torch.empty(1 << 16)  # 13 samples a chunk: 31 chunks
    with LargestNew() as mode:
        got = unit_nonzero_counts(y, 2, buffer)
    assert mode.largest <= units  # the per-chunk sums and the total: [units] each
    assert torch.equal(got, torch.count_nonzero(y[0], dim=0).double())


def test_counts_past_float32s_integers_are_exact():
    """A unit with more than 2^24 entries in one chunk: its partial count in float32 would
    stop at 2^24 (2^24 + 1 rounds to 2^24); summed in float64 there, exact."""
    after = (1 << 24) + 3
    y = torch.ones(1, 1, after, dtype=torch.bfloat16)  # 32 MiB
    y[0, 0, :2] = 0.0
    got = unit_nonzero_counts(y, 1, torch.empty(after))
    assert got.tolist() == [float(after - 2)]

"""The screened float32 norms (gradprobe/reduce.py) against float64 references, from
underflow to overflow, and the NaN/Inf flags they carry."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradprobe.reduce import _COUNT_CHUNK, SAFE_LOW, l2_norm, l2_norms, unit_nonzero_counts

SHAPES = [(7,), (3, 5), (128, 256), (64, 32, 16), (4, 8, 33, 33), (1, 70000)]
SCALES = [1e-30, 1e-25, 1e-20, 1e-12, 1e-10, 1.0, 1e10, 1e18, 1e25, 1e30]


def reference(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_norm_matches_float64_from_underflow_to_overflow(shape, scale):
    torch.manual_seed(0)
    t = torch.randn(shape) * scale
    assert torch.isfinite(t).all()
    norm, finite = l2_norm(t)
    assert finite is True
    # float32 level: partial sums over rows, then over the rows
    assert float(norm) == pytest.approx(reference(t), rel=2e-6)
    norms, flags = l2_norms([t, t[:1].contiguous()], t.device)
    assert flags == [True, True]
    assert norms.tolist() == pytest.approx([reference(t), reference(t[:1])], rel=2e-6)


def test_a_mix_of_tiny_and_ordinary_entries_loses_nothing_that_matters():
    # One entry at 1e-6 and a million at 1e-21 (their float32 squares underflow): the
    # norm is 1e-6·(1 + 5e-25), well inside float32's precision of the large one.
    t = torch.full((1000, 1000), 1e-21)
    t[0, 0] = 1e-6
    norm, _ = l2_norm(t)
    assert float(norm) == pytest.approx(reference(t), rel=1e-6)
    # A vanishing signal made only of such entries is measured exactly (float64 recheck).
    tiny = torch.full((1000, 1000), 1e-21)
    norm, _ = l2_norm(tiny)
    assert float(norm) == pytest.approx(1e-21 * 1000, rel=1e-6) and float(norm) < SAFE_LOW


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("shape", [(5,), (128, 256), (64, 32, 16)])
def test_nonfinite_entries_are_flagged(bad, shape):
    t = torch.randn(shape)
    t.view(-1)[len(t.view(-1)) // 2] = bad
    norm, finite = l2_norm(t)
    assert finite is False and not math.isfinite(float(norm))
    norms, flags = l2_norms([torch.randn(3), t, torch.zeros(4)], t.device)
    assert flags == [True, False, True]
    assert norms[2] == 0 and not math.isfinite(float(norms[1]))


def test_large_finite_entries_are_not_flagged_as_overflow():
    t = torch.full((100,), 3e37)  # squares overflow float32; the tensor is finite
    norm, finite = l2_norm(t)
    assert finite is True and float(norm) == pytest.approx(3e38, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    t = (torch.randn(64, 33) * 1e-3).to(dtype)
    norm, _ = l2_norm(t)
    assert float(norm) == pytest.approx(reference(t), rel=1e-5)
    norms, _ = l2_norms([t, t * 2], t.device)
    assert norms.tolist() == pytest.approx([reference(t), 2 * reference(t)], rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 400),
    exponent=st.integers(-40, 36),
    transpose=st.booleans(),
)
def test_norm_property(rows, cols, exponent, transpose):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    t = torch.randn(rows, cols, generator=g) * 10.0**exponent
    if transpose:
        t = t.t()  # not contiguous: the flat path
    if not torch.isfinite(t).all():
        return
    norm, finite = l2_norm(t)
    assert finite is True
    expected = reference(t)
    if expected == 0.0:  # every entry underflowed float32 itself
        assert float(norm) == 0.0
    else:
        assert float(norm) == pytest.approx(expected, rel=2e-6)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=2, max_size=4),
    unit=st.integers(1, 3),
    zero_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    chunk=st.sampled_from([7, 64, _COUNT_CHUNK]),
)
def test_unit_nonzero_counts_equal_count_nonzero(shape, unit, zero_frac, dtype, chunk):
    """Per-unit non-zero counts against torch.count_nonzero over the other dimensions,
    whatever the chunking (the buffer's size: one sample's slice, or several)."""
    unit = min(unit, len(shape) - 1)
    g = torch.Generator().manual_seed(len(shape) * 1000 + sum(shape))
    y = torch.randn(shape, generator=g)
    y[torch.rand(shape, generator=g) < zero_frac] = 0.0
    y[..., 0] = -0.0  # a negative zero is 0
    y = y.to(dtype)
    dims = tuple(d for d in range(len(shape)) if d != unit)
    expected = torch.count_nonzero(y, dim=dims)
    need = max(chunk, math.prod(shape[unit:]))
    got = unit_nonzero_counts(y, unit, torch.empty(need))
    assert got.dtype == torch.float64
    assert torch.equal(got.long(), expected)

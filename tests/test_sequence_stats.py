"""Token cosines, output logits and per-time-step error norms (gradprobe.sequence) against
independent computations: numpy float64 for the cosines and logsumexp, autograd in float64
(``torch.autograd.grad`` of a loss with respect to an LSTM's input and a cell loop's
outputs) for the error signals, and numpy's ``polyfit`` for the slope.

Tolerances: float64 on both sides, sums of at most a few hundred terms: relative error
≲ 1e-13; 1e-9 is far above it on any CPU. Half inputs: the reducers compute in float32
(≈ 6e-8 relative per operation), checked at 1e-5 relative against float64 of the same
half values.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradprobe.sequence as sequence
from gradprobe.sequence import (
    error_time,
    error_time_from_calls,
    fold_time,
    logit_stats,
    time_sq_norms,
    token_cosine,
)

TOL = 1e-9


def np_positions(steps: int, positions: int | None) -> list[int]:
    """The documented sample: the middles of min(positions, T) equal runs of positions."""
    m = steps if positions is None else min(positions, steps)
    return [j * steps // m + ((j + 1) * steps // m - j * steps // m - 1) // 2 for j in range(m)]


def np_cosine(y: np.ndarray, positions: int | None) -> float:
    """Mean cosine over distinct pairs of sampled positions, per sequence; y is [N, T, F]."""
    vals = []
    for seq in y:
        pick = seq[np_positions(seq.shape[0], positions)]
        for i in range(len(pick)):
            for j in range(len(pick)):
                a, b = pick[i], pick[j]
                if i != j and np.linalg.norm(a) > 0 and np.linalg.norm(b) > 0:
                    vals.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.mean(vals)) if vals else float("nan")


# ---- token cosine ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    steps=st.integers(1, 12),
    width=st.integers(1, 6),
    positions=st.one_of(st.none(), st.integers(1, 14)),
    seq_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_token_cosine_against_numpy(n, steps, width, positions, seq_first, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, steps, width, generator=g, dtype=torch.float64) + 0.5
    y[:, 0] = 0.0 if steps > 2 else y[:, 0]  # a zero vector: no direction, its pairs left out
    total, count = token_cosine(
        y.transpose(0, 1) if seq_first else y, time_dim=0 if seq_first else 1, positions=positions
    )
    want = np_cosine(y.numpy(), positions)
    if np.isnan(want):
        assert count.item() == 0
    else:
        np.testing.assert_allclose((total / count).item(), want, atol=TOL)


def test_token_cosine_sees_rank_collapse() -> None:
    g = torch.Generator().manual_seed(0)
    same = torch.randn(1, 1, 16, generator=g).expand(4, 50, 16) * torch.rand(4, 50, 1, generator=g)
    total, count = token_cosine(same)  # every token the same direction (scaled)
    torch.testing.assert_close(total / count, torch.tensor(1.0), rtol=0, atol=1e-6)
    eye = torch.eye(8).unsqueeze(0)  # 8 orthogonal tokens
    total, count = token_cosine(eye, positions=None)
    assert total.item() == 0.0 and count.item() == 8 * 7


def test_token_cosine_bfloat16_in_float32() -> None:
    y = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    total, count = token_cosine(y, positions=6)
    assert total.dtype == torch.float32
    want = np_cosine(y.double().numpy(), 6)
    np.testing.assert_allclose((total / count).item(), want, rtol=1e-5, atol=1e-6)


# ---- output logits --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 7, 11), (5, 11), (11,)])
@pytest.mark.parametrize("chunk", [1, 10, 1 << 22])  # one row at a time, a few, all at once
def test_logit_max_and_z_against_numpy(shape, chunk) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 9
    top, total, count = logit_stats(x, chunk=chunk)
    a = x.numpy().reshape(-1, shape[-1])
    m = a.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(a - m).sum(axis=1))  # numpy logsumexp, float64
    assert top.item() == a.max()
    assert count.item() == a.shape[0]
    np.testing.assert_allclose((total / count).item(), lse.mean(), rtol=TOL)


def test_logits_with_classes_first_and_in_bfloat16() -> None:
    x = (torch.randn(4, 6, 30, generator=torch.Generator().manual_seed(3)) * 20).to(torch.bfloat16)
    top, total, count = logit_stats(x.movedim(-1, 1), class_dim=1)
    a = x.double().numpy().reshape(-1, 30)
    m = a.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(a - m).sum(axis=1))
    assert top.dtype == torch.float32 and top.item() == a.max()
    np.testing.assert_allclose((total / count).item(), lse.mean(), rtol=1e-5)


# ---- error through time ---------------------------------------------------------------------


def np_summary(norms: np.ndarray) -> tuple[float, float, float]:
    q = max(1, len(norms) // 4)
    ok = norms > 0
    t = np.arange(len(norms))[ok]
    slope = np.polyfit(t, np.log10(norms[ok]), 1)[0] if ok.sum() >= 2 else np.nan
    return norms[:q].mean(), norms[-q:].mean(), slope


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    steps=st.integers(2, 20),
    width=st.integers(1, 4),
    batch_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_time_norms_against_numpy(n, steps, width, batch_first, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, steps, width, generator=g, dtype=torch.float64)
    grad = grad * torch.logspace(0, -3, steps, dtype=torch.float64).view(1, steps, 1)
    sq = time_sq_norms(
        grad if batch_first else grad.transpose(0, 1), time_dim=1 if batch_first else 0
    )
    norms = np.sqrt((grad.numpy() ** 2).sum(axis=(0, 2)))
    np.testing.assert_allclose(sq.sqrt().numpy(), norms, rtol=TOL)
    got = error_time(sq)
    for name, want in zip(
        ("error_time_first", "error_time_last", "error_time_slope"), np_summary(norms), strict=True
    ):
        np.testing.assert_allclose(got[name].item(), want, rtol=1e-7, atol=TOL)


def _lstm_problem(batch_first: bool):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, num_layers=1, batch_first=batch_first).double()
    head = nn.Linear(5, 1).double()
    x = torch.randn(4, 30, 3, dtype=torch.float64)
    return lstm, head, x if batch_first else x.transpose(0, 1).contiguous()


@pytest.mark.parametrize("batch_first", [True, False])
def test_lstm_error_through_time_against_autograd(batch_first: bool) -> None:
    # A loss on the last step only: the error reaching the LSTM's input at step t has
    # travelled 29 - t steps back through the recurrence (the error that vanishes).
    lstm, head, x = _lstm_problem(batch_first)
    x = x.requires_grad_(True)
    captured = []
    x.register_hook(captured.append)  # as the engine reads an error signal
    y, _ = lstm(x)
    last = y[:, -1] if batch_first else y[-1]
    loss = head(last).square().sum()
    (reference,) = torch.autograd.grad(loss, x, retain_graph=True)  # independent: autograd
    loss.backward()
    time_dim = 1 if batch_first else 0
    got = error_time(time_sq_norms(captured[0], time_dim=time_dim))
    ref = reference.movedim(time_dim, 0).reshape(30, -1).numpy()
    first, last_q, slope = np_summary(np.linalg.norm(ref, axis=1))
    np.testing.assert_allclose(got["error_time_first"].item(), first, rtol=1e-9)
    np.testing.assert_allclose(got["error_time_last"].item(), last_q, rtol=1e-9)
    np.testing.assert_allclose(got["error_time_slope"].item(), slope, rtol=1e-7)
    assert got["error_time_slope"] > 0 and got["error_time_first"] < got["error_time_last"]
    # the LSTM's own output error is zero before the last step: no slope (a gap, not a number)
    y_sq = time_sq_norms(torch.autograd.grad(head(last).square().sum(), y)[0], time_dim=time_dim)
    assert torch.isnan(error_time(y_sq)["error_time_slope"])
    assert error_time(y_sq)["error_time_first"] == 0


def test_cell_loop_error_norms_in_call_order_against_autograd() -> None:
    torch.manual_seed(1)
    cell, head = nn.GRUCell(3, 6).double(), nn.Linear(6, 1).double()
    xs = torch.randn(25, 2, 3, dtype=torch.float64)
    h = torch.zeros(2, 6, dtype=torch.float64)
    outs, order, norms = [], [], {}

    def record(t: int, grad: torch.Tensor) -> None:
        order.append(t)
        norms[t] = grad.norm()

    for t, x in enumerate(xs):
        h = cell(x, h)
        outs.append(h)
        h.register_hook(lambda g, t=t: record(t, g))  # the engine's per-call error norm
    loss = head(h).square().sum()
    reference = torch.autograd.grad(loss, outs, retain_graph=True)
    order.clear()
    loss.backward()
    assert order == list(range(24, -1, -1))  # backward reaches the calls in reverse order
    got = error_time_from_calls([norms[t] for t in range(25)])  # forward call order
    first, last, slope = np_summary(np.array([r.norm().item() for r in reference]))
    np.testing.assert_allclose(got["error_time_first"].item(), first, rtol=1e-9)
    np.testing.assert_allclose(got["error_time_last"].item(), last, rtol=1e-9)
    np.testing.assert_allclose(got["error_time_slope"].item(), slope, rtol=1e-7)


def test_short_and_empty_sequences_and_folding() -> None:
    one = error_time(torch.tensor([4.0]))
    assert one["error_time_first"] == 2 and one["error_time_last"] == 2
    assert torch.isnan(one["error_time_slope"])
    empty = error_time(torch.zeros(0))
    assert all(torch.isnan(v) for v in empty.values())
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([3.0, 5.0])
    torch.testing.assert_close(fold_time([a, b]), torch.tensor([4.0, 9.0, 9.0]))
    # two micro-batches of one step: the squared norms of the concatenated batch
    g = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(
        fold_time([time_sq_norms(g[:1]), time_sq_norms(g[1:])]), time_sq_norms(g), rtol=TOL, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_time_norms_from_vanishing_to_exploding(dtype, chunk) -> None:
    """Per-entry errors from 1e-30 to 1e30 (a float32 square underflows below ~1e-19 and
    overflows above ~1.8e19): the squared norms and the summary against numpy in float64
    of the same (float32 / bfloat16) values. float64 on both sides, sums of 12 squares:
    relative error ≲ 1e-15, so 1e-12; the slope's log10 in float64, 1e-9."""
    g = torch.Generator().manual_seed(1)
    steps = 13
    scale = torch.logspace(-30, 30, steps, dtype=torch.float64).view(1, steps, 1)
    grad = (torch.randn(3, steps, 4, generator=g, dtype=torch.float64) * scale).to(dtype)
    ref = grad.double().numpy()
    sq = time_sq_norms(grad, chunk=chunk)
    want = (ref**2).sum(axis=(0, 2))
    assert want.min() < 1e-55 and want.max() > 1e55  # both ends of the range present
    np.testing.assert_allclose(sq.numpy(), want, rtol=1e-12)
    got = error_time(sq)
    for name, value in zip(
        ("error_time_first", "error_time_last", "error_time_slope"),
        np_summary(np.sqrt(want)),
        strict=True,
    ):
        np.testing.assert_allclose(got[name].item(), value, rtol=1e-9)
    # A cell loop's per-call float32 norms over the same range: not squared.
    norms = [torch.tensor(v, dtype=torch.float32) for v in np.sqrt(want)]
    got = error_time_from_calls(norms)
    for name, value in zip(
        ("error_time_first", "error_time_last", "error_time_slope"),
        np_summary(np.array([float(n) for n in norms])),
        strict=True,
    ):
        np.testing.assert_allclose(got[name].item(), value, rtol=1e-6)


def test_time_norms_without_float64_scale_by_the_largest_entry() -> None:
    """The path of a device without float64 (MPS; here the CPU told so): float32 squares
    of entries divided by the step's largest |entry|, then scaled back. Entries spread
    over 10 decades within a step and one step of ±1e-17 entries, whose squared norms are
    representable in float32; against float64 numpy: float32 accumulation of 10 scaled
    squares, relative ≲ 10 · 6e-8 plus the scale's square, so 1e-5."""
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    grad = grad * torch.logspace(-25, -15, 5, dtype=torch.float64).view(1, 1, 5)
    grad[:, 3] = 1e-17 * torch.randn(2, 5, generator=g, dtype=torch.float64).sign()
    grad = grad.float()
    with mock.patch.object(sequence, "accumulation_dtype", lambda device: torch.float32):
        sq = time_sq_norms(grad)
    assert sq.dtype == torch.float32
    want = (grad.double().numpy() ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(sq.double().numpy(), want, rtol=1e-5)


def test_zero_length_inputs_give_the_empty_result() -> None:
    """No positions, no classes, no steps: the documented empty results (count 0, NaN
    statistics), not an exception."""
    total, count = token_cosine(torch.randn(2, 0, 4))
    assert float(total) == 0 and int(count) == 0
    total, count = token_cosine(torch.randn(0, 5, 4))
    assert float(total) == 0 and int(count) == 0
    total, count = token_cosine(torch.randn(2, 5, 0))
    assert float(total) == 0 and int(count) == 0
    top, z_sum, rows = logit_stats(torch.randn(3, 4, 0))
    assert torch.isnan(top) and float(z_sum) == 0 and int(rows) == 0
    top, z_sum, rows = logit_stats(torch.randn(0, 7))
    assert torch.isnan(top) and float(z_sum) == 0 and int(rows) == 0
    for grad, time_dim in ((torch.randn(2, 0, 3), 1), (torch.randn(0, 2, 3), 0)):
        sq = time_sq_norms(grad, time_dim=time_dim)
        assert sq.shape == (0,)
        assert all(torch.isnan(v) for v in error_time(sq).values())
    # No sequences: every step's norm is 0 (no entries), as numpy's empty sum.
    assert time_sq_norms(torch.randn(0, 4, 3)).tolist() == [0.0] * 4

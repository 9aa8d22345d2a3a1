"""The attention reducer (gradprobe.attention.attention_stats) against attention weights
computed by hand: numpy, float64, explicit products and an explicit softmax, never SDPA.

Tolerances. Both sides compute in float64: a logit is a sum of E ≤ 8 products (relative
error ≤ E·2⁻⁵³ ≈ 1e-15 of Σ|q_e k_e|), an entropy a sum of S ≤ 12 terms p·log p of
similar error; 1e-9 (absolute, on values of order 1-10) is far above both and does not
depend on the CPU's vector width. Half inputs are compared with the float64 reference of
the same half values: the reducer computes in float32 (error ≈ E·2⁻²⁴ relative on the
logits, ≈ 1e-6), so 1e-4 is wide enough there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradprobe.attention import attention_stats, summarise

TOL = 1e-9


def reference(q, k, *, mask=None, causal=False, scale=None, gqa=False):
    """Per-row logits maximum, entropy and validity of softmax(q·kᵀ·scale + mask), numpy
    float64, broadcast to [*lead, H, L] (rows' values) from q [..., H, L, E], k [..., Hk, S, E]."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    if q.ndim == 2:
        q, k = q[None], k[None]
    heads, length, width = q.shape[-3:]
    kv_heads, keys = k.shape[-3], k.shape[-2]
    if kv_heads != heads:
        k = np.repeat(k, heads // kv_heads, axis=-3)  # repeat_interleave
    scale = 1.0 / math.sqrt(width) if scale is None else scale
    logits = np.einsum("...hle,...hse->...hls", q, k) * scale
    allowed = np.ones((length, keys), dtype=bool)
    if causal:
        allowed = np.tril(allowed)  # top-left aligned, as SDPA
    allowed = np.broadcast_to(allowed, logits.shape)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype == bool:
            allowed = allowed & m
        else:
            m = m.astype(np.float64)
            # −∞ and its finite stand-in (≤ half the dtype's lowest value) count as masked
            lowest = torch.finfo(mask.dtype).min if isinstance(mask, torch.Tensor) else -np.inf
            allowed = allowed & ~(m <= lowest / 2) & np.isfinite(m)
            logits = logits + np.where(np.isfinite(m), m, 0.0)
    allowed = np.broadcast_to(allowed, np.broadcast_shapes(allowed.shape, logits.shape))
    logits = np.broadcast_to(logits, allowed.shape)
    row_ok = allowed.any(-1)
    z = np.where(allowed, logits, -np.inf)
    top = z.max(-1, initial=-np.inf)
    e = np.where(allowed, np.exp(z - np.where(row_ok, top, 0.0)[..., None]), 0.0)
    p = e / np.where(row_ok, e.sum(-1), 1.0)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    return top, ent, row_ok


def exact(q, k, **kw):
    """Per head over all sequences and rows: logit max, mean and min entropy (numpy)."""
    top, ent, ok = reference(q, k, **kw)
    axes = tuple(a for a in range(top.ndim) if a != top.ndim - 2)  # all but the heads
    count = ok.sum(axis=axes)
    mean = np.where(ok, ent, 0).sum(axis=axes) / np.maximum(count, 1)
    return (
        np.where(ok, top, -np.inf).max(axis=axes),
        mean,
        np.where(ok, ent, np.inf).min(axis=axes),
        count,
    )


def np_strata(n, m):
    """The documented sample: m runs of consecutive indices, each its middle (independent
    of gradprobe.attention.strata)."""
    m = n if m is None else min(m, n)
    lo = [j * n // m for j in range(m)]
    hi = [(j + 1) * n // m for j in range(m)]
    return [(a, b, a + (b - a - 1) // 2) for a, b in zip(lo, hi, strict=True)]


def t(x, dtype=torch.float64):
    return torch.as_tensor(x, dtype=dtype)


def test_causal_gqa_exact_against_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g, dtype=torch.float64)
    k = torch.randn(
        2, 2, 9, 8, generator=g, dtype=torch.float64
    )  # L ≠ S, 2 query heads per key head
    call = attention_stats(q, k, is_causal=True, enable_gqa=True, rows=None, batch=None)
    top, mean, low, count = exact(q.numpy(), k.numpy(), causal=True)
    np.testing.assert_allclose(call.logit_max.numpy(), top, atol=TOL)
    np.testing.assert_allclose(call.entropy_mean.numpy(), mean, atol=TOL)
    np.testing.assert_allclose(call.entropy_min.numpy(), low, atol=TOL)
    np.testing.assert_array_equal(call.weight.numpy(), count)


def test_causal_top_left_when_queries_outnumber_keys() -> None:
    # L > S: rows i ≥ S see every key (SDPA's tril of an L×S matrix), row 0 sees key 0 only
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 6, 4, generator=g), torch.randn(1, 1, 3, 4, generator=g)
    call = attention_stats(q.double(), k.double(), is_causal=True, rows=None)
    _, ent, _ = reference(q.numpy(), k.numpy(), causal=True)
    assert ent[0, 0, 0] == 0.0
    np.testing.assert_allclose(call.entropy_mean.numpy(), ent.mean(axis=(0, 2)), atol=TOL)


def test_fully_masked_rows_are_left_out_without_nan() -> None:
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)
    allowed = torch.rand(2, 1, 5, 6, generator=g) > 0.4
    allowed[0, 0, 1] = False  # a padded query: every key masked
    allowed[1, 0, 4] = False
    for mask in (allowed, torch.zeros(allowed.shape).masked_fill(~allowed, -torch.inf)):
        call = attention_stats(
            q.double(),
            k.double(),
            attn_mask=mask.double() if mask.is_floating_point() else mask,
            rows=None,
            batch=None,
        )
        top, mean, low, count = exact(q.numpy(), k.numpy(), mask=allowed.numpy())
        assert not any(torch.isnan(x).any() for x in (call.logit_max, call.entropy_mean))
        np.testing.assert_allclose(call.logit_max.numpy(), top, atol=TOL)
        np.testing.assert_allclose(call.entropy_mean.numpy(), mean, atol=TOL)
        np.testing.assert_allclose(call.entropy_min.numpy(), low, atol=TOL)
        np.testing.assert_array_equal(call.weight.numpy(), count)
    stats = summarise([call])
    assert all(torch.isfinite(v).all() for v in stats.values())


def test_a_head_with_nothing_to_attend_is_a_gap_not_a_number() -> None:
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    mask[0, 1] = False  # head 1 sees nothing
    stats = summarise([attention_stats(q, k, attn_mask=mask)])
    assert torch.isnan(stats["attn_head_entropy"][1]) and torch.isnan(
        stats["attn_head_logit_max"][1]
    )
    assert torch.isfinite(stats["attn_head_entropy"][0])
    assert torch.isfinite(stats["attn_entropy_min"]) and torch.isfinite(stats["attn_logit_max"])


def test_finite_minimum_float_mask_counts_as_masked() -> None:
    # Hugging Face's additive masks use finfo(dtype).min, not −∞: a row masked that way is
    # SDPA's uniform row; it is left out, as a −∞ row would be.
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 1, 4, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g)
    allowed = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    allowed[..., 2, :] = False
    allowed[..., 0, 3:] = False
    finite = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    a = attention_stats(q, k, attn_mask=finite)
    b = attention_stats(q, k, attn_mask=allowed)
    torch.testing.assert_close(a.entropy_mean, b.entropy_mean, rtol=0, atol=1e-6)
    assert torch.equal(a.weight, b.weight) and a.weight.item() == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    q = (torch.randn(2, 2, 6, 8, generator=g) * 4).to(dtype)
    k = (torch.randn(2, 2, 6, 8, generator=g) * 4).to(dtype)
    call = attention_stats(q, k, is_causal=True, rows=None)
    assert call.logit_max.dtype == torch.float32
    top, mean, _, _ = exact(q.double().numpy(), k.double().numpy(), causal=True)
    np.testing.assert_allclose(call.logit_max.numpy(), top, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(call.entropy_mean.numpy(), mean, rtol=1e-4, atol=1e-4)


def test_no_rng_use_and_no_grad() -> None:
    q = torch.randn(1, 2, 40, 4, requires_grad=True)
    k = torch.randn(1, 2, 40, 4, requires_grad=True)
    before = torch.get_rng_state()
    call = attention_stats(q, k, is_causal=True, rows=8)
    assert torch.equal(before, torch.get_rng_state())
    assert not call.entropy_sum.requires_grad and call.entropy_sum.grad_fn is None


# ---- random shapes, masks and layouts ----------------------------------------------------


@st.composite
def problems(draw):
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    length, keys, width = draw(st.integers(1, 9)), draw(st.integers(1, 12)), draw(st.integers(1, 8))
    # k may broadcast over the leading dimensions (learned queries of batch 1 and the like)
    k_lead = [draw(st.sampled_from([1, n])) for n in lead]
    kind = draw(st.sampled_from(["none", "causal", "bool", "float", "float_inf"]))
    mshape = None
    if kind in ("bool", "float", "float_inf"):
        full = [*lead, heads, length, keys]
        mshape = [draw(st.sampled_from([1, n])) for n in full[:-1]] + [keys]
        mshape = mshape[draw(st.integers(0, len(mshape) - 2)) :]  # fewer dims broadcast
    seed = draw(st.integers(0, 2**16))
    rows = draw(st.one_of(st.none(), st.integers(1, 10)))
    batch = draw(st.one_of(st.none(), st.integers(1, 10)))
    return lead, k_lead, heads, kv_heads, length, keys, width, kind, mshape, seed, rows, batch


def _build(lead, k_lead, heads, kv_heads, length, keys, width, kind, mshape, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, heads, length, width, generator=g, dtype=torch.float64) * 2
    k = torch.randn(*k_lead, kv_heads, keys, width, generator=g, dtype=torch.float64) * 2
    mask, np_mask = None, None
    if kind == "bool":
        mask = torch.rand(*mshape, generator=g) > 0.3
        np_mask = mask.numpy()
    elif kind in ("float", "float_inf"):
        mask = torch.randn(*mshape, generator=g, dtype=torch.float64)
        if kind == "float_inf":
            mask = mask.masked_fill(torch.rand(*mshape, generator=g) < 0.3, -torch.inf)
        np_mask = mask
    return q, k, mask, np_mask


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems_against_numpy(p) -> None:
    lead, k_lead, heads, kv_heads, length, keys, width, kind, mshape, seed, rows, batch = p
    q, k, mask, np_mask = _build(
        lead, k_lead, heads, kv_heads, length, keys, width, kind, mshape, seed
    )
    causal = kind == "causal"
    gqa = kv_heads != heads
    call = attention_stats(
        q, k, attn_mask=mask, is_causal=causal, enable_gqa=gqa, rows=rows, batch=batch
    )
    top, ent, ok = reference(q.numpy(), k.numpy(), mask=np_mask, causal=causal, gqa=gqa)
    # rows of every sequence: [n_seq, H, L], the flattened leading dimensions
    top, ent, ok = (
        np.broadcast_to(x, (*lead, heads, length)).reshape(-1, heads, length)
        for x in (top, ent, ok)
    )
    n_seq = top.shape[0]
    seqs, rws = np_strata(n_seq, batch), np_strata(length, rows)

    # 1. The estimate is exactly the documented weighted sample of the reference rows.
    bi = [s[2] for s in seqs]
    ri = [r[2] for r in rws]
    w = np.outer([b - a for a, b, _ in seqs], [b - a for a, b, _ in rws])[:, None, :]
    sub_ok, sub_ent, sub_top = (x[bi][:, :, ri] for x in (ok, ent, top))
    wv = w * sub_ok
    np.testing.assert_allclose(call.weight.numpy(), wv.sum(axis=(0, 2)), atol=TOL)
    want = (wv * np.where(sub_ok, sub_ent, 0)).sum(axis=(0, 2)) / np.maximum(wv.sum(axis=(0, 2)), 1)
    got = call.entropy_mean.numpy()
    has = wv.sum(axis=(0, 2)) > 0
    np.testing.assert_allclose(got[has], want[has], atol=TOL)
    assert np.isnan(got[~has]).all()
    np.testing.assert_allclose(
        call.logit_max.numpy(), np.where(sub_ok, sub_top, -np.inf).max(axis=(0, 2)), atol=TOL
    )

    # 2. Against the exact values over every row of every sequence.
    ex_top = np.where(ok, top, -np.inf).max(axis=(0, 2))
    ex_min = np.where(ok, ent, np.inf).min(axis=(0, 2))
    assert (call.logit_max.numpy() <= ex_top + TOL).all()  # a sample's max never exceeds the max
    assert (call.entropy_min.numpy() >= ex_min - TOL).all()
    ex_mean = np.where(ok, ent, 0).sum(axis=(0, 2)) / np.maximum(ok.sum(axis=(0, 2)), 1)
    if (rows is None or rows >= length) and (batch is None or batch >= n_seq):
        np.testing.assert_allclose(got[has], ex_mean[has], atol=TOL)  # every row: exact
        np.testing.assert_allclose(call.logit_max.numpy(), ex_top, atol=TOL)
    elif ok.all():
        # The sample's deterministic error bound. Each sampled (sequence, row) stands for a
        # block of |B_i|·|R_j| (sequence, row) pairs, weighted by that size, so
        #   |estimate − exact| = |Σ_blocks Σ_{x∈block} (e_rep − e_x)| / (n·L)
        #                      ≤ Σ_blocks |block| · (max − min of e in the block) / (n·L).
        bound = np.zeros(heads)
        for a, b, _ in seqs:
            for c, d, _ in rws:
                blk = ent[a:b, :, c:d]
                bound += (b - a) * (d - c) * (blk.max(axis=(0, 2)) - blk.min(axis=(0, 2)))
        bound /= n_seq * length
        assert (np.abs(got - ex_mean) <= bound + TOL).all(), (got, ex_mean, bound)


def test_summarise_pools_calls_as_one_step() -> None:
    g = torch.Generator().manual_seed(5)
    qs = [torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64) for n in (5, 9)]
    ks = [torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64) for n in (5, 9)]
    calls = [attention_stats(q, k, is_causal=True, rows=None) for q, k in zip(qs, ks, strict=True)]
    stats = summarise(calls)
    refs = [reference(q.numpy(), k.numpy(), causal=True) for q, k in zip(qs, ks, strict=True)]
    # every (call, sequence, head, row) counts once
    ents = np.concatenate([r[1].transpose(1, 0, 2).reshape(3, -1) for r in refs], axis=1)
    tops = np.concatenate([r[0].transpose(1, 0, 2).reshape(3, -1) for r in refs], axis=1)
    np.testing.assert_allclose(stats["attn_entropy"].item(), ents.mean(), atol=TOL)
    np.testing.assert_allclose(stats["attn_head_entropy"].numpy(), ents.mean(1), atol=TOL)
    np.testing.assert_allclose(stats["attn_entropy_min"].item(), ents.mean(1).min(), atol=TOL)
    np.testing.assert_allclose(stats["attn_head_entropy_min"].numpy(), ents.min(1), atol=TOL)
    np.testing.assert_allclose(stats["attn_logit_max"].item(), tops.max(), atol=TOL)
    np.testing.assert_allclose(stats["attn_head_logit_max"].numpy(), tops.max(1), atol=TOL)
    # calls with different heads: the scalars only
    other = attention_stats(torch.randn(1, 2, 3, 4).double(), torch.randn(1, 2, 3, 4).double())
    mixed = summarise([calls[0], other])
    assert "attn_head_entropy" not in mixed and torch.isfinite(mixed["attn_entropy"])


def test_measured_a_slice_of_sequences_at_a_time(monkeypatch) -> None:
    # A bound on the logits alive at once: the slices pool to the same statistics.
    from gradprobe import attention

    g = torch.Generator().manual_seed(6)
    q = torch.randn(5, 2, 6, 4, generator=g, dtype=torch.float64)
    k = torch.randn(5, 2, 7, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 1, 6, 7, generator=g) > 0.3
    whole = attention_stats(q, k, attn_mask=mask, rows=None, batch=None)
    monkeypatch.setattr(attention, "_LOGITS", 2 * 6 * 7 * 2)  # two sequences per slice
    sliced = attention_stats(q, k, attn_mask=mask, rows=None, batch=None)
    for a, b in zip(
        (whole.logit_max, whole.entropy_sum, whole.weight, whole.entropy_min),
        (sliced.logit_max, sliced.entropy_sum, sliced.weight, sliced.entropy_min),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    mean = exact(q.numpy(), k.numpy(), mask=mask.numpy())[1]
    np.testing.assert_allclose(sliced.entropy_mean.numpy(), mean, atol=TOL)


def test_slice_plan_bounds_the_logits_of_a_slice() -> None:
    """The plan's slices hold at most ``budget`` logits (one query row of ``keys`` when a
    row alone is over it), and cover the heads in whole key-head groups or inside one."""
    from gradprobe.attention import _head_slices, slice_plan

    for sequences, heads, group, rows, keys, budget in [
        (8, 32, 1, 32, 8192, 1 << 22),  # the review's case: one sequence is 8.4M logits
        (8, 32, 4, 32, 8192, 1 << 22),
        (8, 32, 8, 32, 8192, 1 << 20),
        (3, 8, 4, 20, 50, 2000),
        (3, 8, 4, 20, 50, 150),
        (3, 8, 4, 20, 50, 30),
        (3, 8, 2, 20, 50, 10**9),
    ]:
        seq, per_head, per_row = slice_plan(sequences, heads, group, rows, keys, budget)
        assert seq * per_head * per_row * keys <= max(budget, keys)
        assert 1 <= seq <= sequences and 1 <= per_head <= heads and 1 <= per_row <= rows
        ranges = _head_slices(heads, group, per_head)
        assert [h for a, b in ranges for h in range(a, b)] == list(range(heads))
        for a, b in ranges:  # a slice is whole groups, or inside one
            assert (a % group == 0 and b % group == 0) or a // group == (b - 1) // group
            assert b - a <= per_head


@pytest.mark.parametrize("budget", [2 * 8 * 20 * 50, 4 * 20 * 50, 2 * 20 * 50, 3 * 50, 30])
def test_sliced_over_sequences_heads_and_rows(monkeypatch, budget) -> None:
    """With the budget on logits set low: the largest logits tensor formed (the matmul's
    result, log_softmax's input) is within it (one row of keys at least), and the
    statistics are those measured unsliced and the exact ones (numpy, float64)."""
    from torch.overrides import TorchFunctionMode

    from gradprobe import attention

    g = torch.Generator().manual_seed(7)
    q = torch.randn(3, 8, 20, 2, generator=g, dtype=torch.float64)
    k = torch.randn(3, 2, 50, 2, generator=g, dtype=torch.float64)  # 4 query heads a key head
    mask = torch.randn(3, 8, 20, 50, generator=g, dtype=torch.float64)
    kw = dict(attn_mask=mask, is_causal=False, enable_gqa=True, rows=None, batch=None)
    whole = attention_stats(q, k, **kw)
    sizes: list[int] = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.matmul:
                sizes.append(out.numel())
            elif func is torch.log_softmax:
                sizes.append(args[0].numel())
            return out

    monkeypatch.setattr(attention, "_LOGITS", budget)
    with Spy():
        sliced = attention_stats(q, k, **kw)
    assert sizes and max(sizes) <= max(budget, 50)
    for a, b in zip(
        (whole.logit_max, whole.entropy_sum, whole.weight, whole.entropy_min),
        (sliced.logit_max, sliced.entropy_sum, sliced.weight, sliced.entropy_min),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    top, mean, low, count = exact(q.numpy(), k.numpy(), mask=mask.numpy())
    np.testing.assert_allclose(sliced.logit_max.numpy(), top, atol=TOL)
    np.testing.assert_allclose(sliced.entropy_mean.numpy(), mean, atol=TOL)
    np.testing.assert_allclose(sliced.entropy_min.numpy(), low, atol=TOL)
    np.testing.assert_array_equal(sliced.weight.numpy(), count)


def test_causal_minimum_entropy_is_over_the_sampled_rows() -> None:
    """docs/attention.md: with rows ≥ L row 0 is sampled and a causal head's minimum
    entropy is 0; with rows < L it is the minimum over the sampled rows (the first about
    L / (2·rows)), as numpy computes it on those rows, and above 0."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 64, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 64, 4, generator=g, dtype=torch.float64)
    _, ent, _ = reference(q.numpy(), k.numpy(), causal=True)  # [1, H, L]
    full = attention_stats(q, k, is_causal=True, rows=None, batch=None)
    np.testing.assert_allclose(full.entropy_min.numpy(), 0.0, atol=TOL)
    sampled = [mid for _, _, mid in np_strata(64, 8)]
    assert sampled[0] == 3  # the middle of rows 0..7
    call = attention_stats(q, k, is_causal=True, rows=8, batch=None)
    np.testing.assert_allclose(call.entropy_min.numpy(), ent[0][:, sampled].min(1), atol=TOL)
    assert (call.entropy_min > 0).all()

"""The site reducers (gradprobe/sites.py): one call (a stack of one, the user's tensor,
only read) and a stack of k calls (the Probe's own copy, overwritten) give each call's
fields as numpy computes them in float64, for every dtype a hook sees; and the fields a
reducer produces are exactly those the catalogue's measures declare for its site."""

from __future__ import annotations

import math
from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradprobe.reduce as reduce
from allocations import LargestNew
from gradprobe.buffer import FIELDS
from gradprobe.reduce import _COUNT_CHUNK, l2_norm, l2_norms, stack_norms
from gradprobe.sites import (
    ERROR_FIELDS,
    HELD_NUMEL,
    OUTPUT_FIELDS,
    reduce_errors,
    reduce_outputs,
    saturation_edges,
    site_fields,
)
from gradprobe.stats import MEASURES, SAT_THRESHOLD

OUTPUT_KINDS = ["out", "nonfinite", "absmax", "gate"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TANH_BOUND = math.sqrt(1 - SAT_THRESHOLD)
SIGMOID_BOUND = math.sqrt(0.25 - SAT_THRESHOLD * 0.25)
# Values this close to a saturation boundary are moved away from it here: numpy's
# float64 reference rounds the bound (and y − ½ of a float64 y) itself. The values at and
# around the bounds, where that matters, are test_saturation_is_exact_at_the_bound's.
MARGIN = 0.02
BOUNDARIES = [TANH_BOUND, -TANH_BOUND, 0.5 - SIGMOID_BOUND, 0.5 + SIGMOID_BOUND]


def _constant(device: torch.device, value: int) -> torch.Tensor:
    return torch.full((), float(value), device=device)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, device=device)


def _calls(seed: int, k: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """k calls of one shape: ordinary, sigmoid-like and tanh-like values, zeros (dead
    units), large ones, and in some calls a NaN or ±Inf."""
    rng = np.random.default_rng(seed)
    calls = []
    for i in range(k):
        kind = rng.integers(4)
        if kind == 0:
            y = rng.normal(size=shape) * 10.0 ** rng.integers(-3, 4)
        elif kind == 1:
            y = rng.uniform(0, 1, size=shape)
        else:
            y = np.tanh(rng.normal(size=shape) * 3)
        y = np.array(y * (rng.uniform(size=shape) > 0.3), dtype=np.float64)  # random zeros
        if len(shape) >= 2 and shape[-1] > 1:
            y[..., 0] = 0.0  # a dead unit (features last)
        for b in BOUNDARIES:
            near = np.abs(y - b) < MARGIN
            y[near] = b + np.where(y[near] >= b, MARGIN, -MARGIN)
        if rng.uniform() < 0.3 and y.size:
            y.flat[rng.integers(y.size)] = [np.nan, np.inf, -np.inf][i % 3]
        calls.append(torch.tensor(y, dtype=torch.float64).to(dtype))
    return calls


def _close(got: torch.Tensor, want: float, bound: float) -> bool:
    g = float(got)
    if math.isnan(want) or math.isinf(want):
        return (math.isnan(g) and math.isnan(want)) or g == want
    return abs(g - want) <= bound


def _check_call(
    got: dict, gates: dict, units: torch.Tensor | None, y: np.ndarray, gate, unit, exact, dtype
):
    """One call's fields against numpy in float64 (``y``: the call's values, exactly)."""
    n = y.size
    finite = np.isfinite(y)
    eps = np.finfo(np.float64 if dtype == torch.float64 else np.float32).eps
    # A float sum or sum of squares of n terms is within n·eps·Σ|terms| (any order of
    # summation), +1 for the cast of the result; a norm (the square root) within half
    # that relatively; 4 spare for the screen's recheck and the gates' subtraction.
    total, sumsq = y.sum(), (y * y).sum()
    abs_total = np.abs(y).sum() if finite.all() else 0.0
    sum_bound = (n + 4) * eps * abs_total
    sq_bound = 2 * (n + 4) * eps * sumsq if finite.all() else 0.0
    norm = math.sqrt(sumsq)
    nonzero = int(np.count_nonzero(y))  # NaN is not 0
    bad = int((~finite).sum())
    if "out" in got:
        s, nm, nz, nf = got["out"]
        assert _close(s, total, sum_bound)
        assert _close(nm, norm, (n + 4) * eps * norm)
        assert int(nz) == nonzero
        assert int(nf) == (bad if exact else int(bad > 0))
    if "nonfinite" in got:
        assert int(got["nonfinite"][0]) == (bad if exact else int(bad > 0))
    if "absmax" in got:
        assert float(got["absmax"][0]) == (np.abs(y[finite]).max() if finite.any() else 0.0)
    if gate is not None:
        gate_sum, saturated = gates[gate]
        if gate == "relu":
            assert float(gate_sum) == nonzero and float(saturated) == 0
        elif gate == "tanh":
            assert _close(gate_sum, n - sumsq, sq_bound)
            assert int(saturated) == int((np.abs(y) > TANH_BOUND).sum())
        else:
            assert _close(gate_sum, total - sumsq, sum_bound + sq_bound)
            assert int(saturated) == int((np.abs(y - 0.5) > SIGMOID_BOUND).sum())
    if unit >= 0:
        # A unit is alive iff an entry of it is not 0 (NaN included): activity ≠ 0.
        alive = np.moveaxis(y != 0, unit, 0).reshape(y.shape[unit], -1).any(axis=1)
        assert (units.double() != 0).tolist() == alive.tolist()


def _reduce(stack, kinds, gates, unit, exact, owned):
    out = reduce_outputs(
        stack,
        kinds,
        constant=_constant,
        index=_index,
        gates=gates,
        unit=unit,
        exact=exact,
        owned=owned,
        compare=(lambda like: torch.empty(like.shape, dtype=like.dtype)) if owned else None,
        counts_buffer=(lambda need: torch.empty(max(need, _COUNT_CHUNK))) if not owned else None,
    )
    per_call = []
    for i in range(stack.shape[0]):
        # [k] each (0-d for a stack of one)
        fields = {kind: [f.reshape(-1)[i] for f in fs] for kind, fs in out.fields.items()}
        gate = {
            name: (s.reshape(-1)[rows.index(i)], sat.reshape(-1)[rows.index(i)])
            for name, rows, s, sat in out.gates
            if i in rows
        }
        units = out.units[i] if out.units is not None else None
        per_call.append((fields, gate, units))
    return per_call


shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(1, 4),
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    kinds=st.sets(st.sampled_from(OUTPUT_KINDS)),
    exact=st.booleans(),
    unit_choice=st.integers(-1, 2),
    screen=st.booleans(),
    data=st.data(),
)
def test_one_call_and_a_stack_agree_with_numpy(
    seed, k, shape, dtype, kinds, exact, unit_choice, screen, data
):
    """``screen`` False: the path a GPU takes, on the CPU (no float32 screen, no host
    read: float64 norms, NaN/Inf flags and absmax masks from device tensors)."""
    with mock.patch.object(reduce, "screened", reduce.screened if screen else _never):
        _one_call_and_a_stack(seed, k, shape, dtype, kinds, exact, unit_choice, data)


def _never(device: torch.device, dtype: torch.dtype) -> bool:
    return False


def _one_call_and_a_stack(seed, k, shape, dtype, kinds, exact, unit_choice, data):
    kinds = [kind for kind in OUTPUT_KINDS if kind in kinds]
    if "out" in kinds and "nonfinite" in kinds:
        kinds.remove("nonfinite")  # the Probe asks for one of the two (out carries it)
    unit = min(unit_choice, len(shape) - 1)
    gates = data.draw(
        st.lists(st.sampled_from([None, "relu", "tanh", "sigmoid"]), min_size=k, max_size=k)
    )
    calls = _calls(seed, k, shape, dtype)
    calls = [c.clamp(min=0) if g == "relu" else c for c, g in zip(calls, gates)]  # y = ReLU(z) ≥ 0
    order = sorted(range(k), key=lambda i: gates[i] != "tanh")  # as the Probe stacks them
    stacked = torch.stack([calls[i] for i in order])
    batch = _reduce(stacked, kinds, [gates[i] for i in order], unit, exact, owned=True)
    for j, i in enumerate(order):
        y = calls[i].double().numpy()
        gate = gates[i] if "gate" in kinds else None
        alone = _reduce(calls[i].unsqueeze(0), kinds, [gates[i]], unit, exact, owned=False)[0]
        for got, gate_got, units in (alone, batch[j]):
            with np.errstate(invalid="ignore"):  # inf − inf: NaN in the reference, as in torch
                _check_call(got, gate_got, units, y, gate, unit, exact, dtype)
        # One call: the user's tensor, only read.
        assert np.array_equal(calls[i].double().numpy(), y, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_large_call_counts_its_units_in_one_pass(dtype):
    """A call over 2¹⁶ entries on a CPU: its non-zero count and unit activity from the
    one-pass counts, its norm row by row; against numpy, and the counts exact."""
    calls = _calls(3, 1, (40, 32, 60), dtype)  # 76800 entries, channels at dim 1
    y = calls[0]
    y[:, 5] = 0.0  # a dead channel
    out = reduce_outputs(
        y.unsqueeze(0),
        ["out", "absmax"],
        constant=_constant,
        index=_index,
        gates=[None],
        unit=1,
        counts_buffer=lambda need: torch.empty(max(need, _COUNT_CHUNK)),
    )
    ref = y.double().numpy()
    counts = np.count_nonzero(ref, axis=(0, 2))
    assert out.units[0].tolist() == counts.astype(float).tolist()
    _check_call(
        {k: [f.reshape(-1)[0] for f in v] for k, v in out.fields.items()},
        {},
        None,
        ref,
        None,
        -1,
        False,
        dtype,
    )


def test_the_reducers_produce_exactly_the_catalogue_fields():
    """Every kind a measure records at the output site (its fold's fields, in order), and
    no other; the gate read from the output gives the gate measure's two fields; the
    error signals' reducer the error and input measures' fields."""
    output = site_fields("output")
    assert set(output) == {m.kind for m in MEASURES.values() if m.site == "output" and m.kind}
    assert set(OUTPUT_FIELDS) == {f for fields in output.values() for f in fields}
    assert all(FIELDS[kind] == fields for kind, fields in output.items())
    out = reduce_outputs(
        torch.randn(3, 4, 5),
        [*output, "gate"],
        constant=_constant,
        index=_index,
        gates=["relu", "tanh", "sigmoid"],
    )
    assert {kind: len(v) for kind, v in out.fields.items()} == {
        k: len(f) for k, f in output.items()
    }
    assert all(v.shape == (3,) for fields in out.fields.values() for v in fields)
    assert site_fields("gate") == {"gate": FIELDS["gate"]} and len(FIELDS["gate"]) == 2
    assert sorted(r for _, rows, *values in out.gates for r in rows) == [0, 1, 2]
    assert all(len(values) == 2 for _, _, *values in out.gates)
    errors = site_fields("error", "input")
    assert set(ERROR_FIELDS) == {f for fields in errors.values() for f in fields}
    for kind, fields in errors.items():
        assert FIELDS[kind] == fields
        one, _ = reduce_errors(kind, torch.randn(4, 3), False, _constant)
        many, _ = reduce_errors(kind, [torch.randn(4, 3), torch.randn(2)], False, _constant)
        assert len(one) == len(many) == len(fields)
        assert all(v.dim() == 0 for v in one) and all(v.shape == (2,) for v in many)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([1e-25, 1e-20, 1e-12, 1.0, 1e18, 1e25]),
    k=st.integers(1, 4),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    poison=st.sampled_from([None, math.nan, math.inf]),
    exact=st.booleans(),
)
def test_error_norms_of_one_signal_a_list_and_a_stack_agree_with_numpy(
    seed, scale, k, shape, poison, exact
):
    """The norm family (one tensor, a list, a stack) and the error reducer: float64
    numpy norms from underflow to overflow (the screen measures those again in float64),
    and NaN/Inf flagged (counted under exact)."""
    g = torch.Generator().manual_seed(seed)
    signals = [torch.randn(shape, generator=g) * scale for _ in range(k)]
    if poison is not None:
        signals[-1].view(-1)[0] = poison
    refs = [math.sqrt(float((s.double().numpy() ** 2).sum())) for s in signals]
    bad = [int((~np.isfinite(s.numpy())).sum()) for s in signals]
    n = signals[0].numel()
    eps = np.finfo(np.float32).eps

    def check(norm: float, ref: float) -> None:  # float32 sum of n squares, then sqrt
        assert _close(torch.tensor(norm), ref, (n + 4) * eps * ref)

    for s, ref, b in zip(signals, refs, bad):
        check(float(l2_norm(s)[0]), ref)
        (norm, flag), _ = reduce_errors("err", s, exact, _constant)
        check(float(norm), ref)
        assert int(flag) == (b if exact else int(b > 0))
    stacked = stack_norms(torch.stack(signals))[0]  # [k], 0-d for a stack of one
    for norms in (l2_norms(signals, torch.device("cpu"))[0], stacked):
        for got, ref in zip(norms.reshape(-1).tolist(), refs):
            check(got, ref)
    (norms, flags), _ = reduce_errors("err", signals, exact, _constant)
    assert [int(f) for f in flags] == [b if exact else int(b > 0) for b in bad]


_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _around(value: float, dtype: torch.dtype, ulps: int) -> torch.Tensor:
    """Every value of ``dtype`` within ``ulps`` steps of ``value`` (rounded there), both
    sides: consecutive positive floats are consecutive integers in their bits."""
    bits = torch.tensor(value, dtype=torch.float64).to(dtype).view(_BITS[dtype])
    steps = torch.arange(-ulps, ulps + 1, dtype=_BITS[dtype])
    return (bits + steps).view(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("owned", [True, False])
def test_saturation_is_exact_at_the_bound(dtype, owned):
    """Every value of the dtype within 6 steps of a saturation bound (√0.99 for tanh, both
    signs; ½ ± √0.2475 for sigmoid), counted against exact rational arithmetic on the
    same values: y² > 0.99, y(1 − y) < 0.0025. The bound rounded into the dtype (bfloat16:
    √0.99 → 0.99609375, which a strict > then missed) counted some of these wrong."""
    tanh_bound = math.sqrt(0.99)
    sigmoid_bound = math.sqrt(0.2475)
    tanh_y = torch.cat([_around(tanh_bound, dtype, 6), -_around(tanh_bound, dtype, 6)])
    sig_y = torch.cat(
        [_around(0.5 - sigmoid_bound, dtype, 6), _around(0.5 + sigmoid_bound, dtype, 6)]
    )
    sat = Fraction(1, 100)  # SAT_THRESHOLD, exactly
    assert SAT_THRESHOLD == 0.01
    want_tanh = sum(Fraction(v) ** 2 > 1 - sat for v in tanh_y.double().tolist())
    want_sig = sum(Fraction(v) * (1 - Fraction(v)) < sat / 4 for v in sig_y.double().tolist())
    assert 0 < want_tanh < tanh_y.numel() and 0 < want_sig < sig_y.numel()  # both sides
    stack = torch.stack([tanh_y, sig_y])
    out = reduce_outputs(
        stack.clone(),
        ["gate"],
        constant=_constant,
        index=_index,
        gates=["tanh", "sigmoid"],
        owned=owned,
        compare=(lambda like: torch.empty(like.shape, dtype=like.dtype)) if owned else None,
    )
    got = {name: int(saturated.reshape(-1)[0]) for name, _, _, saturated in out.gates}
    assert got == {"tanh": want_tanh, "sigmoid": want_sig}
    # Each edge is a value of the dtype (the comparison rounds nothing).
    tanh, low, high = saturation_edges(dtype)
    for edge in (tanh, low, high):
        assert torch.tensor(edge, dtype=torch.float64).to(dtype).item() == edge


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_saturated_counts_past_half_precision_integers(dtype):
    """3000 saturated entries per call (more than bfloat16's 256 or float16's 2048
    consecutive integers), in a stack of calls whose compare buffer has the output's
    dtype: the count stays exact (summed in float32), against numpy."""
    rng = np.random.default_rng(0)
    y = np.where(rng.uniform(size=(3, 4000)) < 0.75, 0.999, 0.5) * rng.choice([-1, 1], (3, 4000))
    stack = torch.tensor(y).to(dtype)
    for owned in (True, False):
        out = reduce_outputs(
            stack.clone(),
            ["gate"],
            constant=_constant,
            index=_index,
            gates=["tanh"] * 3,
            owned=owned,
            compare=(lambda like: torch.empty(like.shape, dtype=like.dtype)) if owned else None,
        )
        ((_, _, _, saturated),) = out.gates
        want = (np.abs(stack.double().numpy()) ** 2 > 0.99).sum(axis=1)
        assert (want > 2048).all()
        assert saturated.double().tolist() == want.astype(float).tolist()


def test_one_size_splits_held_outputs_from_those_reduced_alone() -> None:
    """The Probe holds outputs of at most HELD_NUMEL entries to stack them, and the site
    reducer counts units in one pass only past it: one number, not two copies that drift
    (recording.kept.HELD_NUMEL is sites.HELD_NUMEL itself)."""
    from gradprobe.recording import kept
    from gradprobe.sites import HELD_NUMEL

    assert kept.HELD_NUMEL is HELD_NUMEL
    # Past it, a call alone on a CPU takes the one-pass counts (the buffer is asked for);
    # at it, the held path's activity: the same units and counts either way, as numpy's.
    asked = []
    for n in (HELD_NUMEL, HELD_NUMEL + 1):
        y = torch.zeros(n // 2 if n % 2 == 0 else n, 2 if n % 2 == 0 else 1)
        y[::3] = 1.5
        out = reduce_outputs(
            y.unsqueeze(0),
            ["out"],
            constant=_constant,
            index=_index,
            unit=1,
            counts_buffer=lambda need: asked.append(need) or torch.empty(max(need, _COUNT_CHUNK)),
        )
        ref = y.double().numpy()
        assert int(out.fields["out"][2]) == np.count_nonzero(ref)
        assert (out.units[0] != 0).tolist() == (ref != 0).any(axis=0).tolist()
    assert len(asked) == 1  # the call of HELD_NUMEL + 1 entries only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absmax_of_a_finite_users_tensor_makes_no_copy(dtype):
    """The user's tensor (not owned), known finite by the screen: its largest |entry| from
    its max and min, no |y| of its size allocated; equal to numpy's (a max rounds nothing),
    the largest entry here negative, and −0 read as +0."""
    rng = np.random.default_rng(7)
    y = torch.tensor(rng.standard_normal((64, 40, 30)), dtype=dtype)
    y[3, 4, 5] = -9.0  # the largest |y|: a negative entry
    zeros = -torch.zeros(1, 70000, dtype=dtype)  # all −0: absmax +0
    for t, want in ((y, 9.0), (zeros, 0.0)):
        with LargestNew() as mode:
            # nonfinite: the norm whose screen says the tensor is finite
            out = reduce_outputs(
                t.unsqueeze(0), ["nonfinite", "absmax"], constant=_constant, index=_index
            )
        (absmax,) = out.fields["absmax"]
        assert float(absmax) == float(np.abs(t.double().numpy()).max()) == want
        assert math.copysign(1.0, float(absmax)) == 1.0
        assert mode.largest < t.numel() // 4  # no |y| (nor a bool mask of it)
        assert int(out.fields["nonfinite"][0]) == 0


@pytest.mark.parametrize("gate", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_large_output_counts_saturation_in_chunks(dtype, gate):
    """A tanh or sigmoid output over HELD_NUMEL entries, the user's (only read), through a
    counts buffer smaller than it (chunks crossing rows): every value of the dtype within
    6 steps of the saturation bounds (±√0.99; ½ ± √0.2475), zeros, ±Inf (saturated:
    y² > 0.99, y(1 − y) < 0.0025) and NaN (not), counted against exact rational
    arithmetic; no |y| or bool mask of its size made; the tensor left as it was."""
    sat = Fraction(1, 100)  # SAT_THRESHOLD, exactly
    if gate == "tanh":
        near = torch.cat([_around(TANH_BOUND, dtype, 6), -_around(TANH_BOUND, dtype, 6)])
        saturated = lambda v: v**2 > 1 - sat  # noqa: E731
    else:
        bound = math.sqrt(0.2475)
        near = torch.cat([_around(0.5 - bound, dtype, 6), _around(0.5 + bound, dtype, 6)])
        saturated = lambda v: v * (1 - v) < sat / 4  # noqa: E731
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan], dtype=dtype)
    values = torch.cat([near, special])
    entries = HELD_NUMEL + 1024  # 3328 rows of 20
    y = values.repeat(math.ceil(entries / values.numel()))[:entries].reshape(1, -1, 20)
    before = y.clone()
    ref = y.double().numpy().ravel()
    finite = ref[np.isfinite(ref)]
    want = sum(saturated(Fraction(v)) for v in finite.tolist()) + int(np.isinf(ref).sum())
    assert 0 < want < ref.size
    with LargestNew() as mode:
        out = reduce_outputs(
            y,
            ["nonfinite", "gate"],
            constant=_constant,
            index=_index,
            gates=[gate],
            counts_buffer=lambda need: torch.empty(max(need, 3001)),
        )
    ((name, _, gate_sum, count),) = out.gates
    assert name == gate and float(count) == want
    assert mode.largest < y.numel() // 4
    assert torch.equal(y.view(torch.uint8), before.view(torch.uint8))  # read only
    assert int(out.fields["nonfinite"][0]) == 1
    assert math.isnan(float(gate_sum))  # from ‖y‖² (and Σy): a NaN entry makes it NaN

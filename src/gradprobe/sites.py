"""Site reducers: the per-call fields the hooks record at a site, one path for one call
and for a stack of calls.

A site reducer takes calls of one shape, dtype and device as a stack ``[k, ...]`` (one
call is a stack of one: ``y.unsqueeze(0)``) and the kinds the plan records there, and
returns each kind's fields, one ``[k]`` tensor a field (0-d for a stack of one: the
buffer records either, and a whole-tensor reduction launches cheaper), named and
ordered as the catalogue's folds name them (:data:`gradprobe.stats.FOLDS`,
:data:`gradprobe.buffer.FIELDS`; :func:`site_fields`).
Which field is computed how is one table per site (:data:`OUTPUT_FIELDS`,
:data:`ERROR_FIELDS`): a new output statistic is its catalogue entry plus, if it needs a
new field, one line there (``absmax`` is the example).

Nothing here reads a device value on the host but the norms' screen on a CPU (see
:mod:`gradprobe.reduce`): hooks keep their numbers as tensors. The kept buffers and small
constants are the caller's (the Probe counts their memory): passed in as callables.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor

from .reduce import (
    accumulation_dtype,
    l2_norm,
    l2_norms,
    nonfinite_flags,
    nonzero_count,
    outside_count,
    per_call,
    stack_norms,
    unit_nonzero_counts,
)
from .stats import FOLDS, MEASURES, SAT_THRESHOLD

__all__ = [
    "ERROR_FIELDS",
    "HELD_NUMEL",
    "OUTPUT_FIELDS",
    "Outputs",
    "activity",
    "nonfinite",
    "reduce_errors",
    "reduce_outputs",
    "saturation_edges",
    "site_fields",
    "sum_dtype",
]

Constant = Callable[[torch.device, int], Tensor]


def site_fields(*sites: str) -> dict[str, tuple[str, ...]]:
    """The kinds the catalogue's measures record at ``sites``, each with its fields (the
    fold's order): what the site reducers must produce."""
    return {
        m.kind: tuple(f for _, f, _ in FOLDS[m.kind])
        for m in MEASURES.values()
        if m.site in sites and m.kind is not None
    }


# Each field of the output site, and what it is computed from (an attribute of _Stack).
# A new field is one line here (and its attribute, if no existing one gives it).
OUTPUT_FIELDS: dict[str, Callable[[_Stack], Tensor]] = {
    "sum": lambda s: s.total,
    "norm": lambda s: s.norms,
    "nonzero": lambda s: s.nonzero,
    "nonfinite": lambda s: s.nonfinite,
    "absmax": lambda s: s.absmax,
}
# The error signals' fields, of one signal (0-d) or of several ([n]).
ERROR_FIELDS: dict[str, Callable[[_Signals], Tensor]] = {
    "norm": lambda s: s.norms,
    "nonfinite": lambda s: s.nonfinite,
}

# Saturation: f'(z) below SAT_THRESHOLD of its largest value, read from y = f(z).
# tanh: f' = 1 − y² < 1% where y² > 0.99; sigmoid: f' = y(1 − y) < 1% of ¼.
_SAT = Fraction(repr(SAT_THRESHOLD))  # 1/100 exactly, not the binary 0.01


def _tanh_saturated(v: Fraction) -> bool:
    return v * v > 1 - _SAT


def _sigmoid_saturated(v: Fraction) -> bool:
    return v * (1 - v) < _SAT / 4


def _neighbour(x: Tensor, up: bool) -> Tensor:
    """The next value of a positive finite 0-d ``x`` in its dtype, up or down: its bits as
    an integer ± 1 (IEEE formats order positive values as their bits)."""
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return (x.view(bits) + (1 if up else -1)).view(x.dtype)


def _edge(
    dtype: torch.dtype, approx: float, saturated: Callable[[Fraction], bool], up: bool
) -> float:
    """The first value of ``dtype`` from which, going ``up`` (or down), every value is
    ``saturated`` (decided in exact rational arithmetic): found from the float64
    ``approx`` of the real bound, a step or two at most. ``saturated`` must be monotone
    there."""
    t = torch.tensor(approx, dtype=torch.float64).to(dtype)
    while saturated(Fraction(float(_neighbour(t, not up)))):
        t = _neighbour(t, not up)
    while not saturated(Fraction(float(t))):
        t = _neighbour(t, up)
    return float(t)


@functools.cache  # a pure function of the dtype: four entries
def saturation_edges(dtype: torch.dtype) -> tuple[float, float, float]:
    """``(tanh, sigmoid_low, sigmoid_high)`` for outputs of ``dtype``: a tanh output is
    saturated iff ``|y| ≥ tanh``, a sigmoid output iff ``y ≤ sigmoid_low`` or
    ``y ≥ sigmoid_high``. Each edge is a value of ``dtype`` itself (the saturated one
    nearest the real bound), so comparing ``y`` with it rounds nothing, and no value of
    ``dtype`` lies between the edge and the real bound (√0.99 and ½ ± √0.2475 are
    irrational; every value past the edge is saturated, every value before it is not):
    the comparison in ``y``'s dtype is exact, with no float32 copy of ``y``. The bound
    rounded to nearest instead (as a Python float compared with a bfloat16 tensor is) is
    0.99609375 in bfloat16, not √0.99 = 0.99499: ~9 % of a saturated bfloat16 tanh MLP's
    entries uncounted."""
    tanh = math.sqrt(1.0 - SAT_THRESHOLD)
    sigmoid = math.sqrt(0.25 - SAT_THRESHOLD * 0.25)
    return (
        _edge(dtype, tanh, _tanh_saturated, up=True),
        _edge(dtype, 0.5 - sigmoid, _sigmoid_saturated, up=False),
        _edge(dtype, 0.5 + sigmoid, _sigmoid_saturated, up=True),
    )


def sum_dtype(t: Tensor) -> torch.dtype | None:
    """float32 for half-precision tensors (AMP): a bfloat16 sum keeps about 3 digits."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None


def _reduce_units(y: Tensor, dims: tuple[int, ...], op: Callable[..., Tensor]) -> Tensor:
    """``op`` over ``dims`` of a channels tensor [N, C, ...] (dims 0, 2, ...) in two stages
    where it is contiguous: first each (sample, channel)'s own contiguous entries, then
    the samples; ~20 % cheaper than one reduction that strides over the batch (bench/)."""
    if dims == (0, *range(2, y.dim())) and y.dim() >= 3 and y.is_contiguous():
        return op(op(y.view(y.shape[0], y.shape[1], -1), dim=2), dim=0)
    return op(y, dim=dims)


def activity(y: Tensor, dims: tuple[int, ...], nonnegative: bool = False) -> Tensor:
    """max |y| over ``dims``: > 0 iff the unit is non-zero somewhere (a NaN max is not 0:
    a unit holding a NaN is alive, as its non-zero count says in unit_nonzero_counts).
    A max and a min are two reading passes; ``abs()`` first would write a copy (~2× dearer
    on a conv output). ``nonnegative``: y ≥ 0 (a ReLU's output), the max alone."""
    if not dims:
        return y.abs()
    if nonnegative:
        return _reduce_units(y, dims, torch.amax)
    return torch.maximum(
        _reduce_units(y, dims, torch.amax), _reduce_units(y, dims, torch.amin).neg()
    )


def _count_nonfinite(t: Tensor, dim: int | None = None) -> Tensor:
    """NaN/Inf entries: t − t is NaN exactly where t is NaN or ±Inf."""
    return torch.count_nonzero(t - t, dim=dim)


def nonfinite(
    t: Tensor,
    norms: Tensor,
    finite: bool | list[bool] | None,
    exact: bool,
    constant: Constant,
    per_row: bool = False,
) -> Tensor:
    """NaN/Inf entries of ``t`` (``per_row``: of each call of a stack): their
    exact number under ``stats="full"``, else a flag (0 or 1) that the norm already
    carries, at no extra pass (gradprobe/reduce.py)."""
    if exact:
        return per_call(_count_nonfinite, t) if per_row else _count_nonfinite(t)
    if finite is None:
        return ~torch.isfinite(norms)
    if isinstance(finite, bool) or norms.dim() == 0:  # one: a kept constant, no new tensor
        one = finite if isinstance(finite, bool) else finite[0]
        return constant(t.device, 0 if one else 1)
    return nonfinite_flags(norms, finite)


# ------------------------------------------------------------------ the output site
@dataclass
class Outputs:
    """What :func:`reduce_outputs` returns: per kind its fields (``[k]`` each, 0-d for
    one call), the gates
    read from the output (gate name, the rows it covers, sum of f' and saturated
    entries per row), and the per-unit activity ``[k, units]`` (> 0 iff the unit is not
    all-zero), or None."""

    fields: dict[str, tuple[Tensor, ...]]
    gates: list[tuple[str, list[int], Tensor, Tensor]] = field(default_factory=list)
    units: Tensor | None = None


class _Stack:
    """The stack being reduced and what has been computed of it (each once)."""

    def __init__(self, stack: Tensor) -> None:
        self.y = stack
        self.norms: Tensor
        self.finite: list[bool] | None = None
        self.total: Tensor
        self.nonzero: Tensor
        self.nonfinite: Tensor
        self.absmax: Tensor

    def all_finite(self) -> bool:
        """Known on the host (the CPU's screen) that no entry is NaN or Inf."""
        return self.finite is not None and all(self.finite)


def _rows(t: Tensor, rows: list[int], index: Callable[[list[int], torch.device], Tensor]) -> Tensor:
    """The calls ``rows`` of a stack (a 0-d field: the one call's): a slice where they
    follow each other."""
    if t.dim() == 0:
        return t
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return t[rows[0] : rows[0] + len(rows)]
    return t.index_select(0, index(rows, t.device))


def reduce_outputs(
    stack: Tensor,
    kinds: Collection[str],
    *,
    constant: Constant,
    index: Callable[[list[int], torch.device], Tensor],
    gates: Sequence[str | None] = (),
    unit: int = -1,
    exact: bool = False,
    owned: bool = False,
    compare: Callable[[Tensor], Tensor] | None = None,
    counts_buffer: Callable[[int], Tensor] | None = None,
) -> Outputs:
    """The output site's fields of ``kinds`` (of :func:`site_fields` ``("output")``) for
    the calls stacked in ``stack`` ``[k, ...]``; with ``"gate"`` in ``kinds``, their gates
    read from the output (``gates``: per call ``"relu"``, ``"tanh"``, ``"sigmoid"`` or
    None; y = f(z), so z need not be kept); for ``unit`` ≥ 0 (a call's unit dimension),
    their per-unit activity.

    ``owned``: the stack is the caller's own copy, overwritten here once its values are
    read (|y| in place, then |y| ≠ 0) to save a copy; else it is the user's tensor and
    only read. ``compare``: a kept float buffer like the rows it is given (tanh's
    comparison), ``counts_buffer(n)`` a kept float buffer of at least ``n`` entries (the
    one-pass unit counts of a large CPU output, one call, and its gate's saturated count,
    chunk by chunk); without them, fresh tensors.
    ``exact``: NaN/Inf counted entry by entry (``stats="full"``), else flagged.

    Three phases, in order: what reads y (norms, sums, sigmoid gates, unit activity where
    |y| is not made), what reads |y| (absmax, tanh gates, unit activity), what reads
    |y| ≠ 0 (the non-zero count of an owned stack).
    """
    k = stack.shape[0]
    if stack.dim() == 1:
        stack = stack.unsqueeze(1)  # calls of 0-d outputs
    s = _Stack(stack)
    n = math.prod(stack.shape[1:])
    device = stack.device
    gate = "gate" in kinds
    wanted = {f for kind in kinds if kind != "gate" for f in FOLDS_OF[kind]}
    relu = [i for i, g in enumerate(gates) if g == "relu"] if gate else []
    tanh = [i for i, g in enumerate(gates) if g == "tanh"] if gate else []
    sigmoid = [i for i, g in enumerate(gates) if g == "sigmoid"] if gate else []
    need_norm = bool(wanted & {"norm", "nonfinite"} or tanh or sigmoid)
    need_nonzero = "nonzero" in wanted or bool(relu)
    # The dimensions of a call that are not its units (0: its batch).
    udims = tuple(d for d in range(stack.dim() - 1) if d != unit)
    # A large CPU output alone: its non-zero count and unit activity in one pass.
    counts = (
        unit >= 0
        and need_nonzero
        and k == 1
        and counts_buffer is not None
        and n > HELD_NUMEL
        and device.type == "cpu"
        and stack.is_contiguous()
    )
    # A large CPU output alone, read-only: its gate's saturated count chunk by chunk
    # through the counts buffer (reduce.outside_count), without |y| or a mask of its size.
    chunked_gate = (
        bool(tanh or sigmoid)
        and not owned
        and k == 1
        and counts_buffer is not None
        and n > HELD_NUMEL
        and device.type == "cpu"
        and stack.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and stack.is_contiguous()
    )
    chunked_tanh = chunked_gate and bool(tanh)
    magnitudes = "absmax" in wanted or (bool(tanh) and not chunked_tanh) or (owned and need_nonzero)
    out = Outputs({})
    # -- what reads y
    if need_norm:
        s.norms, s.finite = stack_norms(stack)
    if "nonfinite" in wanted:
        s.nonfinite = nonfinite(stack, s.norms, s.finite, exact, constant, per_row=True)
    if "sum" in wanted or sigmoid:
        s.total = per_call(torch.sum, stack, dtype=sum_dtype(stack))
    if sigmoid:  # f' = y(1 − y): its sum from y's sum and norm; saturated where |y − ½| is large
        y = _rows(stack, sigmoid, index)
        gate_sum = _rows(s.total, sigmoid, index) - _squares(_rows(s.norms, sigmoid, index))
        _, low, high = saturation_edges(stack.dtype)  # exact in y's dtype (see there)
        if chunked_gate:
            assert counts_buffer is not None
            saturated = outside_count(stack, low, high, counts_buffer(0))
        else:
            saturated = per_call(torch.count_nonzero, (y <= low).logical_or_(y >= high))
        out.gates.append(("sigmoid", sigmoid, gate_sum, saturated))
    if counts:
        assert counts_buffer is not None
        scratch = counts_buffer(math.prod(stack.shape[unit + 1 :]))
        per_unit = unit_nonzero_counts(stack, unit + 1, scratch)
        out.units = per_unit.reshape(1, -1)  # a unit is active iff its count is > 0
        s.nonzero = per_unit.sum()
    elif unit >= 0 and not (owned and magnitudes):
        # Every call a stock ReLU's: y ≥ 0 (or NaN), the max alone.
        nonnegative = bool(gates) and all(g == "relu" for g in gates)
        if k == 1:  # a call alone: as it is (a channels tensor reduces in two stages)
            out.units = activity(stack[0], udims, nonnegative).reshape(1, -1)
        else:
            stacked = tuple(d + 1 for d in udims)
            out.units = activity(stack, stacked, nonnegative).reshape(k, -1)
    if chunked_tanh:
        assert counts_buffer is not None
        edge = saturation_edges(stack.dtype)[0]  # exact in y's dtype (see there)
        saturated = outside_count(stack, -edge, edge, counts_buffer(0))
        gate_sum = n - _squares(s.norms)
        out.gates.insert(0, ("tanh", tanh, gate_sum, saturated))
    if "absmax" in wanted and not owned and (chunked_tanh or not tanh) and s.all_finite():
        # The user's tensor, known finite: max |y| = max(max y, −min y), two reading
        # passes and no |y| copy (on GPT-2's logits 13 vs 90 ms, one thread). Exact: a
        # max selects an entry; abs() makes a −0 max +0, as |y|'s is.
        top, bottom = per_call(torch.amax, stack), per_call(torch.amin, stack)
        s.absmax = torch.maximum(top, bottom.neg_()).abs_()
        magnitudes = False  # nothing else reads |y| of a stack not owned
    # -- what reads |y|: in place on an owned stack (its values are not read again)
    if magnitudes:
        mags = stack.abs_() if owned else stack.abs()
        if tanh and not chunked_tanh:  # f' = 1 − y²: from the norm; saturated: y² > 0.99
            y = _rows(mags, tanh, index)
            edge = saturation_edges(stack.dtype)[0]  # exact in y's dtype (see there)
            if compare is not None:
                # Compared into a float buffer, then summed: a per-row sum of a bool
                # tensor (to int64) ran ~8× dearer on the bench MLP (1.7 vs 0.2 ms).
                # Summed in float32 for half precision: a bfloat16 sum of ones stops
                # counting at 256 (float16 at 2048).
                over = compare(y)
                torch.ge(y, edge, out=over)
                saturated = per_call(torch.sum, over, dtype=sum_dtype(over))
            else:
                saturated = per_call(torch.count_nonzero, y >= edge)
            gate_sum = n - _squares(_rows(s.norms, tanh, index))
            out.gates.insert(0, ("tanh", tanh, gate_sum, saturated))
        if unit >= 0 and owned:  # over |y|: one reading pass (a max), where y needed two
            stacked = tuple(d + 1 for d in udims)
            per_unit = _reduce_units(mags, stacked, torch.amax) if udims else mags.clone()
            out.units = per_unit.reshape(k, -1)
        if "absmax" in wanted:
            # The largest finite |y|: NaN/Inf are nonfinite's to count. Exact in its
            # dtype (a max). Masked in place where |y| is not read again.
            if s.all_finite():
                s.absmax = per_call(torch.amax, mags)  # one read, no mask
            elif owned and need_nonzero:  # its sign is still read, NaN included
                s.absmax = per_call(torch.amax, torch.where(mags < math.inf, mags, 0))
            else:
                s.absmax = per_call(torch.amax, mags.nan_to_num_(nan=0.0, posinf=0.0))
    # -- what reads |y| ≠ 0
    if need_nonzero and not counts:
        if owned:
            # A per-row count_nonzero branches per entry (~8× a sum here): |y| ≠ 0 written
            # over |y| as 1 or 0 (NaN ≠ 0: counted; sign() would give it 0), and its float
            # sum, exact (rows ≤ 2²⁴ entries; half precision summed in float32).
            torch.ne(mags, 0, out=mags)
            s.nonzero = per_call(torch.sum, mags, dtype=sum_dtype(mags))
        else:
            s.nonzero = per_call(nonzero_count, stack)
    if relu:  # f' = 1 where y > 0, else 0: the non-zero count; never saturates
        gate_sum = _rows(s.nonzero, relu, index)
        zeros = constant(device, 0)
        out.gates.insert(0, ("relu", relu, gate_sum, zeros if k == 1 else zeros.expand(len(relu))))
    out.fields = {
        kind: tuple(OUTPUT_FIELDS[f](s) for f in FOLDS_OF[kind]) for kind in kinds if kind != "gate"
    }
    return out


def _squares(norms: Tensor) -> Tensor:
    """‖y‖² in the accumulation dtype (a float32 square of a large norm loses digits)."""
    return norms.to(accumulation_dtype(norms.device)) ** 2


# An output of more than this many entries is reduced alone, in its hook, and on a CPU
# counts its units in one pass; one of at most this many is held and stacked with the
# forward's others of its shape. One number for both: recording/kept.py imports this
# constant as its HELD_NUMEL, not a copy of it.
HELD_NUMEL = 1 << 16


# ------------------------------------------------------------------ the error signals
class _Signals:
    """The error signals being reduced: their norms (screened), and their NaN/Inf."""

    def __init__(self, signals: Tensor | list[Tensor], exact: bool, constant: Constant) -> None:
        if isinstance(signals, Tensor):
            self.norms, finite = l2_norm(signals)
        else:
            self.norms, finite = l2_norms(signals, signals[0].device)
        self.finite: bool | list[bool] | None = finite
        self._signals, self._exact, self._constant = signals, exact, constant

    @property
    def nonfinite(self) -> Tensor:
        signals = self._signals
        if isinstance(signals, Tensor):
            return nonfinite(signals, self.norms, self.finite, self._exact, self._constant)
        if self._exact:
            return torch.stack([torch.count_nonzero(g - g) for g in signals])
        return nonfinite_flags(self.norms, self.finite)  # type: ignore[arg-type]


def reduce_errors(
    kind: str, signals: Tensor | list[Tensor], exact: bool, constant: Constant
) -> tuple[tuple[Tensor, ...], bool | list[bool] | None]:
    """The fields of ``kind`` (``err``: dL/d(output), ``in_err``: the module's share of
    dL/d(input)) of one error signal (0-d each) or of a list of signals of one device and
    dtype (``[n]`` each), and whether they are finite where that is known on the host
    (the CPU's screen): a bool, one per signal, or None. Norms are screened float32 or
    float64: 1e-20 signals of vanishing nets must not underflow (gradprobe/reduce.py)."""
    s = _Signals(signals, exact, constant)
    return tuple(ERROR_FIELDS[f](s) for f in FOLDS_OF[kind]), s.finite


FOLDS_OF: dict[str, tuple[str, ...]] = site_fields("output", "gate", "error", "input")

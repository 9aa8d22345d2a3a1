"""How a hook turns a tensor into the few numbers a statistic needs, cheaply.

Why this module: on a CPU the reductions, not the hooks, are what a recorded step
costs, and their price depends on their formulation far more than on their size
(timed on the real shapes in ``bench/``): an L2 norm accumulated in float64 costs
~8× one in float32 (the cast is a copy), ``_foreach_norm`` with a float64 ``dtype``
~25× the plain one, a norm over ``[rows, -1]`` then over the rows ~½ one flat norm
(and it is more accurate: float32 partial sums stay short).

**Why float32 is safe here (the screen).** Squares of float32 entries below ~1e-19
underflow, and above ~1.8e19 overflow: a vanishing error signal of 1e-20 must not
read 0. Both show in the float32 result: where any square overflowed the norm is
Inf; where the norm is at least :data:`SAFE_LOW`, what the underflowed entries lost
is below ``numel · 1.2e-38 / SAFE_LOW²`` of the squared norm (< 1e-8 relative for up to
10⁹ entries). So a float32 norm that is finite and ≥ :data:`SAFE_LOW` is kept, and only
the rare tensor outside that range is measured again in float64, exactly as before.
A NaN or Inf norm (after that recheck) means the tensor held a NaN or an Inf: the
*flag* of non-finite entries comes free with the norm; an exact count of them costs
two more passes and is taken only under ``stats="full"``.

The screen reads the float32 result on the host: on a CPU the value is already
there (no device to wait for), so it costs a microsecond. On other devices nothing is
read in a hook: norms are accumulated in float64 there (bandwidth-bound, cheap on a
GPU), and the non-finite flag is a device tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SAFE_LOW",
    "accumulation_dtype",
    "float32_norms",
    "l2_norm",
    "l2_norms",
    "nonfinite_flags",
    "nonzero_count",
    "outside_count",
    "per_call",
    "screened",
    "stack_norms",
    "to_host_later",
    "unit_nonzero_counts",
]

# Below this float32 norm, underflowed squares could matter: see the module's docstring.
SAFE_LOW = 1e-10
# Tensors with fewer entries take one flat norm (one kernel); larger ones a norm per
# row then over the rows (two kernels, half the time, float32 partial sums stay short).
_ROWWISE_FROM = 1 << 16
_FLOAT32_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it: squared error signals of 1e-20 must not underflow."""
    return torch.float32 if device.type == "mps" else torch.float64


def screened(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether norms of such tensors are taken in float32 and screened on the host."""
    return device.type == "cpu" and dtype in _FLOAT32_INPUTS


def per_call(op: Callable[..., Tensor], stack: Tensor, **kwargs: Any) -> Tensor:
    """``op`` (a reduction: ``sum``, ``amax``, a norm, a count) over each call of ``stack``
    ``[k, ...]``: ``[k]``, or 0-d for a stack of one (reduced whole: a reduction over
    given dimensions launches 1-4 µs dearer on a small tensor; the buffer takes either)."""
    k = stack.shape[0]
    if k == 1:
        return op(stack, **kwargs)
    if stack.is_contiguous():
        return op(stack.view(k, -1), dim=1, **kwargs)
    return op(stack, dim=tuple(range(1, stack.dim())), **kwargs)


def _float32_norms(stack: Tensor) -> Tensor:
    """Per call of ``stack`` ``[k, ...]``, its float32 norm: large calls as a norm per row
    (their first dimension) then over the rows (half the time, partial sums stay short)."""
    k = stack.shape[0]
    if stack.numel() >= _ROWWISE_FROM * k and stack.dim() >= 3 and stack.is_contiguous():
        rows = torch.linalg.vector_norm(
            stack.view(k, stack.shape[1], -1), dim=2, dtype=torch.float32
        )
        return torch.linalg.vector_norm(rows, dim=1)
    return per_call(torch.linalg.vector_norm, stack, dtype=torch.float32)


def _in_range(value: float) -> bool:
    """The screen: a float32 norm kept as it is (see the module's docstring)."""
    return SAFE_LOW <= value < math.inf


def _exact(t: Tensor) -> tuple[Tensor, bool]:
    """The float64 norm of a tensor the screen sent back, and whether it is finite."""
    exact = torch.linalg.vector_norm(t, dtype=torch.float64)
    return exact, math.isfinite(exact.item())  # CPU: no device to wait for


def _screen(norms: Tensor, tensor: Callable[[int], Tensor]) -> tuple[Tensor, list[bool]]:
    """Float32 norms ``[n]`` (0-d: one) through the screen: those out of its range
    measured again in float64 (``tensor(i)``: the i-th tensor), with a host flag each."""
    values = norms.tolist()  # deliberate: CPU tensors, the values are already on the host
    if isinstance(values, float):  # one norm, 0-d
        if _in_range(values):
            return norms, [True]
        exact, finite = _exact(tensor(0))
        return exact, [finite]
    # The common case, checked in C: the sum is NaN or inf if any norm is (norms are ≥ 0;
    # a sum that overflows takes the full check), and min() is sound once none is NaN.
    if sum(values) < math.inf and min(values, default=SAFE_LOW) >= SAFE_LOW:
        return norms, [True] * len(values)
    norms = norms.to(torch.float64)
    finite = [True] * len(values)
    for i, value in enumerate(values):
        if not _in_range(value):
            norms[i], finite[i] = _exact(tensor(i))
    return norms, finite


# One family, one screen: a tensor (l2_norm), a list of tensors (l2_norms), a stack of
# calls of one shape (stack_norms).
def l2_norm(t: Tensor) -> tuple[Tensor, bool | None]:
    """``‖t‖`` as a 0-d tensor, and whether it is finite where that is known on the host.

    Returns ``(norm, finite)``: ``finite`` is a host bool on the screened (CPU) path —
    False iff ``t`` holds a NaN or an Inf — and ``None`` elsewhere (then the caller
    derives the flag on the device: ``~torch.isfinite(norm)``).
    """
    if not screened(t.device, t.dtype):
        return torch.linalg.vector_norm(t, dtype=accumulation_dtype(t.device)), None
    if t.numel() >= _ROWWISE_FROM and t.dim() >= 2 and t.is_contiguous():
        norm = _float32_norms(t.unsqueeze(0))[0]
    else:
        norm = torch.linalg.vector_norm(t, dtype=torch.float32)
    if _in_range(norm.item()):  # deliberate: a CPU tensor, the value is already on the host
        return norm, True
    return _exact(t)


def l2_norms(tensors: list[Tensor], device: torch.device) -> tuple[Tensor, list[bool] | None]:
    """Norms of many tensors of one device and dtype in one batched pass: ``[n]``.

    Returns ``(norms, finite)`` as :func:`l2_norm` does, ``finite`` per tensor. The
    float32 pass is one ``_foreach_norm``; the few tensors outside the screen's range
    are measured again in float64.
    """
    if not tensors:
        return torch.zeros(0, device=device, dtype=accumulation_dtype(device)), []
    if not screened(device, tensors[0].dtype):
        dtype = accumulation_dtype(device)
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)), None
    if tensors[0].dtype == torch.float32:
        return float32_norms(tensors)
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    return _screen(norms, tensors.__getitem__)


def float32_norms(tensors: list[Tensor]) -> tuple[Tensor, list[bool]]:
    """:func:`l2_norms` of float32 CPU tensors (the screened path), for a caller that
    knows them to be such (the sentinel's short route): one ``_foreach_norm``, the screen."""
    return _screen(torch.stack(torch._foreach_norm(tensors)), tensors.__getitem__)


def stack_norms(stack: Tensor) -> tuple[Tensor, list[bool] | None]:
    """The L2 norm of each call of ``stack`` (``[k, ...]``, calls of one shape stacked;
    one call is a stack of one), screened as :func:`l2_norm`: ``(norms [k] (0-d for a
    stack of one, see :func:`per_call`), finite per call or None)``."""
    if stack.dim() == 1:
        stack = stack.unsqueeze(1)  # calls of 0-d tensors (a reduction over no dim is over all)
    if not screened(stack.device, stack.dtype):
        acc = accumulation_dtype(stack.device)
        return per_call(torch.linalg.vector_norm, stack, dtype=acc), None
    return _screen(_float32_norms(stack), stack.__getitem__)


def nonzero_count(t: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Entries of ``t`` that are not 0 (NaN counts as non-zero), as a 0-d integer tensor
    (over ``dim`` where it is given).

    ``count_nonzero`` on a float tensor branches per entry: on a ReLU output, zeros at
    random places, it ran ~8× slower than on one without zeros (12.8 vs 1.6 ms on a
    ``[64, 32, 32, 32]`` tensor, one thread); through a bool copy it costs ~1.9 ms on
    either. Small tensors skip the copy: there the extra op costs more than it saves.
    """
    if t.numel() >= _ROWWISE_FROM and t.device.type == "cpu":
        return torch.count_nonzero(t.bool(), dim=dim)
    return torch.count_nonzero(t, dim=dim)


# Entries the float buffer of unit_nonzero_counts holds at most (1 MiB of float32): it
# stays in cache, and a kept buffer this small costs nothing next to the activations.
_COUNT_CHUNK = 1 << 18
# The largest integer from which float32 counts by one: 2^24.
_FLOAT32_EXACT = 1 << 24


def unit_nonzero_counts(y: Tensor, unit: int, buffer: Tensor) -> Tensor:
    """For each unit (index along dimension ``unit``), how many entries of ``y`` are not
    0: ``[units]`` float64. A unit is dead iff its count is 0, and the counts sum to the
    tensor's non-zero count: one pass for what was three (a bool copy and its count, a
    max and a min per unit; ~1.5 vs ~4 ms on a ``[64, 32, 32, 32]`` conv output).

    ``y``: a contiguous CPU float tensor. A NaN or an Inf is not 0: counted, as
    :func:`nonzero_count` counts it, and its unit is alive, as a NaN max per unit says.
    Compared with 0 into ``buffer`` (float32, at least one sample's slice; the Probe's
    holds :data:`_COUNT_CHUNK` entries), as many samples at a time as it holds, each
    chunk summed per unit and added straight into one float64 ``[units]`` total: nothing
    of ``y``'s size is allocated (a ``cat`` of the chunks' partial counts and its float64
    sum made two full-size copies: ~300 → ~18 ms of one thread's CPU time, and +791 →
    +8 MiB of peak RSS, on GPT-2's ``[8, 128, 50257]`` logits; bench/PROFILE.md).

    Exact: sums of 0/1 are integers, exact in float32 while a chunk gives a unit at most
    2^24 entries (summed in float64 past that), and in the float64 total up to 2^53.
    """
    shape = y.shape
    before = math.prod(shape[:unit])
    units = shape[unit]
    after = math.prod(shape[unit + 1 :])
    view = y.view(before, units, after)
    rows = max(1, min(before, buffer.numel() // max(units * after, 1)))  # samples a chunk
    scratch = buffer.view(-1)[: rows * units * after].view(rows, units, after)
    # A unit's entries in one chunk: rows · after, exact in a float32 sum up to 2^24.
    partial = torch.float64 if rows * after > _FLOAT32_EXACT else None
    total = torch.zeros(units, dtype=torch.float64, device=y.device)
    for start in range(0, before, rows):
        chunk = view[start : start + rows]
        out = scratch[: chunk.shape[0]]
        torch.ne(chunk, 0, out=out)
        total += out.sum(dim=(0, 2), dtype=partial)
    return total


def outside_count(y: Tensor, low: float, high: float, buffer: Tensor) -> Tensor:
    """How many entries of ``y`` are ``≤ low`` or ``≥ high`` (``low < high``): a 0-d
    float64 count. ``y``: a contiguous CPU float tensor, only read; ``buffer``: a float32
    scratch (the Probe's counts buffer), as many entries a chunk as it holds.

    Compared into the buffer and summed, chunk by chunk: no copy of ``y``'s size and no
    bool mask, whose ``count_nonzero`` branches per entry (~3× this on a saturated tanh
    output, one thread). A symmetric pair (tanh's ``±edge``) compares |y| once. Exact: the
    edges are values of ``y``'s dtype and |y| or a half-precision entry widened to float32
    is exact, so no comparison rounds; NaN is never counted, ±Inf is; sums of 0/1 as in
    :func:`unit_nonzero_counts`.
    """
    flat = y.view(-1)
    size = buffer.numel()
    partial = torch.float64 if size > _FLOAT32_EXACT else None
    total = torch.zeros((), dtype=torch.float64, device=y.device)
    for start in range(0, flat.numel(), size):
        part = flat[start : start + size]
        out = buffer.view(-1)[: part.numel()]
        if low == -high:
            if part.dtype == out.dtype:
                torch.abs(part, out=out)
            else:  # abs() writes only its own dtype: half precision widened first (exact)
                out.copy_(part).abs_()
            torch.ge(out, high, out=out)
            total += out.sum(dtype=partial)
            continue
        torch.le(part, low, out=out)
        total += out.sum(dtype=partial)
        torch.ge(part, high, out=out)
        total += out.sum(dtype=partial)
    return total


def nonfinite_flags(norms: Tensor, finite: list[bool] | None) -> Tensor:
    """0/1 per norm: 1 where its tensor held a NaN or an Inf. From the host-side ``finite``
    of the screened path where there is one (no device op beyond a small copy), else from
    the norms themselves, on their device (no sync)."""
    if finite is not None:
        if all(finite):  # the common case: no list to convert
            return torch.zeros(len(finite), device=norms.device)
        return torch.tensor([0.0 if ok else 1.0 for ok in finite], device=norms.device)
    return ~torch.isfinite(norms)


def to_host_later(value: Tensor | float) -> tuple[Tensor | float, Any]:
    """A value to read on the host later without a sync: itself on the CPU; on a GPU a
    pinned copy made without waiting, and the event that says when it has landed."""
    if not isinstance(value, Tensor) or value.device.type == "cpu":
        return value, None
    host = torch.empty((), dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(value.device))
    return host, event

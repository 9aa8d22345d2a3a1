"""The floor of each statistic's arithmetic (bench/every_step.py's stats and floors tables).

For one step of a case: the sizes of the tensors a default Probe reads (each probed call's
output, the error signals, the inputs error_gain reads, activation modules' inputs, the
parameters and their gradients), captured with forward hooks on a copy of the model; per
statistic group (``FLOORS``), the bytes it must read (each tensor once), the kernels a
hand-written eager version launches (computed from the tensor counts and shapes), and that
version, the cheapest eager formulation we measured, to be timed on tensors of those sizes.
Not a public API.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Sizes:
    """One step's tensors, as a default Probe sees them (shapes and dtypes only)."""

    outputs: list[torch.Size] = field(default_factory=list)  # each probed call's output
    errors: list[torch.Size] = field(default_factory=list)  # outputs that require grad
    shares: list[torch.Size] = field(default_factory=list)  # inputs error_gain reads
    gates: list[torch.Size] = field(default_factory=list)  # activation modules' inputs
    params: list[torch.Size] = field(default_factory=list)


def probed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from gradprobe.probe import _choose_modules

        return _choose_modules(model, None)
    except ImportError:  # the rule of the default selection, as documented
        return [
            (n, m)
            for n, m in model.named_modules()
            if not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False))
        ]


def first_float(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, (tuple, list)):
        for v in value:
            found = first_float(v)
            if found is not None:
                return found
    if hasattr(value, "values") and callable(value.values):  # a ModelOutput, a dict
        return first_float(list(value.values()))
    return None


def step_sizes(case: Any) -> Sizes:
    from gradprobe.activations import activation_of

    sizes = Sizes(params=[p.shape for p in case.model.parameters() if p.requires_grad])
    model = copy.deepcopy(case.model)

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x = first_float(args) if args else first_float(kwargs)
        y = first_float(out)
        if y is None:
            return
        sizes.outputs.append(y.shape)
        if y.requires_grad:
            sizes.errors.append(y.shape)
            if x is not None and x.requires_grad:
                sizes.shares.append(x.shape)
        if x is not None and activation_of(module) is not None:
            sizes.gates.append(x.shape)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for _, m in probed_modules(model)]
    try:
        case.loss(model, case.batch)
    finally:
        for h in handles:
            h.remove()
    return sizes


def _norms(shapes: list[torch.Size]) -> Callable[[], Any]:
    tensors = [torch.randn(s) for s in shapes]
    return lambda: torch._foreach_norm(tensors) if tensors else None


ZERO_CHUNK = 1 << 18  # entries compared with 0 at a time into a float32 buffer


def _chunks(shape: torch.Size) -> int:
    return -(-shape.numel() // ZERO_CHUNK)


def _outputs(shapes: list[torch.Size]) -> Callable[[], Any]:
    """Sum and L2 norm (mean and std), and the zero count: compared with 0 into a float32
    buffer a chunk at a time and summed (on a CPU, ``var_mean``, ``count_nonzero`` and
    a bool ``(t == 0).sum()`` each cost 20-40× a sum on GPT-2's logits)."""
    tensors = [torch.randn(s).reshape(-1) for s in shapes]
    buffer = torch.empty(ZERO_CHUNK)

    def run() -> Any:
        out = []
        for t in tensors:
            zeros = 0.0
            for start in range(0, t.numel(), ZERO_CHUNK):
                chunk = t[start : start + ZERO_CHUNK]
                zeros = torch.eq(chunk, 0, out=buffer[: chunk.numel()]).sum() + zeros
            out.append((t.sum(), torch.linalg.vector_norm(t), zeros))
        return out

    return run


def _absmax(shapes: list[torch.Size]) -> Callable[[], Any]:
    tensors = [torch.randn(s) for s in shapes]
    return lambda: [torch.aminmax(t) for t in tensors]


def _units(shapes: list[torch.Size]) -> Callable[[], Any]:
    tensors = [torch.randn(s).reshape(-1, s[-1]) for s in shapes]
    # amax and amin over the rows: cheaper than aminmax(dim=0) or abs().amax() here
    return lambda: [(t.amax(0), t.amin(0)) for t in tensors]


def _gates(shapes: list[torch.Size]) -> Callable[[], Any]:
    """tanh's f' = 1 − y² from its output y (the bench's activations are tanh): y², then
    the saturated count (y² > 0.99) and the mean (gate_mean = 1 − mean y²)."""
    tensors = [torch.rand(s) * 2 - 1 for s in shapes]

    def run() -> Any:
        out = []
        for y in tensors:
            square = y.square()
            out.append(((square > 0.99).sum(), 1 - square.mean()))
        return out

    return run


def _update(shapes: list[torch.Size]) -> Callable[[], Any]:
    params = [torch.randn(s) for s in shapes]
    snapshot = [torch.empty(s) for s in shapes]
    diff = [torch.empty(s) for s in shapes]  # kept, as a snapshot is: no allocation per step

    def run() -> Any:
        torch._foreach_copy_(snapshot, params)
        before = torch._foreach_norm(snapshot)
        torch._foreach_copy_(diff, params)
        torch._foreach_sub_(diff, snapshot)
        return before, torch._foreach_norm(diff)

    return run


# Per group: its statistics; the tensors it must read, each once (size lists of Sizes, with
# a multiplicity); the eager kernels of the hand-written version per tensor of each list;
# and that version. "grads" are the gradients (the parameters' shapes).
@dataclass(frozen=True)
class Floor:
    reads: tuple[tuple[str, int], ...]  # (Sizes field or "grads", times read)
    # (Sizes field or "grads", kernels per tensor: a number, or one of its shape)
    kernels: tuple[tuple[str, int | Callable[[torch.Size], int]], ...]
    bare: Callable[[Sizes], Callable[[], Any]] | None
    # Part of the default statistics' floor (the "all" row): each tensor they read counted
    # once (the flags, the global norms and error_nonfinite come from these norms).
    in_all: bool = False


def _field(sizes: Sizes, name: str) -> list[torch.Size]:
    return sizes.params if name == "grads" else getattr(sizes, name)


FLOORS: dict[str, tuple[tuple[str, ...], Floor]] = {
    "none (hooks and step boundary only)": ((), Floor((), (), None)),
    "grad_norm": (
        ("grad_norm",),
        Floor((("grads", 1),), (("grads", 1),), lambda s: _norms(s.params), True),
    ),
    "param_norm": (
        ("param_norm",),
        Floor((("params", 1),), (("params", 1),), lambda s: _norms(s.params), True),
    ),
    "global_grad_norm, global_grad_norm_preclip, clipped": (
        ("global_grad_norm", "global_grad_norm_preclip", "clipped"),
        Floor((("grads", 1),), (("grads", 1),), lambda s: _norms(s.params)),
    ),
    # w before (read once: copy and its norm), then w − w_before (two tensors read); the
    # eager version: copy, norm, copy, subtract, norm.
    "update_ratio": (
        ("update_ratio",),
        Floor((("params", 3),), (("params", 5),), lambda s: _update(s.params), True),
    ),
    "nonfinite (flags from the norms of grads and outputs)": (
        ("nonfinite",),
        Floor(
            (("grads", 1), ("outputs", 1)),
            (("grads", 1), ("outputs", 1)),
            lambda s: _norms(s.params + s.outputs),
        ),
    ),
    "outputs: act_mean, act_std, zero_frac": (
        ("act_mean", "act_std", "zero_frac"),
        Floor(
            (("outputs", 1),),
            (("outputs", lambda shape: 2 + 2 * _chunks(shape)),),
            lambda s: _outputs(s.outputs),
            True,
        ),
    ),
    "act_absmax": (
        ("act_absmax",),
        Floor((("outputs", 1),), (("outputs", 1),), lambda s: _absmax(s.outputs)),
    ),
    "units: dead_frac, dead_window_frac": (
        ("dead_frac", "dead_window_frac"),
        Floor((("outputs", 1),), (("outputs", 2),), lambda s: _units(s.outputs), True),
    ),
    "gate: sat_frac, gate_mean": (
        ("sat_frac", "gate_mean"),
        Floor((("gates", 1),), (("gates", 4),), lambda s: _gates(s.gates), True),
    ),
    "error_norm": (
        ("error_norm",),
        Floor((("errors", 1),), (("errors", 1),), lambda s: _norms(s.errors)),
    ),
    "error_gain (with the error norm it divides by)": (
        ("error_gain",),
        Floor(
            (("errors", 1), ("shares", 1)),
            (("errors", 1), ("shares", 1)),
            lambda s: _norms(s.errors + s.shares),
            True,
        ),
    ),
    "error_nonfinite": (
        ("error_nonfinite",),
        Floor((("errors", 1),), (("errors", 1),), lambda s: _norms(s.errors)),
    ),
    "host-side: calls, grad_missing, skipped, loss, lr": (
        ("calls", "grad_missing", "skipped", "loss", "lr"),
        Floor((), (), None),
    ),
}


def floor_numbers(floor: Floor, sizes: Sizes, rounds: int) -> tuple[int, int, float | None]:
    """(bytes read, eager kernels, bare thread ms) of one group on one step's sizes."""
    nbytes = sum(4 * times * s.numel() for name, times in floor.reads for s in _field(sizes, name))
    kernels = sum(
        per(shape) if callable(per) else per
        for name, per in floor.kernels
        for shape in _field(sizes, name)
    )
    if floor.bare is None:
        return nbytes, kernels, None
    run = floor.bare(sizes)
    run()  # first call: allocations
    times = []
    for _ in range(rounds):
        start = time.thread_time()
        run()
        times.append(time.thread_time() - start)
    return nbytes, kernels, statistics.median(times) * 1e3

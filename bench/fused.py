"""Issue 12's lever "a fused kernel": the batched statistics as one ``torch.compile``d
function against the eager formulation the Probe uses, on the bench MLP's real shapes.

Two workloads, each per recorded step of the 12×256 tanh MLP (batch 128):

* **pass-end statistics**: its 24 hidden outputs ``[128, 256]`` (12 Linear, 12 Tanh),
  stacked, then per output the L2 norm, the sum, the non-zero count, a tanh's saturated
  count (|y| > √0.99) and each unit's largest |y|: eager as in ``gradprobe.capture`` (a
  kept stacking buffer, overwritten in place: |y|, then its sign), compiled as one function
  of the list (inductor fuses the reductions into a few loops over the stack);
* **parameter passes**: the gradients' and the parameters' norms and the copy for
  ``update_ratio``: eager as in ``gradprobe.step`` (``_foreach_norm``, ``_foreach_copy_``),
  compiled as one function.

Each compiled result is checked against the eager one first; then the variants are timed
interleaved (rounds of ``--calls`` calls, median and min of ``--rounds`` rounds). Compile
time is printed: it is paid again for each new set of shapes.

Run:  .venv/bin/python bench/fused.py [--threads 2] [--rounds 9] [--calls 50]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

SATURATED = math.sqrt(0.99)
LAYERS, BATCH, WIDTH = 12, 128, 256


def mlp_outputs() -> tuple[list[Tensor], int]:
    """The MLP's hidden outputs of one step (Linear's, then Tanh's: tanh rows first, as the
    Probe sorts them), and how many are tanh outputs."""
    torch.manual_seed(0)
    pre = [torch.randn(BATCH, WIDTH) for _ in range(LAYERS)]
    return [z.tanh() for z in pre] + pre, LAYERS


def mlp_parameters() -> tuple[list[Tensor], list[Tensor]]:
    torch.manual_seed(1)
    shapes = [(WIDTH, 64), (WIDTH,)] + [(WIDTH, WIDTH), (WIDTH,)] * (LAYERS - 1)
    shapes += [(10, WIDTH), (10,)]
    params = [torch.randn(s) for s in shapes]
    return params, [torch.randn_like(p) for p in params]


class EagerStats:
    """The Probe's eager pass-end formulation, with its kept buffers."""

    def __init__(self, outputs: list[Tensor], tanh_rows: int) -> None:
        self.stack = torch.empty(len(outputs), *outputs[0].shape)
        self.over = torch.empty(tanh_rows, outputs[0].numel())
        self.tanh_rows = tanh_rows

    def __call__(self, outputs: list[Tensor]) -> tuple[Tensor, ...]:
        torch.stack(outputs, out=self.stack)
        rows = self.stack.view(len(outputs), -1)
        norms = torch.linalg.vector_norm(rows, dim=1)
        sums = rows.sum(dim=1)
        rows.abs_()
        unit_max = self.stack.amax(dim=1)
        torch.gt(rows[: self.tanh_rows], SATURATED, out=self.over)
        saturated = self.over.sum(dim=1)
        nonzero = rows.sign_().sum(dim=1)
        return norms, sums, unit_max, saturated, nonzero


def fused_stats(outputs: list[Tensor], tanh_rows: int) -> tuple[Tensor, ...]:
    stacked = torch.stack(outputs)
    rows = stacked.view(stacked.shape[0], -1)
    magnitude = rows.abs()
    norms = (rows * rows).sum(dim=1).sqrt()
    sums = rows.sum(dim=1)
    unit_max = magnitude.view_as(stacked).amax(dim=1)
    saturated = (magnitude[:tanh_rows] > SATURATED).to(rows.dtype).sum(dim=1)
    nonzero = (magnitude != 0).to(rows.dtype).sum(dim=1)
    return norms, sums, unit_max, saturated, nonzero


def eager_params(
    grads: list[Tensor], params: list[Tensor], snapshot: list[Tensor]
) -> tuple[Tensor, Tensor]:
    grad_norms = torch.stack(torch._foreach_norm(grads))
    param_norms = torch.stack(torch._foreach_norm(params))
    torch._foreach_copy_(snapshot, params)
    return grad_norms, param_norms


def fused_params(
    grads: list[Tensor], params: list[Tensor], snapshot: list[Tensor]
) -> tuple[Tensor, Tensor]:
    grad_norms = torch.stack([g.pow(2).sum() for g in grads]).sqrt()
    param_norms = torch.stack([p.pow(2).sum() for p in params]).sqrt()
    for kept, p in zip(snapshot, params):
        kept.copy_(p)
    return grad_norms, param_norms


def agree(got: tuple[Tensor, ...], want: tuple[Tensor, ...], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        if not torch.allclose(g, w, rtol=1e-4, atol=1e-3):
            raise SystemExit(f"{what}: the compiled result {i} differs from the eager one")


def timed(variants: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, list]:
    per_call: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = variants[name]
            for _ in range(3):
                fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call[name].append((time.perf_counter() - start) / calls * 1e3)
    return per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    outputs, tanh_rows = mlp_outputs()
    params, grads = mlp_parameters()
    snapshot = [p.clone() for p in params]
    eager = EagerStats(outputs, tanh_rows)

    start = time.perf_counter()
    compiled_stats = torch.compile(fused_stats, dynamic=False)
    agree(compiled_stats(outputs, tanh_rows), eager(outputs), "pass-end statistics")
    stats_compile = time.perf_counter() - start
    start = time.perf_counter()
    compiled_params = torch.compile(fused_params, dynamic=False)
    agree(
        compiled_params(grads, params, snapshot),
        eager_params(grads, params, snapshot),
        "parameter passes",
    )
    params_compile = time.perf_counter() - start

    per_call = timed(
        {
            "pass-end statistics, eager": lambda: eager(outputs),
            "pass-end statistics, compiled": lambda: compiled_stats(outputs, tanh_rows),
            "parameter passes, eager": lambda: eager_params(grads, params, snapshot),
            "parameter passes, compiled": lambda: compiled_params(grads, params, snapshot),
        },
        args.rounds,
        args.calls,
    )
    print(
        f"torch {torch.__version__}, {args.threads} threads; compile (first call, checked "
        f"against eager): pass-end statistics {stats_compile:.1f} s, parameter passes "
        f"{params_compile:.1f} s\n"
    )
    print("| variant | ms per step, median | min |")
    print("|---|---:|---:|")
    for name, values in per_call.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} |")


if __name__ == "__main__":
    main()

"""Overhead of the Probe on a training step, measured side by side in one process.

Interleaved rounds of: a plain step, the same step under Probe(every=1), under
Probe(every=10), and under Probe(stats="cheap"); the median ms/step of each, and the
ratios to plain. Also the parameter-only statistics against one bare
``torch._foreach_norm`` pass over the gradients. CPU, 2 torch threads.

With ``--ddp``: instead, the 12×256 MLP under DistributedDataParallel on 2 CPU
processes (gloo, loopback), plain vs Probe(every=1), interleaved rounds, 1 thread each;
the Probe's cross-rank work is one collective per step (dead units) and two per flush.

Run:  python bench/overhead.py [--rounds N] [--steps N] [--ddp] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gradprobe import Probe


def tanh_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    layers: list[nn.Module] = [nn.Linear(64, 256), nn.Tanh()]
    for _ in range(11):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    layers.append(nn.Linear(256, 10))
    return nn.Sequential(*layers), torch.randn(128, 64), torch.randint(0, 10, (128,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    layers: list[nn.Module] = []
    c = 3
    for _ in range(6):
        layers += [nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True)]
        c = 32
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
    return nn.Sequential(*layers), torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


MODES: dict[str, dict | None] = {
    "plain": None,
    "probe every=1": {"every": 1},
    "probe every=10": {"every": 10},
    "probe cheap every=1": {"every": 1, "stats": "cheap"},
    "params only every=1": {
        "every": 1,
        "stats": ["grad_norm", "param_norm", "nonfinite"],
        "modules": [],
    },
}


def _time_steps(step: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def bench_model(build, rounds: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model, x, y = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode, kwargs in MODES.items():  # interleaved: drift hits every mode alike
            if kwargs is None:
                samples[mode].append(_time_steps(step, steps))
            else:
                with Probe(model, opt, flush_every=50, **kwargs):
                    step()  # first-step set-up is not the steady state
                    samples[mode].append(_time_steps(step, steps))
    return {m: statistics.median(v) for m, v in samples.items()}


def bench_param_only(build, rounds: int) -> tuple[float, float]:
    """Parameter statistics of the Probe vs one bare _foreach_norm over the gradients."""
    torch.manual_seed(0)
    model, x, y = build()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe = Probe(model, opt, stats=["grad_norm"], modules=[], flush_every=10_000)
    bare, probed = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(50):
            torch._foreach_norm(grads)
        bare.append((time.perf_counter() - start) / 50 * 1e3)
        start = time.perf_counter()
        for _ in range(50):
            probe._record_params()
            probe.buffer.discard_step()
        probed.append((time.perf_counter() - start) / 50 * 1e3)
    probe.close()
    return statistics.median(bare), statistics.median(probed)


def _ddp_worker(rank: int, world: int, port: int, rounds: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)
        model, x, y = tanh_mlp()
        n = len(x) // world
        x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()

        for _ in range(5):
            step()
        samples: dict[str, list[float]] = {"plain": [], "probe every=1": []}
        for _ in range(rounds):
            dist.barrier()
            samples["plain"].append(_time_steps(step, steps))
            dist.barrier()
            with Probe(ddp, opt, flush_every=50):
                step()
                samples["probe every=1"].append(_time_steps(step, steps))
        if rank == 0:
            with open(out, "w") as f:
                f.write(repr({m: statistics.median(v) for m, v in samples.items()}))
    finally:
        dist.destroy_process_group()


def bench_ddp(rounds: int, steps: int, world: int = 2) -> dict[str, float]:
    """Median ms/step of rank 0, plain and probed, on ``world`` CPU processes."""
    import ast

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.txt")
        mp.spawn(_ddp_worker, args=(world, port, rounds, steps, out), nprocs=world, join=True)
        with open(out) as f:
            return ast.literal_eval(f.read())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ddp", action="store_true", help="DDP on 2 CPU processes instead")
    parser.add_argument("--write", default="")
    args = parser.parse_args()
    if args.ddp:
        result = bench_ddp(args.rounds, args.steps)
        plain = result["plain"]
        text = "\n".join(
            [
                "# Probe overhead under DDP (bench/overhead.py --ddp)",
                "",
                f"torch {torch.__version__}, 2 CPU processes (gloo), 1 thread each, batch 64 per rank, "
                f"median of {args.rounds} interleaved rounds of {args.steps} steps (rank 0).",
                "",
                "| model | mode | ms/step | × plain |",
                "|---|---|---:|---:|",
                *(
                    f"| 12×256 tanh MLP, DDP × 2 | {mode} | {ms:.2f} | {ms / plain:.2f} |"
                    for mode, ms in result.items()
                ),
            ]
        )
        print(text)
        if args.write:
            Path(args.write).write_text(text + "\n")
        return
    torch.set_num_threads(2)
    lines = [
        "# Probe overhead (bench/overhead.py)",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds of {args.steps} steps.",
        "",
        "| model | mode | ms/step | × plain |",
        "|---|---|---:|---:|",
    ]
    for label, build in (
        ("12×256 tanh MLP, batch 128", tanh_mlp),
        ("6-layer 32-ch CNN, 3×32×32, batch 64", cnn),
    ):
        result = bench_model(build, args.rounds, args.steps)
        plain = result["plain"]
        for mode, ms in result.items():
            lines.append(f"| {label} | {mode} | {ms:.2f} | {ms / plain:.2f} |")
    bare, probed = bench_param_only(tanh_mlp, args.rounds)
    lines += [
        "",
        f"Parameter statistics (grad_norm) of the 12×256 MLP: {probed:.3f} ms vs one bare "
        f"`torch._foreach_norm` {bare:.3f} ms → {probed / bare:.2f}×.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        Path(args.write).write_text(text)


if __name__ == "__main__":
    main()

"""Where a sentinel step of the default cadence goes, entry point by entry point (issue 26).

The 12×256 tanh MLP of bench/every_step.py (batch 128, AdamW, one thread), a Probe with the
default cadence; after the first recorded steps, the steps between two cadence steps are
sentinel steps. Each function named in PARTS is wrapped and timed with this thread's CPU
time (``time.thread_time_ns``, no profiler: a wrapper adds ~1 µs a call); the table gives,
per sentinel step, the median of each call and the sum of all calls. Parts nest (the
optimizer pre-hook holds the sentinel's recording, which holds the spike watch): the rows
do not add up. Then the hooks alone (no-op functions on the same entry points) beside a
plain twin, the floor row and a sentinel written by hand (no Probe: what a dedicated
sentinel route must do, the least Python can do it with), interleaved.

Run:  .venv/bin/python bench/sentinel_parts.py [--steps 25]  (at most 29)
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import gradprobe.reduce as reduce_mod
from gradprobe import Probe
from gradprobe.buffer import StepBuffer
from gradprobe.recording import clock, follow, optstep, params, passes
from gradprobe.recording.clock import AUTO_EVERY, AUTO_FIRST
from gradprobe.recording.follow import model_signature

# (owner, attribute, label): methods patched on their class, functions on their module.
PARTS: list[tuple[Any, str, str]] = [
    (passes.Passes, "on_pass_start", "pass start hook"),
    (passes.Passes, "on_pass_end", "pass end hook"),
    (follow.Follow, "follow_or_stop", "following the model (2 calls)"),
    (params.ParamStats, "_record_preclip", "pre-clip norms, end of backward"),
    (reduce_mod, "_screen", "  the norms' screen (host check)"),
    (optstep.OptimizerStep, "before_step", "optimizer pre-hook (all)"),
    (optstep.OptimizerStep, "_record_lr", "  learning rate"),
    (params.ParamStats, "record_sentinel", "  the sentinel's recording"),
    (params, "param_groups", "    param_groups (2 calls)"),
    (StepBuffer, "record_params", "    buffer.record_params (2 calls)"),
    (clock.StepClock, "watch_spike", "    spike watch + live check"),
    (optstep.OptimizerStep, "after_step", "optimizer post-hook (all)"),
    (clock.StepClock, "end_step", "  closing the step"),
]


def _mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(256, 10))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _timed(fn: Callable[..., Any], label: str, acc: dict[str, list[int]]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            acc.setdefault(label, []).append(time.thread_time_ns() - t)

    return wrapper


def parts(steps: int) -> None:
    acc: dict[str, list[int]] = {}
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in PARTS]
    # The foreach norm itself, wherever gradprobe calls it (reduce.l2_norms).
    foreach = torch._foreach_norm
    try:
        for owner, name, label in PARTS:
            setattr(owner, name, _timed(getattr(owner, name), label, acc))
        torch._foreach_norm = _timed(foreach, "  of which _foreach_norm", acc)
        model, opt = _mlp()
        x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
        # Past the first recorded steps and one cadence step; all timed steps are sentinel
        # steps (main() keeps them before the next cadence step).
        start = AUTO_EVERY + AUTO_FIRST
        with Probe(model, opt) as probe:
            for step in range(start + steps):
                if step == start:
                    acc.clear()
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                probe.log(loss=loss)
                opt.step()
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        torch._foreach_norm = foreach
    n = steps
    print(f"### A sentinel step, by entry point ({n} steps; µs of thread CPU)\n")
    print("| part | calls/step | median µs a call | µs per step (all calls) |")
    print("|---|---:|---:|---:|")
    order = [label for _, _, label in PARTS]
    order.insert(order.index("  the norms' screen (host check)"), "  of which _foreach_norm")
    for label in order:
        v = acc.get(label, [])
        if v:
            med = statistics.median(v) / 1e3
            print(f"| {label.strip()} | {len(v) / n:.1f} | {med:.1f} | {sum(v) / n / 1e3:.1f} |")


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _hand_written_sentinel(m: nn.Module, o: torch.optim.Optimizer) -> None:
    """What a sentinel step must do, by hand, with no Probe: the model followed (its
    signature at the pass start), the pre-clip norms and their host screen when backward
    ends, the step's gradient norms (those, if no gradient changed since), the learning
    rate, one global norm for a spike window, rows into numpy: the floor of a dedicated
    sentinel route written in Python."""
    params = list(m.parameters())
    state: dict[str, Any] = {"pending": False, "pre": None, "versions": None, "step": 0}
    state["signature"] = model_signature(m)
    rows, rates, window = np.zeros((64, len(params))), np.zeros(64), []

    def backward_end() -> None:
        state["pending"] = False
        grads = [p.grad for p in params]
        norms = torch.stack(torch._foreach_norm(grads))
        state["finite"] = sum(norms.tolist()) < math.inf  # the screen's common case
        state["pre"], state["versions"] = norms, [(id(g), g._version) for g in grads]

    def accumulated(p: Tensor) -> None:
        if not state["pending"]:
            state["pending"] = True
            torch.autograd.Variable._execution_engine.queue_callback(backward_end)

    def pass_start(module: nn.Module, args: Any, kwargs: Any) -> None:
        signature = model_signature(m)
        if signature != state["signature"]:
            state["signature"] = signature

    def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        at = state["step"] % len(rows)
        grads = [p.grad for p in params]
        same = state["versions"] == [(id(g), g._version) for g in grads]
        norms = state["pre"] if same else torch.stack(torch._foreach_norm(grads))
        rows[at] = norms.numpy()
        rates[at] = max(float(g["lr"]) for g in opt.param_groups)
        window.append(float(norms.double().square().sum()) ** 0.5)
        del window[:-20]
        statistics.median(window)

    def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        state["step"] += 1

    for p in params:
        p.register_post_accumulate_grad_hook(accumulated)
    m.register_forward_pre_hook(pass_start, with_kwargs=True)
    o.register_step_pre_hook(pre)
    o.register_step_post_hook(post)


def hooks_alone(steps: int) -> None:
    """The Probe's entry points with no-op functions (what PyTorch charges for them), the
    floor row, and a sentinel written by hand (the floor of a dedicated route)."""

    def plain(m: nn.Module, o: torch.optim.Optimizer) -> None:
        pass

    def hooks(m: nn.Module, o: torch.optim.Optimizer) -> None:
        for p in m.parameters():
            p.register_post_accumulate_grad_hook(_noop)
        m.register_forward_pre_hook(_noop, with_kwargs=True)
        m.register_forward_hook(_noop, always_call=True)
        o.register_step_pre_hook(_noop)
        o.register_step_post_hook(_noop)

    def floor(m: nn.Module, o: torch.optim.Optimizer) -> None:
        def norm(*args: Any) -> None:
            torch._foreach_norm([p.grad for p in m.parameters()])

        o.register_step_pre_hook(norm)

    variants = {
        "plain": plain,
        "no-op hooks (Probe's entry points)": hooks,
        "floor (one `_foreach_norm` at the step)": floor,
        "a sentinel written by hand": _hand_written_sentinel,
    }
    twins = {}
    for key, attach in variants.items():
        m, o = _mlp()
        attach(m, o)
        twins[key] = (m, o)
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    times: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    for s in range(30 + steps):
        for key in keys[s % len(keys) :] + keys[: s % len(keys)]:
            m, o = twins[key]
            t = time.thread_time()
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            if s >= 30:
                times[key].append(time.thread_time() - t)
    base = statistics.median(times["plain"])
    print("\n### The entry points alone, the floor, a sentinel by hand (interleaved twins)\n")
    print("| variant | thread ms p50 | over plain, ms | run total × plain |")
    print("|---|---:|---:|---:|")
    total = sum(times["plain"])
    for key, v in times.items():
        med = statistics.median(v)
        print(f"| {key} | {med * 1e3:.3f} | {(med - base) * 1e3:+.3f} | {sum(v) / total:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, 12×256 tanh MLP, batch 128, AdamW\n")
    parts(min(args.steps, AUTO_EVERY - AUTO_FIRST - 1))
    hooks_alone(300)


if __name__ == "__main__":
    main()

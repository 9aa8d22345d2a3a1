"""Where a flush of the default cadence goes on the 12×256 tanh MLP (issue 26).

The MLP of bench/sentinel_parts.py (batch 128, AdamW lr 1e-3, one thread), a Probe with
the default cadence, the loss logged with ``probe.log``; it flushes every 50 recorded
steps. Each part of the flush is wrapped and timed with this thread's CPU time
(``time.thread_time_ns``, no profiler); parts nest (the drain holds the logged values'
copy, ``_to_frame`` its text columns): the rows do not add up.

At each flush, on the very frame the flush made, the same process also times what this
flush replaced, alternating which goes first: the live check's former pandas reading
(``PandasLiveCheck`` of tests/test_live_frames.py, its reference implementation, on a
copy of the check's state) beside today's, and ``normalize_frame`` of the frame (what
``_to_frame`` did at its end before a frame already normal was kept as built).

The first flush (the recorded first steps, ~3× the rows) is left out of the medians.

Run:  .venv/bin/python bench/flush_parts.py [--steps 430]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradprobe.buffer.drain as drain_mod
import gradprobe.recording.rows as rows_mod
from gradprobe import Probe
from gradprobe.buffer import StepBuffer
from gradprobe.live import LiveCheck
from gradprobe.run import normalize_frame

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_live_frames import PandasLiveCheck  # the reference, kept once

PARTS: list[tuple[Any, str, str]] = [
    (rows_mod.Rows, "flush", "a flush, all"),
    (StepBuffer, "drain", "  the drain"),
    (drain_mod, "_logged_partials", "    the logged values (one copy per device)"),
    (rows_mod.Rows, "_to_frame", "  _to_frame"),
    (rows_mod, "finalize", "    finalize (3 calls)"),
    (rows_mod, "_long", "    _long (a call per statistic)"),
    (rows_mod, "text_column", "    text_column (2 calls)"),
    (LiveCheck, "__call__", "  the live check"),
]
SIDE_BY_SIDE = ["live check, former (pandas)", "live check, now", "normalize_frame"]


def _mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(256, 10))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=430)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # (label, the flush it ran in, thread ns); the flush: the count of Rows.flush calls.
    timed_calls: list[tuple[str, int, int]] = []
    flush = [0]

    def wrap(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*a: Any, **k: Any) -> Any:
            if label == "a flush, all":
                flush[0] += 1
            t = time.thread_time_ns()
            try:
                return original(*a, **k)
            finally:
                timed_calls.append((label, flush[0], time.thread_time_ns() - t))

        setattr(owner, name, timed)

    def side_by_side(check: LiveCheck, frame: Any) -> None:
        """The former and today's reading of ``frame`` from a copy of the check's state
        (neither says anything), in alternating order; and normalize_frame of it."""
        former = copy.deepcopy(check)
        former.__class__ = PandasLiveCheck
        now = copy.deepcopy(check)
        for one in (former, now):
            one.warn, one.on_finding, one.stop_on = False, None, ()
        runs = [(SIDE_BY_SIDE[0], former, PandasLiveCheck.__call__), (SIDE_BY_SIDE[1], now, read)]
        for label, one, reading in runs if flush[0] % 2 else runs[::-1]:
            t = time.thread_time_ns()
            reading(one, frame)
            timed_calls.append((label, flush[0], time.thread_time_ns() - t))
        t = time.thread_time_ns()
        normalize_frame(frame)
        timed_calls.append((SIDE_BY_SIDE[2], flush[0], time.thread_time_ns() - t))

    read = LiveCheck.__call__  # today's reading, unwrapped
    for owner, name, label in PARTS:
        wrap(owner, name, label)
    timed_check = LiveCheck.__call__

    def check_and_compare(self: LiveCheck, frame: Any) -> Any:
        t = time.thread_time_ns()
        side_by_side(self, frame)  # before the real check changes the state
        timed_calls.append(("side by side", flush[0], time.thread_time_ns() - t))
        return timed_check(self, frame)

    LiveCheck.__call__ = check_and_compare  # type: ignore[method-assign]

    model, opt = _mlp()
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    with Probe(model, opt) as probe:
        for _ in range(args.steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            probe.log(loss=loss)
            opt.step()
    # The flushes that made rows (a live check ran), but the first: medians over them.
    flushes = sorted({f for label, f, _ in timed_calls if label == "  the live check"})[1:]
    print(f"{len(flushes) + 1} flushes with rows; medians over all but the first")
    print(f"{'thread CPU ms per flush':52s} {'median':>8s}")
    for label in [label for *_, label in PARTS] + ["on the same frames:", *SIDE_BY_SIDE]:
        if label.endswith(":"):
            print(label)
            continue
        per = [sum(t for part, f, t in timed_calls if part == label and f == i) for i in flushes]
        if label == "a flush, all":  # less the side-by-side timings that ran inside it
            per = [
                p - sum(t for part, f, t in timed_calls if part == "side by side" and f == i)
                for p, i in zip(per, flushes)
            ]
        print(f"{label:52s} {statistics.median(per) / 1e6:8.3f}")


if __name__ == "__main__":
    main()

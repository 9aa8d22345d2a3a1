"""Dead units when a step's calls come in any order and any number: the buffer plans where
each call's activity lands once per pattern of calls (and skips the index where they land
in order), so every pattern must give what a plain per-unit computation gives.

The reference is numpy over the same recorded activities: a unit is dead in a step iff it
was 0 in every call of its module; ``dead_window_units`` counts units dead in each of the
last ``dead_window`` steps its module ran in.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradprobe.buffer import StepBuffer

WIDTHS = (3, 2, 4)  # units of slots 0, 1, 2
WINDOW = 2


def _record(buffer: StepBuffer, calls: list[tuple[int, list[float]]], batched: bool) -> None:
    """``calls``: (slot, activity) in call order; runs of one width go in as one block
    when ``batched`` (as the pass-end batch records them)."""
    device = torch.device("cpu")
    i = 0
    while i < len(calls):
        j = i + 1
        width = len(calls[i][1])
        while batched and j < len(calls) and len(calls[j][1]) == width:
            j += 1
        block = calls[i:j]
        for slot, _ in block:
            buffer.add_host(slot, "calls")
        if len(block) == 1:
            buffer.record_units(block[0][0], device, torch.tensor(block[0][1]))
        else:
            matrix = torch.tensor([a for _, a in block])
            buffer.record_units_many([s for s, _ in block], device, matrix)
        i = j


def _reference(steps: list[list[tuple[int, list[float]]]]) -> tuple[np.ndarray, np.ndarray]:
    dead = np.zeros((len(steps), len(WIDTHS)))
    window = np.zeros((len(steps), len(WIDTHS)))
    runs = [np.zeros(w, dtype=int) for w in WIDTHS]
    seen: set[int] = set()
    for row, calls in enumerate(steps):
        for slot in range(len(WIDTHS)):
            mine = [a for s, a in calls if s == slot]
            if not mine:  # a module that did not run keeps its runs, and none is dead
                window[row, slot] = (runs[slot] >= WINDOW).sum() if slot in seen else 0
                continue
            seen.add(slot)
            inactive = ~np.any(np.array(mine) != 0, axis=0)
            runs[slot] = (runs[slot] + 1) * inactive
            dead[row, slot] = inactive.sum()
            window[row, slot] = (runs[slot] >= WINDOW).sum()
    return dead, window


def _check(steps: list[list[tuple[int, list[float]]]], batched: bool) -> StepBuffer:
    """Record ``steps`` in a buffer, close and drain them; its dead units equal numpy's."""
    buffer = StepBuffer(len(WIDTHS), 0, dead_window=WINDOW)
    for step, calls in enumerate(steps):
        _record(buffer, calls, batched)
        buffer.end_step(step)
    drained = buffer.drain(final=True)
    assert drained is not None
    dead, window = _reference(steps)
    np.testing.assert_array_equal(drained.modules["dead_units"], dead)
    np.testing.assert_array_equal(drained.modules["dead_window_units"], window)
    return buffer


call = st.sampled_from(range(len(WIDTHS))).flatmap(
    lambda s: st.tuples(
        st.just(s),
        st.lists(st.sampled_from([0.0, 0.0, 1.5]), min_size=WIDTHS[s], max_size=WIDTHS[s]),
    )
)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.lists(call, min_size=1, max_size=6), min_size=1, max_size=5))
def test_dead_units_of_calls_in_any_order_and_number_equal_numpy(steps):
    for batched in (False, True):
        _check(steps, batched)


def test_a_repeated_pattern_reuses_its_plan_and_stays_right():
    """The same calls in the same order step after step (the common case) use one plan;
    a pattern change in between gets its own and the first is right again after it."""
    steps = [
        [(0, [0.0, 1.0, 0.0]), (1, [0.0, 0.0]), (2, [1.0, 1.0, 1.0, 0.0])],
        [(0, [0.0, 1.0, 0.0]), (1, [0.0, 0.0]), (2, [1.0, 1.0, 1.0, 0.0])],
        [(2, [0.0, 0.0, 0.0, 0.0]), (0, [1.0, 1.0, 1.0]), (0, [0.0, 0.0, 0.0])],
        [(0, [0.0, 1.0, 0.0]), (1, [3.0, 0.0]), (2, [1.0, 1.0, 1.0, 0.0])],
    ]
    buffer = _check(steps, batched=False)
    assert len(next(iter(buffer._units.values())).plans) == 2  # in order, and step 2's

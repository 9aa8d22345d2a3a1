"""Probe(every="auto") records the steps after a gradient-norm spike in full (issue 22 §6),
as after a NaN; the spike is judged on the true ‖grad‖ of each step, read here directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe, diagnose
from gradprobe.step import (
    AUTO_BURST,
    AUTO_EVERY,
    AUTO_FIRST,
    SPIKE_BURST_FACTOR,
    SPIKE_BURST_MIN,
    SPIKE_BURST_WINDOW,
)

STEPS = AUTO_EVERY + 30
SPIKE = AUTO_FIRST + 15  # a step the cadence does not record


def _train(spike_scale: float) -> tuple[object, dict[int, float]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    norms: dict[int, float] = {}
    with Probe(model, opt) as probe:  # the default cadence
        for step in range(STEPS):
            opt.zero_grad()
            x = torch.randn(8, 6)
            loss = model(x).pow(2).mean() * (spike_scale if step == SPIKE else 1.0)
            loss.backward()
            norms[step] = float(
                torch.linalg.vector_norm(
                    torch.stack(
                        [torch.linalg.vector_norm(p.grad.double()) for p in model.parameters()]
                    )
                )
            )
            opt.step()
    return probe.run(), norms


def _spikes(norms: dict[int, float]) -> list[int]:
    """Steps whose true global norm is ≥ the factor × the median of the window before."""
    out, history = [], []
    for step in sorted(norms):
        recent = history[-SPIKE_BURST_WINDOW:]
        if len(recent) >= SPIKE_BURST_MIN and norms[step] >= SPIKE_BURST_FACTOR * np.median(recent):
            out.append(step)
        history.append(norms[step])
    return out


def _full(run) -> set[int]:
    frame = run.frame()
    return set(frame[frame.stat == "act_mean"].step.unique())


def test_the_steps_after_a_spike_are_recorded_in_full() -> None:
    run, norms = _train(spike_scale=1000.0)
    assert _spikes(norms) == [SPIKE]  # the spike is where it was made, and only there
    cadence = {s for s in range(STEPS) if s < AUTO_FIRST or s % AUTO_EVERY == 0}
    burst = set(range(SPIKE + 1, SPIKE + AUTO_BURST + 1))
    assert SPIKE not in cadence and _full(run) == cadence | burst
    # diagnose names the spike and the parameters whose gradients jumped.
    found = diagnose(run).of("grad_norm_spike")
    assert found is not None and found.evidence["steps"][0] == SPIKE
    assert found.names
    assert set(found.names) <= {p["name"] for p in run.meta["parameters"]}


def test_a_healthy_twin_gets_no_burst() -> None:
    run, norms = _train(spike_scale=1.0)
    assert _spikes(norms) == []
    assert _full(run) == {s for s in range(STEPS) if s < AUTO_FIRST or s % AUTO_EVERY == 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_burst_follows_without_a_host_sync() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with Probe(model, opt) as probe:
        for step in range(STEPS):
            opt.zero_grad()
            x = torch.randn(8, 6, device="cuda")
            (model(x).pow(2).mean() * (1000.0 if step == SPIKE else 1.0)).backward()
            opt.step()
            if step == SPIKE + 3:
                torch.cuda.synchronize()  # the test's own wait, so the copy has landed
    full = _full(probe.run())
    cadence = {s for s in range(STEPS) if s < AUTO_FIRST or s % AUTO_EVERY == 0}
    extra = sorted(full - cadence)
    # a step or a few late (the copy is read once its event completed), AUTO_BURST long
    assert extra and SPIKE < extra[0] <= SPIKE + 5 and len(extra) == AUTO_BURST


def test_the_window_median_is_numpys_bit_for_bit() -> None:
    """The spike rule's median (taken at every step, so without numpy) is np.median's, bit
    for bit: odd and even counts, values spanning many decades (the two middle ones'
    sum halved, as numpy's mean of two), NaN/Inf left out of the window as before."""
    from gradprobe.spikes import SPIKE_MIN, median_of, window_median

    rng = np.random.default_rng(0)
    for n in range(1, 26):
        for _ in range(40):
            values = list(rng.lognormal(0.0, 8.0, size=n) * rng.choice([1e-30, 1.0, 1e30]))
            assert median_of(values) == float(np.median(values))
            window = [*values, float("nan"), float("inf")]
            finite = [v for v in window if np.isfinite(v)]
            expected = float(np.median(finite)) if len(finite) >= SPIKE_MIN else None
            got = window_median(window)
            if expected is None:
                assert np.isnan(got)
            else:
                assert got == expected

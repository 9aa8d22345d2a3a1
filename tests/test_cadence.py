"""Probe(every="auto"): the first steps and every AUTO_EVERY-th in full, the gradients'
norms at every step (the sentinel), and a burst of full steps after non-finite gradients.
Each number is checked against the real ``.grad`` (``torch.linalg.vector_norm``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.errors import GradprobeError
from gradprobe.step import AUTO_BURST, AUTO_EVERY, AUTO_FIRST

STEPS = 2 * AUTO_EVERY + 11
NAN_STEP = AUTO_EVERY + 13  # a step the cadence does not record


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))


def _train(model, probe_kwargs, nan_step=None, optimizer=True):
    """Train STEPS steps; return the frame, the true ‖grad‖ per step and parameter, and
    for each step whether the probed modules had hooks during its forward pass."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    grads: dict[int, dict[str, float]] = {}
    hooked: dict[int, bool] = {}
    with Probe(model, opt if optimizer else None, **probe_kwargs) as probe:
        for step in range(STEPS):
            opt.zero_grad()
            x = torch.randn(5, 6)
            if step == nan_step:
                x[0, 0] = float("nan")
            hooked[step] = len(model[0]._forward_hooks) > 0
            loss = model(x).pow(2).mean()
            loss.backward()
            probe.log(loss=loss)
            grads[step] = {
                n: float(torch.linalg.vector_norm(p.grad.double())) for n, p in model.named_parameters()
            }
            opt.step()
            if not optimizer:
                probe.step()
            if step == nan_step:  # the data's NaN is gone; so is the weights'
                with torch.no_grad():
                    for p in model.parameters():
                        p.nan_to_num_(0.0)
        frame = probe.frame()
        meta = probe.meta
    return frame, grads, hooked, meta


def _full_steps(nan_step=None) -> set[int]:
    full = {s for s in range(STEPS) if s < AUTO_FIRST or s % AUTO_EVERY == 0}
    if nan_step is not None:
        full |= set(range(nan_step + 1, nan_step + AUTO_BURST + 1)) & set(range(STEPS))
    return full


@pytest.mark.parametrize("optimizer", [True, False])
def test_auto_records_the_cadence_in_full_and_gradient_norms_at_every_step(optimizer):
    model = _model()
    frame, grads, hooked, meta = _train(model, {"every": "auto"}, optimizer=optimizer)
    full = _full_steps()
    assert set(frame[frame.stat == "act_mean"].step.unique()) == full
    assert set(frame[frame.stat == "update_ratio"].step.unique()) == full
    assert set(frame[frame.stat == "param_norm"].step.unique()) == full
    # no module hook during the forward of a step it does not record
    assert {s for s, on in hooked.items() if on} == full
    for stat in ("grad_norm", "global_grad_norm", "loss"):
        assert set(frame[frame.stat == stat].step.unique()) == set(range(STEPS)), stat
    grad_rows = frame[frame.stat == "grad_norm"]
    for (step, name), value in grad_rows.set_index(["step", "name"]).value.items():
        assert value == pytest.approx(grads[step][name], rel=1e-5), (step, name)
    total = frame[frame.stat == "global_grad_norm"].set_index("step").value
    for step, value in total.items():
        expected = math.sqrt(sum(g**2 for g in grads[step].values()))
        assert value == pytest.approx(expected, rel=1e-5), step
    assert meta["probe"]["every"] == "auto"
    assert meta["probe"]["cadence"] == {"first": AUTO_FIRST, "every": AUTO_EVERY, "burst": AUTO_BURST}


def test_auto_shows_the_first_non_finite_step_and_records_the_steps_after_it():
    model = _model()
    frame, _grads, hooked, _ = _train(model, {"every": "auto"}, nan_step=NAN_STEP)
    assert NAN_STEP not in _full_steps()  # the sentinel's step, not a recorded one
    flags = frame[(frame.stat == "nonfinite") & frame.name.isin(["0.weight", "2.weight"])]
    first = flags[flags.value > 0].step.min()
    assert first == NAN_STEP
    total = frame[frame.stat == "global_grad_norm"].set_index("step").value
    assert math.isnan(total[NAN_STEP]) and all(math.isfinite(total[s]) for s in range(NAN_STEP))
    full = _full_steps(NAN_STEP)
    assert set(frame[frame.stat == "act_mean"].step.unique()) == full
    assert {s for s, on in hooked.items() if on} == full


def test_every_must_be_a_positive_integer_or_auto():
    with pytest.raises(GradprobeError, match='positive integer or "auto"'):
        Probe(_model(), every="sometimes")
    with pytest.raises(GradprobeError, match='positive integer or "auto"'):
        Probe(_model(), every=0)


def test_auto_records_the_pre_clip_norm_at_every_step():
    """Clipping hides a spike from the norm at the step: the sentinel's pre-clip norm,
    measured when backward ends, is there at every step, equal to the real one."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before_clip = {}
    with Probe(model, opt, every="auto") as probe:
        for step in range(AUTO_EVERY + 5):
            opt.zero_grad()
            model(torch.randn(5, 6) * (50.0 if step == 33 else 1.0)).pow(2).mean().backward()
            before_clip[step] = math.sqrt(
                sum(float(p.grad.double().square().sum()) for p in model.parameters())
            )
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
        frame = probe.frame()
    pre = frame[frame.stat == "global_grad_norm_preclip"].set_index("step").value
    assert set(pre.index) == set(range(AUTO_EVERY + 5))
    for step, value in pre.items():
        assert value == pytest.approx(before_clip[step], rel=1e-5), step
    clipped = frame[frame.stat == "global_grad_norm"].set_index("step").value
    assert clipped[33] == pytest.approx(0.1, rel=1e-4) and pre[33] > 10 * clipped[33]

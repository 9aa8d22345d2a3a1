"""Gradient accumulation: several backward passes per optimizer step, checked by hand.

A step is an optimizer step. Parameter statistics are of the accumulated gradient
there; module statistics aggregate every micro-batch of the step: error_norm is the
root of the summed squares over micro-batches, act_mean the mean over all their
entries, a unit is dead only if it is 0 in every micro-batch.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.stats import MODEL_NAME
from reference import capture_outputs, error_norms

MICRO = 3


def value(frame, step, name, stat) -> float:
    sub = frame[(frame.step == step) & (frame.name == name) & (frame.stat == stat)]
    assert len(sub) == 1, (step, name, stat, len(sub))
    return float(sub.value.iloc[0])


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        # Unit 0 of the ReLU fires only where x0 > 0: in the last micro-batch only.
        model[0].weight[0] = torch.tensor([10.0, 0.0, 0.0, 0.0])
        model[0].bias[0] = 0.0
    xs = [torch.randn(5, 4) for _ in range(MICRO)]
    for i, x in enumerate(xs):
        x[:, 0] = x[:, 0].abs() * (1 if i == MICRO - 1 else -1)
    ys = [torch.randint(0, 2, (5,)) for _ in range(MICRO)]
    return model, xs, ys


def loss_of(out, y):
    return nn.functional.cross_entropy(out, y) / MICRO


def test_statistics_of_an_accumulation_step_match_a_hand_computation():
    model, xs, ys = setup()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = ["0", "1", "2", "3", "4"]
    with Probe(model, opt) as probe:
        opt.zero_grad()
        for x, y in zip(xs, ys):
            loss_of(model(x), y).backward()
        accumulated = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        frame = probe.frame()

    # Hand computation on an unprobed twin, one micro-batch at a time.
    sumsq = dict.fromkeys(names, 0.0)
    outputs = {n: [] for n in names}
    for x, y in zip(xs, ys):
        loss, outs, _ = capture_outputs(twin, names, lambda x=x, y=y: loss_of(twin(x), y))
        for n, norm in error_norms(loss, outs).items():
            sumsq[n] += norm**2
        for n in names:
            outputs[n] += [o.detach().double() for o in outs[n]]

    for n in names:
        assert value(frame, 0, n, "calls") == MICRO
        assert value(frame, 0, n, "error_norm") == pytest.approx(math.sqrt(sumsq[n]), rel=1e-6)
        every = torch.cat([o.reshape(-1) for o in outputs[n]])
        assert value(frame, 0, n, "act_mean") == pytest.approx(float(every.mean()), rel=1e-6)
        assert value(frame, 0, n, "act_std") == pytest.approx(
            float(every.std(unbiased=False)), rel=1e-5
        )
    relu = torch.cat(outputs["1"])
    assert value(frame, 0, "1", "dead_frac") == pytest.approx(
        float((relu == 0).all(0).double().mean())
    )
    assert (relu[:, 0] != 0).any() and (
        relu[:10, 0] == 0
    ).all()  # unit 0: alive in one micro-batch only
    total = 0.0
    for n, g in accumulated.items():
        assert value(frame, 0, n, "grad_norm") == pytest.approx(float(g.norm()), rel=1e-6)
        total += float(g.double().norm()) ** 2
    # The pre-clip norm is of the accumulated gradient (the last backward), not of one micro-batch.
    assert value(frame, 0, MODEL_NAME, "global_grad_norm_preclip") == pytest.approx(
        math.sqrt(total), rel=1e-6
    )
    assert value(frame, 0, MODEL_NAME, "global_grad_norm") == pytest.approx(
        math.sqrt(total), rel=1e-6
    )


def test_micro_batches_of_different_steps_stay_apart():
    model, xs, ys = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt) as probe:
        for step_micro in (2, 1):
            opt.zero_grad()
            for x, y in list(zip(xs, ys))[:step_micro]:
                loss_of(model(x), y).backward()
            opt.step()
        frame = probe.frame()
    assert value(frame, 0, "0", "calls") == 2
    assert value(frame, 1, "0", "calls") == 1

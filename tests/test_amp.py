"""AMP: CPU autocast (bfloat16) with a GradScaler; unscaled norms, and steps the scaler skips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradprobe import GradprobeError, Probe
from gradprobe.stats import MODEL_NAME


def rows(frame, step, name=None):
    sub = frame[frame.step == step]
    return sub if name is None else sub[sub.name == name]


def value(frame, step, name, stat) -> float:
    sub = frame[(frame.step == step) & (frame.name == name) & (frame.stat == stat)]
    assert len(sub) == 1, (step, name, stat, len(sub))
    return float(sub.value.iloc[0])


def build() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    return model, torch.randn(32, 6), torch.randint(0, 3, (32,))


def amp_loop(model, x, y, steps, *, poison=(), clip=None):
    """A standard AMP loop; at the iterations in ``poison`` one gradient entry is set to inf."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    seen = []
    with Probe(model, opt, scaler=scaler) as probe:
        for i in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                loss = nn.functional.cross_entropy(out.float(), y)
            scaler.scale(loss).backward()
            if i in poison:
                with torch.no_grad():
                    model[2].weight.grad[0, 0] = float("inf")
            scaler.unscale_(opt)
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
            scaler.step(opt)
            seen.append(
                {
                    "out": out.detach().double(),
                    "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                    "total": None if total is None else float(total),
                    "scale": float(scaler.get_scale()),
                }
            )
            scaler.update()
        frame = probe.frame()
    return frame, seen


def test_grad_norm_is_of_the_unscaled_gradient():
    model, x, y = build()
    frame, seen = amp_loop(model, x, y, 2)
    assert seen[0]["scale"] > 1000  # the loss really was scaled
    for step in (0, 1):
        for name, g in seen[step]["grads"].items():
            # scaler.step unscaled .grad before optimizer.step: the step pre-hook saw these.
            assert value(frame, step, name, "grad_norm") == pytest.approx(float(g.norm()), rel=1e-6)
    assert (frame[frame.stat == "skipped"].value == 0).all()


def test_preclip_norm_is_unscaled_too():
    model, x, y = build()
    frame, seen = amp_loop(model, x, y, 2, clip=0.05)
    for step in (0, 1):
        assert value(frame, step, MODEL_NAME, "global_grad_norm_preclip") == pytest.approx(
            seen[step]["total"], rel=1e-5
        )
        assert value(frame, step, MODEL_NAME, "global_grad_norm") == pytest.approx(0.05, rel=1e-4)
        assert value(frame, step, MODEL_NAME, "clipped") == 1


def test_a_skipped_step_is_recorded_as_skipped_and_nothing_else():
    model, x, y = build()
    frame, seen = amp_loop(model, x, y, 4, poison={1})
    assert sorted(frame.step.unique()) == [0, 1, 2, 3]
    assert [value(frame, s, MODEL_NAME, "skipped") for s in range(4)] == [0, 1, 0, 0]
    # The skipped step has its skipped row and nothing a detector could misread.
    assert rows(frame, 1)[["name", "stat"]].values.tolist() == [[MODEL_NAME, "skipped"]]
    assert seen[2]["scale"] == seen[1]["scale"] / 2  # the scaler did back off


def test_a_skipped_steps_module_statistics_do_not_leak_into_the_next():
    model, x, y = build()
    frame, seen = amp_loop(model, x, y, 3, poison={1})
    out = seen[2]["out"]
    assert value(frame, 2, "4", "calls") == 1
    assert value(frame, 2, "4", "act_mean") == pytest.approx(float(out.mean()), rel=1e-6)
    assert value(frame, 2, "4", "act_std") == pytest.approx(
        float(out.std(unbiased=False)), rel=1e-5
    )


def test_a_skipped_last_step_is_closed_at_close():
    model, x, y = build()
    frame, _ = amp_loop(model, x, y, 2, poison={1})
    assert value(frame, 1, MODEL_NAME, "skipped") == 1
    assert rows(frame, 1, "0").empty


def test_without_a_scaler_there_is_no_skipped_row():
    model, x, y = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Probe(model, opt) as probe:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        frame = probe.frame()
    assert frame[frame.stat == "skipped"].empty


def test_scaler_must_be_a_grad_scaler():
    with pytest.raises(GradprobeError, match="GradScaler"):
        Probe(nn.Linear(2, 2), scaler=object())

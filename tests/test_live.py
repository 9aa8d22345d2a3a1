"""Live findings: said at the flush that brings their step to the host, against what the
training loop was made to do at a known step; a healthy run says nothing; training is
the same with the live check as without a Probe."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe import GradprobeError, Probe, StopTraining
from gradprobe.hooks import GradprobeWarning


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    return x, (x[:, :3].argmax(1))


def train(steps: int, *, probe_options=None, loss_scale_at=None, lr=0.05, nan_at=None):
    """SGD on a small classifier; ``loss_scale_at={step: k}`` multiplies that step's loss
    (so its gradient) by k, ``nan_at`` makes one step's loss NaN. Returns the model,
    the Probe (or None) and the step training stopped at (or None)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = _data()
    probe = Probe(model, opt, **probe_options) if probe_options is not None else None
    stopped = None
    try:
        for step in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if loss_scale_at and step in loss_scale_at:
                loss = loss * loss_scale_at[step]
            if step == nan_at:
                loss = loss * float("nan")
            loss.backward()
            if probe is not None:
                probe.log(loss=loss)
            opt.step()
    except StopTraining as stop:
        stopped = (step, stop)
    if probe is not None:
        probe.close()
    return model, probe, stopped


def test_a_healthy_run_says_nothing() -> None:
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradprobeWarning)
        _, probe, stopped = train(
            120, probe_options={"on_finding": seen.append, "flush_every": 7}, lr=0.05
        )
    assert seen == [] and stopped is None
    assert probe._live.found == []


def test_a_gradient_spike_at_a_known_step_is_said_with_that_step() -> None:
    seen = []
    with pytest.warns(GradprobeWarning, match="step 30: the global gradient norm jumped"):
        train(45, probe_options={"on_finding": seen.append, "every": 1}, loss_scale_at={30: 100.0})
    spikes = [f for f in seen if f.kind == "grad_norm_spike"]
    assert [f.evidence["step"] for f in spikes] == [30]
    # ×100 on the loss is ×100 on every gradient; the median of the steps before moves
    # little in 20 steps at this rate: the ratio is near 100 (at least the 10× threshold).
    assert spikes[0].evidence["grad_norm"] / spikes[0].evidence["median"] > 50


def test_updates_as_large_as_the_weights_are_said_as_exploding() -> None:
    seen = []
    with pytest.warns(GradprobeWarning, match="update at least as large as the weight"):
        train(3, probe_options={"on_finding": seen.append, "every": 1}, lr=1e3)
    found = [f for f in seen if f.kind == "exploding"]
    assert found and found[0].evidence["step"] == 0
    # The independent fact: SGD's step is lr·g, so ‖Δw‖/‖w‖ = lr·‖g‖/‖w‖ at step 0.
    model = _model()
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    ratios = [1e3 * p.grad.norm() / p.norm() for n, p in model.named_parameters() if "weight" in n]
    assert found[0].evidence["update_ratio"] == pytest.approx(float(max(ratios)), rel=1e-4)


@pytest.mark.parametrize("flush_every", [1, 4, 50])
def test_a_nan_is_said_at_its_step_at_the_latest_at_the_flush_of_that_step(flush_every) -> None:
    seen, when = [], []
    probe_ref = {}

    def record(finding):
        seen.append(finding)
        when.append(probe_ref["probe"].step_index)  # how far training was when it was said

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    probe = Probe(model, opt, every=1, flush_every=flush_every, on_finding=record)
    probe_ref["probe"] = probe
    with pytest.warns(GradprobeWarning, match="step 9: NaN/Inf"):
        for step in range(30):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if step == 9:
                loss = loss * float("nan")
            loss.backward()
            opt.step()
        probe.close()
    assert seen[0].kind == "nonfinite" and seen[0].evidence["step"] == 9
    # Said while closing the step that fills the buffer (flush_every steps: 0-based, the
    # step before a multiple of flush_every), or at close() (step_index 30) for a run that
    # never fills it.
    last_of_flush = ((9 // flush_every) + 1) * flush_every - 1
    assert when[0] == (last_of_flush if last_of_flush < 30 else 30)


def test_stop_on_raises_at_the_step_boundary_only_when_asked() -> None:
    _, _, stopped = train(20, probe_options={"every": 1, "flush_every": 1}, nan_at=6)
    assert stopped is None  # said, not raised
    _, _, stopped = train(
        20, probe_options={"every": 1, "flush_every": 1, "stop_on": ("nonfinite",)}, nan_at=6
    )
    assert stopped is not None
    step, stop = stopped
    assert step == 6 and stop.finding.kind == "nonfinite" and stop.finding.evidence["step"] == 6
    assert isinstance(stop, gradprobe.StopTraining)


def test_bad_live_options_are_one_clear_error() -> None:
    with pytest.raises(GradprobeError, match="stop_on"):
        Probe(_model(), stop_on=("nan",))
    with pytest.raises(GradprobeError, match="on_finding must be callable"):
        Probe(_model(), on_finding=3)


def test_a_failing_on_finding_is_a_warning_not_an_error() -> None:
    def broken(finding):
        raise RuntimeError("user callback broke")

    with pytest.warns(GradprobeWarning, match="on_finding raised RuntimeError"):
        train(12, probe_options={"every": 1, "flush_every": 1, "on_finding": broken}, nan_at=3)


def test_training_is_bit_identical_with_the_live_check() -> None:
    plain, _, _ = train(25, loss_scale_at={10: 100.0})
    seen = []
    probed, _, _ = train(
        25,
        probe_options={"every": 1, "flush_every": 1, "on_finding": seen.append},
        loss_scale_at={10: 100.0},
    )
    assert seen  # the check ran and said something
    for a, b in zip(plain.parameters(), probed.parameters()):
        assert torch.equal(a, b)


def test_wall_time_anchors_are_real_increasing_clock_reads() -> None:
    import time

    before = time.time()
    _, probe, _ = train(23, probe_options={"every": 1, "flush_every": 5})
    after = time.time()
    anchors = probe.meta["wall_time"]
    steps = [a[0] for a in anchors]
    times = [a[1] for a in anchors]
    # The first step's close, then each flush's last step (4, 9, 14, 19) and the final one.
    assert steps == [0, 4, 9, 14, 19, 22]
    assert before <= times[0] and times[-1] <= after
    assert all(b > a for a, b in itertools.pairwise(times))


def test_a_step_the_grad_scaler_skips_is_not_said() -> None:
    # Inf gradients at step 3 are the GradScaler doing its job: it skips the step and
    # halves its scale. Nothing to say about that step (the skipped_steps finding, after
    # training, says whether it happened too often).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    seen, scales = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradprobeWarning)
        probe = Probe(model, opt, scaler=scaler, every=1, flush_every=1, on_finding=seen.append)
        for step in range(8):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if step == 3:
                loss = loss * 1e36  # scaled by 2**16: inf in float32
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        probe.close()
    assert scales[3] == scales[2] / 2  # the scaler did skip step 3
    assert probe.run().model_series("skipped").loc[3] == 1
    assert seen == []


def test_wall_time_anchors_stay_few_on_a_long_run(monkeypatch) -> None:
    import gradprobe.probe as probe_module

    monkeypatch.setattr(probe_module, "_MAX_TIME_ANCHORS", 8)
    _, probe, _ = train(60, probe_options={"every": 1, "flush_every": 2})
    anchors = probe.meta["wall_time"]
    steps = [a[0] for a in anchors]
    assert len(anchors) <= 9 and steps[0] == 0 and steps[-1] == 59
    assert steps == sorted(steps) and all(b > a for a, b in itertools.pairwise(steps))

"""Live findings: a NaN or a gradient-norm spike is said at the step it happens (the step's
global norm and loss read on the host without a sync), the per-layer rules at the flush
that brings their step to the host, against what the training loop was made to do at a
known step; a healthy run says nothing; training is the same with the live check as
without a Probe; diagnose, the live check and the "auto" burst apply one spike rule."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from _diagnose_cases import synthetic_run
from gradprobe import GradprobeError, Probe, StopTraining
from gradprobe.diagnose.instability import detect_grad_norm_spike
from gradprobe.diagnose.thresholds import GRAD_SPIKE_FACTOR
from gradprobe.hooks import GradprobeWarning
from gradprobe.live import LiveCheck
from gradprobe.spikes import SpikeWatch
from gradprobe.stats import MODEL_NAME


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
def test_a_nan_is_said_at_its_step_whatever_the_flush(flush_every) -> None:
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
    # Said at step 9 itself (on the CPU the step's global norm is a host value), not at
    # the flush; and said once: the flush's check leaves that step's rule to the step.
    assert when[0] == 9
    assert [f.kind for f in seen].count("nonfinite") == 1


def _loop(steps, probe_options, *, nan_at=None, scale_at=None, log=True):
    """Training with the default cadence and flush; returns the findings with the loop's
    step and phase at the moment each was said, and where StopTraining came from."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    at = {"step": None, "phase": None}
    said = []
    probe = Probe(
        model, opt, on_finding=lambda f: said.append((f, at["step"], at["phase"])), **probe_options
    )
    stopped = None
    try:
        for step in range(steps):
            at.update(step=step, phase="forward")
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if step == nan_at:
                loss = loss * float("nan")
            if step == scale_at:
                loss = loss * 100.0
            loss.backward()
            if log:
                probe.log(loss=loss)
            at["phase"] = "optimizer.step"
            opt.step()
    except StopTraining as stop:
        stopped = (at["step"], at["phase"], stop)
    probe.close()
    return said, stopped, probe


@pytest.mark.parametrize("every", ["auto", 1, 3])
def test_a_nan_at_step_s_is_said_at_step_s_with_the_default_flush(every) -> None:
    # s = 21: under "auto" a step it does not record in full (its sentinel reads the norm);
    # a step every=3 records (a step it does not record has no rows to say).
    s = 21
    with pytest.warns(GradprobeWarning, match=f"step {s}: NaN/Inf"):
        said, stopped, _ = _loop(60, {"every": every}, nan_at=s)
    assert stopped is None
    nonfinite = [(f, step, phase) for f, step, phase in said if f.kind == "nonfinite"]
    assert len(nonfinite) == 1  # once: not again at the flush (step 49) or at close()
    finding, step, phase = nonfinite[0]
    # Said at the optimizer step of step s, before step s+1 starts (flush_every is 50).
    assert finding.evidence["step"] == s and (step, phase) == (s, "optimizer.step")


def test_stop_on_raises_from_the_optimizer_step_of_the_nan_step() -> None:
    _, stopped, _ = _loop(40, {"stop_on": ("nonfinite",)}, nan_at=7)
    assert stopped is not None
    step, phase, stop = stopped
    assert (step, phase) == (7, "optimizer.step")
    assert stop.finding.kind == "nonfinite" and stop.finding.evidence["step"] == 7


@pytest.mark.parametrize("every", ["auto", 1])
def test_a_loss_times_100_is_a_spike_at_its_step_said_once(every) -> None:
    said, stopped, _ = _loop(70, {"every": every}, scale_at=30)
    spikes = [(f, step) for f, step, _ in said if f.kind == "grad_norm_spike"]
    assert [(f.evidence["step"], step) for f, step in spikes] == [(30, 30)]
    # The independent fact: ×100 on the loss is ×100 on every gradient, so the step's
    # norm is ~100× its neighbours' (the median moves little in 20 steps at this rate).
    assert spikes[0][0].evidence["grad_norm"] / spikes[0][0].evidence["median"] > 50
    assert stopped is None
    # Besides it, only a per-layer rule may speak (at the flush): under every=1 the ×100
    # gradient makes an SGD update as large as the last layer's weight at that step.
    others = [f for f, _, _ in said if f.kind != "grad_norm_spike"]
    assert all(f.kind == "exploding" and "update_ratio" in f.evidence for f in others)
    assert all(f.evidence["step"] == 30 for f in others)


def test_a_healthy_run_with_the_defaults_says_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradprobeWarning)
        said, stopped, _ = _loop(120, {})
    assert said == [] and stopped is None


def test_diagnose_the_live_check_and_the_burst_apply_one_spike_rule() -> None:
    # A series with zeros (gradients gated off), NaNs and Infs (in the window, but not
    # in its median), a spike against a median of few finite values, spikes ≥ 20 steps
    # apart (the live check says one per window).
    rng = np.random.default_rng(0)
    norms = list(rng.uniform(1.0, 2.0, 80))
    norms[0:3] = [0.0, 0.0, 0.0]
    norms[5], norms[12], norms[13] = math.nan, math.inf, math.nan
    norms[10] = 40.0  # 7 finite values before it, 3 of them 0: median ~1, a spike
    norms[40] = 30.0
    norms[41:47] = [math.nan] * 6
    norms[47] = 25.0  # too soon after 40 for the live check to say again: no test of it
    norms[70] = 1e3
    # The rule of docs/findings.md, by hand: ≥ 10× the median of the finite values among
    # the 20 steps before, at least 5 of them, median > 0.
    by_hand = []
    for i, v in enumerate(norms):
        before = [b for b in norms[max(0, i - 20) : i] if math.isfinite(b)]
        if (
            math.isfinite(v)
            and len(before) >= 5
            and np.median(before) > 0
            and v >= GRAD_SPIKE_FACTOR * np.median(before)
        ):
            by_hand.append(i)
    assert by_hand == [10, 40, 47, 70]
    # diagnose, after training (a NaN global norm is read as an infinite one there).
    found = detect_grad_norm_spike(
        synthetic_run(
            [(s, MODEL_NAME, "global_grad_norm_preclip", v) for s, v in enumerate(norms)],
            [{"name": "fc0"}],
        )
    )
    assert found is not None and found.evidence["steps"] == by_hand
    # the "auto" burst (step.py pushes each step's norm into a SpikeWatch)
    watch = SpikeWatch()
    assert [i for i, v in enumerate(norms) if watch.push(v) is not None] == by_hand
    # the live check, at each step (one finding per SPIKE_WINDOW steps: 47 is within 40's)
    live = LiveCheck(warn=False)
    for i, v in enumerate(norms):
        live.at_step(i, v)
    spikes = [f.evidence["step"] for f in live.found if f.kind == "grad_norm_spike"]
    assert spikes == [10, 40, 70]


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
    import gradprobe.recording.meta as meta_module

    monkeypatch.setattr(meta_module, "_MAX_TIME_ANCHORS", 8)
    _, probe, _ = train(60, probe_options={"every": 1, "flush_every": 2})
    anchors = probe.meta["wall_time"]
    steps = [a[0] for a in anchors]
    assert len(anchors) <= 9 and steps[0] == 0 and steps[-1] == 59
    assert steps == sorted(steps) and all(b > a for a, b in itertools.pairwise(steps))


def test_a_step_the_flush_said_first_is_not_said_again_at_the_step() -> None:
    # On a GPU a step's copy may land after the flush that carried its rows: the flush
    # says it, and the late read at the step says nothing more (and the reverse on CPU).
    import pandas as pd

    rows = [(s, MODEL_NAME, "global_grad_norm_preclip", 1.0 + 0.01 * s) for s in range(8)]
    rows.append((8, MODEL_NAME, "global_grad_norm_preclip", math.nan))
    frame = pd.DataFrame(rows, columns=["step", "name", "stat", "value"])
    live = LiveCheck(warn=False)
    for s in range(6):  # steps 0-5 read at the step, 6-8 not yet (copies in flight)
        live.at_step(s, 1.0 + 0.01 * s)
    said = live(frame)
    assert [(f.kind, f.evidence["step"]) for f in said] == [("nonfinite", 8)]
    for s in (6, 7, 8):  # the late reads
        assert live.at_step(s, 1.0 + 0.01 * s if s < 8 else math.nan) == []
    assert [f.kind for f in live.found] == ["nonfinite"]
    # the spike window holds steps 0-8 once each, in order (step 8's NaN last)
    window = list(live._spikes.window)
    assert len(window) == 9 and math.isnan(window[-1])
    assert window[:8] == [1.0 + 0.01 * s for s in range(8)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_a_nan_is_said_within_a_few_steps_once_without_a_flush() -> None:
    # The step's norm and loss reach the host by a pinned copy read once its event has
    # completed: said a step or so after the NaN, well before the flush (step 49), once.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 3)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 8, device="cuda")
    y = x[:, :3].argmax(1)
    at, said = {"step": None}, []
    probe = Probe(model, opt, on_finding=lambda f: said.append((f, at["step"])))
    for step in range(40):
        at["step"] = step
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if step == 10:
            loss = loss * float("nan")
        loss.backward()
        probe.log(loss=loss)
        opt.step()
    torch.cuda.synchronize()
    probe.close()
    nonfinite = [(f, s) for f, s in said if f.kind == "nonfinite"]
    assert len(nonfinite) == 1
    finding, when = nonfinite[0]
    assert finding.evidence["step"] == 10 and 10 <= when < 40


@pytest.mark.parametrize("seed", range(4))
def test_the_spike_rule_over_a_series_and_over_a_stream_agree(seed) -> None:
    # running_median (diagnose) and SpikeWatch (live, burst) against numpy by hand, on
    # heavy-tailed series with zeros, NaNs and Infs: the same medians, the same spikes.
    from gradprobe.spikes import running_median

    rng = np.random.default_rng(seed)
    v = rng.lognormal(0.0, 1.5, 200)
    v[rng.random(200) < 0.1] = 0.0
    v[rng.random(200) < 0.05] = math.nan
    v[rng.random(200) < 0.03] = math.inf
    by_hand = []
    for i in range(len(v)):
        before = v[max(0, i - 20) : i]
        before = before[np.isfinite(before)]
        by_hand.append(np.median(before) if len(before) >= 5 else math.nan)
    # nanmedian over windows vs median of a list: the mean of the same two middle values
    # (one addition, one halving), so equal up to a rounding or two.
    np.testing.assert_allclose(running_median(v), np.array(by_hand), rtol=1e-14)
    watch = SpikeWatch()
    streamed = [watch.push(x) for x in v]
    expected = [
        m if math.isfinite(x) and m > 0 and x >= GRAD_SPIKE_FACTOR * m else None
        for x, m in zip(v, by_hand)
    ]
    assert streamed == expected and any(e is not None for e in expected)

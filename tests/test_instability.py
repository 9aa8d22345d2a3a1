"""Findings for unstable training (issue 14 §2): divergence, loss and gradient-norm spikes,
oscillation, plateau. Built-to-fail real runs, synthetic series for each rule's edges, and
healthy runs with noisy minibatch losses that must report none of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from _diagnose_cases import _digits, case, synthetic_run, validate
from gradprobe import Probe, diagnose
from gradprobe.diagnose import (
    FINDINGS_JSON_SCHEMA,
    GRAD_SPIKE_FACTOR,
    KIND_ORDER,
    LOSS_NOT_LOGGED,
)
from gradprobe.diagnose.instability import detect_grad_norm_spike
from gradprobe.lab.models import mlp
from gradprobe.stats import MODEL_NAME

INSTABILITY = ("divergence", "grad_norm_spike", "loss_spike", "oscillation", "plateau")


def _train_logged(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn,
    *,
    steps: int,
    batch: int | None = 64,
    threads: int = 1,
    **probe_kw,
):
    """Train under a Probe, logging the loss after each step; the run and the losses."""
    torch.set_num_threads(threads)
    losses = []
    try:
        with Probe(model, opt, **probe_kw) as probe:
            for s in range(steps):
                idx = torch.arange(s * batch, (s + 1) * batch) % len(x) if batch else slice(None)
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                probe.log(loss=loss)
                losses.append(loss.item())
            run = probe.run()
    finally:
        torch.set_num_threads(1)
    return run, losses


def _deep_relu(lr: float, seed: int, threads: int, steps: int = 50):
    d = _digits()
    torch.manual_seed(seed)
    model = mlp(64, 10, depth=20, width=64, activation="relu", init="he")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return _train_logged(
        model,
        opt,
        d.x_train,
        d.y_train,
        nn.functional.cross_entropy,
        steps=steps,
        threads=threads,
        stats="cheap",
        modules=[],
    )


def _series_run(loss=None, grad_norm=None):
    rows = []
    for s, v in enumerate(loss if loss is not None else []):
        rows.append((s, MODEL_NAME, "loss", float(v)))
    for s, v in enumerate(grad_norm if grad_norm is not None else []):
        rows.append((s, MODEL_NAME, "global_grad_norm_preclip", float(v)))
    return synthetic_run(rows, [{"name": "fc0"}])


# ---------------------------------------------------------------- the deep ReLU run
def _spikes_by_hand(norm) -> list[int]:
    """The steps whose norm is at least GRAD_SPIKE_FACTOR x the median of the (up to) 20
    finite norms before it, with at least 5 of them: the rule of docs/findings.md, in numpy."""
    values, steps = norm.to_numpy(dtype=float), list(norm.index)
    found = []
    for i, step in enumerate(steps):
        before = values[max(0, i - 20) : i]
        before = before[np.isfinite(before)]
        if len(before) >= 5 and values[i] >= GRAD_SPIKE_FACTOR * np.median(before):
            found.append(step)
    return found


@pytest.mark.slow
@pytest.mark.numerics  # rerun under other CPU kernels by scripts/test.sh
def test_deep_relu_at_too_high_a_rate_reports_gradient_spikes() -> None:
    # A 20-layer ReLU net at lr 0.3 is chaotic: whether a given seed spikes, and where,
    # depends on the rounding of every kernel (another CPU, another thread count). So each
    # run's finding is checked against the rule applied by hand to its own recorded norms,
    # and the claim "this setting spikes" is made of the four runs together.
    spiking = 0
    for seed in (0, 1):
        for threads in (1, 2):
            run, _ = _deep_relu(lr=0.3, seed=seed, threads=threads)
            found = diagnose(run)
            spike = found.of("grad_norm_spike")
            norm = run.model_series("global_grad_norm_preclip")
            expected = _spikes_by_hand(norm)
            assert (spike is not None) == bool(expected), (seed, threads, expected, found.kinds)
            # It never learned: the loss is still where it started.
            assert "plateau" in found.kinds or "divergence" in found.kinds
            if spike is None:
                continue
            spiking += 1
            assert set(spike.evidence["steps"]) <= set(expected)
            for step, ratio in zip(spike.evidence["steps"], spike.evidence["ratio"]):
                before = norm[norm.index < step].iloc[-20:]
                assert ratio == pytest.approx(norm[step] / np.median(before))
                assert ratio >= GRAD_SPIKE_FACTOR
            worst = spike.evidence["worst_step"]
            assert f"at step {worst}" in spike.summary and str(worst) in spike.summary
            # Ranked remedies: for a plain MLP, clipping and a smaller or decaying step first.
            assert [r.key for r in spike.remedies[:2]] == ["grad_clipping", "lr_schedule"]
    assert spiking >= 1  # (4 of 4 on AVX-512 kernels, 2 of 4 on scalar ones)


def test_deep_relu_at_a_stable_rate_reports_no_instability() -> None:
    run, _ = _deep_relu(lr=0.02, seed=0, threads=1, steps=60)
    found = diagnose(run)
    assert not set(found.kinds) & set(INSTABILITY), [f.summary for f in found]


# ---------------------------------------------------------------- divergence
def test_loss_going_to_nan_is_divergence() -> None:
    torch.manual_seed(0)
    d = _digits()
    model = mlp(64, 10, depth=4, width=32, activation="relu", init="he")
    opt = torch.optim.SGD(model.parameters(), lr=1e3)  # NaN within a few steps
    run, losses = _train_logged(
        model, opt, d.x_train, d.y_train, nn.functional.cross_entropy, steps=25
    )
    first = next(s for s, v in enumerate(losses) if not np.isfinite(v))
    finding = diagnose(run).of("divergence")
    assert finding is not None and finding.severity == "critical"
    assert finding.evidence["first_step"] == first
    assert finding.evidence["nonfinite_steps"] == sum(not np.isfinite(v) for v in losses)


def test_a_regression_that_diverges_slowly_is_divergence() -> None:
    # Linear regression with SGD at 2.2/λ_max: the loss grows geometrically, stays finite.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    model = nn.Linear(8, 1)
    lam = torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max().item()
    opt = torch.optim.SGD(model.parameters(), lr=2.2 / lam)
    run, losses = _train_logged(model, opt, x, y, nn.functional.mse_loss, steps=40, batch=None)
    assert np.isfinite(losses).all() and losses[-1] > 10 * losses[0]
    finding = diagnose(run).of("divergence")
    assert finding is not None and finding.evidence["mode"] == "rising"
    assert finding.evidence["end"] > finding.evidence["start"]


def test_rise_after_learning_is_divergence_and_noise_is_not() -> None:
    rng = np.random.default_rng(0)
    fall = np.linspace(2.3, 0.5, 40)
    rise = np.linspace(0.5, 2.0, 30)
    found = diagnose(_series_run(np.concatenate([fall, rise]) * rng.uniform(0.9, 1.1, 70)))
    assert found.of("divergence") is not None
    noisy_end = np.concatenate([fall, np.full(30, 0.5)]) * rng.uniform(0.8, 1.2, 70)
    assert diagnose(_series_run(noisy_end)).of("divergence") is None


# ---------------------------------------------------------------- spikes
def test_gradient_norm_spikes_name_their_steps_and_sizes() -> None:
    rng = np.random.default_rng(1)
    norm = 2.3 * rng.uniform(0.7, 1.3, 60)
    norm[37], norm[52] = 41.7, 30.0
    found = diagnose(_series_run(grad_norm=norm))
    spike = found.of("grad_norm_spike")
    assert spike is not None and spike.evidence["steps"] == [37, 52]
    assert "41.7" in spike.summary.replace("42", "41.7") or "42" in spike.summary
    assert "steps 37, 52" in spike.summary
    # Works without the loss, and says which findings could not be judged.
    for kind in ("divergence", "loss_spike", "oscillation", "plateau"):
        assert found.skipped[kind] == LOSS_NOT_LOGGED


def test_noisy_gradient_norms_are_not_spikes() -> None:
    rng = np.random.default_rng(2)
    norm = np.exp(rng.normal(0, 0.5, 200))  # log-normal noise: up to ~4× the median
    assert diagnose(_series_run(grad_norm=norm)).of("grad_norm_spike") is None


def test_loss_spikes_and_skewed_minibatch_noise() -> None:
    rng = np.random.default_rng(3)
    loss = np.linspace(2.3, 0.3, 60) * rng.uniform(0.85, 1.15, 60)
    loss[30] = 9.0
    spike = diagnose(_series_run(loss)).of("loss_spike")
    assert spike is not None and spike.evidence["steps"] == [30]
    # A well-trained model's minibatch losses near 0, with hard batches at 2–3× the median.
    low = 0.02 * rng.lognormal(0, 0.4, 100)
    assert diagnose(_series_run(low)).of("loss_spike") is None


# ---------------------------------------------------------------- oscillation
def test_period_two_oscillation_is_found_and_noise_is_not() -> None:
    rng = np.random.default_rng(4)
    steps = np.arange(60)
    zigzag = 1.0 + 0.4 * (-1.0) ** steps + 0.05 * rng.normal(size=60)
    finding = diagnose(_series_run(zigzag)).of("oscillation")
    assert finding is not None and finding.evidence["period"] == 2
    slow = 1.0 + 0.4 * np.sin(2 * np.pi * steps / 6)  # period 6
    assert diagnose(_series_run(slow)).of("oscillation").evidence["period"] == 6
    noise = np.linspace(2.3, 0.5, 60) * rng.uniform(0.7, 1.3, 60)
    assert diagnose(_series_run(noise)).of("oscillation") is None


def test_too_high_a_rate_on_a_convex_problem_oscillates() -> None:
    # Least squares (convex) with heavy-ball momentum at lr = 2/λ_max: the weights overshoot
    # the valley back and forth, and the loss goes up and down every step.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    lam = torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max().item()

    def fit(lr: float, momentum: float):
        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        return _train_logged(model, opt, x, y, nn.functional.mse_loss, steps=60, batch=None)

    run, losses = fit(2.0 / lam, 0.9)
    finding = diagnose(run).of("oscillation")
    assert finding is not None and finding.evidence["period"] == 2
    diffs = np.sign(np.diff(losses))
    assert (diffs[1:] != diffs[:-1]).mean() > 0.5  # the loss changes direction most steps
    healthy, losses = fit(0.5 / lam, 0.0)
    assert (np.diff(losses) <= 1e-9).all()  # plain gradient descent below 1/λ: monotone
    assert diagnose(healthy).of("oscillation") is None


# ---------------------------------------------------------------- plateau
def test_a_constant_loss_is_a_plateau() -> None:
    # A model whose output does not depend on its input: a frozen first layer of zeros.
    d = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    nn.init.zeros_(model[0].weight)
    nn.init.constant_(model[0].bias, -1.0)  # every ReLU dead: the output is the last bias
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    run, _ = _train_logged(model, opt, d.x_train, d.y_train, nn.functional.cross_entropy, steps=40)
    finding = diagnose(run).of("plateau")
    assert finding is not None and finding.evidence["after"] >= 0.5 * finding.evidence["start"]
    assert diagnose(_series_run(np.full(30, 1.7))).of("plateau") is not None


def test_a_converged_or_still_learning_run_is_not_a_plateau() -> None:
    rng = np.random.default_rng(5)
    converged = np.concatenate([np.linspace(2.3, 0.05, 30), np.full(30, 0.05)])
    assert diagnose(_series_run(converged * rng.uniform(0.8, 1.2, 60))).of("plateau") is None
    learning = np.linspace(2.3, 1.0, 60) * rng.uniform(0.9, 1.1, 60)
    assert diagnose(_series_run(learning)).of("plateau") is None


# ---------------------------------------------------------------- healthy runs, JSON
@pytest.mark.parametrize("name", ["relu30_he", "residual30", "cnn_healthy"])
def test_healthy_cases_report_no_instability(name: str) -> None:
    assert not set(diagnose(case(name)).kinds) & set(INSTABILITY)


@pytest.mark.parametrize("batch,seed", [(16, 0), (32, 1), (64, 2)])
def test_healthy_noisy_minibatch_training_reports_none(batch: int, seed: int) -> None:
    d = _digits()
    torch.manual_seed(seed)
    model = mlp(64, 10, depth=3, width=32, activation="relu", init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run, losses = _train_logged(
        model, opt, d.x_train, d.y_train, nn.functional.cross_entropy, steps=120, batch=batch
    )
    assert np.std(np.diff(losses)) > 0.05  # the minibatch losses are noisy
    found = diagnose(run)
    assert not set(found.kinds) & set(INSTABILITY), [f.summary for f in found]


def test_new_kinds_are_in_the_json_schema() -> None:
    assert set(INSTABILITY) <= set(KIND_ORDER)
    rng = np.random.default_rng(6)
    norm = 2.0 * rng.uniform(0.8, 1.2, 40)
    norm[30] = 80.0
    loss = np.concatenate([np.linspace(2.3, 1.0, 30), [np.nan] * 10])
    found = diagnose(_series_run(loss, norm))
    assert {"divergence", "grad_norm_spike"} <= set(found.kinds)
    doc = json.loads(found.to_json())
    assert validate(doc, FINDINGS_JSON_SCHEMA) == []


def test_gradients_gated_off_during_a_warm_up_are_not_a_spike() -> None:
    # A running median of 0 makes no ratio: the first non-zero norms are no "×inf" spike.
    norm = np.r_[np.zeros(15), np.full(20, 1e-3)]
    assert diagnose(_series_run(grad_norm=norm)).of("grad_norm_spike") is None


def test_a_parameter_switched_on_after_a_warm_up_is_not_unused() -> None:
    # Missing on steps 0–11 (over half of 20), a gradient every step since: nothing unused,
    # and diagnose runs to the end (it once raised on an empty set of later steps).
    rows = [(s, "aux.weight", "grad_missing", 1.0) for s in range(12)]
    rows += [(s, "aux.weight", "grad_norm", 0.5) for s in range(12, 20)]
    rows += [(s, "fc0.weight", "grad_norm", 1.0) for s in range(20)]
    found = diagnose(synthetic_run(rows, [{"name": "fc0"}]))
    assert found.of("unused_parameters") is None
    assert not any("could not be judged" in v for v in found.skipped.values())


def test_a_detector_that_fails_is_a_skipped_check_not_a_crash(monkeypatch) -> None:
    import dataclasses
    import importlib

    # the module (gradprobe.diagnose is also the function the package exports)
    diagnose_module = importlib.import_module("gradprobe.diagnose")

    def broken(run):
        raise ValueError("boom")

    detectors = {
        k: (dataclasses.replace(d, fn=broken) if k == "plateau" else d)
        for k, d in diagnose_module.DETECTORS.items()
    }
    monkeypatch.setattr(diagnose_module, "DETECTORS", detectors)
    found = diagnose(_series_run(loss=np.linspace(2.0, 1.0, 40)))
    assert found.skipped["plateau"] == "could not be judged: ValueError: boom"


def test_the_parameter_that_jumped_first_is_named_by_the_spike_rule() -> None:
    # Two parameters; "a.weight" jumps ×40 at step 30 (with a NaN and zeros in its
    # window), "b.weight" stays: the global spike at 30 names "a.weight" at step 30 with
    # the ratio of the rule by hand (its value over the median of the finite values
    # among the 20 steps before).
    rng = np.random.default_rng(3)
    a = list(rng.uniform(1.0, 1.5, 40))
    b = list(rng.uniform(1.0, 1.5, 40))
    a[15], a[16], a[20] = 0.0, 0.0, float("nan")
    a[30] = 40.0
    rows = []
    for s in range(40):
        rows += [(s, "a.weight", "grad_norm", a[s]), (s, "b.weight", "grad_norm", b[s])]
        total = a[s] ** 2 + b[s] ** 2 if np.isfinite(a[s]) else float("inf")
        rows.append((s, MODEL_NAME, "global_grad_norm_preclip", float(np.sqrt(total))))
    params = [{"name": "a.weight", "module": "fc0"}, {"name": "b.weight", "module": "fc0"}]
    found = detect_grad_norm_spike(synthetic_run(rows, [{"name": "fc0"}], params))
    assert found is not None and found.evidence["steps"] == [30]
    before = [v for v in a[10:30] if np.isfinite(v)]
    assert list(found.evidence["first_jumped"]) == ["a.weight"]
    jumped = found.evidence["first_jumped"]["a.weight"]
    assert jumped["step"] == 30
    # the same division of the same median (a mean of two middle values: 1-2 roundings)
    assert jumped["ratio"] == pytest.approx(40.0 / np.median(before), rel=1e-12)

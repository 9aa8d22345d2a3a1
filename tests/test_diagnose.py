"""diagnose: built-to-fail runs are diagnosed, built-to-pass runs are not; detector edge cases."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _diagnose_cases import (
    case,
    linear_modules,
    profile_rows,
    synthetic_run,
    validate,
)
from gradprobe import GradprobeError, Run, diagnose
from gradprobe.diagnose import (
    DETECTORS,
    FINDINGS_JSON_SCHEMA,
    SATURATION_FRAC,
    STALL_FACTOR,
    VANISHING_RATIO,
    Findings,
    depth_profile,
)
from gradprobe.lab.data import digits
from gradprobe.lab.models import mlp

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- built to fail
def _median_ratio(run, first: str, last: str) -> float:
    """Ratio of the per-layer medians over steps, taken on log10 values (as documented)."""
    logs = np.log10(run.table("error_norm")[[first, last]].to_numpy())
    med = np.median(logs, axis=0)
    return float(10 ** (med[0] - med[1]))


def test_sigmoid30_vanishing_matches_the_recorded_error_signal() -> None:
    run = case("sigmoid30")
    found = diagnose(run)
    v = found.of("vanishing")
    assert v is not None and v.severity == "critical"
    # Independent: the first and last layers' error signal straight from the frame.
    ratio = _median_ratio(run, "fc1", "out")
    assert v.evidence["first_last_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert v.evidence["first"] == "fc1" and v.evidence["last"] == "out"
    assert v.names[0] == "fc1"
    # The fitted factor reproduces the ratio over 30 layers to within the fit's scatter.
    assert v.evidence["factor_per_layer"] ** 30 == pytest.approx(ratio, rel=5.0)
    assert v.evidence["factor_per_layer"] < 0.5
    # Numbers in the sentence are the evidence's numbers.
    assert f"×{v.evidence['factor_per_layer']:.2g}" in v.summary
    assert f"{ratio:.2g}" in v.summary
    assert [r.key for r in v.remedies[:3]] == ["relu", "batchnorm", "residual"]


def test_sigmoid30_vanishing_agrees_with_autograd_at_init() -> None:
    """Same model, no Probe: dL/dz of the first and last layer via retain_grad."""
    torch.manual_seed(0)
    model = mlp(64, 10, depth=30, width=32, activation="sigmoid")
    d = digits(seed=0)
    zs = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            zs[name] = out

        return hook

    model.fc1.register_forward_hook(keep("fc1"))
    model.out.register_forward_hook(keep("out"))
    loss = torch.nn.functional.cross_entropy(model(d.x_train[:32]), d.y_train[:32])
    loss.backward()
    direct = float(zs["fc1"].grad.double().norm() / zs["out"].grad.double().norm())
    assert direct < VANISHING_RATIO
    recorded = case("sigmoid30").table("error_norm").iloc[0]
    assert float(recorded["fc1"] / recorded["out"]) == pytest.approx(direct, rel=1e-3)


def test_sigmoid30_layers_stall() -> None:
    run = case("sigmoid30")
    s = diagnose(run).of("stalled")
    assert s is not None and "fc1.weight" in s.names
    upd = run.table("update_ratio")
    ref = upd[[f"fc{i}.weight" for i in range(1, 31)] + ["out.weight"]].iloc[3:].median()
    assert float(ref["fc1.weight"]) < STALL_FACTOR * float(ref.quantile(0.9))


def test_tanh_large_weights_explode_over_depth() -> None:
    run = case("tanh30_var4")
    found = diagnose(run)
    e = found.of("exploding")
    assert e is not None and "depth" in e.evidence["modes"]
    assert e.evidence["first_last_ratio"] == pytest.approx(_median_ratio(run, "fc1", "out"))
    assert e.evidence["factor_per_layer"] > 1
    assert e.names[0] == "fc1"
    assert found.of("vanishing") is None


def test_rnn_with_large_recurrent_weight_explodes() -> None:
    run = case("rnn_large")
    e = diagnose(run).of("exploding")
    assert e is not None
    upd = run.table("update_ratio")
    assert e.evidence["update_ratio_max"] == pytest.approx(
        float(upd[["rnn.weight_ih_l0", "rnn.weight_hh_l0"]].max().max())
    )
    assert e.evidence["update_ratio_max"] >= 1
    # SGD: clipping bounds the step; with updates as large as the weights (issue 22 §1) a
    # smaller rate is offered next to an LSTM/GRU.
    keys = [r.key for r in e.remedies]
    assert keys[0] == "grad_clipping"
    assert {"lstm_gru", "lr_schedule"} <= set(keys[:3])


def test_relu_bias_minus_10_has_dead_units_not_vanishing() -> None:
    run = case("relu_bias_dead")
    found = diagnose(run)
    d = found.of("dead_units")
    assert d is not None and d.severity == "critical"
    assert set(d.names) == {"act1", "act2", "act3", "act4"}
    window = run.table("dead_window_frac").iloc[-1]
    assert d.evidence["dead_frac"] == {n: pytest.approx(float(window[n])) for n in d.names}
    # Behind a dead layer every input is 0 and every bias −10: those layers are all dead.
    assert [d.evidence["dead_frac"][n] for n in ("act2", "act3", "act4")] == [1.0, 1.0, 1.0]
    assert found.of("vanishing") is None  # the signal is blocked, not shrinking by a factor
    # Issue 22 §3: the run's own evidence first. Behind a dead layer a Linear's input is 0,
    # so its output is its bias, −10 as built: the finding says so and fixes that layer.
    first = d.remedies[0]
    assert first.key == "fix_preactivation"
    layer, numbers = next(iter(d.evidence["negative_preactivation"].items()))
    assert layer in {"fc2", "fc3", "fc4"} and f"`{layer}`" in first.name
    assert numbers["mean"] == pytest.approx(-10.0, abs=1e-4)  # float32 mean of 32·32 −10s
    assert "every pre-activation of" in d.summary.lower()
    compile(first.code, "<remedy>", "exec")
    assert "leaky_relu" in [r.key for r in d.remedies[1:]]


def test_cnn_dead_channel_names_its_layer() -> None:
    run = case("cnn_dead_channel")
    found = diagnose(run)
    d = found.of("dead_channels")
    assert d is not None
    assert d.names == ("act2",)
    assert d.evidence["fed_by"]["act2"] == "conv2"
    assert d.evidence["dead_frac"]["act2"] == pytest.approx(1 / 8)  # channel 3 of 8
    assert found.of("dead_units") is None


def test_injected_nan_is_found_at_its_step_and_layer() -> None:
    n = diagnose(case("nan_injected")).of("nonfinite")
    assert n is not None
    assert n.names == ("fc4",)
    assert n.evidence["step"] == 3  # the NaN was written into fc4.weight before step 3
    assert "step 3" in n.summary and "`fc4`" in n.summary


def test_saturated_tanh_is_saturation() -> None:
    run = case("tanh_saturated")
    s = diagnose(run).of("saturation")
    assert s is not None
    sat = run.table("sat_frac")
    for name, value in s.evidence["sat_frac"].items():
        assert value == pytest.approx(float(sat[name].iloc[len(sat) // 2 :].median()))
        assert value >= SATURATION_FRAC


# ---------------------------------------------------------------- built to pass
@pytest.mark.parametrize("name", ["relu30_he", "residual30", "cnn_healthy"])
def test_healthy_nets_have_no_vanishing_or_exploding(name: str) -> None:
    found = diagnose(case(name))
    assert not {"vanishing", "exploding", "nonfinite"} & set(found.kinds), found.kinds


# ---------------------------------------------------------------- synthetic edge cases
def test_constant_factor_is_recovered_exactly() -> None:
    errors = [0.5 ** (9 - i) for i in range(10)]
    run = synthetic_run(profile_rows(errors), linear_modules(10))
    p = depth_profile(run)
    assert p is not None
    assert p.factor == pytest.approx(0.5)
    assert p.ratio == pytest.approx(0.5**9)
    assert p.r2 == pytest.approx(1.0)
    assert diagnose(run).of("vanishing") is not None


def test_mild_decay_is_not_vanishing() -> None:
    errors = [0.95 ** (9 - i) for i in range(10)]
    assert diagnose(synthetic_run(profile_rows(errors), linear_modules(10))).of("vanishing") is None


def test_vanishing_is_judged_on_error_signal_not_weight_gradients() -> None:
    """Flat weight gradients with a decaying error signal is vanishing; the reverse is not."""
    n = 10
    params = [{"name": f"fc{i}.weight", "shape": [4, 4], "numel": 16} for i in range(n)]
    decaying = [0.3 ** (n - 1 - i) for i in range(n)]
    flat = [1.0] * n

    def rows(err, grad):
        out = profile_rows(err)
        out += [(s, f"fc{i}.weight", "grad_norm", g) for s in range(3) for i, g in enumerate(grad)]
        return out

    hidden = synthetic_run(rows(decaying, flat), linear_modules(n), params)
    assert diagnose(hidden).of("vanishing") is not None
    only_grads = synthetic_run(rows(flat, decaying), linear_modules(n), params)
    assert diagnose(only_grads).of("vanishing") is None


def test_zero_error_below_a_layer_is_not_fitted_as_vanishing() -> None:
    run = synthetic_run(profile_rows([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]), linear_modules(6))
    p = depth_profile(run)
    assert p is not None and p.fitted_layers == 1 and p.ratio == 0.0
    assert diagnose(run).of("vanishing") is None


def test_gradient_norm_growth_over_steps_is_exploding() -> None:
    params = [{"name": "fc0.weight", "shape": [4, 4], "numel": 16}]
    values = [1.0, 1.2, 0.9, 1.1, 1.0, 3e4]
    rows = [(s, "fc0.weight", "grad_norm", v) for s, v in enumerate(values)]
    e = diagnose(synthetic_run(rows, linear_modules(1), params)).of("exploding")
    assert e is not None and e.evidence["modes"] == ["steps"]
    assert e.evidence["peak_step"] == 5
    assert e.evidence["grad_norm_growth"] == pytest.approx(3e4)  # baseline: the first step
    calm = [(s, "fc0.weight", "grad_norm", v) for s, v in enumerate(values[:-1])]
    assert diagnose(synthetic_run(calm, linear_modules(1), params)).of("exploding") is None


def _update_run(ratios: dict[str, float], steps: int = 4):
    params = [{"name": n, "shape": [4, 4], "numel": 16} for n in ratios]
    rows = [(s, n, "update_ratio", v) for s in range(steps) for n, v in ratios.items()]
    return synthetic_run(rows, linear_modules(1), params)


def test_stalled_and_unstable_updates() -> None:
    run = _update_run({"a.weight": 1e-3, "b.weight": 2e-3, "c.weight": 1e-3, "d.weight": 1e-8})
    s = diagnose(run).of("stalled")
    assert s is not None and s.names == ("d.weight",)
    run = _update_run({"a.weight": 0.3, "b.weight": 1e-3, "c.weight": 1e-3})
    found = diagnose(run)
    assert found.of("unstable_updates").names == ("a.weight",)
    assert found.of("exploding") is None
    run = _update_run({"a.weight": 3.0, "b.weight": 1e-3, "c.weight": 1e-3})
    assert diagnose(run).of("exploding").names == ("a.weight",)
    assert diagnose(run).of("unstable_updates") is None


def test_saturation_since_is_the_start_of_the_trailing_streak() -> None:
    series = [0.0, 0.6, 0.1, 0.5, 0.6, 0.7, 0.8]
    rows = [(s, "act", "sat_frac", v) for s, v in enumerate(series)]
    run = synthetic_run(rows, [{"name": "act", "type": "Tanh", "activation": "tanh"}])
    s = diagnose(run).of("saturation")
    assert s is not None and s.evidence["since_step"]["act"] == 3


def test_nonfinite_value_without_counts() -> None:
    rows = profile_rows([1.0, 1.0, 1.0])
    rows[4] = (1, "fc1", "error_norm", math.inf)
    n = diagnose(synthetic_run(rows, linear_modules(3))).of("nonfinite")
    assert n is not None and n.evidence["step"] == 1 and n.names == ("fc1",)


def test_empty_run_is_a_clear_error() -> None:
    with pytest.raises(GradprobeError, match="no recorded steps"):
        diagnose(synthetic_run([], linear_modules(2)))


def test_missing_statistics_are_reported_as_skipped() -> None:
    run = synthetic_run(profile_rows([1.0, 1.0]), linear_modules(2))
    found = diagnose(run)
    assert "saturation" in found.skipped and "stalled" in found.skipped
    assert "vanishing" not in found.skipped


# ---------------------------------------------------------------- output forms
@pytest.mark.parametrize("name", ["sigmoid30", "rnn_large", "nan_injected", "cnn_dead_channel"])
def test_findings_json_validates_against_the_schema(name: str) -> None:
    doc = json.loads(diagnose(case(name)).to_json())
    assert validate(doc, FINDINGS_JSON_SCHEMA) == []
    assert doc["findings"]


def test_the_validator_can_fail() -> None:
    doc = json.loads(diagnose(case("sigmoid30")).to_json())
    doc["findings"][0]["severity"] = "dire"
    del doc["findings"][0]["remedies"][0]["why"]
    doc["extra"] = 1
    errors = validate(doc, FINDINGS_JSON_SCHEMA)
    assert len(errors) == 3


def test_findings_show_as_an_html_table() -> None:
    found = diagnose(case("sigmoid30"))
    assert isinstance(found, Findings) and isinstance(found, list)
    html = found._repr_html_()
    assert html.count("<tr") == len(found) + 1
    assert "vanishing" in html and "ReLU activation" in html
    assert "no problems found" in Findings([])._repr_html_()


def test_findings_are_ordered_roots_first_then_by_severity() -> None:
    # Issue 22: root causes first (most severe first), each consequence after its root.
    found = diagnose(case("sigmoid30"))
    roots = [f for f in found if f.cause is None]
    assert found[: len(roots)] == roots and roots
    ranks = [("info", "warning", "critical").index(f.severity) for f in roots]
    assert ranks == sorted(ranks, reverse=True)
    kinds = [f.kind for f in found]
    for f in found[len(roots) :]:
        assert kinds.index(f.cause) < kinds.index(f.kind)


def test_docs_list_every_detector_and_threshold() -> None:
    import sys

    from gradprobe.diagnose.thresholds import THRESHOLDS

    text = (ROOT / "docs" / "findings.md").read_text(encoding="utf-8")
    for kind in DETECTORS:
        assert f"`{kind}`" in text, kind
    # every threshold, from the one table (gradprobe.diagnose.thresholds), as the module
    # constants it also defines
    mod = sys.modules["gradprobe.diagnose.thresholds"]
    names = re.findall(
        r"^([A-Z][A-Z0-9_]+) = (?:Threshold|Count)\(", Path(mod.__file__).read_text(), re.M
    )
    assert names and names == list(THRESHOLDS)
    for name, value in THRESHOLDS.items():
        assert f"`{name}`" in text, name
        assert f"{value:g}" in text, (name, value)
        assert value.why and value.name == name, name


def test_thresholds_are_consistent() -> None:
    import sys

    mod = sys.modules["gradprobe.diagnose"]
    assert mod.VANISHING_RATIO < 1 < mod.EXPLODING_RATIO
    assert mod.VANISHING_FACTOR < 1 < mod.EXPLODING_FACTOR
    assert mod.UNSTABLE_UPDATE_RATIO < mod.UPDATE_RATIO_EXPLODING
    assert np.isfinite(mod.STALL_FACTOR)


def test_diagnose_takes_a_probe_or_a_run_directory(tmp_path: Path) -> None:
    from _diagnose_cases import _digits
    from gradprobe import Probe

    torch.manual_seed(0)
    model = mlp(64, 10, depth=12, width=16, activation="sigmoid")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = _digits()
    with Probe(model, opt, store=tmp_path / "run") as probe:
        for s in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                model(d.x_train[s * 16 : (s + 1) * 16]), d.y_train[s * 16 : (s + 1) * 16]
            )
            loss.backward()
            opt.step()
        live = diagnose(probe)
    assert "vanishing" in live.kinds
    assert diagnose(tmp_path / "run").kinds == live.kinds
    assert diagnose(str(tmp_path / "run")).of("vanishing").evidence[
        "first_last_ratio"
    ] == pytest.approx(live.of("vanishing").evidence["first_last_ratio"])
    with pytest.raises(GradprobeError, match="cannot diagnose"):
        diagnose(42)


def _clipped_run(clip_every: int):
    from gradprobe import Probe

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with Probe(model, opt) as probe:
        for step in range(8):
            opt.zero_grad()
            (50 * model(torch.randn(16, 4))).pow(2).sum().backward()
            if step % clip_every == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return probe.run()


def test_clipping_on_most_steps_is_found_with_both_norms() -> None:
    findings = diagnose(_clipped_run(clip_every=1))
    found = [f for f in findings if f.kind == "clipped"]
    assert len(found) == 1
    ev = found[0].evidence
    assert ev["clipped_frac"] == 1.0
    assert ev["median_postclip"] == pytest.approx(1.0, rel=1e-4)
    assert ev["median_preclip"] > 10  # the real gradient, which a one-norm logger hides
    assert found[0].remedies and found[0].remedies[0].key == "lr_schedule"


def test_occasional_clipping_is_not_a_finding() -> None:
    assert not [f for f in diagnose(_clipped_run(clip_every=4)) if f.kind == "clipped"]


def test_skipped_steps_are_found_from_the_scaler_record() -> None:
    from gradprobe.stats import MODEL_NAME

    def run_with(skips: list[int]):
        rows = [(s, MODEL_NAME, "skipped", 1.0 if s in skips else 0.0) for s in range(20)]
        rows += [(s, "0.weight", "grad_norm", 1.0) for s in range(20) if s not in skips]
        frame = pd.DataFrame(rows, columns=["step", "name", "stat", "value"])
        return Run(
            {"modules": [], "parameters": [{"name": "0.weight"}], "probe": {"stats": []}}, frame
        )

    assert not [
        f for f in diagnose(run_with([0, 1])) if f.kind == "skipped_steps"
    ]  # finding its scale
    found = [f for f in diagnose(run_with(list(range(5, 11)))) if f.kind == "skipped_steps"]
    assert (
        found and found[0].evidence["longest_streak"] == 6 and found[0].evidence["first_step"] == 5
    )
    assert not [f for f in diagnose(run_with(list(range(5, 11)))) if f.kind == "exploding"]

"""theory.predict on the user's own model, and theory.compare on a recorded run, against
plain autograd in float64 (the error signal at every Linear's output, read with
retain_grad) and over several seeds.

Tolerances: the prediction is for the wide limit, so a measured log10 ratio differs by
seed-to-seed noise (allowed 4 standard errors of the mean over seeds) and by the finite
width's bias, of relative order depth/width (allowed as depth/width in log10).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradprobe import Probe, theory
from gradprobe.errors import GradprobeError
from gradprobe.lab import models
from reference import capture_outputs, error_norms

WIDTH, DEPTH, BATCH, SEEDS = 256, 8, 32, 5


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _measured_log10(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """log10 ‖dL/d(Linear output)‖ relative to the last Linear, by autograd (loss = sum)."""
    names = _linears(model)
    loss, outputs, _ = capture_outputs(model, names, lambda: model(x).sum())
    norms = error_norms(loss, outputs)
    return {n: math.log10(norms[n] / norms[names[-1]]) for n in names}


class FunctionalMLP(nn.Module):
    """A custom forward with functional activations and unequal widths."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(48, WIDTH)
        self.b = nn.Linear(WIDTH, 2 * WIDTH)
        self.c = nn.Linear(2 * WIDTH, WIDTH)
        self.d = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.a(x))
        x = torch.tanh(self.b(x))
        return self.d(torch.tanh(self.c(x)))


BUILDERS = {
    "tanh, PyTorch default": lambda: models.mlp(
        48, 10, depth=DEPTH, width=WIDTH, activation="tanh"
    ),
    "relu, He": lambda: models.mlp(48, 10, depth=DEPTH, width=WIDTH, init="he"),
    "tanh, orthogonal": lambda: models.mlp(
        48, 10, depth=DEPTH, width=WIDTH, activation="tanh", init="orthogonal"
    ),
    "sigmoid, σ_w² = 4, σ_b² = 0.05": lambda: _with_bias(
        models.mlp(48, 10, depth=DEPTH, width=WIDTH, activation="sigmoid", weight_var=4.0), 0.05
    ),
    "residual relu α = 1": lambda: models.residual_mlp(
        48, 10, depth=DEPTH, width=WIDTH, init="he", scale=1.0
    ),
    "residual relu α = 1/√L": lambda: models.residual_mlp(
        48, 10, depth=DEPTH, width=WIDTH, init="he"
    ),
    "functional tanh, unequal widths": FunctionalMLP,
}


def _with_bias(model: nn.Module, var: float) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.normal_(0.0, math.sqrt(var))
    return model


@pytest.mark.parametrize("case", list(BUILDERS))
def test_predict_matches_autograd_over_seeds(case):
    preds, measured = [], []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        model = BUILDERS[case]().double()
        x = torch.randn(BATCH, 48, dtype=torch.float64) * 1.5
        p = theory.predict(model, x)
        assert p.covered, p.reason
        assert p.q0 == pytest.approx(float(x.pow(2).mean()), rel=1e-12)
        assert [lay.name for lay in p.layers] == _linears(model)
        preds.append([lay.log10_error for lay in p.layers])
        m = _measured_log10(model, x)
        measured.append([m[n] for n in _linears(model)])
    pred = torch.tensor(preds, dtype=torch.float64).mean(0)
    meas = torch.tensor(measured, dtype=torch.float64)
    se = meas.std(0) / math.sqrt(SEEDS)
    tol = 4 * se + DEPTH / WIDTH
    assert bool(((meas.mean(0) - pred).abs() <= tol).all()), (pred, meas.mean(0), tol)


def test_predict_reads_the_init():
    torch.manual_seed(0)
    orth = theory.predict(
        models.mlp(48, 10, depth=3, width=64, activation="tanh", init="orthogonal")
    )
    gauss = theory.predict(
        models.mlp(48, 10, depth=3, width=64, activation="tanh", init="xavier_normal")
    )
    assert [lay.orthogonal for lay in orth.layers] == [True] * 4
    assert [lay.orthogonal for lay in gauss.layers] == [False] * 4
    default = theory.predict(models.mlp(64, 10, depth=3, width=64))
    # PyTorch's default U(±1/√fan_in): σ_w² = 1/3 and σ_b² = 1/(3·fan_in), within sampling
    # error of 64² weights (relative SE of a mean square of uniforms: √(4/5)/64 ≈ 1.4 %)
    for lay in default.layers[:3]:
        assert lay.weight_var == pytest.approx(1 / 3, rel=4 * 0.014)
    res = theory.predict(
        models.residual_mlp(48, 10, depth=4, width=64, init="he"), torch.randn(8, 48)
    )
    assert res.covered and res.residual_blocks == 4
    # α = 1/√4: each block multiplies ‖δ‖ by √(1 + α²·1) on the way down
    assert res.per_layer == pytest.approx(math.sqrt(1.25), rel=0.05)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=-1)


@pytest.mark.parametrize(
    ("model", "x", "reason"),
    [
        (lambda: models.cnn(), torch.randn(2, 1, 8, 8), "Conv2d"),
        (lambda: models.mlp(8, 2, depth=2, norm="batch"), torch.randn(4, 8), "buffers"),
        (lambda: models.recurrent("lstm", hidden=8), torch.randn(2, 5, 2), "LSTM"),
        (Concat, torch.randn(3, 8), "combines|neither"),
        (lambda: nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), torch.randn(3, 8), "LayerNorm"),
    ],
)
def test_outside_the_theory_predicts_nothing_and_says_why(model, x, reason):
    p = theory.predict(model(), x)
    assert not p.covered and p.layers == ()
    assert p.reason and __import__("re").search(reason, p.reason), p.reason
    assert "outside" in p.line()


def test_shared_layers_and_bad_inputs():
    lin = nn.Linear(8, 8)
    shared = nn.Sequential(lin, nn.Tanh(), lin)
    p = theory.predict(shared, torch.randn(2, 8))
    assert not p.covered and "more than once" in p.reason
    with pytest.raises(GradprobeError, match="forward failed"):
        theory.predict(nn.Sequential(nn.Linear(8, 8)), torch.randn(2, 5))


def test_predict_leaves_the_model_and_the_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.0), nn.ReLU(), nn.Linear(16, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 16)
    state = torch.random.get_rng_state()
    theory.predict(model, x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_compare_puts_the_stored_prediction_beside_the_first_recorded_step():
    torch.manual_seed(3)
    model = models.mlp(48, 10, depth=DEPTH, width=WIDTH, activation="tanh").double()
    x = torch.randn(BATCH, 48, dtype=torch.float64)
    expected = _measured_log10(model, x)  # autograd, before any step
    direct = theory.predict(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, optimizer=opt) as probe:
        for _ in range(2):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        run = probe.run()
    assert run.meta["theory"]["covered"]
    c = theory.compare(run)
    assert c.covered and c.step == 0
    # the measured side is the Probe's error_norm: autograd's numbers to rounding
    assert c.measured_log10 == pytest.approx([expected[n] for n in c.names], abs=1e-9)
    # the predicted side: the prediction from the model and input, within the finite-width
    # allowance (the stored one starts from the measured q¹, not from the input)
    assert c.predicted_log10 == pytest.approx(
        [lay.log10_error for lay in direct.layers], abs=DEPTH / WIDTH
    )
    assert abs(math.log10(c.predicted_per_layer / c.measured_per_layer)) <= DEPTH / WIDTH
    assert c.line.startswith("theory: ×") and "measured at step 0" in c.line


def test_compare_says_why_not():
    model = models.residual_mlp(8, 2, depth=2, width=8)
    with Probe(model) as probe:
        model(torch.randn(4, 8)).sum().backward()
        probe.step()
        run = probe.run()
    c = theory.compare(run)
    assert not c.covered and "own forward" in c.reason
    run.meta.pop("theory")
    assert "no theory prediction" in theory.compare(run).reason
    seq = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), act=nn.Tanh(), out=nn.Linear(4, 1)))
    assert theory.describe(seq)["covered"]


def test_diagnose_puts_the_theory_beside_the_measured_vanishing():
    from gradprobe import diagnose

    torch.manual_seed(0)
    model = models.mlp(64, 10, depth=12, width=128, activation="sigmoid")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    with Probe(model, opt) as probe:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        run = probe.run()
    (vanishing,) = [f for f in diagnose(run) if f.kind == "vanishing"]
    c = theory.compare(run)
    assert vanishing.evidence["theory"] == {
        "predicted_per_layer": c.predicted_per_layer,
        "measured_per_layer": c.measured_per_layer,
        "step": 0,
    }
    assert c.line in vanishing.summary
    # sigmoid at PyTorch's default init: far inside the vanishing phase, both ways
    assert c.predicted_per_layer < 0.3 and c.measured_per_layer < 0.3
    assert abs(math.log10(c.predicted_per_layer / c.measured_per_layer)) <= 12 / 128


def test_the_report_shows_the_theory_line(tmp_path):
    from gradprobe import report

    torch.manual_seed(0)
    model = models.mlp(16, 4, depth=4, width=32, activation="tanh")
    with Probe(model, store=tmp_path / "run") as probe:
        model(torch.randn(8, 16)).sum().backward()
        probe.step()
    run = __import__("gradprobe").load(tmp_path / "run")
    out = report(run, tmp_path / "report.html")
    html = __import__("pathlib").Path(out).read_text()
    assert theory.compare(run).line in html
    assert "theory at init" in html


def test_the_probe_stores_a_description_without_warning_or_changing_training():
    import warnings

    def train(probe_it: bool) -> list[torch.Tensor]:  # under a Probe: its parameters after
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(4, 8)
        ctx = Probe(model, opt) if probe_it else __import__("contextlib").nullcontext()
        with ctx as probe:
            for _ in range(2):
                opt.zero_grad()
                model(x).pow(2).sum().backward()
                opt.step()
            if probe_it:
                assert probe.meta["theory"]["covered"]
        return [p.detach().clone() for p in model.parameters()]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probed = train(True)
    twin = train(False)  # the un-probed twin
    assert all(torch.equal(a, b) for a, b in zip(probed, twin, strict=True))
    # weights that cannot be described: a reason in the meta, no warning, no error
    bad = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        bad[0].weight[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Probe(bad) as probe:
            spec = probe.meta["theory"]
    assert not spec["covered"] and "not finite" in spec["reason"]

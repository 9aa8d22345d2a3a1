"""Experiment ``isometry``: deep tanh at criticality, orthogonal vs Gaussian weights, ReLU
for contrast.

Each net is ``depth`` × (Linear → φ) of width ``WIDTH`` at its critical σ_w² (tanh at
σ_b² = 10⁻³, ReLU at He σ_w² = 2, zero biases), with either Gaussian N(0, σ_w²/n) or
orthogonal (gain √σ_w²) weights. At init the input-output Jacobian of the hidden stack
(from the first hidden pre-activation to the last) is computed exactly (``jacrev``, float64)
at a few training inputs, and the spread of JJᵀ's eigenvalues (var/mean²) is set beside
Pennington, Schoenholz & Ganguli's prediction L·(μ₂/μ₁² − 1 − s₁) with σ_w², σ_b² and the
weights' kind read off the model by :func:`gradprobe.theory.predict`. Then each net is
trained on digits with the same optimiser and budget: the paper's claim is that the
isometric net (tanh, orthogonal) learns much faster.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import theory
from . import data, figures, measure, models
from .experiment import (
    Check,
    Experiment,
    RunConfig,
    RunResult,
    Verdict,
    build_verdict,
    fmt,
    mean_spread,
    per_seed,
    pick,
)

NAME = "isometry"
ARMS = tuple((a, w) for a in ("tanh", "relu") for w in ("gaussian", "orthogonal"))
DEPTH = {"tiny": 16, "quick": 32, "full": 64}
STEPS = {"tiny": 150, "quick": 400, "full": 1500}
WIDTH = 64
BIAS_VAR = {"tanh": 1e-3, "relu": 0.0}
# Jacobians are taken at this many training inputs.
JACOBIAN_SAMPLES = 4
# "Learned": the logged training loss first below this (chance is ln 10 ≈ 2.3).
TARGET = 1.0
LR = 0.01


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, s, activation=a, weights=w, depth=DEPTH[mode], steps=STEPS[mode])
        for s in range(seeds)
        for a, w in ARMS
    ]


def build(activation: str, weights: str, depth: int, in_features: int) -> nn.Sequential:
    """The critical net: Gaussian or orthogonal weights at the critical σ_w², biases N(0, σ_b²)."""
    bias_var = BIAS_VAR[activation]
    weight_var = theory.critical_weight_var(activation, bias_var)
    model = models.mlp(in_features, 10, depth=depth, width=WIDTH, activation=activation)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                if weights == "orthogonal":
                    nn.init.orthogonal_(m.weight, gain=math.sqrt(weight_var))
                else:
                    nn.init.normal_(m.weight, 0.0, math.sqrt(weight_var / m.in_features))
                nn.init.normal_(m.bias, 0.0, math.sqrt(bias_var))
    return model


def jacobian_spread_measured(model: nn.Sequential, x: torch.Tensor) -> float:
    """Mean over the rows of ``x`` of var/mean² of JJᵀ's eigenvalues, J = ∂h^L/∂h^1 (float64)."""
    net = _copy64(model)
    mods = list(net.children())
    first, stack = (
        mods[0],
        nn.Sequential(*mods[1:-2]),
    )  # act1 … fcL (the read-out and its act left out)
    spreads = []
    with torch.no_grad():
        hs = first(x.double())
    for h in hs:
        j = torch.func.jacrev(stack)(h).detach()
        ev = torch.linalg.svdvals(j) ** 2
        spreads.append(float(ev.var(unbiased=False) / ev.mean() ** 2))
    return float(np.mean(spreads))


def _copy64(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def predicted_spread(
    model: nn.Sequential, activation: str, x: torch.Tensor, depth: int
) -> tuple[float, bool]:
    """The prediction from the weights as :func:`gradprobe.theory.predict` reads them: the
    hidden layers' mean σ_w² and σ_b², orthogonal if every hidden layer is. Returns the
    spread over the depth − 1 layers of the stack and whether the weights read orthogonal."""
    p = theory.predict(model, x)
    hidden = p.layers[1:-1]  # fc2 … fcL: the stack's weight matrices
    wv = float(np.mean([lay.weight_var for lay in hidden]))
    bv = float(np.mean([lay.bias_var for lay in hidden]))
    orth = all(lay.orthogonal for lay in hidden)
    init = "orthogonal" if orth else "gaussian"
    # the stack starts at the first hidden pre-activation: q¹ = σ_w1² q0 + σ_b1² (not q*)
    q1 = p.layers[0].weight_var * (p.q0 or 0.0) + p.layers[0].bias_var
    spread = theory.jacobian_spread(activation, wv, bv, depth=depth - 1, init=init, q_start=q1)
    return spread, orth


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = data.digits(seed=0)
    torch.manual_seed(config.seed)
    depth = config["depth"]
    model = build(config["activation"], config["weights"], depth, split.in_features)
    xj = split.x_train[:JACOBIAN_SAMPLES]
    predicted, orth = predicted_spread(model, config["activation"], xj, depth)
    measured = jacobian_spread_measured(model, xj)
    fit = measure.fit_run(
        config,
        model,
        split,
        store,
        steps=config["steps"],
        optimizer="momentum",
        lr=LR,
        stats="cheap",
    )
    steps, losses = measure.curve(fit, "step"), measure.curve(fit, "train_loss")
    reached = [s for s, v in zip(steps, losses, strict=True) if v < TARGET]
    metrics = measure.final_train_metrics(model, split.x_train, split.y_train)
    compared = theory.compare(fit.run)
    return RunResult(
        config,
        {
            "spread_predicted": predicted,
            "spread_measured": measured,
            "read_orthogonal": float(orth),
            "train_loss_full": metrics["train_loss_full"],
            "train_error": metrics["train_error"],
            "steps_to_target": float(reached[0]) if reached else math.nan,
            "error_per_layer_predicted": compared.predicted_per_layer or math.nan,
            "error_per_layer_measured": compared.measured_per_layer or math.nan,
        },
        series={"step": steps, "train_loss": losses},
    )


METRICS = [
    "spread_predicted",
    "spread_measured",
    "train_loss_full",
    "train_error",
    "steps_to_target",
    "error_per_layer_predicted",
    "error_per_layer_measured",
]


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(results, ["activation", "weights"], METRICS)


def _loss(r: RunResult) -> float:
    v = r.metrics["train_loss_full"]
    return v if math.isfinite(v) else math.inf


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    depth = results[0].config["depth"]
    spread_order, relu_not, theory_close, learns_faster, beats_relu = [], [], [], [], []
    for _seed, rs in per_seed(results).items():
        r = {(a, w): pick(rs, activation=a, weights=w) for a, w in ARMS}
        m = {k: v.metrics for k, v in r.items()}
        iso = m[("tanh", "orthogonal")]
        spread_order.append(
            bool(
                iso["spread_measured"]
                < min(m[k]["spread_measured"] for k in ARMS if k != ("tanh", "orthogonal"))
            )
        )
        relu_not.append(
            bool(min(m[("relu", w)]["spread_measured"] for w in ("gaussian", "orthogonal")) > 1.0)
        )
        # the wide-limit formula within a factor 2 (width 64 is not wide for depth ≥ 16:
        # the finite-width correction is of relative order depth/width)
        theory_close.append(
            all(
                0.5 <= m[k]["spread_measured"] / m[k]["spread_predicted"] <= 2.0
                for k in ARMS
                if m[k]["spread_predicted"] > 0.5
            )
        )
        learns_faster.append(
            bool(_loss(r[("tanh", "orthogonal")]) < _loss(r[("tanh", "gaussian")]))
        )
        beats_relu.append(
            bool(
                _loss(r[("tanh", "orthogonal")])
                < min(_loss(r[("relu", w)]) for w in ("gaussian", "orthogonal"))
            )
        )
    checks = [
        Check(
            "at init the orthogonal tanh net has the smallest Jacobian spread of the four (measured)",
            tuple(spread_order),
        ),
        Check(
            "ReLU's measured spread stays above 1 with either weights (it cannot be isometric)",
            tuple(relu_not),
        ),
        Check(
            "each measured spread (where the prediction exceeds 0.5) is within a factor 2 of the prediction",
            tuple(theory_close),
        ),
        Check(
            "trained with the same budget, orthogonal tanh reaches a lower training loss than Gaussian tanh",
            tuple(learns_faster),
        ),
        Check("... and lower than ReLU with either weights", tuple(beats_relu)),
    ]
    t = table.set_index(["activation", "weights"])
    findings = [
        f"{a}, {w} weights (depth {depth}): Jacobian spread predicted {fmt(t.loc[(a, w), 'spread_predicted'])}, "
        f"measured {fmt(t.loc[(a, w), 'spread_measured'])}; training loss {fmt(t.loc[(a, w), 'train_loss_full'])}, "
        f"first below {TARGET:g} at step {fmt(t.loc[(a, w), 'steps_to_target'])}; error signal per layer at step 0: "
        f"theory ×{fmt(t.loc[(a, w), 'error_per_layer_predicted'])}, measured ×{fmt(t.loc[(a, w), 'error_per_layer_measured'])}."
        for a, w in ARMS
    ]
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    lines = {
        f"{r.config['activation']}, {r.config['weights']}": (
            r.series["step"],
            r.series["train_loss"],
        )
        for r in results
        if r.config.seed == 0
    }
    return [
        figures.line_chart(
            folder,
            "train_loss",
            lines,
            title="Training loss: critical nets, orthogonal vs Gaussian weights",
            xlabel="step",
            ylabel="cross-entropy (mini-batch)",
            logy=True,
        )
    ]


EXPERIMENT = Experiment(
    name=NAME,
    title="Dynamical isometry: orthogonal weights at criticality",
    question="At the edge of chaos, does a deep tanh net with orthogonal weights have a "
    "well-conditioned Jacobian (spread near 0) and learn faster than with Gaussian weights, "
    "while ReLU cannot be isometric?",
    citation="J. Pennington, S. Schoenholz, S. Ganguli, 'Resurrecting the sigmoid in deep "
    "learning through dynamical isometry: theory and practice', NeurIPS 2017; A. Saxe, J. "
    "McClelland, S. Ganguli, 'Exact solutions to the nonlinear dynamics of learning in deep "
    "linear neural networks', ICLR 2014.",
    source="Pennington et al. 2017",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes=f"Width {WIDTH}; tanh at its critical σ_w² for σ_b² = 1e-3, ReLU at σ_w² = 2 (He), "
    f"σ_b² = 0; SGD + momentum 0.9 at lr {LR}, batch 64, on digits. The Jacobian is exact "
    f"(jacrev, float64) at {JACOBIAN_SAMPLES} training inputs.",
)

"""Experiment ``activations``: eight activations in a 20-layer MLP on digits.

Each activation at the init made for it (Xavier/Glorot normal for sigmoid and tanh, He
for the ReLU family and the smooth modern ones), trained with Adam: learning curves,
gradient flow (error signal per layer), saturated and dead fractions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

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

NAME = "activations"
ALL = ("sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "silu", "gelu")
SATURATING = ("sigmoid", "tanh")
ACTS = {"tiny": ("sigmoid", "relu", "gelu"), "quick": ALL, "full": ALL}
DEPTH = {"tiny": 12, "quick": 20, "full": 20}
STEPS = {"tiny": 120, "quick": 250, "full": 800}


def init_for(activation: str) -> str:
    """The init each activation is designed for (Glorot for saturating ones, He otherwise)."""
    return "xavier_normal" if activation in SATURATING else "he"


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(
            NAME, s, activation=a, init=init_for(a), depth=DEPTH[mode], steps=STEPS[mode]
        )
        for s in range(seeds)
        for a in ACTS[mode]
    ]


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = data.digits(seed=0)
    torch.manual_seed(config.seed)
    model = models.mlp(
        split.in_features,
        10,
        depth=config["depth"],
        activation=config["activation"],
        init=config["init"],
    )
    fit = measure.fit_run(
        config, model, split, store, steps=config["steps"], optimizer="adam", lr=1e-3
    )
    fcs = measure.layers(fit.run, "fc")
    acts = measure.layers(fit.run, "act")
    metrics = {
        "log10_ratio_init": measure.log10(measure.first_last_ratio(fit.run, fcs, "init")),
        "log10_ratio_end": measure.log10(measure.first_last_ratio(fit.run, fcs, "end")),
        "sat_frac": measure.layer_mean(fit.run, "sat_frac", acts),
        "dead_frac": measure.layer_mean(fit.run, "dead_window_frac", acts),
        "gate_mean": measure.layer_mean(fit.run, "gate_mean", acts),
        "train_loss": fit.final.get("train_loss", math.nan),
        "val_loss": fit.final.get("val_loss", math.nan),
        "val_acc": fit.final.get("val_acc", math.nan),
    }
    return RunResult(
        config,
        metrics,
        series={
            "step": measure.curve(fit, "step"),
            "val_loss": measure.curve(fit, "val_loss"),
            "log10_error_end": [
                measure.log10(v) for v in measure.error_profile(fit.run, fcs, "end")
            ],
        },
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(
        results,
        ["activation", "init", "depth"],
        [
            "val_acc",
            "train_loss",
            "log10_ratio_init",
            "log10_ratio_end",
            "sat_frac",
            "dead_frac",
            "gate_mean",
        ],
    )


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    acts = list(dict.fromkeys(r.config["activation"] for r in results))
    modern = [a for a in acts if a not in SATURATING]
    smallest, worse = [], []
    for _seed, rs in per_seed(results).items():
        ratio = {a: pick(rs, activation=a).metrics["log10_ratio_init"] for a in acts}
        loss = {a: pick(rs, activation=a).metrics["train_loss"] for a in acts}
        smallest.append(min(ratio, key=ratio.__getitem__) == "sigmoid")
        worse.append(all(loss["sigmoid"] > loss[a] for a in modern))
    t = table.set_index("activation")
    checks = [
        Check("sigmoid has the smallest first/last error ratio at init", tuple(smallest)),
        Check(f"sigmoid ends with a higher training loss than {', '.join(modern)}", tuple(worse)),
    ]
    best = t["val_acc"].idxmax()
    findings = [
        "Validation accuracy: "
        + ", ".join(f"{a} {fmt(t.loc[a, 'val_acc'])}" for a in acts)
        + f" (best: {best}).",
        "log10 first/last error ratio at init: "
        + ", ".join(f"{a} {fmt(t.loc[a, 'log10_ratio_init'])}" for a in acts)
        + ".",
        "Saturated fraction at the end: "
        + ", ".join(
            f"{a} {fmt(t.loc[a, 'sat_frac'])}" for a in acts if np.isfinite(t.loc[a, "sat_frac"])
        )
        + "; dead-unit fraction: "
        + ", ".join(
            f"{a} {fmt(t.loc[a, 'dead_frac'])}" for a in acts if np.isfinite(t.loc[a, "dead_frac"])
        )
        + ".",
    ]
    return build_verdict(
        checks, findings, {f"val_acc_{a}": float(t.loc[a, "val_acc"]) for a in acts}
    )


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    first = [r for r in results if r.config.seed == 0]
    curves = {r.config["activation"]: (r.series["step"], r.series["val_loss"]) for r in first}
    flow = {
        r.config["activation"]: (
            list(range(1, len(r.series["log10_error_end"]) + 1)),
            r.series["log10_error_end"],
        )
        for r in first
    }
    acts = list(table["activation"])
    return [
        figures.line_chart(
            folder,
            "learning_curves",
            curves,
            title="Validation loss",
            xlabel="step",
            ylabel="cross-entropy",
            logy=True,
        ),
        figures.line_chart(
            folder,
            "gradient_flow",
            flow,
            title="Error signal per layer after training",
            xlabel="hidden layer",
            ylabel="log10 ‖δ‖",
        ),
        figures.bar_chart(
            folder,
            "saturation_dead",
            acts,
            {
                "saturated": list(table["sat_frac"].fillna(0)),
                "dead": list(table["dead_frac"].fillna(0)),
            },
            title="Saturated and dead fractions (end of training)",
            ylabel="fraction of units",
        ),
    ]


EXPERIMENT = Experiment(
    name=NAME,
    title="Activations: saturating vs non-saturating in a 20-layer net",
    question="In a 20-layer MLP on digits, each at its own init, how do sigmoid, tanh, ReLU, "
    "Leaky ReLU, PReLU, ELU, SiLU and GELU differ in learning speed, gradient flow, saturation "
    "and dead units?",
    citation="X. Glorot, A. Bordes, Y. Bengio, 'Deep sparse rectifier neural networks', AISTATS 2011; "
    "K. He et al., 'Delving deep into rectifiers' (PReLU), ICCV 2015; D.-A. Clevert et al., 'Fast and "
    "accurate deep network learning by exponential linear units (ELUs)', ICLR 2016; D. Hendrycks and "
    "K. Gimpel, 'Gaussian error linear units (GELUs)', 2016; P. Ramachandran et al., 'Searching for "
    "activation functions' (Swish/SiLU), 2017.",
    source="Glorot et al. 2011; Clevert et al. 2016",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes="Width 64, Adam at lr 1e-3, batch 64. Saturated: f'(z) < 1% of its maximum; dead: "
    "zero for every sample of every recorded batch in the Probe's window.",
)

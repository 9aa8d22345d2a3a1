"""Experiment ``dying_relu``: what kills ReLU units, and what keeps them alive.

A 5-layer MLP (He init) under two causes: a high learning rate (Adam at 0.03) and a
negative bias init (every bias −2, SGD at 0.1). ReLU against Leaky ReLU (slope 0.01) and
ELU: the Probe's ``dead_window_frac`` (units zero for every sample of every recorded
batch in its window) over training, and the validation accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path

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

NAME = "dying_relu"
ACTS = ("relu", "leaky_relu", "elu")
CAUSES = {
    "tiny": ("negative_bias",),
    "quick": ("high_lr", "negative_bias"),
    "full": ("high_lr", "negative_bias"),
}
STEPS = {"tiny": 150, "quick": 300, "full": 800}
SETUP = {
    "high_lr": {"bias": None, "optimizer": "adam", "lr": 0.03},
    "negative_bias": {"bias": -2.0, "optimizer": "sgd", "lr": 0.1},
}
DEAD = 0.1


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, s, cause=c, activation=a, steps=STEPS[mode])
        for s in range(seeds)
        for c in CAUSES[mode]
        for a in ACTS
    ]


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = data.digits(seed=0)
    setup = SETUP[config["cause"]]
    torch.manual_seed(config.seed)
    model = models.mlp(
        split.in_features,
        10,
        depth=5,
        activation=config["activation"],
        init="he",
        bias=setup["bias"],
    )
    fit = measure.fit_run(
        config,
        model,
        split,
        store,
        steps=config["steps"],
        optimizer=setup["optimizer"],
        lr=setup["lr"],
    )
    acts = measure.layers(fit.run, "act")
    dead = fit.run.table("dead_window_frac", acts)
    return RunResult(
        config,
        {
            "dead_frac_end": measure.layer_mean(fit.run, "dead_window_frac", acts, last=0.1),
            "val_acc": fit.final.get("val_acc", math.nan),
            "train_loss": fit.final.get("train_loss", math.nan),
        },
        series={
            "dead_steps": [float(s) for s in dead.index],
            "dead_frac": [float(v) for v in dead.mean(axis=1)],
        },
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(results, ["cause", "activation"], ["dead_frac_end", "val_acc", "train_loss"])


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    causes = list(dict.fromkeys(r.config["cause"] for r in results))
    dies, alive, elu_better = [], [], []
    for _seed, rs in per_seed(results).items():
        m = {(c, a): pick(rs, cause=c, activation=a).metrics for c in causes for a in ACTS}
        dies.append(all(m[(c, "relu")]["dead_frac_end"] >= DEAD for c in causes))
        alive.append(
            all(m[(c, a)]["dead_frac_end"] == 0.0 for c in causes for a in ("leaky_relu", "elu"))
        )
        elu_better.append(all(m[(c, "elu")]["val_acc"] > m[(c, "relu")]["val_acc"] for c in causes))
    checks = [
        Check(f"ReLU ends with at least {DEAD:.0%} dead units under every cause", tuple(dies)),
        Check("Leaky ReLU and ELU end with no dead units", tuple(alive)),
        Check(
            "ELU reaches a higher validation accuracy than ReLU under every cause",
            tuple(elu_better),
        ),
    ]
    t = table.set_index(["cause", "activation"])
    findings = [
        f"{c}: dead fraction at the end "
        + ", ".join(f"{a} {fmt(t.loc[(c, a), 'dead_frac_end'])}" for a in ACTS)
        + "; validation accuracy "
        + ", ".join(f"{a} {fmt(t.loc[(c, a), 'val_acc'])}" for a in ACTS)
        + "."
        for c in causes
    ]
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    lines = {
        f"{r.config['cause']} {r.config['activation']}": (
            r.series["dead_steps"],
            r.series["dead_frac"],
        )
        for r in results
        if r.config.seed == 0
    }
    return [
        figures.line_chart(
            folder,
            "dead_over_training",
            lines,
            title="Dead units over training (mean over hidden layers)",
            xlabel="step",
            ylabel="dead fraction",
        )
    ]


EXPERIMENT = Experiment(
    name=NAME,
    title="Dying ReLU: dead units and the activations that avoid them",
    question="Do a high learning rate or a negative bias kill ReLU units for good, and do Leaky ReLU "
    "and ELU keep them alive and training?",
    citation="A. L. Maas, A. Y. Hannun, A. Y. Ng, 'Rectifier nonlinearities improve neural network "
    "acoustic models' (Leaky ReLU), ICML 2013; D.-A. Clevert, T. Unterthiner, S. Hochreiter, 'Fast and "
    "accurate deep network learning by exponential linear units (ELUs)', ICLR 2016; L. Lu et al., "
    "'Dying ReLU and initialization: theory and numerical examples', 2019.",
    source="Maas et al. 2013; Clevert et al. 2016",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes="Width 64, depth 5, He init. The Probe's dead window is 10 recorded steps.",
)

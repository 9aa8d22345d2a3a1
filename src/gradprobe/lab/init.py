"""Experiment ``init``: weight initialisations for tanh and ReLU in a 30-layer MLP.

PyTorch's default, too small N(0, 0.01²), too large N(0, 4/n), Xavier/Glorot uniform and
normal, He/Kaiming and orthogonal, each trained with SGD + momentum (the optimiser of He
et al. 2015). It includes their deep-ReLU case: Xavier stalls, He trains.
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

NAME = "init"
ALL = ("default", "small", "large", "xavier_uniform", "xavier_normal", "he", "orthogonal")
ARMS = {
    "tiny": (
        ("relu", "xavier_normal"),
        ("relu", "he"),
        ("tanh", "small"),
        ("tanh", "xavier_normal"),
    ),
    "quick": tuple((a, i) for a in ("tanh", "relu") for i in ALL),
    "full": tuple((a, i) for a in ("tanh", "relu") for i in ALL),
}
DEPTH = 30
STEPS = {"tiny": 150, "quick": 250, "full": 800}
# A run "stalls" if its final training loss is above this fraction of chance (ln 10).
STALL = 0.9
CHANCE = math.log(10)


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, s, activation=a, init=i, depth=DEPTH, steps=STEPS[mode])
        for s in range(seeds)
        for a, i in ARMS[mode]
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
        config,
        model,
        split,
        store,
        steps=config["steps"],
        optimizer="momentum",
        lr=0.01,
        stats="cheap",
    )
    fcs = measure.layers(fit.run, "fc")
    loss = fit.final.get("train_loss", math.nan)
    return RunResult(
        config,
        {
            "log10_ratio_init": measure.log10(measure.first_last_ratio(fit.run, fcs, "init")),
            "train_loss": loss,
            "val_acc": fit.final.get("val_acc", math.nan),
            "stalled": float(not (loss < STALL * CHANCE)),
        },
        series={"step": measure.curve(fit, "step"), "train_loss": measure.curve(fit, "train_loss")},
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(
        results, ["activation", "init"], ["train_loss", "val_acc", "log10_ratio_init", "stalled"]
    )


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    he_case, tanh_case = [], []
    for _seed, rs in per_seed(results).items():
        xr, hr = (
            pick(rs, activation="relu", init="xavier_normal"),
            pick(rs, activation="relu", init="he"),
        )
        he_case.append(bool(xr.metrics["stalled"] and not hr.metrics["stalled"]))
        st, xt = (
            pick(rs, activation="tanh", init="small"),
            pick(rs, activation="tanh", init="xavier_normal"),
        )
        tanh_case.append(bool(st.metrics["stalled"] and not xt.metrics["stalled"]))
    checks = [
        Check(
            f"30-layer ReLU: Xavier stalls (loss > {STALL:g}·ln 10) while He trains", tuple(he_case)
        ),
        Check("30-layer tanh: N(0, 0.01²) stalls while Xavier trains", tuple(tanh_case)),
    ]
    findings = []
    for act in ("relu", "tanh"):
        sub = table[table["activation"] == act]
        if sub.empty:
            continue
        parts = [
            f"{i} {fmt(loss)} (log10 ratio {fmt(r)})"
            for i, loss, r in zip(sub["init"], sub["train_loss"], sub["log10_ratio_init"])
        ]
        findings.append(f"{act}, final training loss by init: " + ", ".join(parts) + ".")
        trained = list(sub[sub["stalled"] < 0.5]["init"])
        findings.append(f"{act}: trained in the budget: {', '.join(trained) or 'none'}.")
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    out = []
    for act in ("relu", "tanh"):
        lines = {
            r.config["init"]: (r.series["step"], r.series["train_loss"])
            for r in results
            if r.config["activation"] == act and r.config.seed == 0
        }
        if lines:
            out.append(
                figures.line_chart(
                    folder,
                    f"curves_{act}",
                    lines,
                    title=f"{act}, depth {DEPTH}: training loss by init",
                    xlabel="step",
                    ylabel="cross-entropy",
                    hline=CHANCE,
                    hline_label="chance (ln 10)",
                )
            )
    return out


EXPERIMENT = Experiment(
    name=NAME,
    title="Initialisation: Xavier for tanh, He for ReLU",
    question="Which weight initialisations let a 30-layer tanh or ReLU MLP train, and is He et al.'s "
    "deep-ReLU case (Xavier stalls, He trains) reproduced?",
    citation="X. Glorot and Y. Bengio, AISTATS 2010; K. He, X. Zhang, S. Ren, J. Sun, 'Delving deep "
    "into rectifiers: surpassing human-level performance on ImageNet classification', ICCV 2015 "
    "(their Figure 3: a 30-layer ReLU net stalls with Xavier init and converges with theirs); "
    "A. Saxe et al., 'Exact solutions to the nonlinear dynamics of learning in deep linear neural "
    "networks' (orthogonal init), ICLR 2014.",
    source="He et al. 2015",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes="Width 64, depth 30, SGD with momentum 0.9 at lr 0.01, batch 64, standardised digits.",
)

"""Experiment ``optimizers``: SGD, SGD + momentum and Adam, each with no schedule, step
decay and cosine decay, on a 10-layer tanh MLP at PyTorch's default init (whose error
signal shrinks towards the input). The question is how the per-layer update ratio
‖Δw‖/‖w‖ differs: across layers (Adam rescales every parameter's step by its own gradient
moments) and over time (a schedule shrinks late updates).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..run import Run
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

NAME = "optimizers"
OPTS = {
    "tiny": ("sgd", "adam"),
    "quick": ("sgd", "momentum", "adam"),
    "full": ("sgd", "momentum", "adam"),
}
SCHEDULES = {
    "tiny": ("none", "cosine"),
    "quick": ("none", "step", "cosine"),
    "full": ("none", "step", "cosine"),
}
LR = {"sgd": 0.1, "momentum": 0.01, "adam": 1e-3}
DEPTH = 10
STEPS = {"tiny": 100, "quick": 300, "full": 900}


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, s, optimizer=o, schedule=sc, lr=LR[o], steps=STEPS[mode])
        for s in range(seeds)
        for o in OPTS[mode]
        for sc in SCHEDULES[mode]
    ]


def _weight_ratios(run: Run) -> pd.DataFrame:
    """update_ratio of the hidden layers' weights (steps × layers, forward order)."""
    names = [n for n in run.parameters if n.startswith("fc") and n.endswith(".weight")]
    return run.table("update_ratio", names)


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = data.digits(seed=0)
    torch.manual_seed(config.seed)
    model = models.mlp(split.in_features, 10, depth=DEPTH, activation="tanh")
    fit = measure.fit_run(
        config,
        model,
        split,
        store,
        steps=config["steps"],
        optimizer=config["optimizer"],
        lr=config["lr"],
        schedule=None if config["schedule"] == "none" else config["schedule"],
        stats="cheap",
        points=40,
    )
    ratios = _weight_ratios(fit.run)
    logs = np.log10(np.maximum(ratios.to_numpy(dtype=float), 1e-45))
    n = len(logs)
    q = max(1, n // 4)
    per_layer = np.nanmean(logs, axis=0)
    return RunResult(
        config,
        {
            "log10_update_first": float(per_layer[0]),
            "log10_update_last": float(per_layer[-1]),
            "layer_spread": float(np.nanmax(per_layer) - np.nanmin(per_layer)),
            "late_minus_early": float(np.nanmean(logs[-q:]) - np.nanmean(logs[:q])),
            "val_acc": fit.final.get("val_acc", math.nan),
            "train_loss": fit.final.get("train_loss", math.nan),
        },
        series={
            "log10_update_per_layer": [float(v) for v in per_layer],
            "update_steps": [float(s) for s in ratios.index],
            "log10_update_mean": [float(v) for v in np.nanmean(logs, axis=1)],
        },
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(
        results,
        ["optimizer", "schedule"],
        [
            "log10_update_first",
            "log10_update_last",
            "layer_spread",
            "late_minus_early",
            "train_loss",
            "val_acc",
        ],
    )


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    opts = list(dict.fromkeys(r.config["optimizer"] for r in results))
    scheds = [s for s in dict.fromkeys(r.config["schedule"] for r in results) if s != "none"]
    uniform, decays = [], []
    for _seed, rs in per_seed(results).items():
        spread = {o: pick(rs, optimizer=o, schedule="none").metrics["layer_spread"] for o in opts}
        uniform.append(all(spread["adam"] < spread[o] for o in opts if o != "adam"))
        decays.append(
            all(
                pick(rs, optimizer=o, schedule=s).metrics["late_minus_early"]
                < pick(rs, optimizer=o, schedule="none").metrics["late_minus_early"] - 0.5
                for o in opts
                for s in scheds
            )
        )
    checks = [
        Check(
            "Adam's update ratios are more uniform across layers than SGD's (smaller max/min spread)",
            tuple(uniform),
        ),
        Check(
            f"{' and '.join(scheds)} decay shrink late updates by over 10^0.5 relative to no schedule",
            tuple(decays),
        ),
    ]
    t = table.set_index(["optimizer", "schedule"])
    findings = [
        "No schedule, log10 ‖Δw‖/‖w‖ first vs last hidden layer: "
        + ", ".join(
            f"{o} {fmt(t.loc[(o, 'none'), 'log10_update_first'])} vs {fmt(t.loc[(o, 'none'), 'log10_update_last'])} "
            f"(spread {fmt(t.loc[(o, 'none'), 'layer_spread'])} decades)"
            for o in opts
        )
        + ".",
        "Late minus early log10 update ratio: "
        + "; ".join(
            f"{o}: "
            + ", ".join(f"{s} {fmt(t.loc[(o, s), 'late_minus_early'])}" for s in ["none", *scheds])
            for o in opts
        )
        + ".",
        "Validation accuracy: "
        + "; ".join(
            f"{o}/{s} {fmt(t.loc[(o, s), 'val_acc'])}" for o in opts for s in ["none", *scheds]
        )
        + ".",
    ]
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    first = [r for r in results if r.config.seed == 0]
    layers = {
        r.config["optimizer"]: (
            list(range(1, len(r.series["log10_update_per_layer"]) + 1)),
            r.series["log10_update_per_layer"],
        )
        for r in first
        if r.config["schedule"] == "none"
    }
    time = {
        f"{r.config['optimizer']} {r.config['schedule']}": (
            r.series["update_steps"],
            r.series["log10_update_mean"],
        )
        for r in first
    }
    return [
        figures.line_chart(
            folder,
            "update_ratio_per_layer",
            layers,
            title="Mean update ratio per hidden layer (no schedule)",
            xlabel="hidden layer",
            ylabel="log10 ‖Δw‖/‖w‖",
        ),
        figures.line_chart(
            folder,
            "update_ratio_over_time",
            time,
            title="Update ratio over training (mean over layers)",
            xlabel="step",
            ylabel="log10 ‖Δw‖/‖w‖",
        ),
    ]


EXPERIMENT = Experiment(
    name=NAME,
    title="Optimisers and schedules: per-layer update ratios",
    question="How do SGD, SGD with momentum and Adam, with and without step or cosine learning-rate "
    "decay, differ in the per-layer update ratio ‖Δw‖/‖w‖ of a deep net whose gradients shrink "
    "towards the input?",
    citation="D. P. Kingma and J. Ba, 'Adam: a method for stochastic optimization', ICLR 2015; "
    "I. Loshchilov and F. Hutter, 'SGDR: stochastic gradient descent with warm restarts' (cosine "
    "decay), ICLR 2017; I. Sutskever et al., 'On the importance of initialization and momentum in "
    "deep learning', ICML 2013.",
    source="Kingma & Ba 2015",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes="10-layer tanh MLP, width 64, PyTorch default init; lr 0.1 (SGD), 0.01 (momentum 0.9), 1e-3 "
    "(Adam); step decay ×0.1 every third of the run, cosine to 0 over the run.",
)

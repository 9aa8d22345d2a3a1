"""Experiment ``residual``: plain vs residual ReLU nets at equal depth.

Plain: ``depth`` × (Linear → ReLU), He init. Residual: an input projection and ``depth``
pre-activation blocks x + s·Linear(ReLU(x)), He init, with the branch scaled by
s = 1/√depth (no normalisation) — without that scale an identity skip around 20+
He-initialised ReLU blocks blows the forward signal up. Same optimiser and budget; the
measure is the training loss and error on the whole training set (He et al.'s
"degradation problem" is about training error, not generalisation).
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

NAME = "residual"
DEPTHS = {"tiny": (4, 32), "quick": (4, 16, 32, 48), "full": (4, 8, 16, 32, 48, 64)}
STEPS = {"tiny": 150, "quick": 300, "full": 800}
# "Worse with depth": the deepest net's training loss at least this many times the shallowest's.
DEGRADE = 2.0


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, s, arch=a, depth=d, steps=STEPS[mode])
        for s in range(seeds)
        for a in ("plain", "residual")
        for d in DEPTHS[mode]
    ]


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = data.digits(seed=0)
    torch.manual_seed(config.seed)
    build = models.mlp if config["arch"] == "plain" else models.residual_mlp
    model = build(split.in_features, 10, depth=config["depth"], activation="relu", init="he")
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
    metrics = measure.final_train_metrics(model, split.x_train, split.y_train)
    metrics["val_acc"] = fit.final.get("val_acc", math.nan)
    return RunResult(
        config,
        metrics,
        series={"step": measure.curve(fit, "step"), "train_loss": measure.curve(fit, "train_loss")},
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(results, ["arch", "depth"], ["train_loss_full", "train_error", "val_acc"])


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    depths = sorted({r.config["depth"] for r in results})
    lo, hi = depths[0], depths[-1]
    plain_worse, res_holds, res_beats = [], [], []
    for _seed, rs in per_seed(results).items():
        loss = {
            (a, d): pick(rs, arch=a, depth=d).metrics["train_loss_full"]
            for a in ("plain", "residual")
            for d in (lo, hi)
        }
        plain_worse.append(bool(loss[("plain", hi)] > DEGRADE * loss[("plain", lo)]))
        res_holds.append(bool(loss[("residual", hi)] <= DEGRADE * loss[("residual", lo)]))
        res_beats.append(bool(loss[("residual", hi)] < loss[("plain", hi)]))
    checks = [
        Check(
            f"the plain net's training loss at depth {hi} is over {DEGRADE:g}× that at depth {lo}",
            tuple(plain_worse),
        ),
        Check(
            f"the residual net's training loss at depth {hi} stays within {DEGRADE:g}× that at depth {lo}",
            tuple(res_holds),
        ),
        Check(
            f"at depth {hi} the residual net reaches a lower training loss than the plain one",
            tuple(res_beats),
        ),
    ]
    t = table.set_index(["arch", "depth"])
    findings = [
        f"{a}: training loss by depth "
        + ", ".join(f"{d}: {fmt(t.loc[(a, d), 'train_loss_full'])}" for d in depths)
        + "; training error "
        + ", ".join(f"{d}: {fmt(t.loc[(a, d), 'train_error'])}" for d in depths)
        + "."
        for a in ("plain", "residual")
    ]
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    lines = {
        a: (table[table["arch"] == a]["depth"], table[table["arch"] == a]["train_loss_full"])
        for a in ("plain", "residual")
    }
    return [
        figures.line_chart(
            folder,
            "train_loss_vs_depth",
            lines,
            title="Final training loss against depth",
            xlabel="depth (blocks)",
            ylabel="cross-entropy on the training set",
            logy=True,
        )
    ]


EXPERIMENT = Experiment(
    name=NAME,
    title="Residual connections: depth without degradation",
    question="At equal depth and budget, does the training error of a plain ReLU net get worse as it "
    "gets deeper while a residual net's does not?",
    citation="K. He, X. Zhang, S. Ren, J. Sun, 'Deep residual learning for image recognition', CVPR "
    "2016; 'Identity mappings in deep residual networks' (pre-activation blocks), ECCV 2016.",
    source="He et al. 2016",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes="Width 64, He init, SGD + momentum 0.9 at lr 0.01, batch 64. The residual branch is scaled "
    "by 1/√depth; there is no normalisation in either net.",
)

"""Experiment ``clipping``: exploding set-ups, with and without gradient clipping.

Two set-ups that explode: a 10-layer ReLU MLP with too-large init N(0, 4/n) trained by SGD
at lr 0.1 on digits, and a tanh RNN whose recurrent matrix is 3 × orthogonal, trained by
SGD at lr 0.5 on the adding problem (T = 50). Each without clipping, with
``clip_grad_norm_(·, 1.0)`` and with ``clip_grad_value_(·, 0.1)``.
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

NAME = "clipping"
SETUPS = {"tiny": ("mlp",), "quick": ("mlp", "rnn"), "full": ("mlp", "rnn")}
CLIPS = ("none", "norm", "value")
STEPS = {"tiny": 60, "quick": 200, "full": 600}
CLIP_NORM, CLIP_VALUE = 1.0, 0.1


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, s, setup=u, clip=c, steps=STEPS[mode])
        for s in range(seeds)
        for u in SETUPS[mode]
        for c in CLIPS
    ]


def run(config: RunConfig, store: Path | None) -> RunResult:
    torch.manual_seed(config.seed)
    if config["setup"] == "mlp":
        split = data.digits(seed=0)
        model = models.mlp(split.in_features, 10, depth=10, activation="relu", init="large")
        lr, first = 0.1, "fc1"
    else:
        split = data.adding_split(1000, 300, 50, seed=config.seed)
        model = models.recurrent("rnn", recurrent_scale=3.0)
        lr, first = 0.5, "rnn"
    clip = {"norm": {"clip_norm": CLIP_NORM}, "value": {"clip_value": CLIP_VALUE}}.get(
        config["clip"], {}
    )
    fit = measure.fit_run(
        config, model, split, store, steps=config["steps"], optimizer="sgd", lr=lr, **clip
    )
    err = fit.run.table("error_norm")
    first_err = err[first].to_numpy(dtype=float) if first in err else np.array([math.nan])
    finite = first_err[np.isfinite(first_err)]
    losses = fit.history["train_loss"].to_numpy(dtype=float)
    return RunResult(
        config,
        {
            "diverged": float(fit.diverged),
            "steps_run": float(fit.history["step"].iloc[-1]) if len(fit.history) else 0.0,
            "final_train_loss": float(losses[-1]) if len(losses) else math.nan,
            "max_log10_error_first": measure.log10(float(finite.max()))
            if len(finite)
            else math.nan,
        },
        series={"step": measure.curve(fit, "step"), "train_loss": measure.curve(fit, "train_loss")},
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(
        results,
        ["setup", "clip"],
        ["diverged", "steps_run", "final_train_loss", "max_log10_error_first"],
    )


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    setups = list(dict.fromkeys(r.config["setup"] for r in results))
    blows, norm_ok, value_ok = [], [], []
    for _seed, rs in per_seed(results).items():
        m = {(u, c): pick(rs, setup=u, clip=c).metrics for u in setups for c in CLIPS}
        blows.append(all(m[(u, "none")]["diverged"] == 1.0 for u in setups))
        norm_ok.append(
            all(
                m[(u, "norm")]["diverged"] == 0.0
                and math.isfinite(m[(u, "norm")]["final_train_loss"])
                for u in setups
            )
        )
        value_ok.append(
            all(
                m[(u, "value")]["diverged"] == 0.0
                and math.isfinite(m[(u, "value")]["final_train_loss"])
                for u in setups
            )
        )
    checks = [
        Check("without clipping the loss turns NaN/Inf", tuple(blows)),
        Check(f"clip_grad_norm_ (max norm {CLIP_NORM:g}) keeps the loss finite", tuple(norm_ok)),
        Check(f"clip_grad_value_ (±{CLIP_VALUE:g}) keeps the loss finite", tuple(value_ok)),
    ]
    t = table.set_index(["setup", "clip"])
    findings = [
        f"{u}: unclipped run stopped at step {fmt(t.loc[(u, 'none'), 'steps_run'])} "
        f"(peak log10 ‖δ‖ at the first layer {fmt(t.loc[(u, 'none'), 'max_log10_error_first'])}); "
        f"final training loss with norm clipping {fmt(t.loc[(u, 'norm'), 'final_train_loss'])}, "
        f"with value clipping {fmt(t.loc[(u, 'value'), 'final_train_loss'])}."
        for u in setups
    ]
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    out = []
    for u in dict.fromkeys(r.config["setup"] for r in results):
        lines = {
            r.config["clip"]: (r.series["step"], r.series["train_loss"])
            for r in results
            if r.config["setup"] == u and r.config.seed == 0
        }
        out.append(
            figures.line_chart(
                folder,
                f"loss_{u}",
                lines,
                title=f"{u}: training loss (a line ends where it turned NaN)",
                xlabel="step",
                ylabel="loss",
                logy=True,
            )
        )
    return out


EXPERIMENT = Experiment(
    name=NAME,
    title="Gradient clipping against explosion",
    question="In set-ups whose gradients explode (a deep ReLU net with too-large init and a high "
    "learning rate; a tanh RNN with large recurrent weights), does clipping the gradient norm or "
    "value keep the loss finite where the unclipped run diverges?",
    citation="R. Pascanu, T. Mikolov, Y. Bengio, 'On the difficulty of training recurrent neural "
    "networks', ICML 2013.",
    source="Pascanu et al. 2013",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 2, 3),
    notes="The Probe records grad_norm at optimizer.step(), after clipping; error_norm (the "
    "back-propagated signal) is recorded during backward, before clipping, so it shows the explosion.",
)

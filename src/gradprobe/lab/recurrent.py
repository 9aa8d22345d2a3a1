"""Experiment ``recurrent``: tanh RNN vs LSTM vs GRU on the adding problem.

Sequence lengths 10, 50 and 100; hidden size 64; Adam at lr 1e-2 (at 1e-3 nothing solves
T ≥ 50 in this budget). Final validation MSE against the trivial baseline (predicting the
mean 1.0: MSE ≈ 1/6), and ‖dL/dh_t‖ over time steps t at init and after training,
computed with ``retain_grad`` on each hidden state of a step-by-step unrolled pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

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

NAME = "recurrent"
KINDS = {"tiny": ("rnn", "lstm"), "quick": ("rnn", "lstm", "gru"), "full": ("rnn", "lstm", "gru")}
LENGTHS = {"tiny": (50,), "quick": (10, 50, 100), "full": (10, 50, 100)}
STEPS = {"tiny": 800, "quick": 1200, "full": 3000}
HIDDEN = 64
BASELINE = 1.0 / 6.0
# "Solved": validation MSE below this fraction of the trivial baseline.
SOLVED = 0.1
HEADLINE_T = 50
GRAD_BATCH = 128


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, s, kind=k, length=t, steps=STEPS[mode])
        for s in range(seeds)
        for t in LENGTHS[mode]
        for k in KINDS[mode]
    ]


def hidden_grad_norms(
    model: models.RecurrentModel, x: torch.Tensor, y: torch.Tensor
) -> list[float]:
    """‖dL/dh_t‖ for t = 1 … T (norm over the batch and the hidden units), MSE loss."""
    was = model.training
    model.train()
    try:
        pred, hs = model.unrolled(x)
        for h in hs:
            h.retain_grad()
        model.zero_grad(set_to_none=True)
        nn.functional.mse_loss(pred, y).backward()
        norms = [float(h.grad.norm()) if h.grad is not None else 0.0 for h in hs]
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was)
    return norms


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = data.adding_split(2000, 500, config["length"], seed=config.seed)
    torch.manual_seed(config.seed)
    model = models.recurrent(config["kind"], hidden=HIDDEN)
    xg, yg = split.x_val[:GRAD_BATCH], split.y_val[:GRAD_BATCH]
    g_init = hidden_grad_norms(model, xg, yg)
    fit = measure.fit_run(
        config, model, split, store, steps=config["steps"], optimizer="adam", lr=1e-2, stats="cheap"
    )
    g_end = hidden_grad_norms(model, xg, yg)
    mse = fit.final.get("val_loss", math.nan)

    def ratio(g: list[float]) -> float:
        return measure.log10(g[0] / g[-1]) if g[-1] > 0 else math.nan

    return RunResult(
        config,
        {
            "val_mse": mse,
            "mse_over_baseline": mse / BASELINE,
            "solved": float(mse < SOLVED * BASELINE),
            "log10_grad_first_last_init": ratio(g_init),
            "log10_grad_first_last_end": ratio(g_end),
        },
        series={
            "grad_init": g_init,
            "grad_end": g_end,
            "step": measure.curve(fit, "step"),
            "val_loss": measure.curve(fit, "val_loss"),
        },
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(
        results,
        ["kind", "length"],
        [
            "val_mse",
            "mse_over_baseline",
            "solved",
            "log10_grad_first_last_init",
            "log10_grad_first_last_end",
        ],
    )


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    lengths = sorted({r.config["length"] for r in results})
    at = HEADLINE_T if HEADLINE_T in lengths else lengths[-1]
    lstm_beats, lstm_solves, rnn_fails = [], [], []
    for _seed, rs in per_seed(results).items():
        rnn, lstm = (
            pick(rs, kind="rnn", length=at).metrics,
            pick(rs, kind="lstm", length=at).metrics,
        )
        lstm_beats.append(bool(lstm["val_mse"] < rnn["val_mse"]))
        lstm_solves.append(bool(lstm["solved"]))
        rnn_fails.append(not bool(rnn["solved"]))
    checks = [
        Check(
            f"at T={at} the LSTM reaches a lower validation MSE than the tanh RNN",
            tuple(lstm_beats),
        ),
        Check(
            f"at T={at} the LSTM solves the task (MSE < {SOLVED:g} × the 1/6 baseline)",
            tuple(lstm_solves),
        ),
        Check(f"at T={at} the tanh RNN does not solve it", tuple(rnn_fails)),
    ]
    t = table.set_index(["kind", "length"])
    kinds = list(dict.fromkeys(table["kind"]))
    findings = [
        f"{k}: validation MSE / baseline by length "
        + ", ".join(f"T={n}: {fmt(t.loc[(k, n), 'mse_over_baseline'])}" for n in lengths)
        + f"; log10 ‖dL/dh_1‖/‖dL/dh_T‖ at T={lengths[-1]}: init {fmt(t.loc[(k, lengths[-1]), 'log10_grad_first_last_init'])}, "
        f"trained {fmt(t.loc[(k, lengths[-1]), 'log10_grad_first_last_end'])}."
        for k in kinds
    ]
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    longest = max(r.config["length"] for r in results)
    out = []
    for when in ("init", "end"):
        lines = {}
        for r in results:
            if r.config["length"] == longest and r.config.seed == 0:
                g = np.asarray(r.series[f"grad_{when}"], dtype=float)
                lines[r.config["kind"]] = (list(range(1, len(g) + 1)), list(g / max(g[-1], 1e-45)))
        out.append(
            figures.line_chart(
                folder,
                f"hidden_grad_{when}",
                lines,
                title=f"‖dL/dh_t‖ / ‖dL/dh_T‖ over time, T={longest}, {'at init' if when == 'init' else 'trained'}",
                xlabel="time step t",
                ylabel="relative gradient norm",
                logy=True,
            )
        )
    kinds = list(dict.fromkeys(table["kind"]))
    lines = {
        k: (table[table["kind"] == k]["length"], table[table["kind"] == k]["val_mse"])
        for k in kinds
    }
    out.append(
        figures.line_chart(
            folder,
            "mse_vs_length",
            lines,
            title="Final validation MSE",
            xlabel="sequence length T",
            ylabel="MSE",
            logy=True,
            hline=BASELINE,
            hline_label="predict the mean (1/6)",
        )
    )
    return out


EXPERIMENT = Experiment(
    name=NAME,
    title="Recurrent nets: gates carry the error across time",
    question="On the adding problem with sequences of 10, 50 and 100 steps, which of a tanh RNN, an "
    "LSTM and a GRU learns the long-range dependency, and how does ‖dL/dh_t‖ decay back through time?",
    citation="S. Hochreiter and J. Schmidhuber, 'Long short-term memory', Neural Computation 1997; "
    "Y. Bengio, P. Simard, P. Frasconi, 'Learning long-term dependencies with gradient descent is "
    "difficult', IEEE TNN 1994; K. Cho et al. (GRU), 2014.",
    source="Hochreiter & Schmidhuber 1997",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes="2,000 training and 500 validation sequences per seed, batch 64, Adam at lr 1e-2, hidden "
    "size 64, PyTorch's default recurrent init. ‖dL/dh_t‖ is measured on 128 validation sequences.",
)

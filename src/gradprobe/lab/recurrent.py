"""Experiment ``recurrent``: tanh RNN vs LSTM vs GRU on the adding problem, and the LSTM's
forget-gate bias.

Sequence lengths 10, 50 and 100; hidden size 64; Adam at lr 1e-2 (at 1e-3 nothing solves
T ≥ 50 in this budget). Final validation MSE against the trivial baseline (predicting the
mean 1.0: MSE ≈ 1/6), and ‖dL/dh_t‖ over time steps t at init and after training,
computed with ``retain_grad`` on each hidden state of a step-by-step unrolled pass.

The LSTM also runs with its forget-gate bias set to 0, 1 and chrono (b_f ~ log U(1, T − 1),
the input gate's bias −b_f: Tallec & Ollivier 2018) beside PyTorch's default (≈ 0 plus
noise). At init the Probe measures ``memory_steps`` (−1/mean log f) on a validation batch,
set beside the prediction −1/E[log σ(b_f + s·z)] (:func:`gradprobe.theory.gated_memory_efold`,
s the spread the gate's weights add, from their variance and the inputs' and hidden
states' norms) and the characteristic time 1 + e^(b_f). In ``tiny`` mode the forget-bias
variants are measured at init only (not trained).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import Probe, theory
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


# The LSTM's forget-gate bias variants (beside "default"), the lengths they run at, and
# whether they are trained in each mode.
FORGET = ("0", "1", "chrono")
FORGET_LENGTHS = {"tiny": (50,), "quick": (50, 100), "full": (10, 50, 100)}
FORGET_TRAINED = {"tiny": False, "quick": True, "full": True}


def grid(mode: str, seeds: int) -> list[RunConfig]:
    out = []
    for s in range(seeds):
        for t in LENGTHS[mode]:
            for k in KINDS[mode]:
                out.append(
                    RunConfig.make(NAME, s, kind=k, length=t, forget="default", steps=STEPS[mode])
                )
            if t in FORGET_LENGTHS[mode]:
                steps = STEPS[mode] if FORGET_TRAINED[mode] else 0
                out += [
                    RunConfig.make(NAME, s, kind="lstm", length=t, forget=f, steps=steps)
                    for f in FORGET
                ]
    return out


def set_forget_bias(model: models.RecurrentModel, forget: str, length: int, seed: int) -> None:
    """The LSTM's forget-gate bias b_f (summed over b_ih and b_hh, which the gate adds):
    0, 1, or chrono's log U(1, T − 1) with the input gate's bias at −b_f; "default" leaves
    PyTorch's init."""
    if forget == "default":
        return
    rnn = model.rnn
    h = rnn.hidden_size
    if forget == "chrono":
        b = theory.chrono_forget_bias(
            h, float(length), generator=torch.Generator().manual_seed(seed)
        )
    else:
        b = torch.full((h,), float(forget), dtype=torch.float64)
    with torch.no_grad():
        rnn.bias_hh_l0[: 2 * h] = 0.0
        rnn.bias_ih_l0[h : 2 * h] = b.to(rnn.bias_ih_l0.dtype)
        rnn.bias_ih_l0[:h] = (-b if forget == "chrono" else torch.zeros_like(b)).to(
            rnn.bias_ih_l0.dtype
        )


def memory_at_init(
    model: models.RecurrentModel, x: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """The Probe's ``memory_steps`` on one batch, beside the predicted e-fold memory and
    the characteristic time 1 + e^(b_f) (b_f averaged over the units: the geometric centre)."""
    rnn = model.rnn
    h = rnn.hidden_size
    with Probe(model) as probe:
        out, _ = rnn(x)
        nn.functional.mse_loss(model.head(out[:, -1]), y).backward()
        probe.step()
        frame = probe.frame()
    model.zero_grad(set_to_none=True)
    rows = frame[(frame["stat"] == "memory_steps") & (frame["name"] == "rnn")]
    measured = float(rows["value"].iloc[0]) if len(rows) else math.nan
    rows_f = slice(h, 2 * h)
    with torch.no_grad():
        b = (rnn.bias_ih_l0[rows_f] + rnn.bias_hh_l0[rows_f]).double()
        w_ih, w_hh = rnn.weight_ih_l0[rows_f].double(), rnn.weight_hh_l0[rows_f].double()
        hs = out.detach().double()
        h_prev = torch.cat([torch.zeros_like(hs[:, :1]), hs[:, :-1]], dim=1)
        # the gate's pre-activation b + w·[x_t; h_(t−1)]: the weights (zero mean) add a spread
        # s² = E[w²]·E‖x_t‖² + E[w²]·E‖h_(t−1)‖²
        s2 = float(w_ih.pow(2).mean() * x.double().pow(2).sum(-1).mean())
        s2 += float(w_hh.pow(2).mean() * h_prev.pow(2).sum(-1).mean())
    predicted = theory.gated_memory_efold(b.tolist(), math.sqrt(s2))
    return {
        "memory_measured": measured,
        "memory_predicted": predicted,
        "memory_characteristic": theory.gated_memory(float(b.mean())),
    }


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
    forget = config.get("forget", "default")
    set_forget_bias(model, forget, config["length"], config.seed)
    xg, yg = split.x_val[:GRAD_BATCH], split.y_val[:GRAD_BATCH]
    memory = (
        memory_at_init(model, xg, yg)
        if config["kind"] == "lstm"
        else dict.fromkeys(
            ("memory_measured", "memory_predicted", "memory_characteristic"), math.nan
        )
    )
    g_init = hidden_grad_norms(model, xg, yg)
    if config["steps"] == 0:  # measured at init only
        return RunResult(
            config,
            {**memory, **dict.fromkeys(TRAINED_METRICS, math.nan)},
            series={"grad_init": g_init},
        )
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
            **memory,
        },
        series={
            "grad_init": g_init,
            "grad_end": g_end,
            "step": measure.curve(fit, "step"),
            "val_loss": measure.curve(fit, "val_loss"),
        },
    )


TRAINED_METRICS = (
    "val_mse",
    "mse_over_baseline",
    "solved",
    "log10_grad_first_last_init",
    "log10_grad_first_last_end",
)
MEMORY_METRICS = ("memory_measured", "memory_predicted", "memory_characteristic")
# "Agrees with the prediction": measured memory within this fraction of the predicted one
# (the measured mean of log f averages 64 units whose weight rows are drawn once: its
# relative error is ~ the units' spread of log f over √64, a few per cent).
MEMORY_RTOL = 0.15


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(results, ["kind", "forget", "length"], [*TRAINED_METRICS, *MEMORY_METRICS])


def _forget_checks(results: list[RunResult]) -> tuple[list[Check], list[str]]:
    """The forget-gate bias: memory measured beside predicted, and the adding problem."""
    variants = [r for r in results if r.config["kind"] == "lstm"]
    lengths = sorted({r.config["length"] for r in variants if r.config["forget"] != "default"})
    if not lengths:
        return [], []
    at = HEADLINE_T if HEADLINE_T in lengths else lengths[-1]
    close, ordered, chrono_best = [], [], []
    trained = all(r.config["steps"] > 0 for r in variants)
    for _seed, rs in per_seed(variants).items():
        m = {f: pick(rs, kind="lstm", length=at, forget=f).metrics for f in ("default", *FORGET)}
        close.append(
            all(
                abs(v["memory_measured"] / v["memory_predicted"] - 1) <= MEMORY_RTOL
                for v in m.values()
            )
        )
        ordered.append(
            bool(
                m["0"]["memory_measured"]
                < m["1"]["memory_measured"]
                < m["chrono"]["memory_measured"]
            )
        )
        if trained:
            chrono_best.append(
                bool(m["chrono"]["val_mse"] <= min(m["0"]["val_mse"], m["default"]["val_mse"]))
            )
    checks = [
        Check(
            f"at init the Probe's memory_steps of each LSTM (forget bias default, 0, 1, chrono; T={at}) is "
            f"within {MEMORY_RTOL:.0%} of the predicted −1/E[log σ(b_f + s·z)]",
            tuple(close),
        ),
        Check("the measured memory grows with the forget bias: 0 < 1 < chrono", tuple(ordered)),
    ]
    if trained:
        checks.append(
            Check(
                f"at T={at} the chrono-initialised LSTM reaches a validation MSE no worse than with forget bias 0 "
                "or PyTorch's default",
                tuple(chrono_best),
            )
        )
    findings = []
    for f in ("default", *FORGET):
        rs = [r for r in variants if r.config["forget"] == f and r.config["length"] == at]
        mean = {k: float(np.mean([r.metrics[k] for r in rs])) for k in (*MEMORY_METRICS, "val_mse")}
        findings.append(
            f"LSTM, forget bias {f} (T={at}): memory at init measured {fmt(mean['memory_measured'])} steps, "
            f"predicted {fmt(mean['memory_predicted'])} (1 + e^b_f = {fmt(mean['memory_characteristic'])})"
            + (
                f"; validation MSE {fmt(mean['val_mse'])}."
                if trained
                else "; not trained in this mode."
            )
        )
    return checks, findings


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    everything = results
    results = [r for r in results if r.config.get("forget", "default") == "default"]
    table = table[table["forget"] == "default"]
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
    more_checks, more_findings = _forget_checks(everything)
    return build_verdict(checks + more_checks, findings + more_findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    results = [r for r in results if r.config.get("forget", "default") == "default"]
    table = table[table["forget"] == "default"]
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

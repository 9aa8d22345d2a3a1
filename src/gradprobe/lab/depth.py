"""Experiment ``depth``: how the error signal reaching the first layer shrinks with depth.

MLPs of 2 to 50 hidden layers (width 64) on standardised digits: sigmoid and tanh at
PyTorch's default init, ReLU at He init. For each, ‖δ‖ at the first hidden Linear over
‖δ‖ at the last (the Probe's ``error_norm``) at initialisation and after training with
Adam, against the mean-field prediction of :func:`gradprobe.theory.predict_error_ratio`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

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

NAME = "depth"
WIDTH = 64
# (activation, init): the saturating ones at PyTorch's default, ReLU at its own (He) init.
ARMS = (("sigmoid", "default"), ("tanh", "default"), ("relu", "he"))
DEPTHS = {"tiny": (2, 30), "quick": (2, 5, 10, 20, 30, 50), "full": (2, 5, 10, 15, 20, 30, 40, 50)}
STEPS = {"tiny": 10, "quick": 100, "full": 400}
# σ_w² = fan_in·Var(W) of each init, for the theory overlay.
WEIGHT_VAR = {"default": 1.0 / 3.0, "he": 2.0}
# The depth the headline comparison is made at (the deepest one if the grid stops earlier).
HEADLINE_DEPTH = 30
HEADLINE_FACTOR = 1e-4


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, seed, activation=a, init=i, depth=d, steps=STEPS[mode])
        for seed in range(seeds)
        for a, i in ARMS
        for d in DEPTHS[mode]
    ]


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = data.digits(seed=0)
    torch.manual_seed(config.seed)
    model = models.mlp(
        split.in_features,
        10,
        depth=config["depth"],
        width=WIDTH,
        activation=config["activation"],
        init=config["init"],
    )
    fit = measure.fit_run(
        config, model, split, store, steps=config["steps"], optimizer="adam", lr=1e-3, stats="cheap"
    )
    fcs = measure.layers(fit.run, "fc")
    init_profile = measure.error_profile(fit.run, fcs, "init")
    end_profile = measure.error_profile(fit.run, fcs, "end")
    ratio_init = measure.first_last_ratio(fit.run, fcs, "init")
    ratio_end = measure.first_last_ratio(fit.run, fcs, "end")
    q0 = float(split.x_train.pow(2).mean())
    return RunResult(
        config,
        metrics={
            "log10_ratio_init": measure.log10(ratio_init),
            "log10_ratio_end": measure.log10(ratio_end),
            "q0": q0,
            "val_acc": fit.final.get("val_acc", math.nan),
            "train_loss": fit.final.get("train_loss", math.nan),
        },
        series={
            "log10_error_init": [measure.log10(v) for v in init_profile],
            "log10_error_end": [measure.log10(v) for v in end_profile],
        },
    )


def predicted_log10_ratio(activation: str, init: str, depth: int, q0: float) -> float:
    """Mean-field log10 ‖δ¹‖/‖δ^depth‖ for this arm (PyTorch's default bias has σ_b² = 1/(3·64))."""
    bias_var = 1.0 / (3.0 * WIDTH) if init == "default" else 0.0
    return theory.predict_log10_error_ratio(activation, WEIGHT_VAR[init], bias_var, depth, q0)


def summarize(results: list[RunResult]) -> pd.DataFrame:
    table = mean_spread(
        results,
        ["activation", "init", "depth"],
        ["log10_ratio_init", "log10_ratio_end", "val_acc", "train_loss"],
    )
    q0 = float(np.mean([r.metrics["q0"] for r in results]))
    table.insert(
        5,
        "predicted_log10_ratio_init",
        [
            predicted_log10_ratio(a, i, int(d), q0)
            for a, i, d in zip(table["activation"], table["init"], table["depth"])
        ],
    )
    return table


def _slope(depths: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of y against depth, and R²."""
    x, y = np.asarray(depths, float), np.asarray(ys, float)
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return math.nan, math.nan
    slope, icpt = np.polyfit(x, y, 1)
    resid = y - (slope * x + icpt)
    ss = float(((y - y.mean()) ** 2).sum())
    return float(slope), (1.0 - float((resid**2).sum()) / ss) if ss > 0 else 1.0


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    depths = sorted({r.config["depth"] for r in results})
    at = HEADLINE_DEPTH if HEADLINE_DEPTH in depths else depths[-1]
    q0 = float(np.mean([r.metrics["q0"] for r in results]))
    exp_decay, below, relu_flat, theory_ok = [], [], [], []
    slopes, gaps, theory_slopes = [], [], []
    for _seed, rs in per_seed(results).items():
        sig = [pick(rs, activation="sigmoid", depth=d).metrics["log10_ratio_init"] for d in depths]
        slope, r2 = _slope(depths, sig)
        predicted = [predicted_log10_ratio("sigmoid", "default", d, q0) for d in depths]
        p_slope, _ = _slope(depths, predicted)
        slopes.append(slope)
        theory_slopes.append(p_slope)
        exp_decay.append(bool(slope < 0 and r2 >= 0.9))
        s_at = pick(rs, activation="sigmoid", depth=at).metrics["log10_ratio_init"]
        r_at = pick(rs, activation="relu", depth=at).metrics["log10_ratio_init"]
        gaps.append(s_at - r_at)
        below.append(bool(s_at - r_at < math.log10(HEADLINE_FACTOR)))
        relu_flat.append(bool(abs(r_at) < 1.0))
        theory_ok.append(bool(math.isfinite(slope) and abs(slope - p_slope) <= 0.25 * abs(p_slope)))
    checks = [
        Check(
            "sigmoid's first/last error ratio at init decays exponentially with depth "
            "(linear in log10, R² ≥ 0.9)",
            tuple(exp_decay),
        ),
        Check(
            f"at depth {at} sigmoid's ratio is below {HEADLINE_FACTOR:g} × ReLU-He's", tuple(below)
        ),
        Check(
            f"ReLU with He init keeps the ratio within a factor 10 of 1 at depth {at}",
            tuple(relu_flat),
        ),
        Check(
            "the measured sigmoid decay rate is within 25% of the mean-field prediction",
            tuple(theory_ok),
        ),
    ]
    s, ps, g = float(np.mean(slopes)), float(np.mean(theory_slopes)), float(np.mean(gaps))
    end = table[table["depth"] == at].set_index("activation")
    findings = [
        f"At init the sigmoid error signal shrinks by a factor {fmt(10**-s)} per layer "
        f"(log10 slope {fmt(s)}; mean-field theory predicts {fmt(ps)}, a factor {fmt(10**-ps)}).",
        f"At depth {at}, sigmoid's first/last ratio is 10^{g:.1f} times ReLU-He's.",
        "After training, log10 first/last ratio at depth "
        f"{at}: "
        + ", ".join(f"{a} {fmt(end.loc[a, 'log10_ratio_end'])}" for a, _ in ARMS)
        + "; validation accuracy: "
        + ", ".join(f"{a} {fmt(end.loc[a, 'val_acc'])}" for a, _ in ARMS)
        + ".",
    ]
    return build_verdict(
        checks,
        findings,
        {"sigmoid_log10_slope": s, "predicted_log10_slope": ps, "log10_gap_sigmoid_vs_relu": g},
    )


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    out = []
    for when in ("init", "end"):
        lines, dashed = {}, {}
        for a, i in ARMS:
            sub = table[table["activation"] == a]
            lines[f"{a} ({i})"] = (sub["depth"], sub[f"log10_ratio_{when}"])
            if when == "init":
                dashed[f"{a} ({i}) mean-field"] = (sub["depth"], sub["predicted_log10_ratio_init"])
        title = "at initialisation" if when == "init" else "after training"
        out.append(
            figures.line_chart(
                folder,
                f"ratio_vs_depth_{when}",
                lines,
                dashed=dashed,
                title=f"First/last error-signal ratio {title}",
                xlabel="hidden layers",
                ylabel="log10 ‖δ first‖ / ‖δ last‖",
                hline=0.0,
            )
        )
    deepest = max(r.config["depth"] for r in results)
    profiles = {}
    for a, i in ARMS:
        r = [
            x
            for x in results
            if x.config["activation"] == a and x.config["depth"] == deepest and x.config.seed == 0
        ]
        if r:
            prof = r[0].series["log10_error_init"]
            profiles[f"{a} ({i})"] = (list(range(1, len(prof) + 1)), prof)
    out.append(
        figures.line_chart(
            folder,
            "error_profile_init",
            profiles,
            title=f"Error signal per layer at init, depth {deepest}",
            xlabel="hidden layer",
            ylabel="log10 ‖δ‖",
        )
    )
    return out


EXPERIMENT = Experiment(
    name=NAME,
    title="Depth: the error signal vanishes exponentially",
    question="How does the error signal reaching the first layer scale with depth, for sigmoid "
    "and tanh at PyTorch's default init and ReLU at He init, at initialisation and after training?",
    citation="X. Glorot and Y. Bengio, 'Understanding the difficulty of training deep feedforward "
    "neural networks', AISTATS 2010; mean-field overlay: S. Schoenholz et al., 'Deep information "
    "propagation', ICLR 2017.",
    source="Glorot & Bengio 2010",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 2, 3),
    notes="Width 64, standardised digits, Adam at lr 1e-3. The ratio is the Probe's error_norm "
    "at fc1 over that at the last hidden fc (the output layer excluded); at init it is the first "
    "recorded step, after training the geometric mean over the last quarter of recorded steps. "
    "A ratio below the float32 range is floored at 1e-45.",
)

"""Experiment ``residual``: plain vs residual ReLU nets at equal depth, and the branch scale.

Plain: ``depth`` × (Linear → ReLU), He init. Residual: an input projection and ``depth``
pre-activation blocks x + α·Linear(ReLU(x)), He init, with the branch scaled by
α = 1/√depth (``residual``) or not at all (``residual_unscaled``, α = 1), no normalisation.
At init the signal's growth over the blocks, E‖x_L‖²/‖x_0‖² forward and ‖δ_0‖²/‖δ_L‖²
backward, is measured on a training batch, averaged over 16 fresh nets of the run's
architecture, beside the prediction (1 + α²)^L (the branch
gain is 1: Hanin & Rolnick 2018; Marion et al. 2025): α = 1 blows the signal up by 2^L,
α = 1/√L keeps it below e. Same optimiser and budget; the measure is the training loss and
error on the whole training set (He et al.'s "degradation problem" is about training
error, not generalisation).
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

NAME = "residual"
DEPTHS = {"tiny": (4, 32), "quick": (4, 16, 32, 48), "full": (4, 8, 16, 32, 48, 64)}
STEPS = {"tiny": 150, "quick": 300, "full": 800}
# "Worse with depth": the deepest net's training loss at least this many times the shallowest's.
DEGRADE = 2.0


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, s, arch=a, depth=d, steps=STEPS[mode])
        for s in range(seeds)
        for a in ARCHS
        for d in DEPTHS[mode]
    ]


ARCHS = ("plain", "residual", "residual_unscaled")
GROWTH_KEYS = (
    "growth_predicted",
    "growth_forward",
    "growth_backward",
    "growth_forward_se",
    "growth_backward_se",
)
# The growth at init is the mean over this many independently initialised nets of the
# run's architecture (the theory predicts the mean; one net's log-growth spreads by ~0.5
# decades at α = 1, depth 32, width 64).
GROWTH_NETS = 16
# "Agrees with the prediction": log10 of the mean within 3 standard errors of (1 + α²)^L,
# plus 5 % of the predicted decades and 0.05 for the backward pass, whose top error
# dL/dx_L (cross-entropy through the head) is not independent of the blocks' weights as
# the theory assumes (with an independent top error it agrees within the standard error:
# tests/test_theory_beyond.py).
GROWTH_SES = 3.0
GROWTH_SLACK = (0.05, 0.05)


def block_growth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """‖x_L‖²/‖x_0‖² (``growth_forward``) and ‖δ_0‖²/‖δ_L‖² (``growth_backward``) over
    the residual blocks at ``x`` (the whole batch; δ = dL/dx for the cross-entropy loss),
    by autograd."""
    seen: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        args[0].retain_grad()
        out.retain_grad()
        seen["in"], seen["out"] = args[0], out

    handle = model.blocks.register_forward_hook(keep)
    try:
        nn.functional.cross_entropy(model(x), y).backward()
        x0, xl = seen["in"], seen["out"]
        fwd = float(xl.detach().pow(2).sum() / x0.detach().pow(2).sum())
        bwd = float(x0.grad.pow(2).sum() / xl.grad.pow(2).sum())
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return {"growth_forward": fwd, "growth_backward": bwd}


def growth_over_nets(
    alpha: float, depth: int, x: torch.Tensor, y: torch.Tensor, seed: int, nets: int = GROWTH_NETS
) -> dict[str, float]:
    """log10 of the mean growth over ``nets`` fresh nets (forward and backward) and its
    standard error in log10 (delta method: SE(mean)/(mean·ln 10)). The global RNG is
    restored after, so the run's own training is unchanged."""
    ratios: dict[str, list[float]] = {"growth_forward": [], "growth_backward": []}
    with torch.random.fork_rng(devices=[]):
        for i in range(nets):
            torch.manual_seed(10_000 * (seed + 1) + i)
            model = models.residual_mlp(
                x.shape[1], 10, depth=depth, activation="relu", init="he", scale=alpha
            )
            for k, v in block_growth(model, x, y).items():
                ratios[k].append(v)
    out = {}
    for k, r in ratios.items():
        a = np.asarray(r)
        mean = float(a.mean())
        out[k] = measure.log10(mean)
        out[f"{k}_se"] = float(a.std(ddof=1) / math.sqrt(a.size) / (mean * math.log(10)))
    return out


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = data.digits(seed=0)
    torch.manual_seed(config.seed)
    arch, depth = config["arch"], config["depth"]
    if arch == "plain":
        model = models.mlp(split.in_features, 10, depth=depth, activation="relu", init="he")
    else:
        alpha = 1.0 if arch == "residual_unscaled" else 1.0 / math.sqrt(depth)
        model = models.residual_mlp(
            split.in_features, 10, depth=depth, activation="relu", init="he", scale=alpha
        )
    growth = dict.fromkeys(GROWTH_KEYS, math.nan)
    if arch != "plain":
        growth.update(
            growth_over_nets(alpha, depth, split.x_train[:256], split.y_train[:256], config.seed)
        )
        growth["growth_predicted"] = math.log10(theory.residual_growth(alpha, depth))
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
    metrics.update(growth)
    return RunResult(
        config,
        metrics,
        series={"step": measure.curve(fit, "step"), "train_loss": measure.curve(fit, "train_loss")},
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(
        results,
        ["arch", "depth"],
        [
            "train_loss_full",
            "train_error",
            "val_acc",
            "growth_predicted",
            "growth_forward",
            "growth_backward",
            "growth_forward_se",
            "growth_backward_se",
        ],
    )


def growth_agrees(m: dict[str, float], key: str) -> bool:
    """Measured log10 mean growth within the tolerance of the prediction (see GROWTH_SES)."""
    slack = GROWTH_SLACK[0] * abs(m["growth_predicted"]) + GROWTH_SLACK[1]
    if key == "growth_forward":
        slack = 0.01  # the forward pass has no loss in it: the standard error alone, and rounding
    return abs(m[key] - m["growth_predicted"]) <= GROWTH_SES * m[f"{key}_se"] + slack


def _finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    depths = sorted({r.config["depth"] for r in results})
    lo, hi = depths[0], depths[-1]
    plain_worse, res_holds, res_beats = [], [], []
    growth_ok, unscaled_grows, scaled_bounded, scaled_trains = [], [], [], []
    for _seed, rs in per_seed(results).items():
        g = {
            (a, d): pick(rs, arch=a, depth=d).metrics
            for a in ("residual", "residual_unscaled")
            for d in depths
        }
        growth_ok.append(
            all(
                growth_agrees(m, k)
                for m in g.values()
                for k in ("growth_forward", "growth_backward")
            )
        )
        unscaled_grows.append(
            bool(
                g[("residual_unscaled", hi)]["growth_forward"]
                > g[("residual_unscaled", lo)]["growth_forward"] + 2
            )
        )
        scaled_bounded.append(
            all(g[("residual", d)]["growth_forward"] < math.log10(2 * math.e) for d in depths)
        )
        scaled_trains.append(
            _finite_or_inf(pick(rs, arch="residual", depth=hi).metrics["train_loss_full"])
            < _finite_or_inf(
                pick(rs, arch="residual_unscaled", depth=hi).metrics["train_loss_full"]
            )
        )
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
        Check(
            "at init the residual nets' measured signal growth over the blocks, forward and "
            f"backward (mean of {GROWTH_NETS} nets), is within {GROWTH_SES:g} standard errors of "
            "the predicted (1 + α²)^L at every depth (backward: plus 5% + 0.05 decades, the loss "
            "coupling the top error to the blocks)",
            tuple(growth_ok),
        ),
        Check(
            f"α = 1: the growth at depth {hi} exceeds that at depth {lo} by over 100× (2^L: "
            "exploding with depth)",
            tuple(unscaled_grows),
        ),
        Check("α = 1/√L: the growth stays below 2e at every depth", tuple(scaled_bounded)),
        Check(
            f"at depth {hi} the α = 1/√L net reaches a lower training loss than the α = 1 net",
            tuple(scaled_trains),
        ),
    ]
    t = table.set_index(["arch", "depth"])
    findings = [
        f"{a}: training loss by depth "
        + ", ".join(f"{d}: {fmt(t.loc[(a, d), 'train_loss_full'])}" for d in depths)
        + "; training error "
        + ", ".join(f"{d}: {fmt(t.loc[(a, d), 'train_error'])}" for d in depths)
        + "."
        for a in ARCHS
    ]
    findings += [
        f"{a} (α = {'1' if a == 'residual_unscaled' else '1/√L'}): log10 signal growth over the "
        "blocks at init, predicted / forward / backward, by depth "
        + ", ".join(
            f"{d}: {fmt(t.loc[(a, d), 'growth_predicted'])} / {fmt(t.loc[(a, d), 'growth_forward'])}"
            f" / {fmt(t.loc[(a, d), 'growth_backward'])}"
            for d in depths
        )
        + "."
        for a in ("residual", "residual_unscaled")
    ]
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    lines = {
        a: (table[table["arch"] == a]["depth"], table[table["arch"] == a]["train_loss_full"])
        for a in ARCHS
    }
    res = table[table["arch"] != "plain"]
    growth = {}
    for a in ("residual", "residual_unscaled"):
        sub = res[res["arch"] == a]
        growth[f"{a}: measured"] = (sub["depth"], np.asarray(sub["growth_forward"], dtype=float))
        growth[f"{a}: (1 + α²)^L"] = (
            sub["depth"],
            np.asarray(sub["growth_predicted"], dtype=float),
        )
    return [
        figures.line_chart(
            folder,
            "signal_growth_vs_depth",
            growth,
            title="log10 ‖x_L‖²/‖x_0‖² over the blocks at init: measured and predicted",
            xlabel="depth (blocks)",
            ylabel="log10 growth",
        ),
        figures.line_chart(
            folder,
            "train_loss_vs_depth",
            lines,
            title="Final training loss against depth",
            xlabel="depth (blocks)",
            ylabel="cross-entropy on the training set",
            logy=True,
        ),
    ]


EXPERIMENT = Experiment(
    name=NAME,
    title="Residual connections: depth without degradation",
    question="At equal depth and budget, does the training error of a plain ReLU net get worse as it "
    "gets deeper while a residual net's does not?",
    citation="K. He, X. Zhang, S. Ren, J. Sun, 'Deep residual learning for image recognition', CVPR "
    "2016; 'Identity mappings in deep residual networks' (pre-activation blocks), ECCV 2016; B. "
    "Hanin, D. Rolnick, 'How to start training: the effect of initialization and architecture', "
    "NeurIPS 2018; P. Marion et al., 'Scaling ResNets in the large-depth regime', JMLR 2025.",
    source="He et al. 2016",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes="Width 64, He init, SGD + momentum 0.9 at lr 0.01, batch 64. The residual branch is scaled "
    "by 1/√depth (residual) or 1 (residual_unscaled); there is no normalisation in any net. The "
    "growth at init is measured on 256 training images.",
)

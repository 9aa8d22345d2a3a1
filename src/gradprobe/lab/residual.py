"""Experiment ``residual``: plain vs residual ReLU nets at equal depth, and the branch scale.

Plain: ``depth`` × (Linear → ReLU), He init. Residual: an input projection and ``depth``
pre-activation blocks x + α·Linear(ReLU(x)), He init, with the branch scaled by
α = 1/√depth (``residual``) or not at all (``residual_unscaled``, α = 1), no normalisation.
At init the signal's growth over the blocks, E‖x_L‖²/‖x_0‖² forward and ‖δ_0‖²/‖δ_L‖²
backward, is measured on a training batch beside the prediction (1 + α²)^L (the branch
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
    "growth_forward_noise",
    "growth_backward_noise",
)
# "Agrees with the prediction": measured growth within this many standard deviations of
# (1 + α²)^L, the standard deviation of one net's log-growth estimated from its own blocks
# (the L per-block factors fluctuate independently: sd = √L · sd of one block's log10).
GROWTH_SDS = 3.0


def block_growth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """log10 of ‖x_L‖²/‖x_0‖² (``growth_forward``) and ‖δ_0‖²/‖δ_L‖² (``growth_backward``)
    over the residual blocks at ``x`` (the whole batch; δ = dL/dx for the cross-entropy
    loss), by autograd, and the standard deviation of each (``*_noise``) from the spread of the
    blocks' own factors."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        args[0].retain_grad()
        out.retain_grad()
        seen.append((args[0], out))

    handles = [b.register_forward_hook(keep) for b in model.blocks]
    try:
        nn.functional.cross_entropy(model(x), y).backward()
        fwd = [float(o.detach().pow(2).sum() / i.detach().pow(2).sum()) for i, o in seen]
        bwd = [float(i.grad.pow(2).sum() / o.grad.pow(2).sum()) for i, o in seen]
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    out = {}
    for name, ratios in (("growth_forward", fwd), ("growth_backward", bwd)):
        logs = np.log10(np.asarray(ratios))
        out[name] = float(logs.sum())
        out[f"{name}_noise"] = (
            float(logs.std(ddof=1) * math.sqrt(len(logs))) if len(logs) > 1 else 0.0
        )
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
        growth.update(block_growth(model, split.x_train[:256], split.y_train[:256]))
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
            "growth_forward_noise",
            "growth_backward_noise",
        ],
    )


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
                abs(m[k] - m["growth_predicted"]) <= GROWTH_SDS * m[f"{k}_noise"] + 0.05
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
            f"backward, is within {GROWTH_SDS:g} standard deviations (estimated from the net's own "
            "blocks) of the predicted (1 + α²)^L at every depth",
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

"""Experiment ``normalization``: none vs BatchNorm vs LayerNorm in a deep sigmoid/tanh MLP,
and raw vs standardised inputs (docs/concepts.md §5).

Part ``norm``: 20 hidden layers at PyTorch's default init, normalisation between each
Linear and its activation, SGD + momentum. Part ``input``: a 3-layer tanh MLP (Xavier) on
raw digit pixels (0–16) against the same pixels standardised with the training mean/std.
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

NAME = "normalization"
NORM_ACTS = {"tiny": ("sigmoid",), "quick": ("sigmoid", "tanh"), "full": ("sigmoid", "tanh")}
NORMS = ("none", "batch", "layer")
NORM_DEPTH = {"tiny": 12, "quick": 20, "full": 20}
STEPS = {"tiny": 150, "quick": 300, "full": 800}
INPUT_DEPTH = 3


def grid(mode: str, seeds: int) -> list[RunConfig]:
    configs = []
    for s in range(seeds):
        for a in NORM_ACTS[mode]:
            for n in NORMS:
                configs.append(
                    RunConfig.make(
                        NAME,
                        s,
                        part="norm",
                        activation=a,
                        norm=n,
                        inputs="standardized",
                        depth=NORM_DEPTH[mode],
                        steps=STEPS[mode],
                    )
                )
        for inputs in ("standardized", "raw"):
            configs.append(
                RunConfig.make(
                    NAME,
                    s,
                    part="input",
                    activation="tanh",
                    norm="none",
                    inputs=inputs,
                    depth=INPUT_DEPTH,
                    steps=STEPS[mode],
                )
            )
    return configs


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = data.digits(seed=0, standardize=config["inputs"] == "standardized")
    torch.manual_seed(config.seed)
    if config["part"] == "norm":
        model = models.mlp(
            split.in_features,
            10,
            depth=config["depth"],
            activation=config["activation"],
            norm=None if config["norm"] == "none" else config["norm"],
        )
        kwargs = {"optimizer": "momentum", "lr": 0.05}
    else:
        model = models.mlp(
            split.in_features,
            10,
            depth=config["depth"],
            activation=config["activation"],
            init="xavier_normal",
        )
        kwargs = {"optimizer": "sgd", "lr": 0.5}
    fit = measure.fit_run(config, model, split, store, steps=config["steps"], **kwargs)
    fcs, acts = measure.layers(fit.run, "fc"), measure.layers(fit.run, "act")
    return RunResult(
        config,
        {
            "train_loss": fit.final.get("train_loss", math.nan),
            "val_loss": fit.final.get("val_loss", math.nan),
            "val_acc": fit.final.get("val_acc", math.nan),
            "log10_ratio_init": measure.log10(measure.first_last_ratio(fit.run, fcs, "init")),
            "sat_frac": measure.layer_mean(fit.run, "sat_frac", acts),
            "sat_frac_first": measure.layer_mean(fit.run, "sat_frac", acts[:1]),
        },
        series={"step": measure.curve(fit, "step"), "train_loss": measure.curve(fit, "train_loss")},
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(
        results,
        ["part", "activation", "norm", "inputs"],
        ["train_loss", "val_acc", "log10_ratio_init", "sat_frac", "sat_frac_first"],
    )


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    acts = list(
        dict.fromkeys(r.config["activation"] for r in results if r.config["part"] == "norm")
    )
    bn, ln, std_better, std_unsat = [], [], [], []
    for _seed, rs in per_seed(results).items():
        loss = {
            (a, n): pick(rs, part="norm", activation=a, norm=n).metrics["train_loss"]
            for a in acts
            for n in NORMS
        }
        bn.append(all(loss[(a, "batch")] < 0.5 * loss[(a, "none")] for a in acts))
        ln.append(all(loss[(a, "layer")] < 0.5 * loss[(a, "none")] for a in acts))
        s, r = pick(rs, part="input", inputs="standardized"), pick(rs, part="input", inputs="raw")
        std_better.append(bool(s.metrics["val_loss"] < r.metrics["val_loss"]))
        std_unsat.append(bool(s.metrics["sat_frac_first"] < r.metrics["sat_frac_first"]))
    checks = [
        Check("BatchNorm at least halves the final training loss of the deep net", tuple(bn)),
        Check("LayerNorm at least halves the final training loss of the deep net", tuple(ln)),
        Check(
            "standardised inputs reach a lower validation loss than raw pixels", tuple(std_better)
        ),
        Check(
            "standardised inputs saturate fewer first-layer tanh units than raw pixels",
            tuple(std_unsat),
        ),
    ]
    findings = []
    norm = table[table["part"] == "norm"]
    for a in acts:
        sub = norm[norm["activation"] == a].set_index("norm")
        findings.append(
            f"{a}, {int(norm['seeds'].iloc[0])} seed(s): final training loss "
            + ", ".join(f"{n} {fmt(sub.loc[n, 'train_loss'])}" for n in NORMS)
            + "; validation accuracy "
            + ", ".join(f"{n} {fmt(sub.loc[n, 'val_acc'])}" for n in NORMS)
            + "."
        )
    inp = table[table["part"] == "input"].set_index("inputs")
    findings.append(
        "tanh inputs: first-layer saturated fraction "
        f"{fmt(inp.loc['standardized', 'sat_frac_first'])} standardised vs {fmt(inp.loc['raw', 'sat_frac_first'])} raw; "
        f"validation accuracy {fmt(inp.loc['standardized', 'val_acc'])} vs {fmt(inp.loc['raw', 'val_acc'])}."
    )
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    first = [r for r in results if r.config.seed == 0]
    lines = {
        f"{r.config['activation']} {r.config['norm']}": (r.series["step"], r.series["train_loss"])
        for r in first
        if r.config["part"] == "norm"
    }
    inputs = {
        r.config["inputs"]: (r.series["step"], r.series["train_loss"])
        for r in first
        if r.config["part"] == "input"
    }
    return [
        figures.line_chart(
            folder,
            "norm_curves",
            lines,
            title="Deep net: training loss by normalisation",
            xlabel="step",
            ylabel="cross-entropy",
            logy=True,
        ),
        figures.line_chart(
            folder,
            "input_curves",
            inputs,
            title="3-layer tanh: raw vs standardised inputs",
            xlabel="step",
            ylabel="cross-entropy",
            logy=True,
        ),
    ]


EXPERIMENT = Experiment(
    name=NAME,
    title="Normalisation: BatchNorm, LayerNorm, standardised inputs",
    question="Does normalising each layer's pre-activations (BatchNorm, LayerNorm) let a deep "
    "sigmoid/tanh net train at PyTorch's default init, and do standardised inputs keep tanh out of "
    "saturation?",
    citation="S. Ioffe and C. Szegedy, 'Batch normalization: accelerating deep network training by "
    "reducing internal covariate shift', ICML 2015; J. L. Ba, J. R. Kiros, G. E. Hinton, 'Layer "
    "normalization', 2016; Y. LeCun, L. Bottou, G. Orr, K.-R. Müller, 'Efficient BackProp', 1998 "
    "(standardised inputs).",
    source="Ioffe & Szegedy 2015; Ba et al. 2016",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes="Deep part: width 64, SGD + momentum 0.9 at lr 0.05. Input part: SGD at lr 0.5.",
)

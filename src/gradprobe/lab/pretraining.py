"""Experiment ``pretraining``: greedy layer-wise autoencoder pre-training, then fine-tuning,
against random init, in a deep sigmoid net with little labelled data.

Every hidden layer is pre-trained in turn, bottom up, as the encoder of a one-layer
autoencoder (sigmoid encoder, linear decoder, squared error) reconstructing the output of
the layers below it, on all training images *without* their labels; then the whole net is
fine-tuned on only ``n_labelled`` labelled images. The random-init arm gets the same
fine-tuning. Both fine-tune with SGD + momentum, the optimiser of the time.
"""

from __future__ import annotations

import math
from pathlib import Path

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

NAME = "pretraining"
DEPTH = {"tiny": 4, "quick": 5, "full": 5}
STEPS = {"tiny": 200, "quick": 300, "full": 1000}
PRETRAIN_STEPS = {"tiny": 150, "quick": 200, "full": 600}
N_LABELLED = {"tiny": 100, "quick": 100, "full": 100}
WIDTH = 64


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(
            NAME,
            s,
            init=i,
            depth=DEPTH[mode],
            steps=STEPS[mode],
            pretrain_steps=PRETRAIN_STEPS[mode],
            n_labelled=N_LABELLED[mode],
        )
        for s in range(seeds)
        for i in ("random", "pretrained")
    ]


def pretrain_greedy(
    model: nn.Sequential,
    x: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Greedy layer-wise autoencoder pre-training of ``model``'s hidden ``fc``/``act`` pairs on
    unlabelled ``x``, in place; returns each layer's final reconstruction error."""
    g = torch.Generator().manual_seed(seed)
    fcs = [(n, m) for n, m in model.named_children() if n.startswith("fc")]
    errors = []
    h = x
    for name, fc in fcs:
        act = getattr(model, "act" + name[2:])
        decoder = nn.Linear(fc.out_features, fc.in_features)
        opt = torch.optim.Adam([*fc.parameters(), *decoder.parameters()], lr=lr)
        loss = torch.tensor(math.nan)
        for _ in range(steps):
            idx = torch.randint(0, len(h), (min(batch_size, len(h)),), generator=g)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(decoder(act(fc(h[idx]))), h[idx])
            loss.backward()
            opt.step()
        errors.append(float(loss.detach()))
        with torch.no_grad():
            h = act(fc(h))  # the next layer learns to reconstruct this layer's code
    return errors


def run(config: RunConfig, store: Path | None) -> RunResult:
    full = data.digits(seed=0)
    split = data.digits(seed=0, n_train=config["n_labelled"])
    torch.manual_seed(config.seed)
    model = models.mlp(
        split.in_features, 10, depth=config["depth"], width=WIDTH, activation="sigmoid"
    )
    recon = (
        pretrain_greedy(model, full.x_train, steps=config["pretrain_steps"], seed=config.seed)
        if config["init"] == "pretrained"
        else []
    )
    fit = measure.fit_run(
        config, model, split, store, steps=config["steps"], optimizer="momentum", lr=0.05
    )
    fcs = measure.layers(fit.run, "fc")
    return RunResult(
        config,
        {
            "val_acc": fit.final.get("val_acc", math.nan),
            "val_loss": fit.final.get("val_loss", math.nan),
            "train_loss": fit.final.get("train_loss", math.nan),
            "log10_ratio_init": measure.log10(measure.first_last_ratio(fit.run, fcs, "init")),
            "recon_error_last": recon[-1] if recon else math.nan,
        },
        series={"step": measure.curve(fit, "step"), "val_acc": measure.curve(fit, "val_acc")},
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(
        results,
        ["init", "depth", "n_labelled"],
        ["val_acc", "val_loss", "train_loss", "log10_ratio_init"],
    )


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    better = []
    gaps = []
    for _seed, rs in per_seed(results).items():
        p, r = pick(rs, init="pretrained").metrics, pick(rs, init="random").metrics
        better.append(bool(p["val_acc"] > r["val_acc"]))
        gaps.append(p["val_acc"] - r["val_acc"])
    t = table.set_index("init")
    checks = [
        Check(
            "pre-training then fine-tuning beats random init on validation accuracy", tuple(better)
        )
    ]
    findings = [
        f"Validation accuracy with {int(t['n_labelled'].iloc[0])} labelled images: pre-trained "
        f"{fmt(t.loc['pretrained', 'val_acc'])} ± {fmt(t.loc['pretrained', 'val_acc_sd'])}, random "
        f"{fmt(t.loc['random', 'val_acc'])} ± {fmt(t.loc['random', 'val_acc_sd'])} "
        f"(mean gain {fmt(sum(gaps) / len(gaps))}).",
        f"log10 first/last error ratio when fine-tuning starts: pre-trained {fmt(t.loc['pretrained', 'log10_ratio_init'])}, "
        f"random {fmt(t.loc['random', 'log10_ratio_init'])}.",
    ]
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    lines = {
        r.config["init"]: (r.series["step"], r.series["val_acc"])
        for r in results
        if r.config.seed == 0
    }
    return [
        figures.line_chart(
            folder,
            "finetune_curves",
            lines,
            title="Fine-tuning on few labels: validation accuracy",
            xlabel="step",
            ylabel="accuracy",
        )
    ]


EXPERIMENT = Experiment(
    name=NAME,
    title="Unsupervised pre-training, then fine-tuning",
    question="With only 100 labelled digits, does greedy layer-wise autoencoder pre-training (on the "
    "unlabelled images) give a deep sigmoid net a better start than random init?",
    citation="G. E. Hinton, S. Osindero, Y.-W. Teh, 'A fast learning algorithm for deep belief nets', "
    "Neural Computation 2006; Y. Bengio, P. Lamblin, D. Popovici, H. Larochelle, 'Greedy layer-wise "
    "training of deep networks', NIPS 2007.",
    source="Hinton et al. 2006; Bengio et al. 2007",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 2, 3),
    notes="Width 64, PyTorch default init before pre-training; autoencoders trained with Adam at lr "
    "1e-2; fine-tuning with SGD + momentum 0.9 at lr 0.05, batch 64.",
)

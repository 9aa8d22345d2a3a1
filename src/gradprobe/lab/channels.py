"""Experiment ``channels``: per-channel statistics of a CNN on digit images ``[N, 1, 8, 8]``.

A 3-layer CNN (16 channels, 3×3 convolutions, ReLU, He init) with and without
BatchNorm2d, with zero biases and with every bias at −3 (a set-up that kills channels).
After training, on the validation images: each channel's pre-activation mean and standard
deviation (over samples and positions), and the dead channels — ReLU channels that are
zero at every position of every image (docs/concepts.md §6). The Probe's ``dead_window_frac``
(per channel for conv outputs) is reported beside it.
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

NAME = "channels"
CHANNELS = 16
DEPTH = 3
BIASES = {"zero": None, "negative": -3.0}
STEPS = {"tiny": 100, "quick": 250, "full": 800}


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, s, batchnorm=bn, bias=b, steps=STEPS[mode])
        for s in range(seeds)
        for b in BIASES
        for bn in (False, True)
    ]


@torch.no_grad()
def channel_stats(model: nn.Sequential, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per layer and channel, on ``x`` in eval mode: pre-activation mean and std (the input
    of each ReLU, i.e. after BatchNorm when there is one) and whether the ReLU output is
    zero everywhere. Arrays are ``[layers, channels]``."""
    pre: list[torch.Tensor] = []
    post: list[torch.Tensor] = []

    def keep(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        # Returns None: a forward hook that returns a value would replace the output.
        pre.append(args[0])
        post.append(out)

    handles = [
        m.register_forward_hook(keep) for n, m in model.named_children() if n.startswith("act")
    ]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    dims = (0, 2, 3)
    return {
        "mean": torch.stack([z.mean(dim=dims) for z in pre]).numpy(),
        "std": torch.stack([z.std(dim=dims) for z in pre]).numpy(),
        "dead": torch.stack([(y == 0).all(dim=0).all(dim=-1).all(dim=-1) for y in post]).numpy(),
    }


def _summary(stats: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        "dead_channels": float(stats["dead"].mean()),
        # Spread across channels, averaged over layers: how unequal the channels are.
        "mean_spread": float(stats["mean"].std(axis=1).mean()),
        # How far each channel is from standardised: |mean| in units of its own std.
        "offset": float((np.abs(stats["mean"]) / np.maximum(stats["std"], 1e-12)).mean()),
        "log10_std_spread": float(np.log10(np.maximum(stats["std"], 1e-12)).std(axis=1).mean()),
    }


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = data.digits(seed=0, images=True)
    torch.manual_seed(config.seed)
    model = models.cnn(
        channels=CHANNELS,
        depth=DEPTH,
        batchnorm=config["batchnorm"],
        init="he",
        bias=BIASES[config["bias"]],
    )
    at_init = _summary(channel_stats(model, split.x_val))
    fit = measure.fit_run(
        config, model, split, store, steps=config["steps"], optimizer="adam", lr=1e-3
    )
    stats = channel_stats(model, split.x_val)
    end = _summary(stats)
    acts = measure.layers(fit.run, "act")
    return RunResult(
        config,
        {
            "dead_channels_init": at_init["dead_channels"],
            "dead_channels": end["dead_channels"],
            "probe_dead_window": measure.layer_mean(fit.run, "dead_window_frac", acts, last=0.1),
            "offset": end["offset"],
            "mean_spread": end["mean_spread"],
            "log10_std_spread": end["log10_std_spread"],
            "val_acc": fit.final.get("val_acc", math.nan),
        },
        series={
            "layer2_mean": [float(v) for v in stats["mean"][min(1, DEPTH - 1)]],
            "layer2_std": [float(v) for v in stats["std"][min(1, DEPTH - 1)]],
        },
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(
        results,
        ["bias", "batchnorm"],
        [
            "dead_channels_init",
            "dead_channels",
            "probe_dead_window",
            "offset",
            "mean_spread",
            "log10_std_spread",
            "val_acc",
        ],
    )


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    even, rescued, killed = [], [], []
    for _seed, rs in per_seed(results).items():
        m = {
            (b, bn): pick(rs, bias=b, batchnorm=bn).metrics for b in BIASES for bn in (False, True)
        }
        even.append(all(m[(b, True)]["offset"] < m[(b, False)]["offset"] for b in BIASES))
        killed.append(bool(m[("negative", False)]["dead_channels"] > 0))
        rescued.append(bool(m[("negative", True)]["dead_channels"] == 0))
    checks = [
        Check(
            "BatchNorm keeps each channel's pre-activation closer to standardised (smaller |mean|/std)",
            tuple(even),
        ),
        Check("without BatchNorm a −3 bias leaves dead channels after training", tuple(killed)),
        Check("with BatchNorm the same bias leaves no dead channel", tuple(rescued)),
    ]
    t = table.set_index(["bias", "batchnorm"])
    findings = [
        f"bias {b}: dead channels without/with BatchNorm {fmt(t.loc[(b, False), 'dead_channels'])} / "
        f"{fmt(t.loc[(b, True), 'dead_channels'])} (at init {fmt(t.loc[(b, False), 'dead_channels_init'])} / "
        f"{fmt(t.loc[(b, True), 'dead_channels_init'])}); mean |channel mean|/std "
        f"{fmt(t.loc[(b, False), 'offset'])} / {fmt(t.loc[(b, True), 'offset'])}; spread of channel means "
        f"{fmt(t.loc[(b, False), 'mean_spread'])} / {fmt(t.loc[(b, True), 'mean_spread'])}; validation accuracy "
        f"{fmt(t.loc[(b, False), 'val_acc'])} / {fmt(t.loc[(b, True), 'val_acc'])}."
        for b in BIASES
    ]
    return build_verdict(checks, findings)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    first = [r for r in results if r.config.seed == 0]
    labels = [str(c) for c in range(1, CHANNELS + 1)]
    means = {
        f"bias {r.config['bias']}, BN {r.config['batchnorm']}": r.series["layer2_mean"]
        for r in first
    }
    stds = {
        f"bias {r.config['bias']}, BN {r.config['batchnorm']}": r.series["layer2_std"]
        for r in first
    }
    return [
        figures.bar_chart(
            folder,
            "channel_means",
            labels,
            means,
            title="Layer 2: pre-activation mean per channel",
            ylabel="mean",
        ),
        figures.bar_chart(
            folder,
            "channel_stds",
            labels,
            stds,
            title="Layer 2: pre-activation std per channel",
            ylabel="std",
        ),
    ]


EXPERIMENT = Experiment(
    name=NAME,
    title="Channels: per-channel statistics and dead channels in a CNN",
    question="In a small CNN on 8×8 digit images, how unequal are the channels' statistics, when do "
    "ReLU channels die, and what does BatchNorm do to each channel?",
    citation="S. Ioffe and C. Szegedy, 'Batch normalization', ICML 2015 (§3.2: per-channel "
    "normalisation for convolutional layers); docs/concepts.md §6.",
    source="Ioffe & Szegedy 2015",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes="Adam at lr 1e-3, batch 64; statistics on the 539 validation images in eval mode.",
)

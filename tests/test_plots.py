"""Plots: drawn from a run's frame only, with what they show checked against the frame."""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from _diagnose_cases import _digits_run, case
from gradprobe import GradprobeError
from gradprobe.lab.models import mlp
from gradprobe.plots import (
    PLOTS,
    activation_histograms,
    error_heatmap,
    gradient_flow,
    missing,
    update_ratios,
)
from gradprobe.report import _colour_mesh


@functools.cache
def full_run():
    torch.manual_seed(0)
    return _digits_run(mlp(64, 10, depth=6, width=32, activation="sigmoid"), stats="full", steps=8)


@functools.cache
def cheap_run():
    torch.manual_seed(0)
    return _digits_run(mlp(64, 10, depth=6, width=32, activation="relu"), stats="cheap", steps=4)


@functools.cache
def fitted_run():
    """Every statistic and the loss: trained by the lab's fit, which logs each step's loss."""
    from gradprobe.lab.data import digits
    from gradprobe.lab.training import fit

    torch.manual_seed(0)
    model = mlp(64, 10, depth=6, width=32, activation="sigmoid")
    return fit(model, digits(seed=0), steps=8, probe={"stats": "full", "every": 1}).run


def _run_for(name: str):
    # The loss figure needs a logged loss, which _digits_run's loop does not log.
    return fitted_run() if name == "loss" else full_run()


@pytest.mark.parametrize("name", list(PLOTS))
def test_every_plot_draws_on_a_full_run(name: str) -> None:
    run = _run_for(name)
    assert missing(name, run) is None
    fig = PLOTS[name].fn(run)
    assert fig.axes and fig.axes[0].has_data()
    plt.close(fig)


@pytest.mark.parametrize("name", list(PLOTS))
def test_every_plot_uses_a_given_axes(name: str) -> None:
    fig, ax = plt.subplots()
    assert PLOTS[name].fn(_run_for(name), ax=ax) is fig
    assert ax.has_data()
    plt.close(fig)


def test_gradient_flow_lines_are_the_recorded_error_norms() -> None:
    run = full_run()
    fig = gradient_flow(run, steps=[0, 7])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    err = run.table("error_norm")
    layers = [f"fc{i}" for i in range(1, 7)] + ["out"]  # layers with weights, input first
    solid = [
        line for line in ax.get_lines() if line.get_linestyle() == "-" and len(line.get_ydata()) > 1
    ]
    np.testing.assert_allclose(solid[0].get_ydata(), err.loc[0, layers].to_numpy())
    np.testing.assert_allclose(solid[1].get_ydata(), err.loc[7, layers].to_numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == layers
    plt.close(fig)


def test_heatmap_is_log10_of_the_error_table() -> None:
    run = full_run()
    fig = error_heatmap(run)
    mesh = _colour_mesh(fig.axes[0])
    layers = [f"fc{i}" for i in range(1, 7)] + ["out"]
    expected = np.log10(run.table("error_norm")[layers].to_numpy().T)
    # Every step recorded: one column per step, in order, none blank.
    np.testing.assert_allclose(np.ma.getdata(mesh.get_array()), expected)
    plt.close(fig)


def test_histogram_bands_sum_to_the_recorded_counts() -> None:
    run = full_run()
    fig = activation_histograms(run, layers=["act1"])
    band = np.ma.getdata(_colour_mesh(fig.axes[0]).get_array())  # every step: no blank column
    bins = run.meta["probe"]["histogram_bins"]
    assert band.shape == (bins, len(run.steps))
    frame = run.frame()
    counts = (
        frame[(frame["name"] == "act1") & frame["stat"].str.startswith("hist_")]
        .pivot_table(index="stat", columns="step", values="value")
        .to_numpy()
    )
    np.testing.assert_allclose(band, np.log1p(100 * counts / counts.sum(axis=0))[::-1])
    plt.close(fig)


def test_missing_statistics_skip_with_a_note() -> None:
    run = cheap_run()
    note = missing("activation_histograms", run)
    assert note is not None and "stats='full'" in note
    assert missing("dead_saturated", run) is not None
    assert missing("gradient_flow", run) is None
    with pytest.raises(GradprobeError, match="not drawn"):
        activation_histograms(run)
    plt.close(update_ratios(run))


def test_update_ratios_draws_one_line_per_weight() -> None:
    run = case("sigmoid30")
    fig = update_ratios(run)
    weights = [p["name"] for p in run.meta["parameters"] if len(p["shape"]) >= 2]
    lines = [
        ln
        for ln in fig.axes[0].get_lines()
        if len(ln.get_xdata()) == len(run.steps) and ln.get_gid() is None  # not edge marks
    ]
    assert len(lines) == len(weights)
    plt.close(fig)


def test_plots_never_touch_hooks_or_models() -> None:
    package = Path(__file__).resolve().parents[1] / "src/gradprobe/plots"  # one module per family
    sources = sorted(package.glob("*.py"))
    assert len(sources) > 1
    for path in sources:
        source = path.read_text()
        for word in ("import torch", "from ..probe", "from ..hooks", "register_"):
            assert word not in source, (path.name, word)


def test_clipping_plot_shows_both_norms_and_the_clipped_fraction() -> None:
    from gradprobe import Probe, plots

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with Probe(model, opt) as probe:
        for step in range(6):
            opt.zero_grad()
            (50 * model(torch.randn(16, 4))).pow(2).sum().backward()
            if step % 2 == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        run = probe.run()
    fig = plots.clipping(run)
    ax = fig.axes[0]
    pre, post = (line.get_ydata() for line in ax.get_lines()[:2])
    assert len(pre) == len(post) == 6
    assert all(p > q for p, q in zip(pre[::2], post[::2]))  # clipped steps part
    assert list(pre[1::2]) == list(post[1::2])  # the others coincide
    assert "clipped at 50% of steps" in ax.get_title(loc="left")

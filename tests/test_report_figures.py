"""The report as a practitioner reads it: every caption true of its figure, nothing hidden.

Figures are read back from the matplotlib objects the report draws (limits, colour
limits, markers, tick labels) and compared with numbers computed here from the run's
frame; pages are read as HTML.
"""

from __future__ import annotations

import functools
import html
import importlib
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from _diagnose_cases import case, linear_modules, profile_rows, synthetic_run
from gradprobe import GradprobeError, Probe, diagnose, report
from gradprobe.diagnose import Finding, Findings, findings_html
from gradprobe.plots import PLOTS, activation_histograms, gradient_flow, update_ratios
from gradprobe.report import axes_facts, inline_code, report_figure
from gradprobe.run import Run
from gradprobe.stats import MODEL_NAME

# The module, not the function of the same name that the package exports.
report_module = importlib.import_module("gradprobe.report")
torch.set_num_threads(1)


@functools.cache
def tanh_run(label: str, clip_at: float, frozen: bool = False, scale: float = 1.0) -> Run:
    """A small tanh MLP, every statistic, 8 steps of SGD with clip_grad_norm_(clip_at).

    ``frozen``: the middle Linear has learning rate 0, so its update is exactly 0.
    ``scale`` multiplies the inputs: runs with different gradient norms.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    moving = list(model[0].parameters()) + list(model[4].parameters())
    groups = [{"params": moving, "lr": 0.05}]
    groups.append({"params": list(model[2].parameters()), "lr": 0.0 if frozen else 0.05})
    opt = torch.optim.SGD(groups)
    x, y = scale * torch.randn(64, 8), torch.randint(0, 3, (64,))
    with Probe(model, opt, stats="full", label=label) as probe:
        for step in range(8):
            batch = slice(8 * step, 8 * step + 8)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            probe.log(loss=loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_at)
            opt.step()
        return probe.run()


def clipped_run() -> Run:
    return tanh_run("clipped", 0.05, scale=20.0)


def unclipped_run() -> Run:
    return tanh_run("unclipped", 1e9)


# ---------------------------------------------------------------- findings text
def test_inline_code_escapes_first_then_renders_backtick_spans() -> None:
    assert inline_code("layer `fc1` & `a<b>`") == (
        "layer <code>fc1</code> &amp; <code>a&lt;b&gt;</code>"
    )
    # Markup outside backticks stays text; a lone backtick stays a backtick.
    assert inline_code("<b>x</b> costs `1") == "&lt;b&gt;x&lt;/b&gt; costs `1"
    assert inline_code('`"q"`') == "<code>&quot;q&quot;</code>"


def test_findings_show_quoted_names_as_code_and_no_backticks() -> None:
    found = diagnose(case("sigmoid30"))
    assert any("`" in f.summary for f in found)  # the diagnosis quotes names
    page = findings_html(found)
    for f in found:
        for name in re.findall(r"`([^`]+)`", f.summary):
            assert f"<code>{html.escape(name)}</code>" in page
    assert "`" not in page


def test_hostile_text_in_backticks_is_escaped() -> None:
    finding = Finding("stalled", "warning", ("x",), "layer `<img src=x>` & more", {}, ())
    page = findings_html(Findings([finding]))
    assert "<code>&lt;img src=x&gt;</code> &amp; more" in page
    assert "<img" not in page


# ---------------------------------------------------------------- captions vs figures
def _panels(figure) -> list:
    """The panels of a report figure: its visible axes that are not colour bars nor the
    right-hand axes (twins) of a panel."""
    panels: list = []
    for ax in figure.axes:
        if not ax.get_visible() or ax.get_label() == "<colorbar>" or not ax.has_data():
            continue
        if any(ax in p.get_shared_x_axes().get_siblings(p) for p in panels):
            continue  # a twin: it shares x with a panel already listed
        panels.append(ax)
    return panels


def _right_axes(figure) -> list:
    """The right-hand axes (ax.twinx()) of the panels, in panel order."""
    return [
        twin
        for p in _panels(figure)
        for twin in p.get_shared_x_axes().get_siblings(p)
        if twin is not p
    ]


@pytest.mark.parametrize("name", list(PLOTS))
def test_every_caption_claim_about_axes_holds_for_its_figure(name: str) -> None:
    # Two runs whose numbers differ by orders of magnitude: sharing must be by construction.
    runs = [clipped_run(), tanh_run("frozen", 1e9, frozen=True)]
    drawn = report_figure(name, runs)
    assert drawn.figure is not None, drawn.sentence
    panels = _panels(drawn.figure)
    assert len(panels) == 2
    if "share their y axis" in drawn.caption:
        assert panels[0].get_ylim() == pytest.approx(panels[1].get_ylim(), rel=1e-12)
    if "one colour scale" in drawn.caption:
        clims = [ax.get_images()[0].get_clim() for ax in panels]
        assert clims[0] == pytest.approx(clims[1], rel=1e-12)
    if "own colour scale" in drawn.caption:
        clims = [ax.get_images()[0].get_clim() for ax in panels]
        assert clims[0] != pytest.approx(clims[1], rel=1e-6)
    if "right axes share one scale" in drawn.caption:
        right = _right_axes(drawn.figure)
        assert len(right) == 2
        assert right[0].get_ylim() == pytest.approx(right[1].get_ylim(), rel=1e-12)
    if "right axis has its own scale" in drawn.caption:
        right = _right_axes(drawn.figure)
        assert right[0].get_ylim() != pytest.approx(right[1].get_ylim(), rel=1e-6)
    assert "share their axes" not in drawn.caption  # the old, unqualified claim
    plt.close(drawn.figure)


def test_axes_facts_reads_sharing_from_the_figure_not_from_intent() -> None:
    fig, (a, b) = plt.subplots(1, 2)
    a.plot([0, 1], [0.3, 0.7])
    b.plot([0, 1], [2, 40])
    assert "share" not in axes_facts([a, b])
    assert "own y axis" in axes_facts([a, b])
    plt.close(fig)
    fig, (a, b) = plt.subplots(1, 2, sharey=True)
    a.plot([0, 1], [0.3, 0.7])
    b.plot([0, 1], [2, 40])
    assert axes_facts([a, b]) == "panels share their y axis"
    plt.close(fig)


def test_error_heatmap_panels_each_span_their_own_run() -> None:
    runs = [clipped_run(), unclipped_run()]
    drawn = report_figure("error_heatmap", runs)
    panels = _panels(drawn.figure)
    assert "each panel has its own colour scale" in drawn.caption
    for ax, run in zip(panels, runs):
        logs = np.log10(run.table("error_norm").to_numpy(dtype=float))
        logs = logs[np.isfinite(logs)]
        assert ax.get_images()[0].get_clim() == pytest.approx((logs.min(), logs.max()))
    # A colour bar per panel.
    bars = [ax for ax in drawn.figure.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == len(panels)
    plt.close(drawn.figure)


def test_activation_histograms_have_a_colour_bar_in_shares() -> None:
    fig = activation_histograms(unclipped_run())
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1
    assert "share" in bars[0].get_ylabel()
    assert [t.get_text() for t in bars[0].get_yticklabels()] == ["0", "1%", "10%", "100%"]
    plt.close(fig)


# ---------------------------------------------------------------- clipping
def test_nothing_clipped_gives_a_sentence_with_the_norms_instead_of_a_figure() -> None:
    run = unclipped_run()
    drawn = report_figure("clipping", [run])
    assert drawn.figure is None
    assert drawn.sentence is not None and drawn.sentence.startswith("Nothing was clipped")
    pre = run.model_series("global_grad_norm_preclip")
    assert f"{pre.min():.3g}–{pre.max():.3g}" in drawn.sentence
    # One run that clipped is enough for the figure: the other panel is the comparison.
    both = report_figure("clipping", [clipped_run(), run])
    assert both.figure is not None and both.sentence is None
    assert len(_panels(both.figure)) == 2
    plt.close(both.figure)


def test_clipped_run_really_clipped() -> None:
    # The premise of the tests above, checked on the frame itself.
    frame = clipped_run().frame()
    clipped = frame[(frame["name"] == MODEL_NAME) & (frame["stat"] == "clipped")]["value"]
    assert clipped.sum() > 0
    frame = unclipped_run().frame()
    clipped = frame[(frame["name"] == MODEL_NAME) & (frame["stat"] == "clipped")]["value"]
    assert clipped.sum() == 0


# ---------------------------------------------------------------- update ratios
def test_zero_updates_are_marked_on_the_bottom_edge_and_named() -> None:
    run = tanh_run("frozen", 1e9, frozen=True)
    frame = run.frame()
    ratios = frame[frame["stat"] == "update_ratio"]
    zero = ratios[ratios["value"] == 0]
    assert set(zero["name"]) == {"2.weight", "2.bias"}  # lr = 0: exactly 0
    zero = zero[zero["name"] == "2.weight"]  # the plot draws weight matrices
    fig = update_ratios(run)
    ax = fig.axes[0]
    marks = [line for line in ax.get_lines() if line.get_gid() == "zero_update"]
    assert len(marks) == 1
    assert sorted(marks[0].get_xdata()) == sorted(zero["step"])
    assert all(y == pytest.approx(0.02) for y in marks[0].get_ydata())  # axes fraction
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "1 weight(s)" in legend and "2.weight" in legend
    plt.close(fig)


def test_no_zero_updates_no_marks() -> None:
    fig = update_ratios(unclipped_run())
    ax = fig.axes[0]
    assert not [line for line in ax.get_lines() if line.get_gid() == "zero_update"]
    assert ax.get_legend() is None
    plt.close(fig)


# ---------------------------------------------------------------- gradient flow axes
def test_gradient_flow_names_every_layer_of_a_deep_net_and_labels_the_axis() -> None:
    layers = 24
    errors = [10.0 ** (-k / 3) for k in range(layers)][::-1]
    run = synthetic_run(profile_rows(errors), linear_modules(layers))
    fig = gradient_flow(run)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"fc{i}" for i in range(layers)]
    assert ax.get_xlabel() == "layer with weights (input → output)"
    plt.close(fig)


def test_gradient_flow_says_which_layers_are_named_when_not_all_fit() -> None:
    layers = 90
    run = synthetic_run(profile_rows([1.0] * layers), linear_modules(layers))
    fig = gradient_flow(run)
    ax = fig.axes[0]
    named = [t.get_text() for t in ax.get_xticklabels()]
    stride = math.ceil(layers / 40)
    assert named == [f"fc{i}" for i in range(0, layers, stride)] + (
        [f"fc{layers - 1}"] if (layers - 1) % stride else []
    )
    assert ax.get_xlabel() == "layer with weights (input → output; every third named)"
    plt.close(fig)


# ---------------------------------------------------------------- the write
def test_report_onto_a_directory_is_one_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "existing"
    target.mkdir()
    with pytest.raises(GradprobeError, match="is a directory"):
        report(unclipped_run(), target)
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch, failure) -> None:
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(report_module.os, "replace", fail)
    target = tmp_path / "new" / "deeper" / "r.html"
    with pytest.raises(type(failure)):
        report_module._write_atomically(target, "<p>page</p>")
    assert list(tmp_path.iterdir()) == []  # no temporary file, no folders made for it


def test_a_successful_write_leaves_only_the_page(tmp_path: Path) -> None:
    target = tmp_path / "out" / "r.html"
    report_module._write_atomically(target, "<p>page</p>")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["r.html"]
    assert target.read_text(encoding="utf-8") == "<p>page</p>"

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
from gradprobe.report import _colour_mesh, axes_facts, inline_code, report_figure
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
        clims = [_colour_mesh(ax).get_clim() for ax in panels]
        assert clims[0] == pytest.approx(clims[1], rel=1e-12)
    if "own colour scale" in drawn.caption:
        clims = [_colour_mesh(ax).get_clim() for ax in panels]
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


def test_error_heatmap_panels_share_one_colour_scale_at_least_two_decades_wide() -> None:
    runs = [clipped_run(), unclipped_run()]
    drawn = report_figure("error_heatmap", runs)
    panels = _panels(drawn.figure)
    assert "one colour scale for all panels" in drawn.caption
    assert "at least 2 decades" in drawn.caption
    # The union of both runs' log10 error signals (numpy on the tables, not the plot's code),
    # widened symmetrically to 2 decades where it is narrower.
    logs = np.concatenate(
        [np.log10(r.table("error_norm").to_numpy(dtype=float)).ravel() for r in runs]
    )
    logs = logs[np.isfinite(logs)]
    lo, hi = logs.min(), logs.max()
    if hi - lo < 2:
        lo, hi = (lo + hi) / 2 - 1, (lo + hi) / 2 + 1
    for ax in panels:
        assert _colour_mesh(ax).get_clim() == pytest.approx((lo, hi), rel=1e-12)
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


# ---------------------------------------------------------------- loss
def _loss_run(losses: list[float], label: str = "synthetic", norms: list[float] | None = None):
    """A run whose (model) rows are exactly these losses (and pre-clip norms), one per step."""
    rows = [(s, MODEL_NAME, "loss", v) for s, v in enumerate(losses)]
    rows += [(s, MODEL_NAME, "global_grad_norm_preclip", v) for s, v in enumerate(norms or [])]
    rows += [(s, "fc", "error_norm", 1.0) for s in range(len(losses))]
    return synthetic_run(rows, [{"name": "fc"}], label=label)


def _loss_line(ax):
    return next(line for line in ax.get_lines() if line.get_label() == "training loss")


def test_loss_curve_is_the_loss_of_an_unprobed_twin() -> None:
    # Independent: the same model, data and updates without a Probe, losses by plain autograd.
    torch.manual_seed(0)
    twin = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    expected = []
    for step in range(8):
        batch = slice(8 * step, 8 * step + 8)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(twin(x[batch]), y[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1e9)
        opt.step()
        expected.append(loss.item())
    run = unclipped_run()
    drawn = report_figure("loss", [run])
    (panel,) = _panels(drawn.figure)
    line = _loss_line(panel)
    assert list(line.get_xdata()) == list(range(8))
    assert np.asarray(line.get_ydata()) == pytest.approx(expected, rel=1e-5)
    # The learning rate on the right axis: the optimizer's largest rate at each step.
    (right,) = _right_axes(drawn.figure)
    # (The hidden copies of the loss that steer the legend clear of it are not drawn.)
    (rate,) = [line for line in right.get_lines() if line.get_visible()]
    assert np.asarray(rate.get_ydata()) == pytest.approx([0.05] * 8)
    assert panel.get_yscale() == "linear"  # a few steps of tanh: no decades to span
    plt.close(drawn.figure)


def test_learning_rate_of_a_schedule_is_drawn_as_the_optimizer_had_it() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    rates = []
    with Probe(model, opt, stats="cheap", label="stepped") as probe:
        for _ in range(9):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            probe.log(loss=loss)
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        run = probe.run()
    fig = PLOTS["loss"].fn(run)
    (right,) = [a for a in fig.axes if a is not fig.axes[0]]
    assert np.asarray(right.get_lines()[0].get_ydata()) == pytest.approx(rates)
    assert rates[0] == 0.1 and rates[-1] == 0.025  # the premise: the rate did change
    plt.close(fig)


def test_loss_axis_is_log_when_the_runs_span_decades_and_shared_across_panels() -> None:
    falling = _loss_run([2.0 * 0.5**s for s in range(12)], "falling")  # 2 → 1e-3
    flat = _loss_run([1.0 + 0.01 * (s % 3) for s in range(12)], "flat")
    alone = report_figure("loss", [flat])
    assert _panels(alone.figure)[0].get_yscale() == "linear"
    both = report_figure("loss", [flat, falling])
    panels = _panels(both.figure)
    # The flat run alone is linear; next to a run that spans decades, both panels are log
    # and share one y axis, as the caption says.
    assert [ax.get_yscale() for ax in panels] == ["log", "log"]
    assert "panels share their y axis" in both.caption
    assert panels[0].get_ylim() == pytest.approx(panels[1].get_ylim())
    lo, hi = panels[0].get_ylim()
    assert lo <= 2.0 * 0.5**11 and hi >= 2.0
    # A loss ≤ 0 (a negative log-likelihood with a bonus, say) cannot sit on a log axis.
    negative = _loss_run([2.0 * 0.5**s - 0.5 for s in range(12)], "negative")
    drawn = report_figure("loss", [negative, falling])
    assert {ax.get_yscale() for ax in _panels(drawn.figure)} == {"linear"}
    for figure in (alone, both, drawn):
        plt.close(figure.figure)


def test_no_loss_logged_is_one_sentence_saying_how() -> None:
    runs = [_no_loss_run("a"), _no_loss_run("b")]
    drawn = report_figure("loss", runs)
    assert drawn.figure is None and drawn.notes == {}
    assert drawn.sentence is not None and drawn.sentence.startswith(
        "None of the 2 runs logged a loss"
    )
    assert "probe.log(loss=loss)" in drawn.sentence
    one = report_figure("loss", runs[:1])
    assert one.sentence is not None and one.sentence.startswith("The run logged no loss")
    # One run with a loss: its panel is drawn, the other run gets its own note saying how.
    mixed = report_figure("loss", [runs[0], unclipped_run()])
    assert mixed.figure is not None and mixed.sentence is None
    assert len(_panels(mixed.figure)) == 1
    assert "probe.log(loss=loss)" in mixed.notes["a"]
    plt.close(mixed.figure)
    with pytest.raises(GradprobeError, match=r"probe\.log"):
        runs[0].plot("loss")


@functools.cache
def _no_loss_run(label: str) -> Run:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, stats="cheap", label=label) as probe:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
        return probe.run()


def test_report_page_shows_the_loss_figure_or_the_sentence(tmp_path: Path) -> None:
    page = report([unclipped_run()], tmp_path / "with.html").read_text(encoding="utf-8")
    section = page.split("<h3>Training loss</h3>", 1)[1].split("<h3>", 1)[0]
    assert "<img" in section and "training loss per recorded step" in section
    page = report([_no_loss_run("a")], tmp_path / "without.html").read_text(encoding="utf-8")
    section = page.split("<h3>Training loss</h3>", 1)[1].split("<h3>", 1)[0]
    assert "<img" not in section and "probe.log(loss=loss)" in section


@pytest.mark.parametrize(
    ("losses", "norms", "marker", "steps"),
    [
        # grad_norm_spike: two norms ×50 their running median, at steps 20 and 31.
        ([1.0] * 40, [1.0 if s not in (20, 31) else 50.0 for s in range(40)], "^", [20, 31]),
        # loss_spike: one loss ×20 its running median at step 25 (noise so the MAD is > 0).
        ([1.0 + 0.01 * (s % 4) if s != 25 else 20.0 for s in range(40)], None, "v", [25]),
        # divergence: NaN from step 12 on.
        ([1.0 - 0.01 * s if s < 12 else math.nan for s in range(20)], None, "|", [12]),
    ],
)
def test_steps_named_by_instability_findings_are_marked(losses, norms, marker, steps) -> None:
    run = _loss_run(losses, norms=norms)
    found = diagnose(run)
    kind = {"^": "grad_norm_spike", "v": "loss_spike", "|": "divergence"}[marker]
    finding = found.of(kind)
    assert finding is not None, found.kinds  # the premise, judged by diagnose itself
    fig = PLOTS["loss"].fn(run)
    ax = fig.axes[0]
    if marker == "|":
        marked = [
            line.get_xdata()[0] for line in ax.get_lines() if line.get_label().startswith(kind)
        ]
        assert marked == steps == [finding.evidence["first_step"]]
        # NaN losses cannot be a line: each is a × on the top edge.
        (crosses,) = [line for line in ax.get_lines() if line.get_marker() == "x"]
        assert list(crosses.get_xdata()) == [s for s, v in enumerate(losses) if math.isnan(v)]
    else:
        (marks,) = [line for line in ax.get_lines() if line.get_marker() == marker]
        assert list(marks.get_xdata()) == steps == finding.evidence["steps"]
        assert marks.get_label().startswith(kind)
    plt.close(fig)


def test_a_healthy_loss_has_no_instability_marks() -> None:
    fig = PLOTS["loss"].fn(unclipped_run())
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["training loss"]
    plt.close(fig)

"""The report leads with conclusions: the headline box, remedy code in <pre>, heatmap
columns at their steps, and error signals of exactly 0 marked in the gradient flow."""

from __future__ import annotations

import dataclasses
import html
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe, diagnose, report
from gradprobe.diagnose import Finding, findings_html
from gradprobe.headline import headline, story, what_fixed_it
from gradprobe.plots import error_heatmap, gradient_flow, step_columns
from gradprobe.remedies import REMEDIES, RankedRemedy
from gradprobe.report import _colour_mesh
from gradprobe.run import Run
from test_report_figures import clipped_run, unclipped_run


def _section(page: str) -> str:
    found = re.search(r'<section class="gp-headline">(.*?)</section>', page, re.S)
    assert found is not None
    return found.group(1)


# ---------------------------------------------------------------- headline
def test_the_headline_is_the_root_finding_its_first_remedy_and_code(tmp_path) -> None:
    run = clipped_run()
    findings = diagnose(run)
    assert findings, "the clipped run has findings"
    page = report(run, tmp_path / "r.html").read_text(encoding="utf-8")
    box = _section(page)
    # Before the findings table: the page leads with it.
    assert page.index('<section class="gp-headline">') < page.index("<h2>Findings</h2>")
    root = next(f for f in findings if getattr(f, "cause", None) is None)
    # The root's summary, its numbers included, as written by diagnose.
    numbers = re.findall(r"\d+(?:\.\d+)?", root.summary)
    assert numbers and all(n in box for n in numbers)
    assert html.unescape(re.sub(r"<[^>]+>", "", box)).count(root.summary.replace("`", "")) == 1
    first = root.remedies[0]
    assert html.escape(first.name) in box
    code = re.search(r'<pre class="gp-code">(.*?)</pre>', box, re.S)
    assert code is not None and html.unescape(code.group(1)) == first.code


def test_headline_groups_consequences_under_their_root() -> None:
    @dataclasses.dataclass(frozen=True)
    class Caused(Finding):
        cause: str | None = None

    root = Caused("exploding", "critical", ("fc1.weight",), "updates 2.8× the weights")
    plateau = Caused("plateau", "warning", (), "loss flat at 3.47", cause="exploding")
    other = Caused("clipped", "info", (), "clipping acted", cause="vanishing")
    h = headline([root, plateau, other])
    assert h.root is root and h.consequences == [plateau] and h.others == [other]
    # Without the cause attribute every finding is a root: the first one leads.
    plain = [Finding("vanishing", "critical", (), "a"), Finding("plateau", "warning", (), "b")]
    assert headline(plain).root is plain[0] and headline(plain).consequences == []


def test_what_fixed_it_names_the_run_with_fewer_findings_and_lower_loss() -> None:
    runs = [clipped_run(), unclipped_run()]
    found = [diagnose(r) for r in runs]
    text = what_fixed_it(runs, found)
    counts = [len(f) for f in found]
    if counts[0] == counts[1]:
        pytest.skip("both runs have as many findings")
    best = runs[int(np.argmin(counts))]
    assert text is not None and text.startswith(f"`{best.name}`")


def test_story_is_the_text_of_the_headline() -> None:
    run = clipped_run()
    findings = diagnose(run)
    text = story(findings)
    root = headline(findings).root
    assert root is not None
    assert f"Root cause: {root.kind} ({root.severity}) — {root.summary}" in text
    assert f"Do this first: {root.remedies[0].name}" in text
    for line in root.remedies[0].code.splitlines():
        assert f"      {line}" in text


def test_multi_line_remedy_code_is_in_pre_one_line_code_inline() -> None:
    multi = REMEDIES["forget_bias"]
    assert "\n" in multi.code
    single = next(r for r in REMEDIES.values() if "\n" not in r.code.strip())
    finding = Finding(
        "vanishing",
        "critical",
        ("lstm",),
        "s",
        remedies=(RankedRemedy(multi, 1.0, ""), RankedRemedy(single, 0.5, "")),
    )
    page = findings_html([finding])  # type: ignore[arg-type]
    pres = re.findall(r'<pre class="gp-code">(.*?)</pre>', page, re.S)
    assert [html.unescape(p) for p in pres] == [multi.code.strip()]
    assert f"<code>{html.escape(single.code)}</code>" in page


# ---------------------------------------------------------------- figures
def _zero_below_run() -> tuple[Run, list[str]]:
    """An MLP whose middle output is multiplied by 0: every layer below it gets an error
    signal of exactly 0 (by construction, not by measurement)."""

    class Times(nn.Module):
        def __init__(self, k: float) -> None:
            super().__init__()
            self.k = k

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.k

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        Times(0.0),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with Probe(model, opt, every=1) as probe:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return probe.run(), ["0", "2"]


def test_an_error_signal_of_exactly_zero_is_marked_on_the_floor() -> None:
    run, below = _zero_below_run()
    err = run.table("error_norm")
    assert (err[below] == 0).all().all()  # what the model does, recorded as it is
    fig = gradient_flow(run)
    ax = fig.axes[0]
    marks = [ln for ln in ax.get_lines() if ln.get_gid() == "zero_error"]
    assert marks
    labels = [t.get_text() for t in ax.get_xticklabels()]
    xs = sorted({labels[int(x)] for m in marks for x in m.get_xdata()})
    assert xs == sorted(below)
    floor = {float(y) for m in marks for y in m.get_ydata()}
    assert len(floor) == 1 and ax.get_ylim()[0] < floor.pop()
    assert any(t.get_gid() == "zero_floor_label" and t.get_text() == "0" for t in ax.texts)
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "exactly 0" in legend
    plt.close(fig)


def test_heatmap_columns_sit_at_their_steps_and_a_missing_step_is_blank() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with Probe(model, opt, every=3) as probe:
        for _ in range(13):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    run = probe.run()
    assert list(run.steps) == [0, 3, 6, 9, 12]
    frame = run.frame()
    gapped = Run(run.meta, frame[frame["step"] != 6], path=None)  # step 6 lost
    edges, columns = step_columns(gapped.steps, gapped.meta)
    # Each recorded step's column is one cadence wide, starting at the step.
    np.testing.assert_array_equal(edges[columns], np.array([0, 3, 9, 12]) - 0.5)
    np.testing.assert_array_equal(edges[columns + 1], np.array([3, 6, 12, 15]) - 0.5)
    fig = error_heatmap(gapped)
    mesh = _colour_mesh(fig.axes[0])
    values = mesh.get_array()
    blank = [i for i in range(values.shape[1]) if i not in set(columns.tolist())]
    assert blank and np.ma.getmaskarray(values)[:, blank].all()
    assert edges[blank[0]] == 5.5 and edges[blank[0] + 1] == 8.5
    assert "not recorded" in fig.axes[0].get_title(loc="left")
    plt.close(fig)


@pytest.mark.parametrize(
    "name", ["gradient_flow", "dead_saturated", "update_ratios", "clipping", "loss"]
)
def test_no_legend_covers_a_data_point_or_marker(name: str) -> None:
    from gradprobe.plots import PLOTS, missing
    from gradprobe.report import report_figure
    from test_report_figures import tanh_run

    zero, _ = _zero_below_run()
    runs = [
        r
        for r in (clipped_run(), tanh_run("frozen", 1e9, frozen=True), zero)
        if missing(PLOTS[name], r) is None
    ]
    drawn = report_figure(name, runs)
    if drawn.figure is None:
        pytest.skip(drawn.sentence or "nothing drawn")
    fig = drawn.figure
    fig.canvas.draw()
    checked = 0
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent()
        # The panel's own lines and those of the axes sharing its x (the loss's rate axis).
        axes = [a for a in fig.axes if a is ax or a in ax.get_shared_x_axes().get_siblings(ax)]
        axes += [a for a in fig.axes if a.bbox.bounds == ax.bbox.bounds and a is not ax]
        for other in set(axes):
            for line in other.get_lines():
                if not line.get_visible() or line.get_linestyle() == ":":
                    continue  # hidden copies, and the dotted reference lines
                xy = line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
                xy = xy[np.isfinite(xy).all(axis=1)]
                inside = (
                    (xy[:, 0] > box.x0)
                    & (xy[:, 0] < box.x1)
                    & (xy[:, 1] > box.y0)
                    & (xy[:, 1] < box.y1)
                )
                assert not inside.any(), (name, line.get_label(), xy[inside][:3])
                checked += len(xy)
    assert checked > 0
    plt.close(fig)


def test_what_fixed_it_reads_accuracy_when_the_findings_tie() -> None:
    from test_report_figures import tanh_run

    a, b = tanh_run("a", 1e9), tanh_run("b", 1e9)  # the same run twice: the same findings
    found = [diagnose(a), diagnose(b)]
    assert [f.kind for f in found[0]] == [f.kind for f in found[1]]
    extra = {"a": {"validation accuracy": 0.61}, "b": {"validation accuracy": 0.83}}
    text = what_fixed_it([a, b], found, extra)
    assert text is not None and text.startswith("`b`") and "0.83" in text
    assert what_fixed_it([a, b], found) is None  # nothing tells them apart

"""Runs and findings in a notebook: Run._repr_html_, Findings._repr_html_ and Run.plot.

What a notebook shows is read back (tables parsed, the PNG decoded) and checked against the
run's own frame and the diagnosis; escaping, size bounds and the never-raise fallbacks are
checked on runs built to break them.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import gradprobe.html as html_module
from _diagnose_cases import case, linear_modules, profile_rows, synthetic_run
from gradprobe import GradprobeError, Probe, diagnose
from gradprobe.diagnose import Findings, key_numbers
from gradprobe.lab.data import digits
from gradprobe.lab.models import mlp
from gradprobe.plots import PLOTS
from gradprobe.report import KEY_COLUMNS
from gradprobe.run import Run, empty_frame


# ---------------------------------------------------------------- reading HTML back
class _Page(HTMLParser):
    """Tables (rows of cell texts), images (src), and every tag and attribute seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str]] = []
        self._cell: list[str] | None = None
        self._open: list[list[list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [(k, v or "") for k, v in attrs]
        if tag == "table":
            self._open.append([])
        elif tag == "tr" and self._open:
            self._open[-1].append([])
        elif tag in ("td", "th") and self._open:
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._open:
            self._open[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table" and self._open:
            self.tables.append(self._open.pop())

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def text_of(html: str) -> str:
    """The visible text (tags dropped, entities decoded), whitespace collapsed."""
    from html import unescape

    no_style = re.sub(r"<style>.*?</style>", "", html, flags=re.S)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", no_style)).split())


def png_size(src: str) -> tuple[int, int, int]:
    """(width, height, bytes) of a data:image/png;base64 source, read from its IHDR."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    raw = base64.b64decode(src[len(prefix) :], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    return width, height, len(raw)


def layer_table(page: _Page) -> dict[str, dict[str, str]]:
    """The per-module table: {module: {column: cell}}."""
    table = next(t for t in page.tables if t and t[0] and t[0][0] == "module")
    header = table[0]
    rows = [r for r in table[1:] if len(r) == len(header)]
    return {r[0]: dict(zip(header[1:], r[1:])) for r in rows}


def assert_self_contained(html: str) -> None:
    page = parse(html)
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    for key, value in page.attributes:
        assert not key.startswith("on"), key  # no event handlers
        if key in ("src", "href"):
            assert value.startswith("data:"), value
    assert "http://" not in html and "https://" not in html and "url(" not in html


def close_to(cell: str, value: float) -> bool:
    return np.isclose(float(cell), value, rtol=6e-3, atol=0.0)  # 3 significant digits


# ---------------------------------------------------------------- Run._repr_html_
@pytest.mark.parametrize("name", ["sigmoid30", "rnn_large", "nan_injected", "relu30_he"])
def test_run_html_shows_the_findings_with_their_numbers(name: str) -> None:
    run = case(name)
    html = run._repr_html_()
    found = diagnose(run)
    shown = text_of(html)
    for f in found:
        assert f.kind in shown
        # every number of the summary, as the summary prints it
        for number in re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", f.summary):
            assert number in shown, (f.kind, number)
    if not found:
        assert "no problems found" in shown


@pytest.mark.parametrize("name", ["sigmoid30", "residual30", "cnn_dead_channel"])
def test_run_html_key_numbers_are_the_runs(name: str) -> None:
    run = case(name)
    page = parse(run._repr_html_())
    headers = [KEY_COLUMNS[k] for k in key_numbers(run)]
    table = next(t for t in page.tables if t[0] == headers)
    numbers = key_numbers(run)
    for header, cell in zip(headers, table[1]):
        value = numbers[next(k for k, v in KEY_COLUMNS.items() if v == header)]
        if np.isnan(value):
            assert cell == "–"
        else:
            assert close_to(cell, value), (header, cell, value)
    # and one of them against the frame itself: the first/last error ratio
    if name == "sigmoid30":
        err = run.table("error_norm")
        first, last = run.modules[0], run.modules[-1]
        ratio = float(table[1][headers.index(KEY_COLUMNS["first_last_error_ratio"])])
        measured = (err[first] / err[last]).median()
        assert np.isclose(ratio, measured, rtol=0.5)  # the median over steps, 3 digits


@pytest.mark.parametrize("name", ["sigmoid30", "cnn_dead_channel", "rnn_large"])
def test_run_html_layer_table_is_the_last_step_of_the_frame(name: str) -> None:
    run = case(name)
    rows = layer_table(parse(run._repr_html_()))
    frame = run.frame()
    last = frame[frame["step"] == frame["step"].max()]
    value = last.set_index(["name", "stat"])["value"]
    assert list(rows) == run.modules[: len(rows)]
    checked = 0
    for module, cells in rows.items():
        for column, cell in cells.items():
            stat = column.removeprefix("weight ")
            owner = (f"{module}.weight" if module else "weight") if column != stat else module
            if (owner, stat) in value.index and np.isfinite(value[(owner, stat)]):
                assert close_to(cell, value[(owner, stat)]), (module, column, cell)
                checked += 1
            else:
                assert cell in ("", "nan", "inf", "-inf"), (module, column, cell)
    assert checked >= len(rows)  # at least the error signal of every module


def test_run_html_figure_is_a_small_inline_png() -> None:
    run = case("sigmoid30")
    open_before = plt.get_fignums()  # other tests in this worker may have left some
    html = run._repr_html_()
    page = parse(html)
    assert len(page.images) == 1
    width, height, size = png_size(page.images[0])
    assert (width, height) == (480, 240)
    assert size < 100_000
    assert_self_contained(html)
    assert plt.get_fignums() == open_before  # the display left nothing open in pyplot


@pytest.mark.parametrize("name", ["sigmoid30", "rnn_large", "cnn_healthy"])
def test_findings_html_is_self_contained(name: str) -> None:
    assert_self_contained(diagnose(case(name))._repr_html_())
    assert_self_contained(case(name)._repr_html_())


# ---------------------------------------------------------------- escaping
HOSTILE = '<img src=x onerror="alert(1)">&amp;<script>alert(2)</script>'


def _hostile_run(label: str = "plain", layer: str = "fc0") -> Run:
    errors = [1e-9, 1e-7, 1e-5, 1e-3, 1e-1, 1.0]
    rows = [r for r in profile_rows(errors) if r[1] != "fc0"]
    rows += [(s, layer, "error_norm", 1e-9) for s in range(3)]
    rows += [(s, f"{layer}.weight", "grad_norm", 2e-9) for s in range(3)]
    modules = [{"name": layer}, *linear_modules(6)[1:]]
    return synthetic_run(rows, modules, [{"name": f"{layer}.weight"}], label=label)


@pytest.mark.parametrize(
    "where",
    ["label", "layer", "path"],
)
def test_run_html_escapes_names(where: str, tmp_path: Path) -> None:
    run = _hostile_run(**({where: HOSTILE} if where != "path" else {}))
    if where == "path":
        run.path = tmp_path / HOSTILE.replace("/", "_")
    html = run._repr_html_()
    page = parse(html)
    assert not {"script"} & set(page.tags)
    assert "onerror" not in {k for k, _ in page.attributes}
    assert "<img src=x" not in html and "<script>alert" not in html
    assert HOSTILE.replace("/", "_") in text_of(html) or HOSTILE in text_of(html)
    assert_self_contained(html)
    if where == "layer":  # the layer is in the findings and in the table, as text
        assert "vanishing" in diagnose(run).kinds
        assert HOSTILE in layer_table(page)
        assert_self_contained(diagnose(run)._repr_html_())
        assert HOSTILE in text_of(diagnose(run)._repr_html_())


def test_findings_html_escapes_the_run_name() -> None:
    found = diagnose(_hostile_run(label=HOSTILE))
    html = found._repr_html_()
    assert "<script>alert" not in html and HOSTILE in text_of(html)


# ---------------------------------------------------------------- bounded size
def _big_run(layers: int, steps: int) -> Run:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(steps):
        for i in range(layers):
            rows.append((s, f"block.{i}.fc", "error_norm", float(0.9**i * rng.uniform(0.5, 2))))
            rows.append((s, f"block.{i}.fc", "act_std", float(rng.uniform(0.1, 1))))
            rows.append((s, f"block.{i}.fc.weight", "grad_norm", float(rng.uniform(0.1, 1))))
            rows.append((s, f"block.{i}.fc.weight", "update_ratio", float(rng.uniform(1e-4, 1e-3))))
    modules = [{"name": f"block.{i}.fc"} for i in range(layers)]
    params = [{"name": f"block.{i}.fc.weight"} for i in range(layers)]
    return synthetic_run(rows, modules, params, label="big")


@pytest.mark.parametrize(("layers", "steps"), [(400, 20), (60, 300)])
def test_run_html_is_bounded_for_a_big_run(layers: int, steps: int) -> None:
    run = _big_run(layers, steps)
    html = run._repr_html_()
    assert len(html) < 150_000
    page = parse(html)
    rows = layer_table(page)
    assert len(rows) == min(layers, html_module._HTML_MAX_ROWS)
    if layers > html_module._HTML_MAX_ROWS:
        assert f"the first {len(rows)} of {layers} modules" in text_of(html)
    width, height, _ = png_size(page.images[0])
    assert (width, height) == (480, 240)


def test_run_html_has_no_histogram_columns() -> None:
    from test_plots import full_run

    run = full_run()  # stats="full": 32 histogram bins per module
    assert any(s.startswith("hist_") for s in run.stats)
    html = run._repr_html_()
    assert "hist_" not in html
    assert set(next(iter(layer_table(parse(html)).values()))) <= {
        *html_module._HTML_MODULE_STATS,
        *(f"weight {s}" for s in html_module._HTML_WEIGHT_STATS),
    }


# ---------------------------------------------------------------- never raises
def test_empty_run_says_nothing_was_recorded() -> None:
    run = Run({"label": "empty"}, empty_frame())
    html = run._repr_html_()
    assert "nothing recorded yet" in html and "0 recorded steps" in html


def test_a_run_without_error_norm_says_why_there_is_no_figure() -> None:
    rows = [(s, "fc0.weight", "grad_norm", 1.0) for s in range(3)]
    run = synthetic_run(rows, linear_modules(1), [{"name": "fc0.weight"}])
    html = run._repr_html_()
    assert not parse(html).images
    assert "not drawn, the run has no error_norm" in html


@pytest.mark.parametrize("part", ["run_findings", "run_gradient_flow", "run_key_numbers"])
def test_one_failing_part_leaves_the_others(part: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(run: Run) -> str:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(html_module, part, boom)  # the run's view (gradprobe.html)
    html = case("sigmoid30")._repr_html_()
    assert "not shown: RuntimeError: boom" in html and "second line" not in html
    shown = text_of(html)
    assert ("vanishing" in shown) == (part != "run_findings")
    assert bool(parse(html).images) == (part != "run_gradient_flow")


def test_a_meta_without_module_names_falls_back_to_text() -> None:
    run = case("sigmoid30")
    broken = Run({**run.meta, "modules": [{"no name": 1}], "execution_order": None}, run.frame())
    html = broken._repr_html_()  # must not raise: even repr() fails on this run
    assert html.startswith("<pre>&lt;gradprobe.run.Run object at ")
    assert "could not show this run as HTML (KeyError: &#x27;name&#x27;)" in html


@pytest.mark.parametrize(
    "meta",
    [{"probe": "not a dict"}, {"model": None, "probe": None}, {"modules": [{"name": "ghost"}]}],
)
def test_a_damaged_meta_still_displays_what_it_can(meta: dict[str, object]) -> None:
    run = case("sigmoid30")
    damaged = Run({**run.meta, **meta}, run.frame())
    html = damaged._repr_html_()
    assert html.startswith("<style>") and "recorded steps" in html
    assert "Key numbers" in html and "Gradient flow" in html


@pytest.mark.parametrize("what", ["head", "css"])
def test_whole_html_failure_falls_back_to_text(what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(run: Run) -> str:
        raise KeyError("meta")

    if what == "head":
        monkeypatch.setattr(html_module, "run_head", boom)
    else:  # the run's view (gradprobe.html) fails before its first part
        monkeypatch.delattr(html_module, "NOTEBOOK_CSS")
    run = case("sigmoid30")
    html = run._repr_html_()
    assert html.startswith("<pre>") and "Run(&#x27;run&#x27;" in html
    assert "could not show this run as HTML" in html
    assert ("KeyError" if what == "head" else "NameError") in html


def test_findings_html_failure_falls_back_to_text(monkeypatch: pytest.MonkeyPatch) -> None:
    found = diagnose(case("sigmoid30"))

    def boom(findings: Findings, **_: object) -> str:
        raise ValueError("bad finding")

    monkeypatch.setattr(html_module, "findings_html", boom)
    html = found._repr_html_()
    assert html.startswith("<pre>") and "Finding(kind=&#x27;vanishing&#x27;" in html
    assert "could not show these findings as HTML (ValueError: bad finding)" in html


def test_findings_html_counts_and_names_the_run() -> None:
    found = diagnose(case("sigmoid30"))
    shown = text_of(found._repr_html_())
    assert shown.startswith(f"run : {len(found)} findings")
    assert parse(found._repr_html_()).tables[0][0][1] == "finding"
    assert "1 finding" in text_of(Findings(found[:1], run_name="x")._repr_html_())


# ---------------------------------------------------------------- Run.plot
@functools.cache
def logged_run() -> Run:
    """Every statistic (stats="full") and the loss, logged: a run every plot can draw."""
    torch.manual_seed(0)
    data = digits(seed=0)
    model = mlp(64, 10, depth=4, width=16, activation="sigmoid")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, stats="full") as probe:
        for step in range(6):
            opt.zero_grad()
            batch = slice(32 * step, 32 * (step + 1))
            loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            probe.log(loss=loss)
            opt.step()
    return probe.run()


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_returns_a_figure_pyplot_does_not_hold(name: str) -> None:
    run = logged_run()
    before = plt.get_fignums()
    fig = run.plot(name)
    assert isinstance(fig, Figure) and fig.axes[0].has_data()
    assert plt.get_fignums() == before
    fig.savefig(os.devnull, format="png")


def test_plot_gradient_flow_draws_the_recorded_error_norms() -> None:
    run = case("sigmoid30")
    err = run.table("error_norm")
    step = int(err.index[-1])
    fig = run.plot("gradient_flow", steps=[step])
    solid = [line for line in fig.axes[0].get_lines() if line.get_label() == f"step {step}"]
    assert len(solid) == 1
    layers = [m for m in run.modules if m.startswith(("fc", "out"))]
    np.testing.assert_allclose(solid[0].get_ydata(), err.loc[step, layers].to_numpy(), rtol=1e-12)


def test_plot_draws_on_a_given_axes() -> None:
    fig, (left, right) = plt.subplots(1, 2)
    run = case("sigmoid30")
    assert run.plot("error_heatmap", ax=right) is fig
    assert right.collections and not left.has_data()
    plt.close(fig)


def test_plot_size_is_honoured() -> None:
    fig = case("sigmoid30").plot("update_ratios", size=(3.0, 2.0))
    assert tuple(fig.get_size_inches()) == (3.0, 2.0)


@pytest.mark.parametrize("bad", ["gradient-flow", "", "GRADIENT_FLOW", None, 3])
def test_plot_unknown_name_lists_the_valid_ones(bad: object) -> None:
    with pytest.raises(GradprobeError) as info:
        case("sigmoid30").plot(bad)  # type: ignore[arg-type]
    message = str(info.value)
    assert f"no plot named {bad!r}" in message
    for name in PLOTS:
        assert name in message


@pytest.mark.parametrize(
    ("name", "needs"),
    [("activation_histograms", "hist_00"), ("clipping", "global_grad_norm_preclip")],
)
def test_plot_of_an_unrecorded_statistic_says_what_to_record(name: str, needs: str) -> None:
    rows = profile_rows([1e-3, 1e-2, 1.0])
    run = synthetic_run(rows, linear_modules(3))
    with pytest.raises(GradprobeError, match=needs):
        run.plot(name)


# ---------------------------------------------------------------- backends
@pytest.mark.parametrize(
    ("how", "expected"), [("MPLBACKEND", "svg"), ("matplotlibrc", "pdf"), ("nothing", "agg")]
)
def test_a_chosen_backend_is_kept(how: str, expected: str, tmp_path: Path) -> None:
    """A notebook's kernel chooses its inline backend by MPLBACKEND; importing gradprobe.lab
    or drawing must not replace it by Agg (figures would print as text). Alone: Agg."""
    env = {"MPLCONFIGDIR": str(tmp_path / "config")}  # no user matplotlibrc either
    if how == "MPLBACKEND":
        env["MPLBACKEND"] = expected
    elif how == "matplotlibrc":
        (tmp_path / "matplotlibrc").write_text(f"backend: {expected}\n")
        env["MATPLOTLIBRC"] = str(tmp_path / "matplotlibrc")
    code = (
        "import gradprobe.lab.data, matplotlib\n"
        "from gradprobe import plots\n"
        "plots._pyplot()\n"
        "print(matplotlib.get_backend().lower())\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "MATPLOTLIBRC")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
        timeout=120, check=True,
    ).stdout
    assert out.strip().endswith(expected)


def test_plot_docstring_names_every_plot() -> None:
    for name in PLOTS:
        assert f"``{name}``" in (Run.plot.__doc__ or ""), name

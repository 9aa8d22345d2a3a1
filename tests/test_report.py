"""report: one self-contained HTML page; rendered in headless Chromium with every figure."""

from __future__ import annotations

import functools
import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from _diagnose_cases import _digits_run, case
from gradprobe import GradprobeError, diagnose, load, report
from gradprobe.lab.models import mlp
from gradprobe.plots import PLOTS, missing
from gradprobe.report import inline_code


@functools.cache
def stored_runs(root: str) -> tuple:
    """A sigmoid run (full statistics) and a ReLU run (cheap), written to disk."""
    torch.manual_seed(0)
    a = _digits_run(
        mlp(64, 10, depth=8, width=32, activation="sigmoid"),
        stats="full",
        steps=8,
        store=Path(root) / "sigmoid",
        label="deep sigmoid",
    )
    torch.manual_seed(0)
    b = _digits_run(
        mlp(64, 10, depth=8, width=32, activation="relu", init="he"),
        stats="cheap",
        steps=8,
        store=Path(root) / "relu",
        label="relu he",
    )
    return load(Path(root) / "sigmoid"), load(Path(root) / "relu"), a, b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return stored_runs(str(tmp_path_factory.mktemp("runs")))[:2]


def _imgs(page: str) -> list[str]:
    return re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)


def _figures_expected(runs) -> int:
    """Plots that at least one run can draw and that show something (a sentence stands in
    for a figure that would show nothing, e.g. clipping where nothing was clipped)."""
    count = 0
    for spec in PLOTS.values():
        drawable = [r for r in runs if missing(spec, r) is None]
        if drawable and (spec.nothing_to_show is None or spec.nothing_to_show(drawable) is None):
            count += 1
    return count


def test_single_run_report_is_self_contained(tmp_path: Path) -> None:
    run = case("sigmoid30")
    path = report(run, tmp_path / "r.html")
    page = path.read_text(encoding="utf-8")
    found = diagnose(run)
    # Findings first, then figures, then metadata.
    assert page.index("Findings") < page.index("Figures") < page.index("<h2>Runs")
    for f in found:
        assert inline_code(f.summary) in page  # names quoted in backticks render as code
    srcs = _imgs(page)
    assert len(srcs) == _figures_expected([run])
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert not re.search(r"url\((https?:)?//", page)


def test_several_runs_side_by_side(runs, tmp_path: Path) -> None:
    sig, relu = runs
    path = report([sig, relu], tmp_path / "both.html", extra={"deep sigmoid": {"acc": 0.5}})
    page = path.read_text(encoding="utf-8")
    table = page.split("<h2>Key numbers</h2>")[1].split("</table>")[0]
    assert "deep sigmoid" in table and "relu he" in table and "0.5" in table
    # One image per plot that at least one run can draw: panels share a figure.
    assert len(_imgs(page)) == _figures_expected([sig, relu])
    # The cheap run has no histograms: its note says how to get them.
    assert "relu he: Activation histograms" in html.unescape(page)
    assert "stats=&#x27;full&#x27;" in page


def test_duplicate_names_are_made_distinct_without_touching_the_runs(runs, tmp_path) -> None:
    sig, _ = runs
    page = report([sig, sig], tmp_path / "dup.html").read_text(encoding="utf-8")
    assert "deep sigmoid (1)" in page and "deep sigmoid (2)" in page
    assert sig.name == "deep sigmoid"


def test_empty_run_is_a_clear_error(tmp_path: Path) -> None:
    from _diagnose_cases import linear_modules, synthetic_run

    with pytest.raises(GradprobeError, match="no recorded steps"):
        report(synthetic_run([], linear_modules(2)), tmp_path / "x.html")


# ---------------------------------------------------------------- in a real browser
_CHECK = """<script>
window.addEventListener('error', function (e) {
  document.documentElement.setAttribute('data-js-error', String(e.message));
});
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    imgs[i].setAttribute('data-natural', imgs[i].naturalWidth + 'x' + imgs[i].naturalHeight);
    if (imgs[i].complete && imgs[i].naturalWidth > 0 && imgs[i].naturalHeight > 0) ok++;
  }
  document.documentElement.setAttribute('data-images', imgs.length + '/' + ok);
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run(
        [binary, *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.browser
def test_report_renders_in_headless_chromium(runs, tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (scripts/install-chromium.sh installs it)")
    sig, relu = runs
    path = report([sig, relu], tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    n_imgs = len(_imgs(page))
    # A copy with a small checking script: the report itself needs no JavaScript.
    probe_page = tmp_path / "checked.html"
    probe_page.write_text(page.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    done = _headless(
        binary,
        tmp_path / "profile",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probe_page.as_uri(),
    )
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'data-js-error="' not in dom
    # The page leads with the headline box, before the findings table.
    assert 0 <= dom.find('class="gp-headline"') < dom.find("<h2>Findings</h2>")
    images = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert images is not None, dom[:500]
    assert int(images.group(1)) == n_imgs == int(images.group(2)) > 0
    sizes = re.findall(r'data-natural="(\d+)x(\d+)"', dom)
    assert len(sizes) == n_imgs and all(int(w) > 0 and int(h) > 0 for w, h in sizes)
    for f in diagnose(sig):  # the DOM serialises quotes unescaped
        expected = inline_code(f.summary).replace("&quot;", '"').replace("&#x27;", "'")
        assert expected in dom
    shot = tmp_path / "report.png"
    done = _headless(
        binary,
        tmp_path / "profile2",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        path.as_uri(),
    )
    assert done.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000

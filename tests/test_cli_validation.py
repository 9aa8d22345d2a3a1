"""Every command's path and number options are checked before any work starts.

Bad input gets exactly one line on stderr, a non-zero exit, no traceback, and leaves
the file system as it was. Also: `import gradprobe.cli` stays light, help shows real
metavars, and `gradprobe diagnose` says what it checked when it finds nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradprobe.cli import main

# A path no one can create, root included: /proc refuses new entries whatever the
# permission bits say (checked by test_proc_is_unwritable_even_for_root).
UNWRITABLE = "/proc/gradprobe-test/out"


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, nn.Module]:
    """A 2-layer CNN trained a few steps on random data under a Probe: (run dir, steps, model)."""
    import gradprobe

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    store = tmp_path_factory.mktemp("runs") / "cnn"
    steps = 6
    with gradprobe.Probe(model, optimizer, store=store):
        for _ in range(steps):
            x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return store, steps, model


def _listing(root: Path) -> set[tuple[str, int]]:
    """Every path under ``root`` with its size (0 for folders)."""
    return {
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else 0) for p in root.rglob("*")
    }


def _cases(ws: Path, run: Path) -> dict[str, tuple[list[str], str]]:
    """Command line -> a word the error line must contain; ``ws`` is the working folder."""
    a_file = ws / "notes.txt"  # exists: a file where a folder is expected
    a_dir = ws / "folder"  # exists: a folder where a file (or a run) is expected
    under_file = a_file / "sub"  # its parent is a file: cannot be created, even by root
    new = str(ws / "new")  # does not exist: must still not exist afterwards
    r = str(run)
    return {
        # demo
        "demo --out file": (["demo", "--out", str(a_file)], "is a file"),
        "demo --out under a file": (["demo", "--out", str(under_file)], "is a file"),
        "demo --out unwritable": (["demo", "--out", UNWRITABLE], "not writable"),
        "demo --out empty": (["demo", "--out", ""], "empty"),
        "demo --out no value": (["demo", "--out"], "--out"),
        "demo --seed negative": (["demo", "--out", new, "--seed", "-1"], "--seed"),
        "demo --seed wrong type": (["demo", "--out", new, "--seed", "abc"], "--seed"),
        "demo --seed fraction": (["demo", "--out", new, "--seed", "1.5"], "--seed"),
        "demo --seed too large": (["demo", "--out", new, "--seed", str(2**64)], "--seed"),
        # lab
        "lab run no name": (["lab", "run"], "NAME"),
        "lab run unknown": (["lab", "run", "nonsense", "--out", new], "nonsense"),
        "lab run --seeds zero": (["lab", "run", "depth", "--out", new, "--seeds", "0"], "--seeds"),
        "lab run --seeds negative": (["lab", "run", "depth", "--seeds", "-2"], "--seeds"),
        "lab run --seeds wrong type": (["lab", "run", "depth", "--seeds", "two"], "--seeds"),
        "lab run --workers negative": (["lab", "run", "depth", "--workers", "-1"], "--workers"),
        "lab run --workers wrong type": (["lab", "run", "depth", "--workers", "1e3"], "--workers"),
        "lab run --out file": (["lab", "run", "depth", "--out", str(a_file)], "is a file"),
        "lab run --out under a file": (["lab", "run", "depth", "--out", str(under_file)], "file"),
        "lab run --out unwritable": (["lab", "run", "depth", "--out", UNWRITABLE], "--out"),
        "lab list extra": (["lab", "list", "extra"], "extra"),
        # report
        "report no run": (["report"], "RUN"),
        "report run missing": (["report", str(ws / "nowhere"), "-o", new], "does not exist"),
        "report run is a file": (["report", str(a_file), "-o", new], "is a file"),
        "report run is not a run": (["report", str(a_dir), "-o", new], "not a run"),
        "report -o folder": (["report", r, "-o", str(a_dir)], "is a folder"),
        "report -o under a file": (["report", r, "-o", str(under_file)], "is a file"),
        "report -o unwritable": (["report", r, "-o", UNWRITABLE], "not writable"),
        "report -o no value": (["report", r, "-o"], "-o"),
        # diagnose
        "diagnose no run": (["diagnose"], "RUN"),
        "diagnose run missing": (["diagnose", str(ws / "nowhere")], "does not exist"),
        "diagnose run is a file": (["diagnose", str(a_file)], "is a file"),
        "diagnose run is not a run": (["diagnose", str(a_dir)], "not a run"),
        # theory
        "theory no --activation": (["theory", "--weight-var", "1"], "--activation"),
        "theory --weight-var wrong type": (["theory", "-a", "tanh", "--weight-var", "x"], "σ_w²"),
        "theory --weight-var negative": (["theory", "-a", "tanh", "--weight-var", "-1"], "σ_w²"),
        "theory --weight-var nan": (["theory", "-a", "tanh", "--weight-var", "nan"], "finite"),
        "theory --weight-var inf": (["theory", "-a", "tanh", "--weight-var", "inf"], "finite"),
        "theory --bias-var negative": (
            ["theory", "-a", "tanh", "--weight-var", "1", "--bias-var", "-0.5"],
            "σ_b²",
        ),
        "theory --depth zero": (
            ["theory", "-a", "tanh", "--weight-var", "1", "--depth", "0"],
            "--depth",
        ),
        "theory --depth wrong type": (
            ["theory", "-a", "tanh", "--weight-var", "1", "--depth", "ten"],
            "--depth",
        ),
        "theory --plot folder": (
            ["theory", "-a", "tanh", "--weight-var", "1", "--plot", str(a_dir)],
            "is a folder",
        ),
        "theory --plot under a file": (
            ["theory", "-a", "tanh", "--weight-var", "1", "--plot", str(under_file / "p.png")],
            "is a file",
        ),
        "theory --plot unwritable": (
            ["theory", "-a", "tanh", "--weight-var", "1", "--plot", UNWRITABLE + ".png"],
            "not writable",
        ),
        "theory unknown activation with --plot": (
            ["theory", "-a", "nope", "--weight-var", "1", "--plot", str(ws / "new" / "p.png")],
            "nope",
        ),
        # explain
        "explain no topic": (["explain"], "TOPIC"),
        "explain unknown topic with --out": (["explain", "nope", "--out", new], "nope"),
        "explain --plot folder": (["explain", "activations", "--plot", str(a_dir)], "is a folder"),
        "explain --out file": (["explain", "activations", "--out", str(a_file)], "is a file"),
        "explain --out unwritable": (["explain", "activations", "--out", UNWRITABLE], "--out"),
        "explain --plot under a file": (
            ["explain", "activations", "--plot", str(under_file / "a.png")],
            "is a file",
        ),
        # export
        "export tensorboard run missing": (
            ["export", "tensorboard", str(ws / "nowhere"), "--logdir", new],
            "does not exist",
        ),
        "export tensorboard no --logdir": (["export", "tensorboard", r], "--logdir"),
        "export tensorboard --logdir file": (
            ["export", "tensorboard", r, "--logdir", str(a_file)],
            "is a file",
        ),
        "export tensorboard --logdir unwritable": (
            ["export", "tensorboard", r, "--logdir", UNWRITABLE],
            "--logdir",
        ),
        # any command
        "unknown command": (["frobnicate"], "frobnicate"),
    }


def _workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "notes.txt").write_text("a file, not a folder")
    (ws / "folder").mkdir()
    (ws / "folder" / "keep.txt").write_text("the user's")
    return ws


# The case ids, from a throwaway call (paths do not matter for the names).
CASE_IDS = list(_cases(Path("/ws"), Path("/run")))


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_line_and_leaves_nothing_behind(
    case: str, cnn_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    ws = _workspace(tmp_path)
    monkeypatch.chdir(ws)  # relative defaults (runs/demo, report.html) would land here
    argv, needle = _cases(ws, cnn_run[0])[case]
    before = _listing(tmp_path)

    code = main(argv)

    captured = capsys.readouterr()
    assert code != 0, (case, captured.out)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, (case, captured.err)
    assert lines[0].startswith("error:") and needle in lines[0], (case, lines[0])
    assert "Traceback" not in captured.err + captured.out
    assert _listing(tmp_path) == before, case
    assert not Path(UNWRITABLE).parent.exists()


def test_proc_is_unwritable_even_for_root(tmp_path: Path) -> None:
    """The 'unwritable' cases above are real: creation under /proc fails for this user too."""
    with pytest.raises(OSError):
        os.makedirs(Path(UNWRITABLE).parent)
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(OSError):
        os.makedirs(a_file / "sub")


def test_valid_paths_still_work(cnn_run, tmp_path: Path, capsys) -> None:
    """The checks do not reject what is fine: new nested folders, existing files replaced."""
    run_dir = cnn_run[0]
    target = tmp_path / "a" / "b" / "r.html"
    assert main(["report", str(run_dir), "-o", str(target)]) == 0
    assert target.read_bytes().startswith(b"<!DOCTYPE html>")
    assert main(["report", str(run_dir), "-o", str(target)]) == 0  # overwriting is fine
    png = tmp_path / "new" / "theory.png"
    assert main(["theory", "-a", "tanh", "--weight-var", "1.5", "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()


def _gradprobe_command() -> list[str]:
    exe = Path(sys.executable).parent / "gradprobe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gradprobe.cli"]


@pytest.mark.parametrize("which", ["demo --seed -1", "report -o folder"])
def test_installed_command_rejects_bad_input(which: str, cnn_run, tmp_path: Path) -> None:
    """The real entry point, in a fresh process: the three tracebacks of issue 10 §3."""
    ws = _workspace(tmp_path)
    argv = {
        "demo --seed -1": ["demo", "--seed", "-1", "--out", str(ws / "demo")],
        "report -o folder": ["report", str(cnn_run[0]), "-o", str(ws / "folder")],
    }[which]
    before = _listing(tmp_path)
    proc = subprocess.run(
        [*_gradprobe_command(), *argv], capture_output=True, text=True, timeout=300, cwd=ws
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert _listing(tmp_path) == before


def test_demo_out_existing_file_is_rejected_by_the_real_command(tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    proc = subprocess.run(
        [*_gradprobe_command(), "demo", "--out", str(a_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# ---------------------------------------------------------------- start-up
HEAVY = ("torch", "matplotlib", "scipy", "pandas")


def test_importing_the_cli_imports_nothing_heavy() -> None:
    """`gradprobe --help` must not pay for torch & co.: the commands import them when run."""
    code = f"import sys, gradprobe.cli; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert proc.stdout.split() == [], f"imported by gradprobe.cli: {proc.stdout.strip()}"


# ---------------------------------------------------------------- help text
@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["lab", "run", "--help"], ["--seeds", "--workers", " N ", " DIR ", "NAME"]),
        (["demo", "--help"], [" DIR ", " N "]),
        (["report", "--help"], [" FILE ", "RUN"]),
        (["theory", "--help"], [" FLOAT ", " FILE "]),
        (["explain", "--help"], ["docs/concepts.md §5", "docs/concepts.md §1"]),
    ],
)
def test_help_shows_metavars_and_plain_usage(argv, shown, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(argv) == 0
    out = capsys.readouterr().out
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert "{" not in usage, usage
    for text in shown:
        assert text in out, (text, out)
    option_rows = [line for line in out.splitlines() if "--seeds" in line or "--workers" in line]
    assert all("<str>" not in row for row in option_rows), option_rows


def test_concept_citations_name_the_file() -> None:
    """Every section the CLI cites is 'docs/concepts.md §N', the file shipped in the repository."""
    import re

    source = (Path(__file__).parents[1] / "src" / "gradprobe" / "cli.py").read_text("utf-8")
    sections = re.findall(r"(.{0,17})§\d", source)
    assert len(sections) >= 4, "explain should cite the concepts it computes"
    assert all(before == "docs/concepts.md " for before in sections), sections
    assert len(re.findall("concepts.md", source)) == len(re.findall("docs/concepts.md", source))


# ---------------------------------------------------------------- no findings
def test_diagnose_with_no_findings_says_what_was_checked(cnn_run, capsys) -> None:
    import pandas as pd

    from gradprobe import diagnose, load
    from gradprobe.diagnose import DETECTORS, findings_html, no_findings_note

    run_dir, steps, model = cnn_run
    findings = diagnose(load(run_dir))
    assert findings == [], findings.kinds  # a healthy little net: nothing to report

    assert main(["diagnose", str(run_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo rich's line wrapping

    # Independent counts: the steps trained above, the leaf modules of the model, and
    # the statistics as they lie in the run's parquet files.
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    recorded = pd.concat(pd.read_parquet(p) for p in sorted((run_dir / "stats").glob("*.parquet")))
    stats = sorted(set(recorded["stat"]))
    assert "no problems found" in out
    assert f"in {steps} recorded steps of {len(leaves)} modules" in out
    assert f"checked {len(stats)} statistics" in out and all(s in out for s in stats)
    ran = [k for k, d in DETECTORS.items() if set(d.requires) & set(stats)]
    assert f"{len(ran)} detectors ({', '.join(ran)})" in out
    # The report shows the same sentence (one piece of code for both).
    from html import escape

    assert escape(no_findings_note(findings)) in findings_html(findings)
    assert " ".join(no_findings_note(findings).split()) in out

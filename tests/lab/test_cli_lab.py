"""The lab's command line: list, run, and one-line errors with exit code 2."""

from __future__ import annotations

import os

import pytest

from gradprobe.cli import main


def test_lab_list(capsys):
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("depth", "recurrent", "channels"):
        assert name in out
    assert "Hochreiter" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["lab", "run", "nonsense"], "unknown experiment 'nonsense'"),
        (["lab", "run", "depth", "--seeds", "0"], "--seeds must be a whole number"),
        (["lab", "run", "depth", "--seeds", "-2"], "--seeds must be a whole number"),
        (["lab", "run", "depth", "--seeds", "two"], "--seeds must be a whole number"),
        (["lab", "run", "depth", "--workers", "0"], "--workers must be a whole number"),
    ],
)
def test_bad_input_is_one_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unwritable_out(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("not a folder")
    assert main(["lab", "run", "clipping", "--quick", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "Traceback" not in err
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["lab", "run", "clipping", "--quick", "--out", str(locked / "sub")]) == 2


def test_lab_run_writes_everything(capsys, tmp_path, monkeypatch):
    # The CLI's quick mode on the smallest grid: the tiny one, swapped in for speed.
    import gradprobe.lab.runner as runner

    real = runner.run_experiment
    monkeypatch.setattr(runner, "run_experiment", lambda e, **kw: real(e, **{**kw, "mode": "tiny"}))
    assert (
        main(
            [
                "lab",
                "run",
                "clipping",
                "--quick",
                "--seeds",
                "1",
                "--workers",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "clipping: agrees with Pascanu et al. 2013" in out
    assert (tmp_path / "clipping" / "results.csv").exists()
    assert (tmp_path / "lab_report.html").exists()

"""The diagnose and report commands: output, JSON schema, and one-line errors on bad input."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from _diagnose_cases import _digits_run, validate
from gradprobe import diagnose, load
from gradprobe.cli import main
from gradprobe.diagnose import FINDINGS_JSON_SCHEMA
from gradprobe.lab.models import mlp


@functools.cache
def _stored(root: str) -> Path:
    torch.manual_seed(0)
    path = Path(root) / "sigmoid"
    _digits_run(mlp(64, 10, depth=12, width=32, activation="sigmoid"), steps=6, store=path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _stored(str(tmp_path_factory.mktemp("cli")))


def test_diagnose_json_validates_and_matches_the_library(run_dir: Path, capsys) -> None:
    assert main(["diagnose", str(run_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert validate(doc, FINDINGS_JSON_SCHEMA) == []
    expected = diagnose(load(run_dir))
    assert [f["kind"] for f in doc["findings"]] == expected.kinds
    assert "vanishing" in expected.kinds


def test_diagnose_prints_a_table(run_dir: Path, capsys) -> None:
    assert main(["diagnose", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "vanishing" in out and "ReLU" in out


def test_report_command_writes_the_file(run_dir: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "out" / "r.html"
    assert main(["report", str(run_dir), str(run_dir), "-o", str(target)]) == 0
    page = target.read_text(encoding="utf-8")
    assert "<img" in page and "vanishing" in page
    assert f"wrote {target}" in capsys.readouterr().out


def _bad_inputs(tmp_path: Path, run_dir: Path) -> dict[str, Path]:
    not_a_run = tmp_path / "plain"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "meta.json").write_text((run_dir / "meta.json").read_text())
    (corrupt / "stats").mkdir()
    (corrupt / "stats" / "part-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "meta.json").write_text((run_dir / "meta.json").read_text())
    (empty / "stats").mkdir()
    return {
        "missing": tmp_path / "nowhere",
        "not a run": not_a_run,
        "corrupt part": corrupt,
        "empty run": empty,
        "a file": not_a_run / "notes.txt",
    }


@pytest.mark.parametrize("command", ["diagnose", "report"])
def test_bad_input_is_one_line_and_non_zero(command, run_dir: Path, tmp_path: Path, capsys):
    for what, path in _bad_inputs(tmp_path, run_dir).items():
        args = [command, str(path)] + (
            ["-o", str(tmp_path / "x.html")] if command == "report" else []
        )
        code = main(args)
        captured = capsys.readouterr()
        assert code != 0, what
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (what, captured.err)
        assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "x.html").exists()

"""Every example script runs to completion (in a scratch directory) and prints its answer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "an example must print what it found"
    assert "Traceback" not in result.stderr


def test_quickstart_finds_the_vanishing_signal(tmp_path: Path) -> None:
    script = next(p for p in EXAMPLES if p.name == "01_quickstart.py")
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    ratio = float(out.strip().splitlines()[-1].split(" receives ")[1].split()[0])
    assert ratio < 1e-4  # ten sigmoid layers at PyTorch's default init


def test_first_nan_example_names_the_unsafe_layer() -> None:
    script = next(p for p in EXAMPLES if p.name == "02_first_nan.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True).stdout
    assert "module '3' (UnsafeNorm)" in out and "forward output" in out

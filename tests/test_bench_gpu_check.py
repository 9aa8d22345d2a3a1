"""bench/gpu_check.py, issue 26's prepared GPU run: on a machine without CUDA it says so
in one line and exits non-zero; its smoke sizes run on the CPU end to end (three twins
trained in turns, a row for each, the sync check reported as not made)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs it for real")
def test_without_cuda_one_line_and_a_non_zero_exit():
    done = _run()
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "gpu_check.py: no CUDA device here (--device cpu --tiny for a smoke run)"
    ]


def test_the_smoke_run_reports_every_twin():
    done = _run("--device", "cpu", "--tiny")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == ["plain", "every=1", "default cadence"]
    assert all(float(r.split(" | ")[2].rstrip(" |")) > 0 for r in rows)
    assert "host syncs in 3 sentinel steps (cadence): not checked" in done.stdout

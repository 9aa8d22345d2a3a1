"""bench/ab.py, the step-by-step comparison of two gradprobe versions in one process: it
must load the other version as a package of its own, train all three twins identically
(it checks the weights itself), report every variant, and refuse a bad ref in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "ab.py"

pytestmark = pytest.mark.skipif(
    not (ROOT / ".git").exists(), reason="bench/ab.py reads the base version from git"
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


def _variants(stdout: str) -> list[str]:
    return [line.split(" | ")[0][2:] for line in stdout.splitlines() if line.startswith("| ")][1:]


@pytest.mark.parametrize(
    "extra",
    [["--every", "1"], ["--sentinel-only"]],
    ids=["every=1", "sentinel-only"],
)
def test_both_versions_run_side_by_side_and_train_identically(extra):
    done = _run("--base", "HEAD", "--steps", "4", "--warm", "1", *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _variants(done.stdout) == ["plain", "base", "new"]
    assert "gradprobe_base" in done.stdout  # the base version is its own package
    assert "training bit-identical in all three variants: yes" in done.stdout


def test_a_checkout_folder_as_the_base(tmp_path):
    done = _run("--base-src", str(ROOT / "src" / "gradprobe"), "--steps", "2", "--warm", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _variants(done.stdout) == ["plain", "base", "new"]


def test_a_ref_that_does_not_exist_is_one_line():
    done = _run("--base", "no-such-ref-anywhere", "--steps", "1")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "cannot read src/gradprobe at 'no-such-ref-anywhere'" in done.stderr

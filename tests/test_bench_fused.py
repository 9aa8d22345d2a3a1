"""bench/fused.py, issue 12's fused-kernel measurement: both formulations must compute
the statistics they stand for (else the comparison means nothing), and the script must
run, compiled results checked against eager ones, as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import fused  # noqa: E402  bench/ is not a package: its folder is on the path


def _reference(outputs: list[torch.Tensor], tanh_rows: int) -> tuple[torch.Tensor, ...]:
    """Per output, in float64, one tensor at a time."""
    ys = [y.double() for y in outputs]
    norms = torch.stack([torch.linalg.vector_norm(y) for y in ys])
    sums = torch.stack([y.sum() for y in ys])
    unit_max = torch.stack([y.abs().amax(dim=0) for y in ys])
    saturated = torch.stack([(y.abs() > fused.SATURATED).sum() for y in ys[:tanh_rows]])
    nonzero = torch.stack([torch.count_nonzero(y) for y in ys])
    return norms, sums, unit_max, saturated, nonzero


def _close(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("formulation", ["eager", "fused"])
def test_pass_end_statistics_against_one_output_at_a_time(formulation):
    outputs, tanh_rows = fused.mlp_outputs()
    outputs[3] = outputs[3].clone()
    outputs[3][:, :5] = 0.0  # a few dead units: the non-zero count and unit max must see them
    if formulation == "eager":
        got = fused.EagerStats(outputs, tanh_rows)(outputs)
    else:
        got = fused.fused_stats(outputs, tanh_rows)  # its body, run eagerly
    want = _reference(outputs, tanh_rows)
    _close(got, want)  # raises, naming the statistic, where they differ
    # the case is the one meant: output 3's five dead units are seen, in every sample
    rows, _units = outputs[3].shape
    assert int(want[4][3]) == outputs[3].numel() - 5 * rows
    assert bool((want[2][3][:5] == 0).all()) and bool((want[2][3][5:] > 0).all())


@pytest.mark.parametrize("formulation", [fused.eager_params, fused.fused_params])
def test_parameter_passes_against_vector_norm_and_a_copy(formulation):
    params, grads = fused.mlp_parameters()
    snapshot = [torch.zeros_like(p) for p in params]
    grad_norms, param_norms = formulation(grads, params, snapshot)
    _close(
        (grad_norms, param_norms),
        (
            torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]),
            torch.stack([torch.linalg.vector_norm(p.double()) for p in params]),
        ),
    )
    assert all(torch.equal(s, p) for s, p in zip(snapshot, params))


def _can_compile() -> bool:
    """inductor on the CPU builds C++ against Python's headers."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return bool(shutil.which("g++") or shutil.which("c++")) and headers.exists()


@pytest.mark.slow
@pytest.mark.skipif(not _can_compile(), reason="torch.compile on the CPU needs g++ and Python.h")
def test_the_script_compiles_checks_and_reports():
    done = subprocess.run(
        [sys.executable, str(BENCH / "fused.py"), "--rounds", "1", "--calls", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| pass-end statistics, eager",
        "| pass-end statistics, compiled",
        "| parameter passes, eager",
        "| parameter passes, compiled",
    ]

"""`gradprobe theory` and `gradprobe explain` through the command line."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from gradprobe.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_theory_json_for_he_relu(capsys):
    code, out, err = run(
        capsys, "theory", "--activation", "relu", "--weight-var", "2", "--depth", "20", "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {
        "activation",
        "weight_var",
        "bias_var",
        "q_star",
        "chi1",
        "depth_scale",
        "critical_weight_var",
        "depth",
        "predicted_log10_error_ratio",
    }
    # He init is critical for relu: every factor σ_w²·E[relu'²] = 2·½ = 1
    assert data["activation"] == "relu"
    assert data["chi1"] == pytest.approx(1.0, abs=1e-12)
    assert data["critical_weight_var"] == pytest.approx(2.0, abs=1e-8)
    assert data["predicted_log10_error_ratio"] == pytest.approx(0.0, abs=1e-12)
    assert data["depth_scale"] is None  # infinite at criticality: JSON null


def test_theory_json_without_depth_and_for_tanh(capsys):
    code, out, _ = run(capsys, "theory", "-a", "tanh", "--weight-var", "0.5", "--json")
    data = json.loads(out)
    assert code == 0 and "predicted_log10_error_ratio" not in data
    # σ_b² = 0, σ_w² < 1: q* = 0 and χ₁ = σ_w² tanh'(0)² = σ_w², ξ_c = −1/ln σ_w²
    assert data["q_star"] == 0.0
    assert data["chi1"] == pytest.approx(0.5, rel=1e-9)
    assert data["depth_scale"] == pytest.approx(-1 / math.log(0.5), rel=1e-6)
    assert data["critical_weight_var"] == pytest.approx(1.0, abs=1e-8)


def test_theory_table_and_plot(capsys, tmp_path):
    png = tmp_path / "curves.png"
    code, out, err = run(
        capsys,
        "theory",
        "-a",
        "sigmoid",
        "--weight-var",
        "0.3333",
        "--bias-var",
        "0.001",
        "--depth",
        "10",
        "--plot",
        str(png),
    )
    assert code == 0, err
    assert "χ₁" in out and "critical σ_w²" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["theory", "-a", "nope", "--weight-var", "1"], "unknown activation 'nope'"),
        (["theory", "-a", "tanh", "--weight-var", "-1"], "weight variance"),
        (["theory", "-a", "tanh", "--weight-var", "1", "--bias-var", "-0.5"], "bias variance"),
        (["theory", "-a", "tanh", "--weight-var", "1", "--depth", "0"], "depth"),
        (["theory", "-a", "tanh"], "--weight-var"),
        (["theory", "--weight-var", "1"], "--activation"),
        (["theory", "bogus"], "unknown theory topic 'bogus'"),
        (["theory", "residual"], "needs --depth"),
        (["theory", "residual", "--depth", "4", "--alpha", "nan"], "--alpha"),
        (["theory", "residual", "--depth", "4", "--plot", "x.png"], "has no plot"),
        (["theory", "width", "--depth", "4"], "needs --width"),
        (["theory", "width", "--width", "0", "--depth", "4"], "--width"),
        (["theory", "isometry", "--depth", "4"], "needs --activation"),
        (
            ["theory", "isometry", "-a", "softplus", "--weight-var", "3", "--depth", "4"],
            "fixed point",
        ),
        (["theory", "isometry", "-a", "tanh", "--depth", "4", "--init", "unif"], "unif"),
        (["theory", "gated"], "needs --forget-bias"),
        (["theory", "gated", "--forget-bias", "inf"], "--forget-bias"),
        (["explain", "nope"], "unknown topic"),
        (["explain", "backprop", "--plot", "x.png"], "has no figure"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, args, needle):
    code, _, err = run(capsys, *args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_explain_standardize_prints_population_std(capsys):
    code, out, _ = run(capsys, "explain", "standardize")
    assert code == 0
    assert f"{statistics.pstdev([100, 50, 10, 5, 1]):.2f}" == "37.72"
    assert "37.72" in out and "1422.96" in out and "1600.16" in out


def test_explain_backprop_and_channels(capsys):
    code, out, _ = run(capsys, "explain", "backprop")
    assert code == 0 and "dL/dW1" in out and "autograd" in out
    code, out, _ = run(capsys, "explain", "channels")
    assert code == 0 and "DEAD" in out and "[8, 4, 8, 8]" in out


def test_explain_activations_writes_png(capsys, tmp_path):
    code, out, _ = run(capsys, "explain", "activations", "--out", str(tmp_path))
    assert code == 0 and "gelu" in out
    assert (tmp_path / "activations.png").read_bytes()[:4] == b"\x89PNG"


def test_installed_command_reports_bad_input_without_traceback():
    exe = Path(sys.executable).parent / "gradprobe"
    if not exe.exists():
        pytest.skip("gradprobe console script is not installed in this environment")
    proc = subprocess.run(
        [str(exe), "theory", "--activation", "nope", "--weight-var", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: unknown activation 'nope'")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_theory_topics_json_are_the_library_numbers(capsys):
    from gradprobe import theory

    code, out, err = run(capsys, "theory", "residual", "--depth", "16", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["alpha"] for r in rows] == [1.0, 0.25]
    assert rows[0]["growth"] == 2.0**16 == theory.residual_growth(1.0, 16)
    assert rows[1]["growth"] == theory.residual_growth(0.25, 16)
    code, out, _ = run(
        capsys, "theory", "residual", "--depth", "9", "--alpha", "0.5", "--gain", "2", "--json"
    )
    assert json.loads(out)["rows"] == [
        {"alpha": 0.5, "growth": theory.residual_growth(0.5, 9, 2.0), "per_block": math.sqrt(1.5)}
    ]
    code, out, _ = run(capsys, "theory", "width", "--width", "64", "--depth", "20", "--json")
    assert json.loads(out)["second_moment"] == theory.width_spread(64, 20)
    code, out, _ = run(
        capsys, "theory", "isometry", "-a", "tanh", "--bias-var", "0.001", "--depth", "32", "--json"
    )
    d = json.loads(out)
    wv = theory.critical_weight_var("tanh", 0.001)  # the default σ_w²: criticality
    assert d["weight_var"] == wv and d["chi1"] == pytest.approx(1.0, abs=1e-9)
    assert d["spread"] == {
        i: theory.jacobian_spread("tanh", wv, 0.001, depth=32, init=i)
        for i in ("gaussian", "orthogonal")
    }
    code, out, _ = run(capsys, "theory", "gated", "--forget-bias", "1", "--json")
    d = json.loads(out)
    assert d["memory"] == theory.gated_memory(1.0) == 1 + math.e
    assert d["memory_efold"] == pytest.approx(-1 / math.log(1 / (1 + math.exp(-1.0))), rel=1e-12)
    for topic in (
        ["residual", "--depth", "4"],
        ["width", "--width", "8", "--depth", "3"],
        ["gated", "--forget-bias", "0"],
    ):
        code, out, _ = run(capsys, "theory", *topic)
        assert code == 0 and "┃" in out

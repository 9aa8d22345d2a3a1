"""bench/every_step.py, issue 26's benchmark: every mode of every case runs (a one-layer
GPT-2 with a small vocabulary stands in for the bench's; 1-2 steps), trains its twins
identically (the script compares their weights itself), and prints each table with one
row per mode, statistic group or memory mode, each with its columns. Timings are not
checked (no timed unit tests): only the output's shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "every_step.py"
SMALL_GPT2 = ["--gpt2-layers", "1", "--gpt2-vocab", "256"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *SMALL_GPT2, *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


def _tables(stdout: str) -> dict[str, list[list[str]]]:
    """Rows of the tables under each ``###`` heading (headers and separators dropped)."""
    tables: dict[str, list[list[str]]] = {}
    title = ""
    for line in stdout.splitlines():
        if line.startswith("### "):
            title = line[4:]
            tables[title] = []
        elif line.startswith("|---"):
            tables[title].pop()  # the header above it
        elif line.startswith("|") and title:
            tables[title].append([c.strip() for c in line.strip().strip("|").split("|")])
    return tables


def _number(cell: str) -> float:
    return float(cell.replace("+", ""))


def test_every_mode_and_statistic_runs_and_trains_identically():
    done = _run(
        "--cases", "gpt2,mlp,mlp1024", "--tables", "modes,stats",
        "--gpt2-steps", "1", "--mlp-steps", "2", "--mlp1024-steps", "1",
        "--warm", "1", "--bare-rounds", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Training bit-identical in every mode: yes" in done.stdout
    tables = _tables(done.stdout)
    modes = tables["Modes, interleaved step by step"]
    labels = [row[1].split(" (steady")[0] for row in modes]
    expected = [
        "plain",
        "plain + one `_foreach_norm` over the grads (floor)",
        "Probe(model, opt): default cadence",
        "every=1, default statistics",
        'every=1, stats="cheap"',
    ]
    assert labels == expected * 3
    assert [row[0] for row in modes] == ["gpt2"] * 5 + ["mlp"] * 5 + ["mlp1024"] * 5
    for row in modes:
        assert len(row) == 7
        assert _number(row[2]) > 0 and _number(row[4]) > 0 and _number(row[5]) > 0
    per_stat = tables["Each statistic alone at every=1, beside the floor of its arithmetic"]
    # one table per case, 14 groups and "all" each
    assert len(per_stat) == 3 * 15
    groups = [row[0] for row in per_stat]
    assert groups.count("all (default statistics)") == 3
    assert groups.count("error_gain (with the error norm it divides by)") == 3
    for i, row in enumerate(per_stat):
        assert len(row) == 6
        assert _number(row[1]) > 0
        nbytes, kernels = float(row[3]), int(row[4])
        if row[0].startswith(("none", "host-side")):
            assert (nbytes, kernels, row[5]) == (0.0, 0, "")
        elif i < 15 and row[0].startswith("gate"):
            # GPT-2's NewGELUActivation is not a registered activation: no gate to read
            assert (nbytes, kernels) == (0.0, 0)
        else:
            assert nbytes > 0 and kernels > 0 and float(row[5]) >= 0, row


def test_peak_memory_in_fresh_processes():
    done = _run("--cases", "mlp", "--tables", "memory", "--memory-steps", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _tables(done.stdout)["Peak memory (a fresh process per case and mode)"]
    assert [row[1] for row in rows] == ["plain", "every=1", "default cadence"]
    assert rows[0][4] == "1.00" and rows[0][6] == "1.000"
    for row in rows:
        assert len(row) == 7 and float(row[3]) > 0 and float(row[5]) > 0


def test_an_unknown_case_is_one_line():
    done = _run("--cases", "resnet")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "unknown case or table" in done.stderr


def test_the_profile_script_runs_and_reports_each_part():
    done = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "profile_every_step.py"), "--cases", "mlp",
            "--steps", "1", "--warm", "1", "--parts", "hooks,hooks-cadence,levers,cprofile,walk,ops",
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    tables = _tables(done.stdout)
    assert set(tables) == {
        "mlp: by entry point (thread CPU time, no profiler)",
        "mlp: the default cadence by entry point (steady state)",
        "mlp: cProfile (thread CPU time)",
        "mlp: the same, every call walking the graph",
        "mlp: aten ops per recorded step (torch.profiler)",
        "mlp: unit counts, today's and chunk-summed (lever #1)",
    }
    # the proposed unit counts equal today's on every output shape
    assert [row[-1] for row in tables["mlp: unit counts, today's and chunk-summed (lever #1)"]] == [
        "yes",
        "yes",
    ]
    entry_points = [row[0] for row in tables["mlp: by entry point (thread CPU time, no profiler)"]]
    assert "forward hook" in entry_points and "probe.log (the user's call)" in entry_points
    assert len(tables["mlp: cProfile (thread CPU time)"]) > 5
    ops = tables["mlp: aten ops per recorded step (torch.profiler)"]
    assert len(ops) == 15 and all(len(row) == 4 for row in ops)

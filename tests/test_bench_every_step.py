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
    # one table per case, 17 groups and "all" each
    per_case = 18
    assert len(per_stat) == 3 * per_case
    groups = [row[0] for row in per_stat]
    assert groups.count("all (default statistics)") == 3
    assert groups.count("error_gain (with the error norm it divides by)") == 3
    for group in SEQUENCE_GROUPS:
        assert groups.count(group) == 3
    for i, row in enumerate(per_stat):
        assert len(row) == 6
        assert _number(row[1]) > 0
        nbytes, kernels = float(row[3]), int(row[4])
        gpt2 = i < per_case
        if row[0].startswith(("none", "host-side")):
            assert (nbytes, kernels, row[5]) == (0.0, 0, "")
        elif gpt2 and row[0].startswith("gate"):
            # GPT-2's NewGELUActivation is not a registered activation: no gate to read
            assert (nbytes, kernels) == (0.0, 0)
        elif not gpt2 and row[0] in SEQUENCE_GROUPS[:2]:
            # an MLP has no attention call and no sequence block
            assert (nbytes, kernels) == (0.0, 0)
        elif not gpt2 and row[0] == SEQUENCE_GROUPS[2]:
            # its logits [128, 10] (mlp) are 5 KiB: 0.0 in MiB; one pass, 8 kernels
            assert kernels == 8 and float(row[5]) >= 0, row
        else:
            assert nbytes > 0 and kernels > 0 and float(row[5]) >= 0, row


SEQUENCE_GROUPS = (
    "attention: attn_logit_max, attn_entropy, attn_entropy_min",
    "token_cosine",
    "logits: logit_max, logit_z",
)


def test_the_sequence_floors_follow_the_sizes_of_one_step():
    """Issue 25's floors from the sizes captured on one GPT-2 step, against the sizes
    worked out by hand from the config (1 layer, 6 heads of 64, vocab 256, batch 8 × 128):
    one causal SDPA call with q and k [8, 6, 128, 64]; one block output [8, 128, 384]; one
    logits tensor [8, 128, 256]. Sample: BATCH sequences × ROWS rows per head, POSITIONS
    positions per sequence (the library's constants)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import every_step
        import stat_floors
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from gradprobe.attention import BATCH, ROWS
    from gradprobe.sequence import POSITIONS

    args = every_step.parse([*SMALL_GPT2])
    case = every_step.build("gpt2", args)
    sizes = stat_floors.step_sizes(case)
    assert [(tuple(c.q), tuple(c.k), c.mask, c.causal) for c in sizes.attention] == [
        ((8, 6, 128, 64), (8, 6, 128, 64), None, True)
    ]
    assert [tuple(s) for s in sizes.blocks] == [(8, 128, 384)]
    assert [tuple(s) for s in sizes.logits] == [(8, 128, 256)]
    # the attention module is probed now (the engine's rule), so its output is counted
    names = [n for n, _ in stat_floors.probed_modules(case.model)]
    assert "transformer.h.0.attn" in names
    floors = {label: floor for label, (_, floor) in stat_floors.FLOORS.items()}
    b, r = min(BATCH, 8), min(ROWS, 128)
    expected = {
        SEQUENCE_GROUPS[0]: (4 * (b * 6 * r * 64 + b * 6 * 128 * 64), 12),  # causal: 10 + 2
        SEQUENCE_GROUPS[1]: (4 * 8 * min(POSITIONS, 128) * 384, 6),
        SEQUENCE_GROUPS[2]: (4 * 8 * 128 * 256, 8),
    }
    for label, (nbytes, kernels) in expected.items():
        got_bytes, got_kernels, ms = stat_floors.floor_numbers(floors[label], sizes, 1)
        assert (got_bytes, got_kernels) == (nbytes, kernels), label
        assert ms is not None and ms >= 0


def test_the_hand_written_sequence_floors_compute_the_statistics():
    """The timed hand-written versions are the statistics, not stand-ins: each builds its
    tensors from torch's RNG, so re-seeding rebuilds them, and its results are compared
    with the library's reducers on those tensors (float32 both: sums of ~1e2-1e4 terms of
    size ~1-10 agree to ~1e-4 relative; tolerances 1e-3 relative)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import stat_floors
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import torch

    from gradprobe.attention import attention_stats
    from gradprobe.sequence import logit_stats, token_cosine

    close = {"rtol": 1e-3, "atol": 1e-4}
    torch.manual_seed(0)
    [(top, z)] = stat_floors._logits([torch.Size([3, 9, 11])])()
    torch.manual_seed(0)
    want_top, want_z, _ = logit_stats(torch.randn(3, 9, 11))
    torch.testing.assert_close((top, z), (want_top, want_z), **close)

    torch.manual_seed(1)
    [cos] = stat_floors._token_cosine([torch.Size([2, 50, 16])])()
    torch.manual_seed(1)
    total, _ = token_cosine(torch.randn(2, 50, 16))
    torch.testing.assert_close(cos, total, **close)

    # 2 sequences, 3 heads, 40 query rows against 40 keys, causal: ROWS (32) strata of rows
    call = stat_floors.AttnCall(
        torch.Size([2, 3, 40, 8]), torch.Size([2, 3, 40, 8]), None, causal=True
    )
    torch.manual_seed(2)
    [(logit_max, neg_sum, neg_max)] = stat_floors._attention([call])()
    torch.manual_seed(2)
    q = torch.randn(2, 3, 1, 40, 8).reshape(2, 3, 40, 8)
    k = torch.randn(2, 3, 1, 40, 8).reshape(2, 3, 40, 8)
    want = attention_stats(q, k, is_causal=True)
    torch.testing.assert_close(logit_max.reshape(-1), want.logit_max, **close)
    torch.testing.assert_close(-neg_sum.reshape(-1), want.entropy_sum, **close)
    torch.testing.assert_close(-neg_max.reshape(-1), want.entropy_min, **close)


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
    # a row per FLOORS group (bench/stat_floors.py) and one for the default statistics
    assert len(ops) == 18 and all(len(row) == 4 for row in ops)

"""The run directory: atomic parts, load(), damaged and killed runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe import GradprobeError, Probe


def _train(store, steps=5, flush_every=2, every=1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with Probe(model, opt, store=store, flush_every=flush_every, every=every, label="t") as probe:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        live = probe.frame()
    return live


def test_store_round_trip_equals_the_live_frame(tmp_path):
    live = _train(tmp_path / "run")
    run = gradprobe.load(tmp_path / "run")
    parts = sorted((tmp_path / "run" / "stats").glob("part-*.parquet"))
    assert len(parts) >= 3  # flushes every 2 steps, and at close
    assert not list((tmp_path / "run" / "stats").glob(".*tmp"))
    stored = run.frame().sort_values(["step", "name", "stat"]).reset_index(drop=True)
    expected = live.sort_values(["step", "name", "stat"]).reset_index(drop=True)
    assert stored.equals(expected)
    assert run.meta["status"] == "closed" and run.meta["steps"] == 5
    assert run.modules == ["0", "1", "2"]
    assert run.name == "t"
    assert run.meta["versions"]["torch"] == torch.__version__


def test_a_directory_holding_an_earlier_run_is_replaced(tmp_path):
    _train(tmp_path / "run", steps=5)
    _train(tmp_path / "run", steps=2)
    assert gradprobe.load(tmp_path / "run").meta["steps"] == 2
    assert sorted(gradprobe.load(tmp_path / "run").steps) == [0, 1]


def test_table_is_wide_in_forward_order(tmp_path):
    _train(tmp_path / "run", steps=3)
    table = gradprobe.load(tmp_path / "run").table("error_norm")
    assert list(table.columns) == ["0", "1", "2"] and list(table.index) == [0, 1, 2]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no meta.json"),
    ],
)
def test_load_rejects_what_is_not_a_run(tmp_path, make, match):
    with pytest.raises(GradprobeError, match=match):
        gradprobe.load(make(tmp_path))


def test_load_names_a_corrupt_part(tmp_path):
    _train(tmp_path / "run")
    part = sorted((tmp_path / "run" / "stats").glob("part-*.parquet"))[1]
    part.write_bytes(b"not parquet at all")
    with pytest.raises(GradprobeError, match=part.name):
        gradprobe.load(tmp_path / "run")


def test_load_rejects_a_foreign_meta(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(GradprobeError, match="not a gradprobe run"):
        gradprobe.load(tmp_path)


def test_a_run_killed_with_sigkill_keeps_every_flushed_step(tmp_path):
    """A training process is killed mid-way: every flushed part loads, nothing half-written."""
    store = tmp_path / "killed"
    marker = tmp_path / "flushed"
    script = textwrap.dedent(
        f"""
        import torch, time
        from torch import nn
        from gradprobe import Probe
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        probe = Probe(model, opt, store={str(store)!r}, flush_every=3, dead_window=1, every=1)
        step = 0
        while True:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == 9:
                open({str(marker)!r}, "w").write("9")
            time.sleep(0.002)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "the training process did not get going"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    run = gradprobe.load(store)
    steps = sorted(run.steps)
    assert len(steps) >= 9 and len(steps) % 3 == 0  # whole flushes only
    assert steps == list(range(len(steps)))
    assert run.meta["status"] == "running"
    per_step = run.frame().groupby("step").size()
    # No half-written step: every step has every statistic (every=1, dead_window=1; under
    # the default cadence the steps after AUTO_FIRST have the sentinel's rows only, and a
    # fast machine reaches them before the kill).
    assert per_step.nunique() == 1


def test_rank_zero_only_writes(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    with Probe(nn.Linear(2, 2), store=tmp_path / "rank1"):
        pass
    assert not Path(tmp_path / "rank1").exists()


def test_with_a_store_rows_live_on_disk_only(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with Probe(model, store=tmp_path / "run", flush_every=2) as probe:
        for _ in range(6):
            model(torch.randn(3, 4)).sum().backward()
            probe.step()
        assert probe._engine.rows._frames == []  # nothing accumulates in memory
        live = probe.frame()
    assert sorted(live.step.unique()) == list(range(6))
    assert live.equals(gradprobe.load(tmp_path / "run").frame())

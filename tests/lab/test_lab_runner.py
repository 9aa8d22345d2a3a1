"""runner: configs, determinism, the process pool, written results and the report."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from gradprobe.errors import GradprobeError
from gradprobe.lab import EXPERIMENTS
from gradprobe.lab.experiment import Check, RunConfig, build_verdict, mean_spread, seeds_for
from gradprobe.lab.runner import run_experiment, run_experiments


def test_registry_is_complete_and_plain():
    assert list(EXPERIMENTS) == [
        "depth",
        "activations",
        "init",
        "isometry",
        "normalization",
        "residual",
        "recurrent",
        "clipping",
        "optimizers",
        "pretraining",
        "dying_relu",
        "channels",
        "attention",
    ]
    for name, e in EXPERIMENTS.items():
        assert e.name == name and e.question.endswith("?") and e.citation and e.source
        for mode in ("tiny", "quick", "full"):
            configs = e.grid(mode, 2)
            assert configs and len(set(configs)) == len(configs)
            assert {c.seed for c in configs} == {0, 1}


def test_run_config_is_hashable_json_and_stable():
    a = RunConfig.make("depth", 0, depth=5, activation="relu")
    b = RunConfig.make("depth", 0, activation="relu", depth=5)
    assert a == b and hash(a) == hash(b) and a.run_id == b.run_id
    assert RunConfig.from_dict(json.loads(a.to_json())) == a
    assert RunConfig.make("depth", 1, depth=5, activation="relu").run_id != a.run_id


def test_verdict_counts_seeds():
    v = build_verdict([Check("a", (True, True, False)), Check("b", (True, True, True))], ["x"])
    assert v.agrees_with_source and not v.passed
    assert (v.seeds_agree, v.seeds_total) == (2, 3)
    assert "holds in 2 of 3 seeds" in v.text
    w = build_verdict([Check("a", (False, True, False))], [])
    assert not w.agrees_with_source and w.text.startswith("Disagrees")


def test_bad_seeds_rejected():
    e = EXPERIMENTS["clipping"]
    for bad in (0, -1):
        with pytest.raises(GradprobeError):
            seeds_for(e, "quick", bad)
    assert seeds_for(e, "quick", None) == e.seeds[1]


def test_same_seed_gives_identical_tables(tmp_path):
    first = run_experiment("clipping", mode="tiny", workers=1)
    second = run_experiment("clipping", mode="tiny", workers=1)
    pd.testing.assert_frame_equal(first.table, second.table)
    # NaN-safe: as_dict writes non-finite numbers as None.
    assert [r.as_dict()["metrics"] for r in first.results] == [
        r.as_dict()["metrics"] for r in second.results
    ]


def test_pool_matches_in_process_and_writes_results(tmp_path):
    inline = run_experiment("clipping", mode="tiny", workers=1)
    outcomes = run_experiments(["clipping"], mode="tiny", out=tmp_path, workers=2)
    pooled = outcomes[0]
    # A spawned worker with one torch thread computes exactly what the parent does.
    pd.testing.assert_frame_equal(inline.table, pooled.table)
    folder = tmp_path / "clipping"
    table = pd.read_csv(folder / "results.csv")
    assert list(table.columns) == list(pooled.table.columns)
    data = json.loads((folder / "results.json").read_text())
    assert data["verdict"]["text"] == pooled.verdict.text and len(data["runs"]) == len(
        pooled.results
    )
    assert sorted(p.name for p in folder.glob("*.png"))
    # Each run's probe store is loadable by gradprobe.load.
    import gradprobe

    run = gradprobe.load(folder / "runs" / pooled.results[0].config.run_id)
    assert not run.empty
    html = (tmp_path / "lab_report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert pooled.verdict.text.splitlines()[0] in html


def test_mean_spread_keeps_grid_order():
    from gradprobe.lab.experiment import RunResult

    rs = [
        RunResult(RunConfig.make("x", s, k=k), {"m": float(s + i)})
        for s in range(2)
        for i, k in enumerate(("b", "a"))
    ]
    t = mean_spread(rs, ["k"], ["m"])
    assert list(t["k"]) == ["b", "a"] and list(t["m"]) == [0.5, 1.5] and list(t["seeds"]) == [2, 2]

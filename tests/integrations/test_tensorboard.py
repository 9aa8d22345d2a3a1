"""TensorBoard: export a stored run and write a live one; read the event files back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradprobe
from gradprobe import Probe
from gradprobe.cli import main
from gradprobe.headline import story
from gradprobe.integrations.tensorboard import (
    DEFAULT_STATS,
    TensorBoardWriter,
    export,
    histogram_edges,
)


def train(store=None, steps=3, writer_dir=None, **writer_options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with Probe(model, opt, store=store, stats="full", flush_every=2) as probe:
        writer = TensorBoardWriter(probe, writer_dir, **writer_options) if writer_dir else None
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    if writer is not None:
        writer.close()
    return probe


def events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def changing_series(scalars) -> set[str]:
    """Tags of the series whose values are not all the same (numpy, not the exporter's code)."""
    tags = set()
    for (stat, name), rows in scalars.groupby(["stat", "name"]):
        if len(np.unique(rows.value.to_numpy())) > 1:
            tags.add(f"{stat}/{name}")
    return tags


def check(acc: EventAccumulator, run: gradprobe.Run, every_stat: bool = False) -> None:
    frame = run.frame()
    scalars = frame[~frame.stat.str.startswith("hist_")]
    if not every_stat:
        scalars = scalars[scalars.stat.isin(DEFAULT_STATS)]
    assert set(acc.Tags()["scalars"]) == changing_series(scalars)
    for tag, stat, name in (
        ("error_norm/1", "error_norm", "1"),
        ("grad_norm/0.weight", "grad_norm", "0.weight"),
        ("global_grad_norm/(model)", "global_grad_norm", "(model)"),
    ):
        got = {e.step: e.value for e in acc.Scalars(tag)}
        want = scalars[(scalars.stat == stat) & (scalars.name == name)]
        assert got == pytest.approx(dict(zip(want.step, want.value)), rel=1e-6)
    hist = acc.Histograms("activations/1")
    assert [h.step for h in hist] == [0, 1, 2]
    edges = histogram_edges(run.meta, "1")
    h = hist[-1].histogram_value
    counts = frame[(frame.step == 2) & (frame.name == "1") & frame.stat.str.startswith("hist_")]
    counts = counts.sort_values("stat").value.to_numpy()
    assert h.num == counts.sum() == 16 * 8
    assert list(h.bucket_limit) == pytest.approx(edges[1:].tolist())
    assert list(h.bucket) == pytest.approx(counts.tolist())
    mean = frame[(frame.step == 2) & (frame.name == "1") & (frame.stat == "act_mean")].value.iloc[0]
    assert h.sum / h.num == pytest.approx(mean, rel=1e-6)


def test_export_command_writes_scalars_and_histograms(tmp_path):
    train(store=tmp_path / "run")
    assert (
        main(["export", "tensorboard", str(tmp_path / "run"), "--logdir", str(tmp_path / "tb")])
        == 0
    )
    check(events(tmp_path / "tb"), gradprobe.load(tmp_path / "run"))


def test_live_writer_matches_the_export(tmp_path):
    train(store=tmp_path / "run", writer_dir=tmp_path / "live")
    check(events(tmp_path / "live"), gradprobe.load(tmp_path / "run"))


def test_export_of_a_path_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert (
        main(["export", "tensorboard", str(tmp_path / "nope"), "--logdir", str(tmp_path / "tb")])
        == 2
    )
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not np.any([p.name.startswith("events") for p in tmp_path.rglob("*")])


def _train_with_loss(store, steps: int, writer_dir=None, nan_at: int | None = None):
    """A run that logs its loss; the learning rate is constant, the NaN flags all zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    with Probe(model, opt, store=store, every=1, flush_every=4) as probe:
        writer = TensorBoardWriter(probe, writer_dir) if writer_dir else None
        for step in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if step == nan_at:
                loss = loss * float("nan")
            loss.backward()
            probe.log(loss=loss)
            opt.step()
    if writer is not None:
        writer.close()
    return probe


def test_default_tags_no_constant_series_real_walltimes_and_findings_text(tmp_path):
    import time

    before = time.time()
    _train_with_loss(tmp_path / "run", steps=10)
    after = time.time()
    run = gradprobe.load(tmp_path / "run")
    export(run, tmp_path / "tb")
    acc = events(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    frame = run.frame()
    # What users read is there ...
    assert {"loss/(model)", "global_grad_norm/(model)", "global_grad_norm_preclip/(model)"} <= tags
    assert {"error_norm/0", "grad_norm/0.weight", "update_ratio/2.weight"} <= tags
    # ... and nothing that never changes: the constant lr, the all-zero NaN/Inf flags.
    assert "lr/(model)" not in tags and not any(t.startswith("grad_nonfinite/") for t in tags)
    for tag in tags:
        values = [e.value for e in acc.Scalars(tag)]
        assert len(set(values)) > 1, tag
    # Wall times: when the steps ran (between the clock reads around training), increasing.
    loss_events = acc.Scalars("loss/(model)")
    walls = np.array([e.wall_time for e in loss_events])
    assert [e.step for e in loss_events] == list(range(10))
    assert before <= walls.min() and walls.max() <= after
    assert np.all(np.diff(walls) > 0)
    # The findings, as the story of this run's diagnosis.
    text = acc.Tensors("gradprobe/findings/text_summary")[-1].tensor_proto.string_val[0].decode()
    want = story(gradprobe.diagnose(run))
    assert [line.strip() for line in text.splitlines()] == [
        line.strip() for line in want.splitlines()
    ]
    assert set(frame.step) == set(range(10))


def test_stats_all_writes_every_changing_statistic(tmp_path):
    train(store=tmp_path / "run")
    run = gradprobe.load(tmp_path / "run")
    export(run, tmp_path / "tb", stats="all")
    check(events(tmp_path / "tb"), run, every_stat=True)
    argv = ["export", "tensorboard", str(tmp_path / "run"), "--logdir", str(tmp_path / "cli")]
    assert main([*argv, "--all"]) == 0
    check(events(tmp_path / "cli"), run, every_stat=True)


def test_live_writer_says_a_nan_at_its_step(tmp_path):
    with pytest.warns(gradprobe.hooks.GradprobeWarning, match="step 6: NaN/Inf"):
        _train_with_loss(tmp_path / "run", steps=9, writer_dir=tmp_path / "live", nan_at=6)
    acc = events(tmp_path / "live")
    live = acc.Tensors("gradprobe/live/text_summary")
    assert [e.step for e in live][:1] == [6]
    assert "nonfinite" in live[0].tensor_proto.string_val[0].decode()

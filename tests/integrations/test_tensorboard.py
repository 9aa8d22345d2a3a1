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
from gradprobe.integrations.tensorboard import TensorBoardWriter, histogram_edges


def train(store=None, steps=3, writer_dir=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with Probe(model, opt, store=store, stats="full", flush_every=2) as probe:
        writer = TensorBoardWriter(probe, writer_dir) if writer_dir else None
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    if writer is not None:
        writer.close()
    return probe


def events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def check(acc: EventAccumulator, run: gradprobe.Run) -> None:
    frame = run.frame()
    scalars = frame[~frame.stat.str.startswith("hist_")]
    assert set(acc.Tags()["scalars"]) == {f"{s}/{n}" for s, n in zip(scalars.stat, scalars.name)}
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

"""Lightning, where users look: a NaN said at its step, a stop on request, the diagnosis
printed at the end of fit, key scalars in the trainer's logger, the trainer's
configuration in the run's meta, and the Probe's default cadence."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

pytest.importorskip("lightning", reason="the [lightning] extra is not installed")

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

import gradprobe
from gradprobe.headline import story
from gradprobe.integrations.lightning import GradProbeCallback
from gradprobe.stats import MODEL_NAME


class Regressor(pl.LightningModule):
    """A small MLP whose loss is made NaN at one known optimizer step (``nan_at``)."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.nan_at = nan_at
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.trainer.global_step == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(n: int = 128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8
    )


def fit(tmp_path, model, callback, logger=False, **trainer_kwargs):
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **trainer_kwargs,
    )
    trainer.fit(model, loader())
    return trainer


def test_a_nan_at_a_known_step_is_said_at_that_step_and_stops_when_asked(tmp_path):
    seen = []
    callback = GradProbeCallback(
        tmp_path / "run", stop_on=("nonfinite",), on_finding=seen.append, flush_every=1
    )
    with pytest.warns(gradprobe.hooks.GradprobeWarning, match="step 7: NaN/Inf"):
        trainer = fit(tmp_path, Regressor(nan_at=7), callback, max_steps=14)
    assert [f.kind for f in seen][:1] == ["nonfinite"]
    assert seen[0].evidence["step"] == 7
    assert callback.stopped_by is seen[0]
    # Stopped at the end of the batch whose flush saw it: step 7 was the last one taken.
    assert trainer.global_step == 8
    assert gradprobe.load(tmp_path / "run").steps.max() == 7


def test_without_stop_on_the_nan_is_said_and_training_goes_on(tmp_path):
    seen = []
    callback = GradProbeCallback(tmp_path / "run", on_finding=seen.append, flush_every=1)
    with pytest.warns(gradprobe.hooks.GradprobeWarning, match="step 3: NaN/Inf"):
        trainer = fit(tmp_path, Regressor(nan_at=3), callback, max_steps=6)
    assert trainer.global_step == 6 and seen[0].evidence["step"] == 3


def test_the_printed_diagnosis_is_the_stored_runs_and_the_meta_holds_the_trainer(tmp_path, capsys):
    callback = GradProbeCallback(tmp_path / "run")
    fit(
        tmp_path,
        Regressor(),
        callback,
        max_steps=5,
        gradient_clip_val=0.25,
        gradient_clip_algorithm="norm",
        accumulate_grad_batches=2,
    )
    printed = capsys.readouterr().out
    run = gradprobe.load(tmp_path / "run")
    assert story(gradprobe.diagnose(run)) in printed
    assert callback.diagnosis == story(gradprobe.diagnose(run))
    trainer = run.meta["trainer"]
    assert trainer["framework"] == "lightning"
    assert trainer["gradient_clip_val"] == 0.25
    assert trainer["gradient_clip_algorithm"] == "norm"
    assert trainer["accumulate_grad_batches"] == 2
    assert trainer["max_steps"] == 5
    assert trainer["precision"] == "32-true"
    # The Probe's own default cadence, not every step.
    assert run.meta["probe"]["every"] == "auto"


def test_key_scalars_reach_the_trainers_logger(tmp_path):
    callback = GradProbeCallback(tmp_path / "run", every=1, flush_every=2)
    logger = CSVLogger(str(tmp_path / "logs"), name="", version=0)
    fit(tmp_path, Regressor(), callback, logger=logger, max_steps=6, gradient_clip_val=0.5)
    run = gradprobe.load(tmp_path / "run")
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradprobe/global_grad_norm")]
    logged = {int(r["step"]): float(r["gradprobe/global_grad_norm"]) for r in rows}
    preclip = {int(r["step"]): float(r["gradprobe/global_grad_norm_preclip"]) for r in rows}
    post = run.table("global_grad_norm")[MODEL_NAME].dropna()
    pre = run.table("global_grad_norm_preclip")[MODEL_NAME].dropna()
    # Every step the run holds the norm for, and only those.
    assert sorted(logged) == sorted(post.index) and len(logged) >= 5
    for step, value in logged.items():
        # CSV keeps the float's repr: the value itself.
        assert math.isclose(value, float(post.loc[step]), rel_tol=1e-12)
        assert math.isclose(preclip[step], float(pre.loc[step]), rel_tol=1e-12)
    # The largest update ratio of a step is the largest of its weights' (from the table).
    ratios = run.table("update_ratio")
    maxima = {int(r["step"]): float(r["gradprobe/update_ratio_max"]) for r in rows}
    for step, value in maxima.items():
        assert math.isclose(value, float(ratios.loc[step].max()), rel_tol=1e-12)

"""Lightning: a real Trainer fits a small model under GradProbeCallback; the run loads and diagnoses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("lightning", reason="the [lightning] extra is not installed")

import lightning.pytorch as pl

import gradprobe
from gradprobe import GradprobeError
from gradprobe.integrations.lightning import GradProbeCallback
from gradprobe.stats import MODEL_NAME


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(1, keepdim=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def fit(tmp_path, **trainer_kwargs):
    torch.manual_seed(0)
    model = Regressor()
    callback = GradProbeCallback(tmp_path / "run", every=1, label="lightning")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **trainer_kwargs,
    )
    trainer.fit(model, loader())
    return model, callback


def test_fit_records_a_run_that_loads_and_diagnoses(tmp_path):
    model, callback = fit(tmp_path, max_steps=6, gradient_clip_val=0.5)
    run = gradprobe.load(tmp_path / "run")
    assert run.meta["status"] == "closed" and run.name == "lightning"
    frame = run.frame()
    assert sorted(frame.step.unique()) == list(range(6))
    names = (
        {n for n, _ in model.named_modules()}
        | {n for n, _ in model.named_parameters()}
        | {MODEL_NAME}
    )
    assert set(frame.name) <= names
    assert {"net.0", "net.2.weight"} <= set(frame.name)  # the LightningModule's own names
    table = run.table("error_norm")
    assert table.notna().all().all()
    # Lightning clipped at 0.5: the optimizer saw at most that, backward produced more.
    pre = run.table("global_grad_norm_preclip")[MODEL_NAME]
    post = run.table("global_grad_norm")[MODEL_NAME]
    assert (post <= 0.5 * (1 + 1e-4)).all() and (pre >= post).all()
    clipped = run.table("clipped")[MODEL_NAME]
    assert (clipped == (pre > 0.5 * (1 + 1e-4)).astype(float)).all()
    findings = gradprobe.diagnose(run)
    assert findings is not None
    assert callback.probe is not None and callback.probe.closed


def test_gradient_accumulation_steps_are_optimizer_steps(tmp_path):
    _, _ = fit(tmp_path, max_steps=2, accumulate_grad_batches=3)
    frame = gradprobe.load(tmp_path / "run").frame()
    calls = frame[(frame.name == "net.0") & (frame.stat == "calls")]
    assert calls.step.tolist() == [0, 1]
    assert calls.value.tolist() == [3, 3]


def test_unknown_probe_options_fail_at_construction():
    with pytest.raises(GradprobeError, match="unknown Probe options"):
        GradProbeCallback(None, evry=2)

"""The loss and the learning rate in the record: ``Probe.log`` and the optimizer's rates,
as ``(model)`` rows, checked against the values the training loop computed itself."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe import GradprobeError, Probe
from gradprobe.stats import MODEL_NAME, STATISTICS

torch.set_num_threads(1)


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, x[:, :2].sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _series(frame, stat: str) -> dict[int, float]:
    rows = frame[(frame["name"] == MODEL_NAME) & (frame["stat"] == stat)]
    assert not rows.duplicated(["step"]).any(), "one row per step"
    return dict(zip(rows["step"].tolist(), rows["value"].tolist()))


def _train(
    *,
    where: str,
    micro: int = 1,
    steps: int = 6,
    flush_every: int = 50,
    every: int = 1,
    store=None,
) -> tuple[dict[int, float], Probe]:
    """SGD with ``micro`` micro-batches per step, logging each micro-batch's loss before
    or after ``optimizer.step()``; returns the step's mean loss computed by hand."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    expected: dict[int, float] = {}
    probe = Probe(model, opt, flush_every=flush_every, every=every, store=store)
    for s in range(steps):
        opt.zero_grad()
        losses = []
        for m in range(micro):
            i = (s * micro + m) * 4 % len(x)
            loss = nn.functional.mse_loss(model(x[i : i + 4]), y[i : i + 4])
            (loss / micro).backward()
            losses.append(loss)
            if where == "before":
                probe.log(loss=loss)
        opt.step()
        if where == "after":
            for loss in losses:
                probe.log(loss=loss)
        expected[s] = float(np.mean([v.item() for v in losses]))
    return expected, probe


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("flush_every", [1, 2, 50])
def test_loss_is_the_steps_mean_logged_loss(where: str, micro: int, flush_every: int) -> None:
    expected, probe = _train(where=where, micro=micro, flush_every=flush_every)
    frame = probe.frame()
    probe.close()
    got = _series(frame, "loss")
    assert sorted(got) == sorted(expected)
    for s, value in expected.items():
        assert got[s] == pytest.approx(value, rel=1e-6)


def test_every_keeps_the_loss_of_recorded_steps_only(tmp_path) -> None:
    expected, probe = _train(where="after", every=2, steps=7, store=tmp_path / "run")
    probe.close()
    run = gradprobe.load(tmp_path / "run")
    got = run.model_series("loss")
    assert got.index.tolist() == [0, 2, 4, 6]
    assert got.to_numpy() == pytest.approx([expected[s] for s in (0, 2, 4, 6)], rel=1e-6)
    assert run.table("loss")[MODEL_NAME].to_numpy() == pytest.approx(got.to_numpy())
    # Every step's loss lands in the rows of a step that has its other statistics too.
    assert set(got.index) <= set(run.table("global_grad_norm").index)


def test_logging_keeps_tensors_on_the_device_no_host_sync() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    with Probe(model, opt) as probe:
        loss = nn.functional.mse_loss(model(x[:8]), y[:8])
        loss.backward()
        banned = ("item", "cpu", "tolist", "numpy", "__float__", "__bool__")
        with mock.patch.multiple(
            torch.Tensor, **{b: mock.Mock(side_effect=AssertionError(b)) for b in banned}
        ):
            probe.log(loss=loss, scaled=loss * 2)
        opt.step()
        frame = probe.frame()
    assert _series(frame, "loss")[0] == pytest.approx(loss.item())
    assert _series(frame, "scaled")[0] == pytest.approx(2 * loss.item())


def test_floats_numpy_numbers_and_nonfinite_values_are_kept() -> None:
    model = _net()
    with Probe(model) as probe:  # no optimizer: probe.step() marks the steps
        values = [1.5, np.float32(2.5), float("nan"), torch.tensor(float("inf"))]
        for v in values:
            model(torch.randn(2, 6)).sum().backward()
            probe.log(loss=v, lr=0.1)
            probe.step()
        frame = probe.frame()
    got = _series(frame, "loss")
    assert [got[s] for s in range(2)] == [1.5, 2.5]
    assert np.isnan(got[2]) and got[3] == np.inf
    assert list(_series(frame, "lr").values()) == [0.1] * 4


def test_a_value_logged_after_probe_step_belongs_to_that_step() -> None:
    model = _net()
    with Probe(model) as probe:
        for s in range(3):
            model(torch.randn(2, 6)).sum().backward()
            probe.step()
            probe.log(loss=float(s))  # after the step: no training pass since
        frame = probe.frame()
    assert _series(frame, "loss") == {0: 0.0, 1: 1.0, 2: 2.0}


def test_bad_values_and_names_raise_one_clear_error() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Probe(model, opt) as probe:
        with pytest.raises(GradprobeError, match="not one real number"):
            probe.log(loss=torch.ones(3))
        with pytest.raises(GradprobeError, match="not a number"):
            probe.log(loss="low")
        with pytest.raises(GradprobeError, match="not a number"):
            probe.log(done=True)
        with pytest.raises(GradprobeError, match="records it itself"):
            probe.log(lr=0.1)  # read from the optimizer
        with pytest.raises(GradprobeError, match="records it itself"):
            probe.log(global_grad_norm=1.0)
    probe.log(loss=1.0)  # after close(): ignored, no error


def test_lr_is_read_from_each_param_group_at_the_step() -> None:
    model = _net()
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[2].parameters(), "lr": 0.01},
        ]
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = _data()
    rates = []
    with Probe(model, opt) as probe:
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
            rates.append([g["lr"] for g in opt.param_groups])  # what the step will use
            opt.step()
            sched.step()
        frame = probe.frame()
    for i in range(2):
        assert list(_series(frame, f"lr/{i}").values()) == pytest.approx([r[i] for r in rates])
    assert list(_series(frame, "lr").values()) == pytest.approx([max(r) for r in rates])


def test_one_group_records_lr_only_and_adam_too() -> None:
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    x, y = _data()
    with Probe(model, opt) as probe:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
            opt.step()
        frame = probe.frame()
    assert _series(frame, "lr") == {0: pytest.approx(3e-4), 1: pytest.approx(3e-4), 2: 3e-4}
    assert not frame["stat"].str.startswith("lr/").any()


def test_loss_and_lr_are_declared_once_as_statistics() -> None:
    for name in ("loss", "lr"):
        assert STATISTICS[name].logged is not None and "(model)" in STATISTICS[name].doc
    assert {"loss", "lr"} <= set(gradprobe.stats.PRESETS["cheap"])


# ---------------------------------------------------------------- integrations
def test_lightning_logs_the_loss_of_every_micro_batch(tmp_path) -> None:
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from gradprobe.integrations.lightning import GradProbeCallback

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            return {"loss": loss}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, y = _data(48)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = Regressor()
    callback = GradProbeCallback(tmp_path / "run")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        max_steps=3,
        accumulate_grad_batches=2,
    )
    trainer.fit(model, loader)
    got = gradprobe.load(tmp_path / "run").model_series("loss")
    expected = np.array(model.losses).reshape(3, 2).mean(axis=1)
    assert got.index.tolist() == [0, 1, 2]
    assert got.to_numpy() == pytest.approx(expected, rel=1e-5)
    assert gradprobe.load(tmp_path / "run").model_series("lr").tolist() == [0.05] * 3


@pytest.mark.parametrize("accumulation", [1, 2])
def test_hugging_face_logs_the_models_loss(tmp_path, accumulation: int) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from gradprobe.integrations.huggingface import GradProbeCallback

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            start = torch.randint(0, 64, (32, 1), generator=g)
            self.ids = (start + torch.arange(16)) % 64
            # Some labels ignored (-100): items per micro-batch differ, as in real data.
            self.labels = self.ids.clone()
            self.labels[::3, :5] = -100

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    callback = GradProbeCallback(tmp_path / "run", stats="cheap")
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        max_steps=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    # The Trainer's own logged training loss, step by step, is the reference.
    reference = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    got = gradprobe.load(tmp_path / "run").model_series("loss")
    assert got.index.tolist() == [0, 1, 2]
    assert got.to_numpy() == pytest.approx(reference, rel=2e-3)

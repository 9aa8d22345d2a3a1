"""Hugging Face, where users look: a NaN said at its step and a stop on request, the
diagnosis printed at the end of training, key scalars in the Trainer's logs, the
TrainingArguments in the run's meta, and the Probe's default cadence."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra is not installed")
pytest.importorskip(
    "accelerate", reason="the [hf] extra is not installed (Trainer needs accelerate)"
)

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradprobe
from gradprobe.headline import story
from gradprobe.integrations.huggingface import GradProbeCallback
from gradprobe.stats import MODEL_NAME


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class PoisonAt(TrainerCallback):
    """Makes the final LayerNorm's weight NaN when optimizer step ``step`` begins: from
    that step's forward pass on, the loss and every gradient are NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.transformer.ln_f.weight[0] = float("nan")


def train(tmp_path, callback, extra=(), **args):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **args,
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=arguments,
        train_dataset=Tokens(),
        callbacks=[callback, *extra],
    )
    trainer.train()
    return trainer


def test_a_nan_at_a_known_step_is_said_at_that_step_and_stops_when_asked(tmp_path):
    seen = []
    callback = GradProbeCallback(
        tmp_path / "run", stop_on="nonfinite", on_finding=seen.append, flush_every=1
    )
    with pytest.warns(gradprobe.hooks.GradprobeWarning, match="step 5: NaN/Inf"):
        trainer = train(tmp_path, callback, [PoisonAt(5)], max_steps=12, logging_strategy="no")
    assert seen and seen[0].kind == "nonfinite" and seen[0].evidence["step"] == 5
    assert callback.stopped_by is seen[0]
    # Asked to stop at the end of step 5 (the 6th optimizer step).
    assert trainer.state.global_step == 6


def test_the_printed_diagnosis_is_the_stored_runs_and_the_meta_holds_the_arguments(
    tmp_path, capsys
):
    callback = GradProbeCallback(tmp_path / "run")
    train(
        tmp_path,
        callback,
        max_steps=4,
        learning_rate=3e-3,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        max_grad_norm=0.5,
        gradient_accumulation_steps=2,
        weight_decay=0.01,
        logging_strategy="no",
    )
    printed = capsys.readouterr().out
    run = gradprobe.load(tmp_path / "run")
    assert story(gradprobe.diagnose(run)) in printed
    assert callback.diagnosis == story(gradprobe.diagnose(run))
    meta = run.meta["trainer"]
    assert meta["framework"] == "transformers"
    assert meta["learning_rate"] == 3e-3 and meta["warmup_steps"] == 2
    assert meta["lr_scheduler_type"] == "cosine" and meta["max_grad_norm"] == 0.5
    assert meta["gradient_accumulation_steps"] == 2 and meta["weight_decay"] == 0.01
    assert meta["fp16"] is False and meta["bf16"] is False
    assert meta["optim"].startswith("adamw")
    assert run.meta["probe"]["every"] == "auto"


def test_key_scalars_go_into_the_trainers_logs(tmp_path):
    callback = GradProbeCallback(tmp_path / "run", flush_every=1)
    trainer = train(
        tmp_path,
        callback,
        max_steps=4,
        max_grad_norm=0.5,
        logging_strategy="steps",
        logging_steps=1,
    )
    run = gradprobe.load(tmp_path / "run")
    post = run.table("global_grad_norm")[MODEL_NAME]
    pre = run.table("global_grad_norm_preclip")[MODEL_NAME]
    entries = [e for e in trainer.state.log_history if "gradprobe/global_grad_norm" in e]
    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    for entry in entries:
        step = entry["step"] - 1  # the Trainer counts steps taken; the Probe, from 0
        assert math.isclose(entry["gradprobe/global_grad_norm"], post.loc[step], rel_tol=1e-12)
        assert math.isclose(
            entry["gradprobe/global_grad_norm_preclip"], pre.loc[step], rel_tol=1e-12
        )
        # The Trainer's own grad_norm is the pre-clip norm clip_grad_norm_ returned.
        assert math.isclose(entry["grad_norm"], pre.loc[step], rel_tol=1e-5)


def test_moved_first_the_key_scalars_reach_the_reporting_integration(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callback = GradProbeCallback(tmp_path / "run", flush_every=1)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        max_steps=3,
        logging_strategy="steps",
        logging_steps=1,
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config), args=arguments, train_dataset=Tokens(), callbacks=[callback]
    )
    # As docs/integrations.md says: the reporting callbacks run first unless this one is.
    trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(GradProbeCallback))
    trainer.train()
    run = gradprobe.load(tmp_path / "run")
    post = run.table("global_grad_norm")[MODEL_NAME]
    files = list((tmp_path / "tb").rglob("events.out.tfevents*"))
    assert files
    acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    tag = next(t for t in acc.Tags()["scalars"] if t.endswith("gradprobe/global_grad_norm"))
    got = {e.step: e.value for e in acc.Scalars(tag)}
    assert sorted(got) == [1, 2, 3]
    for step, value in got.items():  # TensorBoard keeps float32
        assert math.isclose(value, post.loc[step - 1], rel_tol=1e-6)

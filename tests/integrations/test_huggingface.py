"""Hugging Face: a tiny GPT-2 (random init, no download) trained a few steps by Trainer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra is not installed")
pytest.importorskip(
    "accelerate", reason="the [hf] extra is not installed (Trainer needs accelerate)"
)

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import gradprobe
from gradprobe.integrations.huggingface import GradProbeCallback
from gradprobe.stats import MODEL_NAME


class Tokens(torch.utils.data.Dataset):
    """Generated token sequences: a repeating pattern the model can learn."""

    def __init__(self, n: int = 32, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(tmp_path, **args):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(config)
    callback = GradProbeCallback(tmp_path / "run", label="gpt2")
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **args,
    )
    Trainer(model=model, args=arguments, train_dataset=Tokens(), callbacks=[callback]).train()
    return model, gradprobe.load(tmp_path / "run")


def test_trainer_run_is_stored_under_the_models_own_names(tmp_path):
    model, run = train(tmp_path, max_steps=4, max_grad_norm=0.5)
    frame = run.frame()
    assert run.meta["status"] == "closed"
    assert sorted(frame.step.unique()) == [0, 1, 2, 3]
    modules = {n for n, _ in model.named_modules()}
    params = {n for n, _ in model.named_parameters()}
    assert set(frame.name) <= modules | params | {MODEL_NAME}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.act", "lm_head"} <= set(frame.name)
    assert "transformer.h.0.attn.c_attn.weight" in set(frame.name)
    # The Trainer clips at max_grad_norm: both norms are there, the post-clip one bounded.
    post = run.table("global_grad_norm")[MODEL_NAME]
    pre = run.table("global_grad_norm_preclip")[MODEL_NAME]
    assert (post <= 0.5 * (1 + 1e-4)).all() and (pre >= post * (1 - 1e-6)).all()
    # Conv1D outputs keep features last: dead units counted over the 3*32 features.
    assert run.module_info("transformer.h.0.attn.c_attn")["layout"] == "last"
    assert gradprobe.diagnose(run) is not None


def test_accumulation_steps_are_optimizer_steps(tmp_path):
    _, run = train(tmp_path, max_steps=2, gradient_accumulation_steps=2)
    frame = run.frame()
    calls = frame[(frame.name == "lm_head") & (frame.stat == "calls")]
    assert calls.step.tolist() == [0, 1]
    assert calls.value.tolist() == [2, 2]

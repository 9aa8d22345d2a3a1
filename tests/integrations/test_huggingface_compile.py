"""Hugging Face Trainer's own compile option (``torch_compile=True``): the Trainer compiles
the model, the callback's Probe records it, training is bit-identical to the same Trainer
run without the callback, and each parameter's ``grad_norm`` is the norm of the ``.grad``
the optimizer step applies (read directly by a callback of the test's own)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra is not installed")
pytest.importorskip(
    "accelerate", reason="the [hf] extra is not installed (Trainer needs accelerate)"
)

from test_huggingface import Tokens
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import gradprobe
from gradprobe.hooks import GradprobeWarning
from gradprobe.integrations.huggingface import GradProbeCallback


class GradNorms(TrainerCallback):
    """‖.grad‖ of each parameter just before each optimizer step (after clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(
            {
                n: float(p.grad.double().norm())
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        )


def _train(tmp_path, probed: bool):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(config)
    grads = GradNorms()
    callbacks = [grads] + ([GradProbeCallback(tmp_path / "run", every=1)] if probed else [])
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_grad_norm=0.5,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        max_steps=3,
        torch_compile=True,
        torch_compile_backend="aot_eager",
    )
    Trainer(model=model, args=arguments, train_dataset=Tokens(), callbacks=callbacks).train()
    return model, grads.steps


def test_the_trainers_compile_option(tmp_path):
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, grads = _train(tmp_path / "probed", probed=True)
    torch._dynamo.reset()
    twin, _ = _train(tmp_path / "plain", probed=False)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    assert len(ours) == 1 and "is compiled" in ours[0], ours
    frame = gradprobe.load(tmp_path / "probed" / "run").frame()
    assert not frame[frame.stat == "error_norm"].empty  # the module statistics are there
    rows = frame[frame.stat == "grad_norm"]
    assert len(rows) == sum(len(g) for g in grads)
    for row in rows.itertuples():
        # float32 norms against float64 of the same tensors: ~1e-7 relative.
        assert row.value == pytest.approx(grads[row.step][row.name], rel=1e-5)

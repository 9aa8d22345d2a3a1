"""Hugging Face: ``GradProbeCallback``, a ``transformers.TrainerCallback`` that records a run.

The Probe is attached at ``on_train_begin`` to the model the Trainer trains, so names
are ``model.named_modules()``'s (``transformer.h.0.attn.c_attn``). Its step hooks go on
the torch optimizer inside accelerate's ``AcceleratedOptimizer``, which accelerate
steps only at the end of a gradient-accumulation cycle: a step is an optimizer step,
module statistics add up over its micro-batches, and the Trainer's gradient clipping
(``max_grad_norm``) shows as ``global_grad_norm_preclip`` vs ``global_grad_norm``. With
fp16 the accelerator's ``GradScaler`` is watched, so skipped steps are recorded.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..probe import Probe
from ..run import Run
from ._options import check_probe_options

__all__ = ["GradProbeCallback"]


class GradProbeCallback(TrainerCallback):
    """Probe the model a ``transformers.Trainer`` trains; the run streams to ``store``.

    Args:
        store: the run directory (``gradprobe.load(store)`` reads it back), or None.
        every: record every ``every``-th optimizer step.
        **probe_options: any other :class:`~gradprobe.Probe` option.
    """

    def __init__(
        self, store: str | os.PathLike[str] | None = None, every: int = 1, **probe_options: Any
    ) -> None:
        self.store = store
        self.every = every
        self.probe_options = check_probe_options(probe_options, "GradProbeCallback")
        self.probe: Probe | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("the Trainer passed no model or optimizer to on_train_begin")
        # accelerate wraps the optimizer; the wrapper steps the inner one only on sync steps.
        inner = getattr(optimizer, "optimizer", optimizer)
        scaler = getattr(optimizer, "scaler", None)
        self.probe = Probe(
            model, inner, store=self.store, every=self.every, scaler=scaler, **self.probe_options
        )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.probe is not None:
            self.probe.close()

    def run(self) -> Run:
        """What the Probe recorded (after training, or so far)."""
        if self.probe is None:
            raise RuntimeError("the callback has not seen a training run yet")
        return self.probe.run()

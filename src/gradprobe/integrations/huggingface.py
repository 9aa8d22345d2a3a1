"""Hugging Face: ``GradProbeCallback``, a ``transformers.TrainerCallback`` that records a run.

The Probe is attached at ``on_train_begin`` to the model the Trainer trains, so names
are ``model.named_modules()``'s (``transformer.h.0.attn.c_attn``). Its step hooks go on
the torch optimizer inside accelerate's ``AcceleratedOptimizer``, which accelerate
steps only at the end of a gradient-accumulation cycle: a step is an optimizer step,
module statistics add up over its micro-batches, and the Trainer's gradient clipping
(``max_grad_norm``) shows as ``global_grad_norm_preclip`` vs ``global_grad_norm``. With
fp16 the accelerator's ``GradScaler`` is watched, so skipped steps are recorded.

The loss is logged too (``Probe.log(loss=...)``): the callback reads the ``loss`` of the
model's own output (a ``ModelOutput``, as Hugging Face models return it when the batch
has labels) after each training forward pass, a tensor kept on the device. Where the
Trainer had the model divide the loss by the labelled items of the whole step
(``num_items_in_batch``, with gradient accumulation), each micro-batch's value is scaled
back so that the step's row is the step's mean loss. A loss computed outside the model
(``compute_loss_func``, label smoothing) is not seen: log it with ``callback.probe.log``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..hooks import HookSet, Site, warn_once
from ..probe import Probe
from ..run import Run
from ._options import check_probe_options

__all__ = ["GradProbeCallback"]


class GradProbeCallback(TrainerCallback):
    """Probe the model a ``transformers.Trainer`` trains; the run streams to ``store``.

    Args:
        store: the run directory (``gradprobe.load(store)`` reads it back), or None.
        every: record every ``every``-th optimizer step.
        log_loss: log the model's output ``loss`` of each training pass (see above).
        **probe_options: any other :class:`~gradprobe.Probe` option.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        every: int = 1,
        log_loss: bool = True,
        **probe_options: Any,
    ) -> None:
        self.store = store
        self.every = every
        self.log_loss = log_loss
        self.probe_options = check_probe_options(probe_options, "GradProbeCallback")
        self.probe: Probe | None = None
        self._hooks = HookSet()
        self._failed: set[str] = set()
        self._loss_scale = 1.0  # for a loss divided by the items of the whole step

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
        if self.log_loss:
            # The model divided its micro-batch's summed loss by the items of the whole
            # step (every micro-batch, and every rank when tokens are averaged across them).
            ranks = args.world_size if getattr(args, "average_tokens_across_devices", False) else 1
            self._loss_scale = float(args.gradient_accumulation_steps * ranks)
            self._hooks.on_module(model, _read_loss, weakref.ref(self), _LOSS_SITE, 0)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._hooks.remove()
        if self.probe is not None:
            self.probe.close()

    def _log_loss(self, model: torch.nn.Module, kwargs: Mapping[str, Any], output: Any) -> None:
        """Log the loss of a training pass (the model in train() mode, under grad)."""
        probe = self.probe
        if probe is None or probe.closed or not model.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        loss = loss.detach()
        if kwargs.get("num_items_in_batch") is not None:
            loss = loss * self._loss_scale  # a device op, no sync
        probe.log(loss=loss)

    def _entry_failed(self, site: Site, key: int, exc: BaseException) -> None:
        """Reading the loss failed (gradprobe.hooks.Entry): one warning, never the Trainer's
        error; that step has no loss row."""
        warn_once(self._failed, site.where, exc)

    def _entry_traced(self, site: Site) -> None:
        """A compiled model traced the loss hook: it ran outside the graph, nothing to do."""

    def run(self) -> Run:
        """What the Probe recorded (after training, or so far)."""
        if self.probe is None:
            raise RuntimeError("the callback has not seen a training run yet")
        return self.probe.run()


_LOSS_SITE = Site("the Hugging Face callback (reading the loss)", "none")


def _read_loss(
    callback: GradProbeCallback,
    key: int,
    module: torch.nn.Module,
    args: Any,
    kwargs: Any,
    output: Any,
) -> None:
    callback._log_loss(module, kwargs, output)

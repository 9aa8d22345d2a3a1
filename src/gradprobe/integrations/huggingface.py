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

Where users look (see ``docs/integrations.md``): the ``TrainingArguments`` that act on
gradients and steps (learning rate, warmup, scheduler, ``max_grad_norm``, accumulation,
fp16/bf16, optimizer, ...) are kept in the run's meta (``meta["trainer"]``); at each
``on_log`` the key scalars of the latest flushed step (``gradprobe/global_grad_norm``,
``gradprobe/update_ratio_max``, ...) are added to the Trainer's ``logs`` and to
``state.log_history`` (so ``trainer_state.json`` and the callbacks after this one see
them). The Trainer runs its reporting integrations (``report_to``) before the callbacks
it is given; to send the scalars to them too, move this one first:
``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(GradProbeCallback))``.
A NaN, a spike or an explosion is said at
the flush that sees it (:mod:`gradprobe.live`), and with ``stop_on`` the Trainer is asked
to stop (``control.should_training_stop``) at the end of that step; at the end of
training the diagnosis is printed, root cause first (:func:`gradprobe.headline.story`),
on the main process.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..diagnose import diagnose
from ..headline import story
from ..hooks import HookSet, Site, warn_once
from ..probe import Probe
from ..run import Run
from ._options import Stopper, check_probe_options, key_scalars, note_trainer

__all__ = ["GradProbeCallback"]


class GradProbeCallback(TrainerCallback):
    """Probe the model a ``transformers.Trainer`` trains; the run streams to ``store``.

    Args:
        store: the run directory (``gradprobe.load(store)`` reads it back), or None.
        every: the Probe's cadence: ``"auto"`` (its default) or every ``every``-th
            optimizer step.
        log_loss: log the model's output ``loss`` of each training pass (see above).
        stop_on: live finding kinds (``"nonfinite"``, ``"grad_norm_spike"``,
            ``"exploding"``) on which the Trainer is asked to stop.
        log_to_logs: add key scalars to the Trainer's ``logs`` at each ``on_log``.
        print_diagnosis: print the diagnosis at the end of training (main process).
        **probe_options: any other :class:`~gradprobe.Probe` option (``on_finding``...).
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        every: int | str = "auto",
        log_loss: bool = True,
        stop_on: Any = (),
        log_to_logs: bool = True,
        print_diagnosis: bool = True,
        **probe_options: Any,
    ) -> None:
        self.store = store
        self.every = every
        self.log_loss = log_loss
        self.log_to_logs = log_to_logs
        self.print_diagnosis = print_diagnosis
        self.probe_options = check_probe_options(probe_options, "GradProbeCallback")
        self._stopper = Stopper(stop_on, self.probe_options.pop("on_finding", None))
        self._latest: dict[str, float] = {}  # key scalars of the last flushed step
        self._latest_step = self._logged_step = -1
        self.diagnosis: str | None = None  # the story printed at the end of training
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
            model,
            inner,
            store=self.store,
            every=self.every,
            scaler=scaler,
            on_finding=self._stopper,
            **self.probe_options,
        )
        try:
            note_trainer(self.probe, training_config(args))
        except Exception as exc:  # the run goes on without it
            warn_once(self._failed, "the Hugging Face callback (the trainer's configuration)", exc)
        if self.log_to_logs:
            self.probe.add_listener(self._keep_latest)
        if self.log_loss:
            # The model divided its micro-batch's summed loss by the items of the whole
            # step (every micro-batch, and every rank when tokens are averaged across them).
            ranks = args.world_size if getattr(args, "average_tokens_across_devices", False) else 1
            self._loss_scale = float(args.gradient_accumulation_steps * ranks)
            self._hooks.on_module(model, _read_loss, weakref.ref(self), _LOSS_SITE, 0)

    def _keep_latest(self, frame: Any) -> None:
        scalars = key_scalars(frame)
        if scalars:
            self._latest = scalars[max(scalars)]
            self._latest_step = max(scalars)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._stopper.finding is not None:
            control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # Each flushed step once: not again in a later entry (the end-of-training summary).
        if not self._latest or logs is None or self._latest_step == self._logged_step:
            return
        self._logged_step = self._latest_step
        logs.update(self._latest)
        # The Trainer appended its entry to the history before calling on_log.
        if state.log_history and isinstance(state.log_history[-1], dict):
            state.log_history[-1].update(self._latest)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._hooks.remove()
        if self.probe is None or self.probe.closed:
            return
        self.probe.close()
        if self.print_diagnosis and state.is_world_process_zero:
            try:
                self.diagnosis = story(diagnose(self.probe.run()))
            except Exception as exc:  # a diagnosis must not fail training
                warn_once(self._failed, "the Hugging Face callback (the diagnosis)", exc)
            else:
                print(self.diagnosis)

    @property
    def stopped_by(self) -> Any:
        """The live finding that asked the Trainer to stop (``stop_on``), or None."""
        return self._stopper.finding

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


# The TrainingArguments that decide what happens to gradients and steps.
_TRAINING_ARGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "max_grad_norm",
    "gradient_accumulation_steps",
    "fp16",
    "bf16",
    "optim",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "seed",
)


def training_config(args: TrainingArguments) -> dict[str, Any]:
    """The trainer's configuration for the run's meta."""
    import transformers

    config: dict[str, Any] = {"framework": "transformers", "version": transformers.__version__}
    config.update({k: getattr(args, k) for k in _TRAINING_ARGS if hasattr(args, k)})
    config["world_size"] = args.world_size
    return config

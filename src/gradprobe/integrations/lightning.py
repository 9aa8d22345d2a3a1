"""Lightning: ``GradProbeCallback`` records a Probe run while a ``Trainer`` fits.

The Probe is attached at ``on_fit_start`` (after the strategy has wrapped the model and
built the optimizers) to the LightningModule itself, so names are the module's own
(``net.0``, never ``module.``/``_forward_module.``). With one optimizer its step hooks
mark the steps, so Lightning's gradient accumulation and clipping are seen as they
happen; with a mixed-precision ``GradScaler`` (``precision="16-mixed"``) skipped steps
are recorded. With several optimizers (manual optimisation) a step is a training batch.

The loss ``training_step`` returns (a tensor, or a dict's ``"loss"``) is logged at
``on_train_batch_end`` (``Probe.log(loss=...)``, kept on the device), for every
micro-batch: under automatic optimisation Lightning has divided it by
``accumulate_grad_batches``, so it is multiplied back, and the step's row is the mean
loss of its micro-batches.

Where users look (see ``docs/integrations.md``): the trainer's configuration
(``gradient_clip_val``/``_algorithm``, ``accumulate_grad_batches``, ``precision``,
``max_steps``/``max_epochs``) is kept in the run's meta (``meta["trainer"]``); at each
flush a few key scalars per step go to the trainer's loggers (``gradprobe/global_grad_norm``,
``gradprobe/update_ratio_max``, ...: :func:`._options.key_scalars`); a NaN, a spike or an
explosion is said at the flush that sees it (:mod:`gradprobe.live`), and with
``stop_on`` the trainer is asked to stop (``trainer.should_stop``) at the end of that
batch; at the end of ``fit`` the diagnosis is printed, root cause first
(:func:`gradprobe.headline.story`), on rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from ..diagnose import diagnose
from ..headline import story
from ..hooks import warn_once
from ..probe import Probe
from ..run import Run
from ._options import Stopper, check_probe_options, key_scalars, note_trainer

__all__ = ["GradProbeCallback"]


class GradProbeCallback(pl.Callback):
    """Probe the LightningModule during ``fit``; the run streams to ``store``.

    Args:
        store: the run directory (``gradprobe.load(store)`` reads it back), or None.
        every: the Probe's cadence: ``"auto"`` (its default) or every ``every``-th
            optimizer step.
        log_loss: log the loss ``training_step`` returns (see above).
        stop_on: live finding kinds (``"nonfinite"``, ``"grad_norm_spike"``,
            ``"exploding"``) on which the trainer is asked to stop.
        log_to_logger: give key scalars to the trainer's loggers at each flush.
        print_diagnosis: print the diagnosis at the end of ``fit`` (rank 0).
        **probe_options: any other :class:`~gradprobe.Probe` option (``stats``,
            ``modules``, ``flush_every``, ``label``, ``on_finding``, ...).
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        every: int | str = "auto",
        log_loss: bool = True,
        stop_on: Any = (),
        log_to_logger: bool = True,
        print_diagnosis: bool = True,
        **probe_options: Any,
    ) -> None:
        super().__init__()
        self.store = store
        self.every = every
        self.log_loss = log_loss
        self.log_to_logger = log_to_logger
        self.print_diagnosis = print_diagnosis
        self._failed: set[str] = set()
        self.probe_options = check_probe_options(probe_options, "GradProbeCallback")
        self._stopper = Stopper(stop_on, self.probe_options.pop("on_finding", None))
        self._trainer: pl.Trainer | None = None
        self.diagnosis: str | None = None  # the story printed at the end of fit
        self.probe: Probe | None = None
        self._marks_steps = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.optimizers)
        optimizer = optimizers[0] if len(optimizers) == 1 else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.probe = Probe(
            pl_module,
            optimizer,
            store=self.store,
            every=self.every,
            scaler=scaler,
            on_finding=self._stopper,
            **self.probe_options,
        )
        self._marks_steps = optimizer is None
        self._trainer = trainer
        try:
            note_trainer(self.probe, trainer_config(trainer))
        except Exception as exc:  # the run goes on without it
            warn_once(self._failed, "the Lightning callback (the trainer's configuration)", exc)
        if self.log_to_logger and trainer.loggers:
            self.probe.add_listener(self._to_loggers)

    def _to_loggers(self, frame: Any) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        for step, metrics in sorted(key_scalars(frame).items()):
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        if self.probe is None:
            return
        if self.log_loss:
            try:
                self._log_loss(trainer, pl_module, outputs)
            except Exception as exc:  # never into the Trainer's loop
                warn_once(self._failed, "the Lightning callback (logging the loss)", exc)
        # Logged before a step this callback marks: the loss belongs to that step.
        if self._marks_steps:
            self.probe.step()
        if self._stopper.finding is not None and not trainer.should_stop:
            trainer.should_stop = True  # Lightning stops at the end of this batch

    def _log_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self.probe is None or not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        loss = loss.detach()
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it; no sync
        self.probe.log(loss=loss)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.probe is None or self.probe.closed:
            return
        self.probe.close()
        if self.print_diagnosis and trainer.is_global_zero:
            try:
                self.diagnosis = story(diagnose(self.probe.run()))
            except Exception as exc:  # a diagnosis must not fail the fit
                warn_once(self._failed, "the Lightning callback (the diagnosis)", exc)
            else:
                print(self.diagnosis)

    @property
    def stopped_by(self) -> Any:
        """The live finding that asked the trainer to stop (``stop_on``), or None."""
        return self._stopper.finding

    def run(self) -> Run:
        """What the Probe recorded (after ``fit``, or so far)."""
        if self.probe is None:
            raise RuntimeError("the callback has not seen a fit yet")
        return self.probe.run()


def trainer_config(trainer: pl.Trainer) -> dict[str, Any]:
    """What the Trainer is configured to do to the gradients and steps."""
    return {
        "framework": "lightning",
        "version": pl.__version__,
        "gradient_clip_val": trainer.gradient_clip_val,
        "gradient_clip_algorithm": trainer.gradient_clip_algorithm,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "precision": trainer.precision,
        "max_steps": trainer.max_steps,
        "max_epochs": trainer.max_epochs,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
    }

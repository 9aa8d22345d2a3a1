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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from ..hooks import warn_once
from ..probe import Probe
from ..run import Run
from ._options import check_probe_options

__all__ = ["GradProbeCallback"]


class GradProbeCallback(pl.Callback):
    """Probe the LightningModule during ``fit``; the run streams to ``store``.

    Args:
        store: the run directory (``gradprobe.load(store)`` reads it back), or None.
        every: record every ``every``-th optimizer step.
        log_loss: log the loss ``training_step`` returns (see above).
        **probe_options: any other :class:`~gradprobe.Probe` option (``stats``,
            ``modules``, ``flush_every``, ``label``, ...).
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        every: int = 1,
        log_loss: bool = True,
        **probe_options: Any,
    ) -> None:
        super().__init__()
        self.store = store
        self.every = every
        self.log_loss = log_loss
        self._failed: set[str] = set()
        self.probe_options = check_probe_options(probe_options, "GradProbeCallback")
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
            **self.probe_options,
        )
        self._marks_steps = optimizer is None

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

    def _log_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self.probe is None or not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        loss = loss.detach()
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it; no sync
        self.probe.log(loss=loss)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.probe is not None:
            self.probe.close()

    def run(self) -> Run:
        """What the Probe recorded (after ``fit``, or so far)."""
        if self.probe is None:
            raise RuntimeError("the callback has not seen a fit yet")
        return self.probe.run()

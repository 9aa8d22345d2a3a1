"""fit: one small, deterministic training run under a Probe.

The demo and every lab experiment train through this one loop, so their numbers
are comparable: same batching, same evaluation, same probe settings. The loop is
nanoGPT-plain: sample a batch, forward, loss, backward, optional clipping, step.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..errors import GradprobeError
from ..probe import Probe
from ..run import Run
from .data import Split

__all__ = ["FitResult", "evaluate", "fit", "make_optimizer"]


@dataclass
class FitResult:
    """What a training run produced: its recorded statistics and its learning curve."""

    run: Run
    history: pd.DataFrame  # step, train_loss, val_loss, val_acc (NaN for regression)
    final: dict[str, float] = field(default_factory=dict)
    diverged: bool = False
    seconds: float = 0.0


def make_optimizer(
    name: str, params: Any, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``sgd``, ``momentum`` (SGD with momentum 0.9), ``adam`` or ``adamw``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise GradprobeError(f"unknown optimizer {name!r}", "use 'sgd', 'momentum', 'adam' or 'adamw'")


WARMUP_FRACTION = 0.1  # of the steps, for schedule="warmup_cosine"


def _scheduler(name: str | None, optimizer: torch.optim.Optimizer, steps: int) -> Any:
    if name in (None, "none"):
        return None
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(steps // 3, 1), gamma=0.1)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    if name == "warmup_cosine":
        # Linear warm-up from 0 over the first WARMUP_FRACTION of the steps, then the
        # cosine decay to 0: the first steps of a deep net at the full rate are the
        # turbulent ones (a spike there can kill units for the rest of the run).
        warm = max(int(steps * WARMUP_FRACTION), 1)
        rest = max(steps - warm, 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(step - warm, rest) / rest))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise GradprobeError(
        f"unknown schedule {name!r}", "use None, 'step', 'cosine' or 'warmup_cosine'"
    )


def _loss_fn(task: str) -> Any:
    return nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> tuple[float, float]:
    """(loss, accuracy) on a whole set in eval mode; accuracy is NaN for regression."""
    was_training = model.training
    model.eval()
    try:
        out = model(x)
        loss = float(_loss_fn(task)(out, y))
        acc = (
            float((out.argmax(dim=1) == y).float().mean()) if task == "classification" else math.nan
        )
    finally:
        model.train(was_training)
    return loss, acc


def fit(
    model: nn.Module,
    data: Split,
    *,
    steps: int = 300,
    batch_size: int = 64,
    optimizer: str = "sgd",
    lr: float = 0.1,
    schedule: str | None = None,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    seed: int = 0,
    eval_every: int = 25,
    store: str | os.PathLike[str] | None = None,
    label: str | None = None,
    config: dict[str, Any] | None = None,
    probe: dict[str, Any] | None = None,
    stop_on_nonfinite: bool = True,
    z_loss: float = 0.0,
) -> FitResult:
    """Train ``model`` on ``data`` for ``steps`` mini-batch steps under a :class:`Probe`.

    Batches are drawn by a generator seeded with ``seed`` (the model's own init is the
    caller's: seed before building it). The validation set is evaluated every
    ``eval_every`` steps and at the end. A loss that turns NaN/Inf stops the run early
    (``diverged=True``) unless ``stop_on_nonfinite`` is False; the Probe keeps the steps
    up to and including the first non-finite one.

    ``z_loss`` > 0 adds ``z_loss``·mean((log Z)²) to the loss that is back-propagated, log Z
    the logsumexp of the model's output over its class dimension (dim 1, as
    ``cross_entropy`` reads it): the auxiliary loss of Chowdhery et al. 2022 (PaLM). The
    loss logged and reported stays the task's own, so runs with and without it compare.
    """
    started = time.perf_counter()
    loss_fn = _loss_fn(data.task)
    opt = make_optimizer(optimizer, model.parameters(), lr)
    sched = _scheduler(schedule, opt, steps)
    g = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    rows: list[dict[str, float]] = []
    recent: list[torch.Tensor] = []
    diverged = False
    model.train()
    with Probe(model, opt, store=store, label=label, config=config, **(probe or {})) as p:
        for step in range(steps):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
            opt.zero_grad(set_to_none=True)
            out = model(data.x_train[idx])
            loss = loss_fn(out, data.y_train[idx])
            if z_loss > 0:
                (loss + z_loss * torch.logsumexp(out, dim=1).square().mean()).backward()
            else:
                loss.backward()
            # The tensor, not a float: the Probe keeps it on the device until its flush,
            # so every run records its loss curve without a host sync per step.
            p.log(loss=loss)
            if clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            if clip_value is not None:
                nn.utils.clip_grad_value_(model.parameters(), clip_value)
            opt.step()
            if sched is not None:
                sched.step()
            recent.append(loss.detach())
            last = step == steps - 1
            if (step + 1) % eval_every == 0 or last:
                # Deliberate host sync once per evaluation, not per step.
                train_loss = float(torch.stack(recent).mean())
                recent.clear()
                val_loss, val_acc = evaluate(model, data.x_val, data.y_val, data.task)
                rows.append(
                    {
                        "step": step + 1,
                        "train_loss": train_loss,
                        "val_loss": val_loss,
                        "val_acc": val_acc,
                    }
                )
                if stop_on_nonfinite and not math.isfinite(train_loss):
                    diverged = True
                    break
        run = p.run()
    history = pd.DataFrame(rows, columns=["step", "train_loss", "val_loss", "val_acc"])
    final = rows[-1] if rows else {}
    return FitResult(
        run,
        history,
        {k: float(v) for k, v in final.items()},
        diverged,
        time.perf_counter() - started,
    )

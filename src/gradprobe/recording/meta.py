"""The run's meta: what the model and the Probe are (read once), and what is learned while training.

:func:`describe` is the meta written when a Probe is made; :class:`Progress` holds what
the hooks and the step close learn (the forward's order, each module's units, the
wall-clock anchors), merged into the meta by :meth:`Progress.of`.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..activations import recurrent_nonlinearity
from ..architecture import describe_architecture
from .context import Context

__all__ = ["Progress", "describe", "module_info", "now", "optimizer_meta"]

# Wall-clock anchors kept in the meta (see Progress.note_time): thinned past this many.
_MAX_TIME_ANCHORS = 512
_OPTIMIZER_KEYS = ("lr", "betas", "eps", "momentum", "weight_decay", "nesterov", "amsgrad")


class Progress:
    """What is learned while training: the modules in the order they first ran, what each
    module's units turned out to be ("feature" or "channel"), and ``[step, seconds since
    the epoch]`` at the first step's close and at each flush (the close of the flush's
    last step): exporters place steps in time by them."""

    def __init__(self) -> None:
        self.execution_order: list[int] = []
        self.seen_slots: set[int] = set()
        self.unit_kinds: dict[int, str] = {}
        self.wall_time: list[list[float]] = []
        self._last_close: list[float] | None = None

    def note_time(self, step: int) -> None:
        """The wall-clock time of this step's close (one host clock read, no device
        work): the first step's and each flush's last step's become the run's anchors."""
        self._last_close = [step, time.time()]
        if not self.wall_time:
            self.wall_time.append(list(self._last_close))

    def anchor_flush(self) -> None:
        """A flush: the last close is an anchor."""
        if self._last_close is not None and self._last_close[0] > self.wall_time[-1][0]:
            self.wall_time.append(list(self._last_close))
            if len(self.wall_time) > _MAX_TIME_ANCHORS:
                # The meta is rewritten at every flush: keep it small on long runs by
                # dropping every other anchor between the first and the last.
                inner = self.wall_time[1:-1][1::2]
                self.wall_time = [self.wall_time[0], *inner, self.wall_time[-1]]

    def of(self, ctx: Context) -> dict[str, Any]:
        """The meta's entries learned while training."""
        # One entry per probed slot, in slot order (sequence-only slots are not listed).
        probed = [s.index for s in ctx.slots if not s.sequence_only]
        modules = [
            {**info, "units": self.unit_kinds[k]} if k in self.unit_kinds else info
            for k, info in zip(probed, ctx.meta["modules"])
        ]
        seen = [ctx.slots[k].name for k in self.execution_order]
        # Sequence-only slots (blocks, the final projection: recording/sequences.py) are
        # not probed modules: neither listed nor ordered here.
        rest = [s.name for s in ctx.slots if s.index not in self.seen_slots and not s.sequence_only]
        return {
            "execution_order": seen + rest,
            "steps": ctx.step_index,
            "modules": modules,
            "wall_time": [list(a) for a in self.wall_time],
        }


def module_info(s: Any, m: nn.Module, histograms: bool) -> dict[str, Any]:
    info = {
        "name": s.name,
        "type": s.type,
        "activation": s.activation.name if s.activation else recurrent_nonlinearity(m),
        "parameters": sum(p.numel() for p in m.parameters(recurse=False)),
        "layout": s.layout,
    }
    if histograms:
        info["histogram_range"] = list(s.histogram_range)
    return info


def describe(
    ctx: Context,
    model: nn.Module,
    probe: dict[str, Any],
    label: str | None,
    config: dict[str, Any] | None,
) -> dict[str, Any]:
    """The run's meta as the Probe is made (``probe``: its settings)."""
    by_name = dict(model.named_modules())
    modules = [
        module_info(s, by_name[s.name], ctx.histograms) for s in ctx.slots if not s.sequence_only
    ]
    params = dict(model.named_parameters())
    # What the model is and does (attention, norms and where they sit, residual
    # additions...), read once here so that a loaded run is diagnosed as a live one.
    architecture: dict[str, Any] = {}
    ctx.guard(
        lambda: architecture.update(describe_architecture(model)),
        "reading the model's architecture",
    )
    return {
        "label": label,
        "created": now(),
        "model": {
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "summary": _summary(model),
        },
        "modules": modules,
        "architecture": architecture,
        "parameters": [
            {"name": n, "shape": list(params[n].shape), "numel": params[n].numel()}
            for n in ctx.param_names
        ],
        "probe": probe,
        "config": config or {},
        "versions": {
            "gradprobe": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def optimizer_meta(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's class and each param group's scalar hyper-parameters, for the meta.

    Remedies read them (Adam's β₂/ε, momentum); tensors (a capturable lr) are left out
    rather than copied to the host.
    """
    groups = []
    for group in optimizer.param_groups:
        kept: dict[str, Any] = {}
        for key in _OPTIMIZER_KEYS:
            value = group.get(key)
            if isinstance(value, (bool, int, float)):
                kept[key] = value
            elif isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):
                kept[key] = list(value)
        groups.append(kept)
    return {"class": type(optimizer).__name__, "param_groups": groups}


def theory_of(model: nn.Module) -> dict[str, Any]:
    from ..theory.model import describe as theory  # on first use: recording needs no theory

    return theory(model)


def _summary(model: nn.Module, limit: int = 4000) -> str:
    text = repr(model)
    return text if len(text) <= limit else text[:limit] + "\n..."


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

"""Worked examples of the concepts behind gradprobe (docs/concepts.md), computed live and checked.

Each topic is a function that returns its numbers (a dataclass), so tests and
notebooks can check them; :func:`render` turns one into rich renderables for the
``gradprobe explain TOPIC`` command, which only prints them.

* :func:`backprop` — docs/concepts.md §1: the two-layer sigmoid network's gradients written
  out as Hadamard products, each compared with ``torch.autograd`` in float64, and a
  deep sigmoid chain whose product of per-layer factors vanishes.
* :func:`standardize` — docs/concepts.md §5: X = [100, 50, 10, 5, 1] standardised.
* :func:`channels` — docs/concepts.md §6: ``[batch, channels, height, width]`` through a real
  convolution on digits images, per-channel statistics and a dead channel.
* :func:`activations` — docs/concepts.md §7: the cheat-sheet, with each registered
  activation's maximum derivative, saturated and dead ranges found numerically.
* ``residual`` (:mod:`.residual`) — a residual ReLU net's signal forward and back for
  α = 1 and 1/√L, the backward pass by hand against autograd, beside (1 + α²)^l.
* ``isometry`` (:mod:`.isometry`) — deep tanh and ReLU Jacobians at criticality, Gaussian
  vs orthogonal weights, multiplied out by hand against autograd, their spectrum's
  spread beside Pennington et al.'s prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import GradprobeError
from .backprop import BackpropExample, ChainLayer, backprop, render_backprop
from .channels import ChannelsExample, channels, render_channels
from .cheatsheet import (
    CHEAT_SHEET,
    ActivationFacts,
    activations,
    plot_activations,
    render_activations,
    write_figure,
)
from .standardize import StandardizeExample, render_standardize, standardize

__all__ = [
    "CHEAT_SHEET",
    "TOPICS",
    "ActivationFacts",
    "BackpropExample",
    "ChainLayer",
    "ChannelsExample",
    "StandardizeExample",
    "activations",
    "backprop",
    "channels",
    "compute",
    "plot_activations",
    "render",
    "standardize",
    "write_figure",
]


def _residual() -> Any:
    from .residual import residual

    return residual()


def _isometry() -> Any:
    from .isometry import isometry

    return isometry()


def _render_residual(result: Any) -> list[Any]:
    from .residual import render_residual

    return render_residual(result)


def _render_isometry(result: Any) -> list[Any]:
    from .isometry import render_isometry

    return render_isometry(result)


# topic -> (compute its numbers, present them); the heavier topics import on first use
TOPICS: dict[str, Callable[[], Any]] = {
    "backprop": backprop,
    "standardize": standardize,
    "channels": channels,
    "activations": activations,
    "residual": _residual,
    "isometry": _isometry,
}
_RENDER: dict[str, Callable[[Any], list[Any]]] = {
    "backprop": render_backprop,
    "standardize": render_standardize,
    "channels": render_channels,
    "activations": render_activations,
    "residual": _render_residual,
    "isometry": _render_isometry,
}


def compute(topic: str) -> Any:
    """The numbers of one topic (``backprop``, ``standardize``, ``channels``, ``activations``)."""
    if topic not in TOPICS:
        raise GradprobeError(f"unknown topic {topic!r}", f"use one of: {', '.join(TOPICS)}")
    return TOPICS[topic]()


def render(topic: str, result: Any) -> list[Any]:
    """Rich renderables presenting ``result`` (from :func:`compute`) for the terminal."""
    if topic not in _RENDER:
        raise GradprobeError(f"unknown topic {topic!r}", f"use one of: {', '.join(TOPICS)}")
    return _RENDER[topic](result)

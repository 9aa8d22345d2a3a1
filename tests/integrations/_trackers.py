"""What the W&B and MLflow tests share: the models they log, a short probed training and the
documented key mapping, written out independently of gradprobe.integrations._trackers."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradprobe import Probe


class OddNames(nn.Module):
    """Module names with characters MLflow refuses in a key: '(' ')' '[' ']'."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({"in(put)": nn.Linear(4, 8), "out[1]": nn.Linear(8, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers["out[1]"](torch.sigmoid(self.layers["in(put)"](x)))


def sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def deep_sigmoid() -> nn.Module:
    """Ten sigmoid layers: gradients vanish, so the diagnosis has findings to log."""
    layers: list[nn.Module] = []
    for i in range(10):
        layers += [nn.Linear(4 if i == 0 else 16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def train(
    make: Callable[[], nn.Module] = sequential,
    store: Any = None,
    steps: int = 3,
    flush_every: int = 2,
    live: Callable[[Probe], Any] | None = None,
    stats: str = "default",
    after_step: Callable[[torch.Tensor], None] | None = None,
) -> tuple[nn.Module, Any]:
    """Train a few steps under a Probe; ``live(probe)`` makes a writer; ``after_step(loss)``
    is the user's own logging. Returns (model, writer)."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    writer = None
    with Probe(model, opt, store=store, stats=stats, flush_every=flush_every) as probe:
        writer = live(probe) if live else None
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            probe.log(loss=loss)
            opt.step()
            if after_step is not None:
                after_step(loss)
    return model, writer


def expected_key(stat: str, name: str) -> str:
    """The documented mapping, written out independently of the module's."""
    key = f"gradprobe/{stat}" if name == "(model)" else f"gradprobe/{stat}/{name}"
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", key)

"""The run's meta ``probe.staging_bytes`` (the buffers the Probe keeps from step to step to
reduce outputs in batches) against the bytes those buffers must hold, worked out from the
model's shapes: the memory bound the README and issue 12 promise is reported truly."""

from __future__ import annotations

import torch
from torch import nn

from gradprobe import Probe
from gradprobe.reduce import _COUNT_CHUNK

FLOAT32 = 4


def _train(model: nn.Module, x: torch.Tensor, steps: int = 2) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, every=1) as probe:
        for _ in range(steps):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        return probe.meta["probe"]


def test_small_outputs_stack_per_shape_and_tanh_rows_compare():
    """Outputs held to the forward's end are stacked per shape (one buffer a shape, a row
    per call), and each shape's tanh rows are compared into one more buffer of their size;
    an output alone of its shape is reduced alone, with no buffer."""
    layers, batch, width = 3, 8, 16
    body = [m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())]
    model = nn.Sequential(*body, nn.Linear(width, 3), nn.Tanh(), nn.Linear(3, 5))
    meta = _train(model, torch.randn(batch, width))
    wide = 2 * layers * batch * width + layers * batch * width  # [8, 16]: stack, tanh rows
    narrow = 2 * batch * 3 + batch * 3  # [8, 3]: the head's Linear and Tanh, its tanh row
    # [8, 5]: the last Linear, alone of its shape: nothing kept
    assert meta["staging_bytes"] == (wide + narrow) * FLOAT32


class Repeated(nn.Module):
    """Its body runs ``self.repeats`` times a forward: more calls of the same shapes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.repeats = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.repeats):
            x = self.body(x)
        return x


def test_a_grown_buffer_replaces_the_old_one_in_the_count():
    """More calls of a shape in a later step grow its buffers: the meta then counts the
    grown ones, not the ones they replaced."""
    batch, width = 4, 8
    model = Repeated(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(batch, width)
    counted = []
    with Probe(model, opt, every=1) as probe:
        for repeats in (2, 2, 5, 3):  # the first step learns which outputs can be held
            model.repeats = repeats
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            counted.append(probe.meta["probe"].get("staging_bytes", 0))
    # a stack of 2·repeats rows (Linear and Tanh) and the repeats tanh rows, at most
    per_call = batch * width * FLOAT32
    assert counted[1:] == [(4 + 2) * per_call, (10 + 5) * per_call, (10 + 5) * per_call]


def test_large_outputs_share_one_count_buffer():
    """Outputs over the held size are reduced in their hook through one float buffer of
    at least a chunk, shared by every such output of the device."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(64, 3, 16, 16)  # outputs of 64·8·16·16 = 131072 entries each
    meta = _train(model, x)
    per_sample = 8 * 16 * 16
    assert meta["staging_bytes"] == max(_COUNT_CHUNK, per_sample) * FLOAT32


def test_no_module_statistic_keeps_no_staging():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, every=1, stats=["grad_norm"]) as probe:
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        assert probe.meta["probe"].get("staging_bytes", 0) == 0

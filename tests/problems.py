"""Shared model "problems" (BackPACK style): every statistic is tested on each of them.

A module of its own (not conftest.py) so tests import it by a name no other directory's
conftest shadows; tests/conftest.py turns PROBLEMS into the ``problem`` fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Problem:
    """A model, a batch and a loss: enough to train one step."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]

    def make(self, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
        torch.manual_seed(seed)
        model = self.build()
        x, y = self.batch()
        return model, x, y


class TwiceBlock(nn.Module):
    """One Linear applied twice in a forward pass (a shared block)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.act = nn.Tanh()
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.shared(self.inp(x)))
        h = self.act(self.shared(h))
        return self.out(h)


class SharedWeight(nn.Module):
    """Two Linear modules holding the same weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.inp = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.b(torch.tanh(self.a(self.inp(x))))))


class Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(4, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def _flat_batch() -> tuple[Tensor, Tensor]:
    return torch.randn(16, 6), torch.randint(0, 3, (16,))


def _seq_batch() -> tuple[Tensor, Tensor]:
    return torch.randn(8, 5, 4), torch.randint(0, 3, (8,))


def _img_batch() -> tuple[Tensor, Tensor]:
    return torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))


def _frozen_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)
    return model


PROBLEMS = [
    Problem("mlp_tanh", lambda: nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3)), _flat_batch, _ce),
    Problem("mlp_relu_inplace", lambda: nn.Sequential(nn.Linear(6, 10), nn.ReLU(inplace=True), nn.Linear(10, 10), nn.ReLU(inplace=True), nn.Linear(10, 3)), _flat_batch, _ce),
    Problem("mlp_sigmoid_dropout", lambda: nn.Sequential(nn.Linear(6, 10), nn.Sigmoid(), nn.Dropout(0.3), nn.Linear(10, 3)), _flat_batch, _ce),
    Problem("cnn_batchnorm", lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)), _img_batch, _ce),
    Problem("rnn", lambda: Recurrent(nn.RNN), _seq_batch, _ce),
    Problem("lstm", lambda: Recurrent(nn.LSTM), _seq_batch, _ce),
    Problem("gru", lambda: Recurrent(nn.GRU), _seq_batch, _ce),
    Problem("transformer", Transformer, _seq_batch, _ce),
    Problem("module_twice", TwiceBlock, _flat_batch, _ce),
    Problem("shared_weight", SharedWeight, _flat_batch, _ce),
    Problem("frozen", _frozen_mlp, _flat_batch, _ce),
]

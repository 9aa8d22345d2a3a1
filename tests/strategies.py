"""Hypothesis strategies for random architectures: MLPs and CNNs of random depth, width,
activation, with or without BatchNorm/LayerNorm/Dropout and residual blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from gradprobe.lab.models import activation_module

ACTIVATION_NAMES = ["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "selu", "silu",
                    "gelu", "softplus", "hardtanh", "softsign"]


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


@dataclass(frozen=True)
class Architecture:
    kind: str  # "mlp" or "cnn"
    depth: int
    width: int
    activation: str
    norm: str  # "none", "batch", "layer"
    dropout: bool
    residual: bool
    inplace: bool
    batch: int

    def build(self) -> nn.Module:
        layers: list[nn.Module] = []
        conv = self.kind == "cnn"
        first = nn.Conv2d(2, self.width, 3, padding=1) if conv else nn.Linear(5, self.width)
        layers.append(first)
        for _ in range(self.depth):
            block: list[nn.Module] = [
                nn.Conv2d(self.width, self.width, 3, padding=1) if conv else nn.Linear(self.width, self.width)
            ]
            if self.norm == "batch":
                block.append(nn.BatchNorm2d(self.width) if conv else nn.BatchNorm1d(self.width))
            elif self.norm == "layer":
                block.append(nn.GroupNorm(1, self.width) if conv else nn.LayerNorm(self.width))
            act = activation_module(self.activation)
            if self.inplace and hasattr(act, "inplace"):
                act.inplace = True
            block.append(act)
            if self.dropout:
                block.append(nn.Dropout2d(0.2) if conv else nn.Dropout(0.2))
            body = nn.Sequential(*block)
            layers.append(Residual(body) if self.residual else body)
        if conv:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        layers.append(nn.Linear(self.width, 3))
        return nn.Sequential(*layers)

    def batch_data(self) -> tuple[Tensor, Tensor]:
        x = torch.randn(self.batch, 2, 5, 5) if self.kind == "cnn" else torch.randn(self.batch, 5)
        return x, torch.randint(0, 3, (self.batch,))


architectures = st.builds(
    Architecture,
    kind=st.sampled_from(["mlp", "cnn"]),
    depth=st.integers(1, 5),
    width=st.integers(2, 9),
    activation=st.sampled_from(ACTIVATION_NAMES),
    norm=st.sampled_from(["none", "batch", "layer"]),
    dropout=st.booleans(),
    residual=st.booleans(),
    inplace=st.booleans(),
    batch=st.integers(2, 9),
)

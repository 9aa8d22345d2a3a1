"""channels: BatchNorm evens out channels and keeps them alive."""

from __future__ import annotations

import torch

from gradprobe.lab import models
from gradprobe.lab.channels import channel_stats
from gradprobe.lab.experiment import row_of


def test_batchnorm_per_channel(lab_tiny):
    o = lab_tiny("channels")
    for bias in ("zero", "negative"):
        assert (
            row_of(o.table, bias=bias, batchnorm=True)["offset"]
            < row_of(o.table, bias=bias, batchnorm=False)["offset"]
        )
    assert row_of(o.table, bias="negative", batchnorm=True)["dead_channels"] == 0.0
    assert row_of(o.table, bias="negative", batchnorm=False)["dead_channels"] > 0.0


def test_channel_stats_shape_and_dead():
    torch.manual_seed(0)
    model = models.cnn(channels=4, depth=2, init="he", bias=-100.0)
    stats = channel_stats(model, torch.randn(8, 1, 8, 8))
    assert stats["mean"].shape == (2, 4)
    # A bias of −100 kills every channel of every layer.
    assert stats["dead"].all()

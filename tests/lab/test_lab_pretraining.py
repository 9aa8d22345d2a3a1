"""pretraining: greedy layer-wise pre-training beats random init with few labels."""

from __future__ import annotations

import torch

from gradprobe.lab import models
from gradprobe.lab.experiment import row_of
from gradprobe.lab.pretraining import pretrain_greedy


def test_pretraining_beats_random(lab_tiny):
    o = lab_tiny("pretraining")
    assert row_of(o.table, init="pretrained")["val_acc"] > row_of(o.table, init="random")["val_acc"]
    assert o.verdict.agrees_with_source


def test_pretraining_lowers_reconstruction_error():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    model = models.mlp(16, 3, depth=2, width=8, activation="sigmoid")
    before = [p.detach().clone() for p in model.parameters()]
    errors = pretrain_greedy(model, x, steps=50)
    assert len(errors) == 2
    # The output layer is left for fine-tuning; the hidden layers moved.
    after = list(model.parameters())
    assert not torch.equal(before[0], after[0])
    assert torch.equal(before[-1], after[-1])

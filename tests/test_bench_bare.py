"""bench/bare.py, the bench's floor of the default statistics' reductions: it must take
the numbers it claims to take (else the floor it reports means nothing), and, like the
Probe, leave training bit-identical."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bare import BareMonitor  # bench/ is not a package: its folder is on the path


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def test_bare_monitor_takes_the_gradient_norms_and_leaves_training_identical():
    plain, watched = _model(), _model()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, watched)]
    monitor = BareMonitor(watched, opts[1])
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for _ in range(3):
        for model, opt in zip((plain, watched), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            taken = monitor.results  # the monitor drops this step's list when it ends
            grads = [p.grad.clone() for p in model.parameters()]
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            if model is watched:
                # forward batch per shape, error signals, grad norms, param norms, update norms
                expected = torch.stack([torch.linalg.vector_norm(g) for g in grads])
                assert any(
                    isinstance(r, torch.Tensor)
                    and r.shape == expected.shape
                    and torch.allclose(r, expected)
                    for r in taken
                )
                update = torch.stack(
                    [torch.linalg.vector_norm(b - p) for b, p in zip(before, model.parameters())]
                )
                assert any(
                    isinstance(r, torch.Tensor)
                    and r.shape == update.shape
                    and torch.allclose(r, update)
                    for r in taken
                )
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    monitor.close()
    assert not monitor._handles

"""A norm of the model's own code is not a layer of the depth profile, whatever its class
is called (issue 22 §2, §5): the Probe reads what a module does (meta["architecture"]),
and the diagnosis's depth fit, dead-unit attribution and figures use that."""

from __future__ import annotations

import torch
from torch import nn

from gradprobe import Probe
from gradprobe.diagnose import is_weight_layer, norm_modules
from gradprobe.diagnose.depth import depth_profile


class Scaler(nn.Module):
    """An RMSNorm as models write their own (LLaMA's, T5's), named like nothing in torch."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.eps) * self.weight


def _run(depth: int = 6, width: int = 16):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), Scaler(width), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = Probe(model, opt, every=1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(32, width, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    run = probe.run()
    probe.close()
    return model, run


def test_a_norm_of_the_models_own_code_is_no_weight_layer():
    model, run = _run()
    scalers = {n for n, m in model.named_modules() if isinstance(m, Scaler)}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert norm_modules(run) == scalers  # read from what they do, not their name
    norms = norm_modules(run)
    for name in scalers:
        info = run.module_info(name)
        assert info["parameters"] > 0  # a module with parameters ...
        assert not is_weight_layer(info, norms)  # ... that normalises: not a layer
        assert is_weight_layer(info)  # (by its class name alone it would have been one)
    for name in linears:
        assert is_weight_layer(run.module_info(name), norms)
    profile = depth_profile(run)
    assert profile is not None
    assert set(profile.layers) == linears

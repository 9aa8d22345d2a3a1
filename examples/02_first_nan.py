"""Where does the first NaN come from? A layer that divides by a vanishing number, found by
the probe's non-finite counts (forward outputs and backward signals).

Run:  python examples/02_first_nan.py
"""

from __future__ import annotations

import torch
from torch import nn

import gradprobe


class UnsafeNorm(nn.Module):
    """Divides by the batch standard deviation, with no epsilon: NaN once a feature is constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / x.std(0)


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), UnsafeNorm(), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight[3] = 0.0  # a constant feature: its std is 0, and 0/0 is NaN
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    with gradprobe.Probe(model, opt) as probe:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        run = probe.run()
    step, name, stat = run.first_nonfinite()
    kind = "forward output" if stat == "nonfinite" else "backward error signal"
    print(f"first NaN/Inf: step {step}, module {name!r} ({run.module_info(name)['type']}), in its {kind}")


if __name__ == "__main__":
    main()

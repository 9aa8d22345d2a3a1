"""act_absmax: the largest |output| entry of a module over the step, against numpy.

The reference is taken by plain forward hooks of the test's own that copy every output
(no gradprobe code), then reduced in float64 by numpy: the max over finite entries of
every call of the step (a module called twice, micro-batches of an accumulation step).
A max is exact in any float dtype (it selects an entry, rounds nothing), and float32 →
float64 is exact: the comparison is equality, on any CPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.stats import PRESETS, Plan


class Shared(nn.Module):
    """A block called twice per forward (weights shared), then a head whose output is
    poisoned (NaN and Inf entries) on every other call."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, 3)
        self.poison = Poison()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x))
        h = self.block(self.block(h))
        return self.poison(self.head(h))


class Poison(nn.Module):
    """Identity that writes a NaN and an Inf into its output on chosen calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = x * 3.0
        if self.calls % 2 == 0:
            y = y.clone()
            y.view(-1)[0] = float("nan")
            y.view(-1)[1] = float("inf")
        return y


def _reference(model: nn.Module, names: list[str]) -> tuple[dict, list]:
    """Forward hooks of our own: each output copied to float64 numpy, per step."""
    seen: dict[str, list[np.ndarray]] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:

        def hook(_m, _i, out, name=name):
            seen.setdefault(name, []).append(out.detach().double().numpy().copy())

        handles.append(modules[name].register_forward_hook(hook))
    return seen, handles


def _finite_absmax(arrays: list[np.ndarray]) -> float:
    flat = np.abs(np.concatenate([a.reshape(-1) for a in arrays]))
    flat = flat[np.isfinite(flat)]
    return float(flat.max()) if flat.size else 0.0


@pytest.mark.parametrize("width", [8, 300])  # 300: outputs over the held size, reduced alone
@pytest.mark.parametrize("stats", [["act_absmax"], [*PRESETS["default"], "act_absmax"]])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_act_absmax_is_the_largest_finite_entry_of_the_step(
    width: int, stats: list[str], accumulate: int
) -> None:
    torch.manual_seed(1)
    model = Shared(width)
    twin = copy.deepcopy(model)
    names = ["inp", "act", "block.0", "block.1", "head", "poison"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    # width 300: 256 × 300 entries, over the size held for the batched reduction
    # (Capture._HELD_NUMEL): reduced in the hook; width 8: held, several calls stacked.
    batch = 16 if width == 8 else 256
    with Probe(model, opt, stats=stats) as probe:
        seen, handles = _reference(model, names)
        expected: dict[tuple[int, str], float] = {}
        poisoned: dict[int, bool] = {}
        for step in range(3):
            seen.clear()
            for net, o in ((model, opt), (twin, twin_opt)):
                o.zero_grad()
                for _ in range(accumulate):
                    x = torch.randn(batch, 5, generator=torch.Generator().manual_seed(step))
                    # The poisoned entries carry no gradient (written over): training is finite.
                    loss = net(x).nan_to_num(0.0, 0.0, 0.0).square().mean() / accumulate
                    loss.backward()
                o.step()
            for name in names:
                expected[(step, name)] = _finite_absmax(seen[name])
            poisoned[step] = any(not np.isfinite(a).all() for a in seen["poison"])
        for h in handles:
            h.remove()
        frame = probe.frame()
    got = frame[frame.stat == "act_absmax"].set_index(["step", "name"])["value"]
    assert set(got.index) == set(expected), (sorted(got.index), sorted(expected))
    for key, value in expected.items():
        assert got[key] == value, (key, got[key], value)  # a max is exact: equality
    # The poisoned calls' NaN/Inf are left out of the max, and counted by nonfinite.
    assert all(np.isfinite(v) and v > 0 for v in expected.values())
    if "nonfinite" in stats:
        flags = frame[(frame.stat == "nonfinite") & (frame.name == "poison")]
        assert {int(r.step): r.value > 0 for r in flags.itertuples()} == poisoned
    assert any(poisoned.values())
    # Training is the twin's, bit for bit.
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_act_absmax_in_bfloat16_is_the_entry_itself() -> None:
    """bf16 outputs: the max of the bf16 entries, exactly (no accumulation to round)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 4)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen, handles = _reference(model, ["0", "1", "2"])
    with Probe(model, opt, stats=["act_absmax", "act_mean"]) as probe:
        x = (torch.randn(64, 6) * 40).to(torch.bfloat16)
        model(x).float().sum().backward()
        opt.step()
        frame = probe.frame()
    for h in handles:
        h.remove()
    got = frame[frame.stat == "act_absmax"].set_index("name")["value"]
    for name in ("0", "1", "2"):
        assert got[name] == _finite_absmax(seen[name]), name


def test_act_absmax_is_opt_in_and_only_its_measure_is_taken() -> None:
    assert "act_absmax" not in PRESETS["default"]
    assert "act_absmax" in PRESETS["full"]
    plan = Plan.of(["act_absmax"])
    assert plan.absmax and plan.forward
    assert not (plan.output or plan.nonfinite or plan.units or plan.gate or plan.error)

"""Per-parameter statistics of a model whose parameters come in several dtypes (one
batched group each), at recorded steps and at the "auto" cadence's sentinel steps,
against the real ``.grad`` and the real update of every parameter at every step.

Why: on the CPU these values go straight to host arrays (``StepBuffer.record_params``),
and a sentinel step reuses the norms backward left without gathering the gradients
again; both must give the numbers a plain computation gives, whatever the dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.step import AUTO_FIRST


class MixedDtypes(nn.Module):
    """float32 → float64 → bfloat16 → float32 layers, each cast at its input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8).double()
        self.c = nn.Linear(8, 160).to(torch.bfloat16)  # 1280 weights: NaN counts > 256
        self.d = nn.Linear(160, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h.double()))
        h = torch.tanh(self.c(h.to(torch.bfloat16)))
        return self.d(h.float())


def _real_values(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, poison: int, exact: bool
):
    """Train ``steps`` steps; per step and parameter: ‖grad‖, ‖w‖ and its NaN/Inf entries
    (their number if ``exact``, else whether there is one), read in the optimizer's
    pre-hook, as the step sees them, and ‖Δw‖/‖w‖."""
    seen: dict[int, dict[str, dict[str, float]]] = {}
    names = {p: n for n, p in model.named_parameters()}
    before: dict[str, torch.Tensor] = {}
    step = [0]

    def pre(optimizer, args, kwargs):
        row = seen.setdefault(step[0], {})
        for p, n in names.items():
            g = p.grad.double()
            bad = int((~torch.isfinite(g)).sum())
            row[n] = {
                # bfloat16 arithmetic (the snapshot's difference) rounds at 2^-8
                "rel": 1e-2 if p.dtype == torch.bfloat16 else 1e-5,
                "grad_norm": float(torch.linalg.vector_norm(g)),
                "param_norm": float(torch.linalg.vector_norm(p.detach().double())),
                "nonfinite": float(bad if exact else bad > 0),
            }
            before[n] = p.detach().double().clone()

    def post(optimizer, args, kwargs):
        for p, n in names.items():
            w = before[n]
            seen[step[0]][n]["update_ratio"] = float(
                torch.linalg.vector_norm(p.detach().double() - w) / torch.linalg.vector_norm(w)
            )
        step[0] += 1

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for s in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if s == poison:  # in place, after backward: the norms must be taken again
            model.b.weight.grad[0, 0] = math.nan
            model.c.weight.grad.view(-1)[:997] = math.inf  # 997: not a bfloat16 number
        opt.step()
    for h in handles:
        h.remove()
    return seen


def _rows(frame, stat):
    sub = frame[frame.stat == stat]
    return {(int(s), n): float(v) for s, n, v in zip(sub.step, sub.name, sub.value)}


@pytest.mark.parametrize("stats", [None, "full"])
@pytest.mark.parametrize("every", [1, "auto"])
def test_param_statistics_of_every_dtype_against_the_real_tensors(every, stats):
    torch.manual_seed(0)
    model = MixedDtypes()
    # the last step's gradient is poisoned: its NaN reaches no later step
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    steps = AUTO_FIRST + 4 if every == "auto" else 4
    poison = steps - 1
    exact = stats == "full"
    with Probe(model, opt, every=every, **({"stats": stats} if stats else {})) as probe:
        seen = _real_values(model, opt, steps, poison, exact)
        frame = probe.frame()
    grad_norms = _rows(frame, "grad_norm")
    flags = _rows(frame, "nonfinite")
    ratios = _rows(frame, "update_ratio")
    param_norms = _rows(frame, "param_norm")
    sentinel_steps = [s for s in range(steps) if s >= AUTO_FIRST] if every == "auto" else []
    for s, row in seen.items():
        for name, real in row.items():
            got = grad_norms[(s, name)]
            if math.isnan(real["grad_norm"]):
                assert math.isnan(got) or math.isinf(got) or flags.get((s, name)) == 1.0
            else:
                assert got == pytest.approx(real["grad_norm"], rel=1e-5), (s, name)
            if (s, name) in flags:
                assert flags[(s, name)] == real["nonfinite"], (s, name)
            if s not in sentinel_steps:
                assert param_norms[(s, name)] == pytest.approx(real["param_norm"], rel=1e-5)
            if s not in sentinel_steps and s != poison:
                assert ratios[(s, name)] == pytest.approx(real["update_ratio"], rel=real["rel"]), (s, name)
    # the sentinel's rows exist at every step it ran, and only its statistics
    for s in sentinel_steps:
        assert all((s, n) in grad_norms for n in seen[s])
        assert not any(k[0] == s for k in ratios)
    # the poisoned gradients are found at their step, and only they
    assert flags[(poison, "b.weight")] == 1.0
    assert flags[(poison, "c.weight")] == (997.0 if exact else 1.0)
    assert sum(v for (s, _), v in flags.items() if s == poison) == (998.0 if exact else 2.0)

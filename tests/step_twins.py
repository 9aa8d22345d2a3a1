"""What the tests of "what the step applies" compare against: an optimizer that reads the
gradients where its update uses them, and a census of the hooks a Probe may leave.

:class:`ReadingSGD` is plain SGD written out (``p -= lr · grad``), so that it never calls
another optimizer's ``step`` (whose hooks, patched on the class, would fire a second
time). It calls the closure itself, like any optimizer, and then reads each ``.grad``:
what the update is about to apply, independent of the Probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class ReadingSGD(torch.optim.Optimizer):
    """SGD that keeps, per step, the norms of the gradients it applies (by parameter)."""

    def __init__(self, params: Any, lr: float, names: dict[int, str] | None = None) -> None:
        super().__init__(params, {"lr": lr})
        self.names = names or {}
        self.applied: list[dict[str, float]] = []

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        seen = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                seen[self.names.get(id(p), str(id(p)))] = float(p.grad.double().norm())
                p.add_(p.grad, alpha=-group["lr"])
        self.applied.append(seen)
        return loss


def global_norm(norms: dict[str, float]) -> float:
    return math.sqrt(sum(v * v for v in norms.values()))


def names_of(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def hook_count(model: nn.Module, *optimizers: torch.optim.Optimizer) -> int:
    """Hooks of every module and parameter of ``model`` and of the optimizers' steps."""
    tables = (
        "_forward_pre_hooks",
        "_forward_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
    n = sum(len(getattr(m, t, None) or {}) for m in model.modules() for t in tables)
    n += sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    for opt in optimizers:
        n += len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)
    return n


def table(frame: Any, stat: str, name: str) -> dict[int, float]:
    """``{step: value}`` of one statistic of one name."""
    rows = frame[(frame.stat == stat) & (frame.name == name)]
    return dict(zip(rows.step.astype(int), rows.value.astype(float)))


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def error_norm_sq(output: Tensor, loss: Tensor) -> float:
    """‖dL/d(output)‖², by autograd (the graph is kept for the caller's backward)."""
    (g,) = torch.autograd.grad(loss, output, retain_graph=True)
    return float(g.double().pow(2).sum())

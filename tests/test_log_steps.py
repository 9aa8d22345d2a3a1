"""Which step a value given to ``probe.log`` is of (docs: Probe.log): the step in
progress if a forward under grad ran since the last optimizer step, or if the value's own
autograd graph was made since; else the step that just closed. The reference is the loop
itself: each iteration logs one value per place, and the rows must be at that iteration's
step, under every cadence, whatever expression of the loss is logged."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradprobe import Probe

STEPS = 26  # past AUTO_FIRST (20): sentinel steps under "auto"

EXPRESSIONS: dict[str, Callable[[torch.Tensor], torch.Tensor | float]] = {
    "detached": lambda loss: loss.detach(),
    "loss * k": lambda loss: loss * 4.0,  # a new node on the step's (old) graph
    "exp": lambda loss: loss.exp(),
    "float": lambda loss: float(loss),
}


class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _logged_steps(every: str | int, where: str, parts: bool, expr: str) -> list[int]:
    torch.manual_seed(0)
    model = TwoPart()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    with Probe(model, opt, every=every) as probe:
        for _ in range(STEPS):
            x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
            opt.zero_grad()
            out = model.head(model.body(x)) if parts else model(x)
            loss = ((out - y) ** 2).mean()
            if where == "before backward":
                probe.log(value=EXPRESSIONS[expr](loss))
            loss.backward()
            if where == "before step":
                probe.log(value=EXPRESSIONS[expr](loss))
            opt.step()
            if where == "after step":
                probe.log(value=EXPRESSIONS[expr](loss))
        frame = probe.frame()
    return sorted(frame[frame.stat == "value"].step.tolist())


@pytest.mark.parametrize("expr", list(EXPRESSIONS))
@pytest.mark.parametrize("where", ["before backward", "before step", "after step"])
@pytest.mark.parametrize("parts", [False, True], ids=["model(x)", "its parts"])
@pytest.mark.parametrize("every", ["auto", 1])
def test_each_value_is_of_its_iterations_step(every, parts, where, expr):
    assert _logged_steps(every, where, parts, expr) == list(range(STEPS))


def test_a_value_logged_after_a_forward_under_grad_after_the_step():
    # A validation forward left under grad after optimizer.step() is a forward of the
    # step in progress, as docs say (the rule the hooks applied before): its metric goes
    # to the next step; one under no_grad does not move it.
    torch.manual_seed(0)
    model = TwoPart()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with Probe(model, opt, every=1) as probe:
        for _ in range(3):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            with torch.no_grad():
                probe.log(quiet=float(model(x).mean()))  # the step that closed
            probe.log(graded=float(model(x).mean()))  # after a forward under grad
        frame = probe.frame()
    assert sorted(frame[frame.stat == "quiet"].step) == [0, 1, 2]
    assert sorted(frame[frame.stat == "graded"].step) == [1, 2, 3]


def test_a_graph_it_cannot_read_leaves_the_hooks_rule(monkeypatch):
    # log() is the user's call: should autograd's graph not be readable (a tensor
    # subclass, a node of another kind), nothing raises and the hooks' rule decides.
    import gradprobe.recording.passes as passes

    def unreadable(node, since):
        raise RuntimeError("a node that has no sequence number")

    monkeypatch.setattr(passes, "_graph_newer", unreadable)
    assert _logged_steps(1, "after step", False, "loss * k") == list(range(STEPS))
    assert _logged_steps(1, "before step", False, "loss * k") == list(range(STEPS))

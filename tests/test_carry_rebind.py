"""A gated recurrent module added or replaced mid-run gets its carry-gate statistics, as
one present from the start does: the value at the step after the change equals what a
fresh Probe on a copy of the changed model reads on the same batch (its binding made at
construction, not by following a change). Before: the carry slots were found once."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradprobe import Probe


class Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("every", [1, "auto"])
@pytest.mark.parametrize("new", ["gru", "lstm"])
def test_a_recurrent_module_replaced_mid_run_keeps_its_carry_gates(every, new) -> None:
    torch.manual_seed(0)
    model = Seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(3, 6, 4)
    twin = None
    with Probe(model, opt, every=every) as probe:
        for step in range(4):
            if step == 2:
                model.rnn = (nn.GRU if new == "gru" else nn.LSTM)(4, 8, batch_first=True)
                opt.add_param_group({"params": list(model.rnn.parameters())})
                twin = copy.deepcopy(model)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        frame = probe.frame()
    rows = frame[frame.stat == "carry_gate_mean"].set_index("step").value
    assert sorted(rows.index) == [0, 1, 2, 3]
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.01)
    with Probe(twin, opt2, every=1) as fresh:
        opt2.zero_grad()
        twin(x).pow(2).mean().backward()
        opt2.step()
        expected = fresh.frame()
    # the same module, input and code path: equal, not close
    assert rows[2] == expected[expected.stat == "carry_gate_mean"].value.item()

"""init: He et al. 2015's 30-layer ReLU case, and a too-small init for tanh."""

from __future__ import annotations

from gradprobe.lab.experiment import row_of


def test_he_trains_where_xavier_stalls(lab_tiny):
    o = lab_tiny("init")
    xavier = row_of(o.table, activation="relu", init="xavier_normal")
    he = row_of(o.table, activation="relu", init="he")
    assert xavier["stalled"] == 1.0 and he["stalled"] == 0.0
    assert he["train_loss"] < xavier["train_loss"]
    small = row_of(o.table, activation="tanh", init="small")
    good = row_of(o.table, activation="tanh", init="xavier_normal")
    assert small["train_loss"] > good["train_loss"]
    assert o.verdict.checks[0].held == (True,)

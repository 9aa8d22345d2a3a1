"""isometry: the measured Jacobian spread beside Pennington et al.'s prediction, and training."""

from __future__ import annotations

import math

import torch

from gradprobe import theory
from gradprobe.lab.experiment import row_of
from gradprobe.lab.isometry import build, jacobian_spread_measured


def test_isometry_verdict_is_computed_from_its_runs(lab_tiny):
    o = lab_tiny("isometry")
    iso = row_of(o.table, activation="tanh", weights="orthogonal")
    others = [
        row_of(o.table, activation=a, weights=w)
        for a, w in (("tanh", "gaussian"), ("relu", "gaussian"), ("relu", "orthogonal"))
    ]
    assert all(iso["spread_measured"] < r["spread_measured"] for r in others)
    assert o.verdict.checks[0].held == (True,)
    # each check is the comparison of the table's numbers it names
    assert o.verdict.checks[3].held == (
        iso["train_loss_full"]
        < row_of(o.table, activation="tanh", weights="gaussian")["train_loss_full"],
    )
    for r in (iso, *others):
        assert math.isfinite(r["spread_predicted"]) and r["error_per_layer_predicted"] > 0


def test_measured_spread_is_the_jacobians_own():
    # jacobian_spread_measured against the Jacobian multiplied out by hand (float64)
    torch.manual_seed(0)
    model = build("tanh", "orthogonal", 4, 8).double()
    x = torch.randn(2, 8, dtype=torch.float64)
    fcs = [m for m in model if isinstance(m, torch.nn.Linear)]
    spreads = []
    for xi in x:
        h = fcs[0](xi)
        j = torch.eye(len(h), dtype=torch.float64)
        for fc in fcs[1:-1]:
            j = (fc.weight * (1 - torch.tanh(h) ** 2)) @ j
            h = fc(torch.tanh(h))
        ev = torch.linalg.eigvalsh(j @ j.T)
        spreads.append(float(ev.var(unbiased=False) / ev.mean() ** 2))
    got = jacobian_spread_measured(model, x)
    assert abs(got - sum(spreads) / 2) <= 1e-10 * max(1.0, got)
    # and build() puts the weights where the theory's critical line is
    p = theory.predict(model, x)
    assert all(lay.orthogonal for lay in p.layers[1:-1])

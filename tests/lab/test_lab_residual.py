"""residual: the plain net degrades with depth, the residual one does not."""

from __future__ import annotations

import pytest

from gradprobe.lab.experiment import row_of


def test_plain_degrades_residual_holds(lab_tiny):
    o = lab_tiny("residual")
    p4, p32 = (row_of(o.table, arch="plain", depth=d)["train_loss_full"] for d in (4, 32))
    r4, r32 = (row_of(o.table, arch="residual", depth=d)["train_loss_full"] for d in (4, 32))
    assert p32 > 2 * p4
    assert r32 < p32
    assert r32 <= 2 * r4
    assert o.verdict.agrees_with_source


def test_branch_scale_growth_measured_beside_predicted(lab_tiny):
    import math

    from gradprobe import theory
    from gradprobe.lab.residual import growth_agrees

    o = lab_tiny("residual")
    for arch, alpha_of in (
        ("residual", lambda d: 1 / math.sqrt(d)),
        ("residual_unscaled", lambda d: 1.0),
    ):
        for d in (4, 32):
            r = row_of(o.table, arch=arch, depth=d)
            assert r["growth_predicted"] == math.log10(theory.residual_growth(alpha_of(d), d))
            for k in ("growth_forward", "growth_backward"):
                assert growth_agrees(r, k), (arch, d, k)
    assert row_of(o.table, arch="residual_unscaled", depth=32)["growth_forward"] > 8  # 2^32
    assert row_of(o.table, arch="residual", depth=32)["growth_forward"] < math.log10(2 * math.e)
    assert [c.held for c in o.verdict.checks[3:]] == [(True,)] * 4


def test_block_growth_is_autograds():
    import math

    import torch
    from torch import nn

    from gradprobe.lab import models
    from gradprobe.lab.residual import block_growth

    torch.manual_seed(0)
    model = models.residual_mlp(6, 3, depth=3, width=8, init="he", scale=0.5).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    got = {k: math.log10(v) for k, v in block_growth(model, x, y).items()}
    # by hand: the blocks' input and output and dL/d of each, with torch.autograd.grad
    x0 = model.inp(x)
    xl = model.blocks(x0)
    loss = nn.functional.cross_entropy(model.out(model.head_act(xl)), y)
    g0, gl = torch.autograd.grad(loss, [x0, xl])
    assert got["growth_forward"] == pytest.approx(
        math.log10(float(xl.pow(2).sum() / x0.pow(2).sum())), abs=1e-12
    )
    assert got["growth_backward"] == pytest.approx(
        math.log10(float(g0.pow(2).sum() / gl.pow(2).sum())), abs=1e-12
    )

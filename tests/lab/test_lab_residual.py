"""residual: the plain net degrades with depth, the residual one does not."""

from __future__ import annotations

from gradprobe.lab.experiment import row_of


def test_plain_degrades_residual_holds(lab_tiny):
    o = lab_tiny("residual")
    p4, p32 = (row_of(o.table, arch="plain", depth=d)["train_loss_full"] for d in (4, 32))
    r4, r32 = (row_of(o.table, arch="residual", depth=d)["train_loss_full"] for d in (4, 32))
    assert p32 > 2 * p4
    assert r32 < p32
    assert r32 <= 2 * r4
    assert o.verdict.agrees_with_source

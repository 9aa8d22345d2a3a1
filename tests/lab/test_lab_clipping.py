"""clipping: the unclipped run diverges; norm and value clipping keep the loss finite."""

from __future__ import annotations

import math

from gradprobe.lab.experiment import row_of


def test_clipping_keeps_loss_finite(lab_tiny):
    o = lab_tiny("clipping")
    assert row_of(o.table, setup="mlp", clip="none")["diverged"] == 1.0
    for clip in ("norm", "value"):
        row = row_of(o.table, setup="mlp", clip=clip)
        assert row["diverged"] == 0.0 and math.isfinite(row["final_train_loss"])
    assert o.verdict.passed

"""depth: sigmoid's error signal vanishes exponentially with depth; ReLU-He's does not."""

from __future__ import annotations

import math

from gradprobe.lab.experiment import row_of


def test_sigmoid_vanishes_against_relu_he(lab_tiny):
    o = lab_tiny("depth")
    sig = row_of(o.table, activation="sigmoid", depth=30)
    relu = row_of(o.table, activation="relu", depth=30)
    # Measured by the Probe on real training runs: below 1e-4 of ReLU-He's ratio.
    assert sig["log10_ratio_init"] - relu["log10_ratio_init"] < math.log10(1e-4)
    # Shallow nets barely differ; the gap is the depth.
    assert row_of(o.table, activation="sigmoid", depth=2)["log10_ratio_init"] > -2
    # The mean-field overlay predicts the measured decay.
    assert abs(sig["log10_ratio_init"] - sig["predicted_log10_ratio_init"]) < 0.25 * abs(
        sig["predicted_log10_ratio_init"]
    )
    assert o.verdict.agrees_with_source
    assert o.verdict.checks[1].held == (True,)
    assert "shrinks by a factor" in o.verdict.text

"""dying_relu: a negative bias kills ReLU units; Leaky ReLU and ELU keep none dead."""

from __future__ import annotations

from gradprobe.lab.experiment import row_of


def test_relu_dies_alternatives_live(lab_tiny):
    o = lab_tiny("dying_relu")
    relu = row_of(o.table, cause="negative_bias", activation="relu")
    assert relu["dead_frac_end"] >= 0.1
    for a in ("leaky_relu", "elu"):
        assert row_of(o.table, cause="negative_bias", activation=a)["dead_frac_end"] == 0.0
    assert row_of(o.table, cause="negative_bias", activation="elu")["val_acc"] > relu["val_acc"]

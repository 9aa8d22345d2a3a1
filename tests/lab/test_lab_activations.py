"""activations: sigmoid's signal vanishes in a deep net and it trains worst."""

from __future__ import annotations

from gradprobe.lab.experiment import row_of


def test_sigmoid_vanishes_and_trains_worst(lab_tiny):
    o = lab_tiny("activations")
    sig, relu, gelu = (row_of(o.table, activation=a) for a in ("sigmoid", "relu", "gelu"))
    assert sig["log10_ratio_init"] < min(relu["log10_ratio_init"], gelu["log10_ratio_init"])
    assert sig["train_loss"] > max(relu["train_loss"], gelu["train_loss"])
    # Saturation is measured for sigmoid only; ReLU has none to measure.
    assert sig["sat_frac"] >= 0
    assert o.verdict.agrees_with_source

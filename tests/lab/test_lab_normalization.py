"""normalization: BatchNorm rescues a deep sigmoid net; standardised inputs saturate less."""

from __future__ import annotations

from gradprobe.lab.experiment import row_of


def test_batchnorm_and_standardised_inputs(lab_tiny):
    o = lab_tiny("normalization")
    none = row_of(o.table, part="norm", activation="sigmoid", norm="none")
    bn = row_of(o.table, part="norm", activation="sigmoid", norm="batch")
    assert bn["train_loss"] < 0.5 * none["train_loss"]
    std = row_of(o.table, part="input", inputs="standardized")
    raw = row_of(o.table, part="input", inputs="raw")
    assert std["sat_frac_first"] < raw["sat_frac_first"]
    assert o.verdict.checks[0].held == (True,)
    assert o.verdict.checks[3].held == (True,)

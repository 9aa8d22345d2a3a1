"""optimizers: Adam's update ratios are more even across layers; cosine decay shrinks late ones."""

from __future__ import annotations

from gradprobe.lab.experiment import row_of


def test_update_ratios(lab_tiny):
    o = lab_tiny("optimizers")
    sgd = row_of(o.table, optimizer="sgd", schedule="none")
    adam = row_of(o.table, optimizer="adam", schedule="none")
    assert adam["layer_spread"] < sgd["layer_spread"]
    for opt in ("sgd", "adam"):
        cos = row_of(o.table, optimizer=opt, schedule="cosine")
        assert (
            cos["late_minus_early"]
            < row_of(o.table, optimizer=opt, schedule="none")["late_minus_early"]
        )

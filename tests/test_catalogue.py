"""The statistics catalogue: what a Probe measures is derived from the statistics it records.

Each statistic declares the measurements it needs (``Statistic.needs``); the Probe's
flags that the hooks read (``_want_output`` …) are derived from them. The reference
here is the hand-written rule the flags had before they were derived (copied verbatim,
as data): the derivation must give the same flags for every preset and every single
statistic, so no statistic measures more, or less, than before.
"""

from __future__ import annotations

import pytest
from torch import nn

from gradprobe import Probe
from gradprobe.stats import PRESETS, STATISTICS

# The flags as they were written by hand in probe.py before stage 4 of issue 24.
_OLD_FLAGS = {
    "_want_output": {"act_mean", "act_std", "zero_frac"},
    "_want_nonfinite": {"nonfinite"},
    "_want_units": {"dead_frac", "dead_window_frac"},
    "_want_gate": {"gate_mean", "sat_frac"},
    "_want_error": {"error_norm", "error_gain", "error_nonfinite"},
    "_want_input_error": {"error_gain"},
    "_want_params": {
        "grad_norm",
        "param_norm",
        "update_ratio",
        "nonfinite",
        "global_grad_norm",
        "clipped",
    },
    "_want_update": {"update_ratio"},
    "_want_preclip": {"global_grad_norm_preclip", "clipped"},
}
_OLD_CARRY = {"carry_gate_mean", "memory_steps", "seq_len"}


def _old_flags(stats: tuple[str, ...]) -> dict[str, bool]:
    want = set(stats)
    flags = {name: bool(want & names) for name, names in _OLD_FLAGS.items()}
    flags["_want_forward"] = (
        flags["_want_output"]
        or flags["_want_nonfinite"]
        or flags["_want_units"]
        or flags["_want_gate"]
    )
    return flags


# Statistics that existed when the flags were hand-written: a statistic added later
# declares its needs itself (test_new_statistics_declare_needs).
_OLD_STATISTICS = [
    "grad_norm",
    "grad_missing",
    "param_norm",
    "update_ratio",
    "nonfinite",
    "error_norm",
    "error_gain",
    "act_mean",
    "act_std",
    "zero_frac",
    "dead_frac",
    "dead_window_frac",
    "sat_frac",
    "gate_mean",
    "carry_gate_mean",
    "memory_steps",
    "seq_len",
    "error_nonfinite",
    "calls",
    "global_grad_norm",
    "global_grad_norm_preclip",
    "clipped",
    "skipped",
    "loss",
    "lr",
]

_CASES = [(f"preset {p}", PRESETS[p]) for p in ("cheap",)] + [
    (f"stat {s}", (s,)) for s in _OLD_STATISTICS
]
# The default and full presets held exactly the statistics above.
_CASES.append(("all old statistics", tuple(_OLD_STATISTICS)))


@pytest.mark.parametrize(("label", "stats"), _CASES, ids=[c[0] for c in _CASES])
def test_flags_equal_the_hand_written_ones(label: str, stats: tuple[str, ...]) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LSTM(4, 2))
    probe = Probe(model, stats=list(stats))
    try:
        got = {name: getattr(probe, name) for name in _old_flags(stats)}
        assert got == _old_flags(stats), label
        # The carry gates of the LSTM are measured iff a carry statistic is recorded.
        assert bool(probe._carry_slots) == bool(set(stats) & _OLD_CARRY), label
        for value in got.values():
            assert type(value) is bool  # plain bools: the hot path reads them
    finally:
        probe.close()


def test_presets_hold_known_statistics() -> None:
    for name, stats in PRESETS.items():
        assert set(stats) <= set(STATISTICS), name
    assert set(_OLD_STATISTICS) <= set(PRESETS["default"])

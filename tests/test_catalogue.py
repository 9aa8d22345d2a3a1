"""The statistics catalogue: what a Probe measures is derived from the statistics it records.

Each statistic declares the measurements it needs (``Statistic.needs``); the Probe's
flags that the hooks read (``_want_output`` …) are derived from them. The reference
here is the hand-written rule the flags had before they were derived (copied verbatim,
as data): the derivation must give the same flags for every preset and every single
statistic, so no statistic measures more, or less, than before.
"""

from __future__ import annotations

import numpy as np
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
# declares its needs itself (test_finalisers_read_only_what_their_needs_measure checks them).
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
        # The flags are the plan's (the recording components' shared context).
        plan = probe._ctx.plan
        got = {name: getattr(plan, name.removeprefix("_want_")) for name in _old_flags(stats)}
        assert got == _old_flags(stats), label
        # The carry gates of the LSTM are measured iff a carry statistic is recorded.
        assert bool(probe._engine.hookup.carry_slots) == bool(set(stats) & _OLD_CARRY), label
        for value in got.values():
            assert type(value) is bool  # plain bools: the hot path reads them
    finally:
        probe.close()


# Issue 25 §2-3 (sequences): in the default preset, measured at a few sites each.
_SEQUENCE_STATISTICS = [
    "token_cosine",
    "logit_max",
    "logit_z",
    "error_time_first",
    "error_time_last",
    "error_time_slope",
]


def test_presets_hold_known_statistics() -> None:
    for name, stats in PRESETS.items():
        assert set(stats) <= set(STATISTICS), name
    assert set(_OLD_STATISTICS) <= set(PRESETS["default"])
    assert set(_SEQUENCE_STATISTICS) <= set(PRESETS["default"]) - set(PRESETS["cheap"])


def test_plan_has_one_flag_per_measure() -> None:
    from dataclasses import fields

    from gradprobe.stats import MEASURES, Plan

    assert [f.name for f in fields(Plan)] == list(MEASURES)
    every = Plan.of(STATISTICS)
    assert all(getattr(every, name) for name in MEASURES)  # each measure serves a statistic
    assert not any(getattr(Plan.of(["calls", "loss"]), name) for name in MEASURES)


def test_needs_name_measures_whose_partials_the_reducers_fill() -> None:
    from gradprobe.buffer import FIELDS
    from gradprobe.stats import FOLDS, MEASURES, PARTIALS

    for stat in STATISTICS.values():
        assert set(stat.needs) <= set(MEASURES), stat.name
    for measure in MEASURES.values():
        for partial in measure.partials:
            assert PARTIALS[partial].where == "device", (measure.name, partial)
        if measure.kind is not None:
            # A per-call measure fills exactly the partials its kind's fold writes.
            folded = {partial for partial, _, _ in FOLDS[measure.kind]}
            assert folded == set(measure.partials), measure.name
    for kind, folds in FOLDS.items():
        assert FIELDS[kind] == tuple(field for _, field, _ in folds)
        for partial, _, how in folds:
            assert partial in PARTIALS, (kind, partial)
            # Calls in one step fold as micro-batches and ranks combine: by max or by sum.
            expected = "max" if how == "max" else "sum"
            assert PARTIALS[partial].combine == expected, (kind, partial)
    # Every partial the device accumulates (logged values aside) comes from a measure.
    produced = {p for m in MEASURES.values() for p in m.partials}
    device = {n for n, p in PARTIALS.items() if p.where == "device" and not n.startswith("log_")}
    assert device == produced


class _Reads(dict):
    """Partials of ones, remembering which a finaliser read."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> np.ndarray:
        self.read.add(key)
        return np.ones((2, 3))


def test_finalisers_read_only_what_their_needs_measure() -> None:
    """A statistic reads device partials only of the measures it needs (else the
    derived plan would leave one unmeasured), and host counts as it likes."""
    from gradprobe.stats import MEASURES, PARTIALS

    for stat in STATISTICS.values():
        allowed = {p for m in stat.needs for p in MEASURES[m].partials}
        for scope in ("module", "parameter", "model"):
            fn = stat.finalizer(scope)
            if fn is None:
                continue
            reads = _Reads()
            values, present = fn(reads)
            assert np.shape(values) == np.shape(present) == (2, 3), stat.name
            device = {r for r in reads.read if PARTIALS[r].where in ("device", "params")}
            # model partials derived from parameter ones ("params") need the params measure
            if any(PARTIALS[r].where == "params" for r in device):
                assert "params" in stat.needs or "preclip" in stat.needs, stat.name
                device = {r for r in device if PARTIALS[r].where == "device"}
            assert device <= allowed, (stat.name, scope, device - allowed)


def test_every_partial_combines_and_sharded_norms_are_declared() -> None:
    from gradprobe import shards
    from gradprobe.stats import PARTIALS

    for p in PARTIALS.values():
        assert p.combine in ("sum", "max", "same"), p.name
        assert p.shard is None or p.scope == "parameter", p.name
    # Every parameter quantity the step measures on the device combines over shards.
    measured = {n for n, p in PARTIALS.items() if p.scope == "parameter" and p.where == "device"}
    assert measured - {"update_ratio"} == set(shards._SQUARED + shards._COUNTED) - {
        "update",
        "before",
    }


def test_presets_derived_from_the_entries_equal_the_hand_written_lists() -> None:
    """Each statistic says the first preset that records it; the presets, in the
    catalogue's order, are the lists written by hand before (act_absmax added to full;
    the attention statistics of issue 25: attn_logit_max to cheap, the entropies to
    default, the per-head forms to full)."""
    cheap = (
        "grad_norm",
        "grad_missing",
        "param_norm",
        "update_ratio",
        "nonfinite",
        "error_norm",
        "error_gain",
        "error_nonfinite",
        "calls",
        "attn_logit_max",
        "global_grad_norm",
        "global_grad_norm_preclip",
        "clipped",
        "skipped",
        "loss",
        "lr",
    )
    assert PRESETS["cheap"] == cheap
    full_only = {"act_absmax", "attn_head_logit_max", "attn_head_entropy", "attn_head_entropy_min"}
    assert PRESETS["default"] == tuple(s for s in STATISTICS if s not in full_only)
    assert PRESETS["full"] == tuple(STATISTICS)
    attention = {"attn_logit_max", "attn_entropy", "attn_entropy_min"}
    assert set(_OLD_STATISTICS) | attention | set(_SEQUENCE_STATISTICS) == set(PRESETS["default"])

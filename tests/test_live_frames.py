"""The live check's reading of a flushed frame (NumPy arrays taken from its columns once)
says what the pandas reading it replaced said: the same findings, in the same order, with
the same summaries and evidence, the same warnings and the same state after, over random
frames (random steps and row order, NaN/Inf in random statistics, steps a GradScaler
skipped, steps read at the step before the flush, update ratios, either global norm).

The reference below is the former implementation, kept verbatim as the independent
computation: pandas boolean filtering, ``groupby("step").last()``, ``sort_values``."""

from __future__ import annotations

import warnings
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gradprobe.diagnose import UPDATE_RATIO_EXPLODING, Finding
from gradprobe.hooks import GradprobeWarning
from gradprobe.live import LiveCheck
from gradprobe.run import normalize_frame, text_column
from gradprobe.stats import MODEL_NAME

_NONFINITE_FLAGS = ("grad_nonfinite", "nonfinite", "error_nonfinite")


# ---------------------------------------------------------------- the former reading
class PandasLiveCheck(LiveCheck):
    """The live check with the former ``__call__`` (its step-level rules, spike watch and
    saying are the same code: what changed is how a frame is read)."""

    def __call__(self, frame: pd.DataFrame) -> list[Finding]:
        if frame.empty:
            return []
        new: list[Finding] = []
        model = frame[frame["name"] == MODEL_NAME]
        skipped = set(model.loc[(model["stat"] == "skipped") & (model["value"] > 0), "step"])
        seen = self._at_step
        last = int(frame["step"].max())
        self._flushed_upto = max(self._flushed_upto, last)
        self._at_step = {s for s in seen if s > last}
        if "nonfinite" not in self._said:
            f = _old_nonfinite(frame, model, skipped, seen)
            if f is not None:
                new.append(f)
        norms = _old_global_norms(model, skipped)
        norms = norms[~norms.index.isin(seen)] if seen else norms
        for step, value in norms.items():
            f = self._spike_or_growth(int(step), float(value))
            if f is not None:
                new.append(f)
        if "exploding" not in self._said:
            f = _old_huge_updates(frame)
            if f is not None:
                new.append(f)
        new.sort(key=lambda f: f.evidence["step"])
        for f in new:
            self._say(f)
        return new


def _old_global_norms(model: pd.DataFrame, skipped: set[Any]) -> pd.Series:
    for stat in ("global_grad_norm_preclip", "global_grad_norm"):
        rows = model[(model["stat"] == stat) & ~model["step"].isin(skipped)]
        if not rows.empty:
            return rows.groupby("step")["value"].last().sort_index()
    return pd.Series(dtype=float)


def _old_nonfinite(
    frame: pd.DataFrame,
    model: pd.DataFrame,
    skipped: set[Any],
    seen: AbstractSet[int] = frozenset(),
) -> Finding | None:
    rows = frame[~frame["step"].isin(skipped)] if skipped else frame
    if seen:
        at_step = rows["step"].isin(seen) & (
            (rows["name"] == MODEL_NAME) | (rows["stat"] == "grad_nonfinite")
        )
        rows = rows[~at_step]
    flagged = rows[rows["stat"].isin(_NONFINITE_FLAGS) & (rows["value"] > 0)]
    values = rows[
        (rows["name"] == MODEL_NAME)
        & rows["stat"].isin(["loss", "global_grad_norm", "global_grad_norm_preclip"])
        & ~np.isfinite(rows["value"].to_numpy())
    ]
    bad = pd.concat([flagged, values])
    if bad.empty:
        return None
    step = int(bad["step"].min())
    at = bad[bad["step"] == step]
    names = tuple(dict.fromkeys(str(n) for n in at["name"]))
    what = sorted(set(at["stat"]))
    shown = ", ".join(f"`{n}`" for n in names[:4]) + (" …" if len(names) > 4 else "")
    return Finding(
        "nonfinite",
        "critical",
        names,
        f"step {step}: NaN/Inf in {shown} ({', '.join(what)})",
        {"step": step, "stats": what, "live": True},
    )


def _old_huge_updates(frame: pd.DataFrame) -> Finding | None:
    rows = frame[(frame["stat"] == "update_ratio") & (frame["value"] >= UPDATE_RATIO_EXPLODING)]
    rows = rows[np.isfinite(rows["value"].to_numpy()) & ~rows["name"].str.endswith("bias")]
    if rows.empty:
        return None
    step = int(rows["step"].min())
    at = rows[rows["step"] == step].sort_values("value", ascending=False)
    top = at.iloc[0]
    return Finding(
        "exploding",
        "critical" if float(top["value"]) >= 10 else "warning",
        tuple(str(n) for n in at["name"]),
        f"step {step}: {len(at)} weight(s) took an update at least as large as the weight "
        f"(‖Δw‖/‖w‖ up to {float(top['value']):.3g} at `{top['name']}`)",
        {"step": step, "update_ratio": float(top["value"]), "live": True},
    )


# ---------------------------------------------------------------- random flushes
NAMES = [MODEL_NAME, "0", "1", "0.weight", "0.bias", "2.weight", "blocks.3.attn.bias"]
STATS = [
    "loss",
    "global_grad_norm",
    "global_grad_norm_preclip",
    "skipped",
    "grad_nonfinite",
    "nonfinite",
    "error_nonfinite",
    "update_ratio",
    "grad_norm",
    "lr",
]
# Values that make findings: NaN/Inf, flags (> 0), ratios around 1 and 10, norms that
# spike (×10 a window's median) or grow ×1000 over the first steps'; and exact ties.
SPECIAL = [0.0, -0.0, 1.0, 1.0, 2.0, 0.5, 10.0, 12.0, 5e3, 2e6, np.nan, np.inf, -np.inf]
values = st.one_of(st.sampled_from(SPECIAL), st.floats(0.0, 1e4, allow_nan=False))


@st.composite
def rows(draw: st.DrawFn, first: int, last: int) -> list[tuple[int, str, str, float]]:
    """Random rows of steps ``first..last``: each step some of the model's statistics
    (a global norm or both, a loss, maybe skipped), some per-layer ones, a few strays."""
    out = []
    both = draw(st.booleans())
    for step in range(first, last + 1):
        if draw(st.integers(0, 6)) == 0:
            continue  # a step without rows (a gap)
        norms = ["global_grad_norm_preclip", "global_grad_norm"] if both else ["global_grad_norm"]
        for stat in [*norms, "loss"]:
            for _ in range(draw(st.integers(0, 2))):  # none, one, or a repeated row
                out.append((step, MODEL_NAME, stat, draw(values)))
        if draw(st.integers(0, 5)) == 0:
            out.append((step, MODEL_NAME, "skipped", draw(st.sampled_from([0.0, 1.0]))))
        for _ in range(draw(st.integers(0, 4))):
            name = draw(st.sampled_from(NAMES[1:]))
            stat = draw(st.sampled_from(STATS[4:]))
            # A flag is mostly 0 (a count of NaN/Inf elements): a few steps raise one.
            flag = st.sampled_from([0.0, 0.0, 0.0, 0.0, 1.0, 3.0, np.nan])
            out.append((step, name, stat, draw(flag if stat in _NONFINITE_FLAGS else values)))
    for _ in range(draw(st.integers(0, 3))):  # anything anywhere
        step = draw(st.integers(first, last))
        out.append((step, draw(st.sampled_from(NAMES)), draw(st.sampled_from(STATS)), draw(values)))
    return out


def frame_of(rows: list[tuple[int, str, str, float]], sort: bool) -> pd.DataFrame:
    """A flush's frame: text columns made as the flush makes them (text_column), rows
    ordered by step (stably, as the flush does) or left in the drawn order."""
    if sort:
        rows = sorted(rows, key=lambda r: r[0])
    names, stats = sorted(set(NAMES)), sorted(set(STATS))
    frame = pd.DataFrame(
        {
            "step": np.array([r[0] for r in rows], dtype=np.int64),
            "name": text_column(names, np.array([names.index(r[1]) for r in rows], dtype=int)),
            "stat": text_column(stats, np.array([stats.index(r[2]) for r in rows], dtype=int)),
            "value": np.array([r[3] for r in rows], dtype=np.float64),
        }
    )
    return normalize_frame(frame)


@st.composite
def flushes(draw: st.DrawFn) -> list[tuple[list[tuple[int, float, float | None]], pd.DataFrame]]:
    """Consecutive flushes: before each, the steps read at the step (at_step calls, some
    of them before or inside the flush's steps), then the flush's frame."""
    out, step = [], draw(st.integers(0, 3))
    for _ in range(draw(st.integers(1, 4))):
        last = step + draw(st.integers(0, 30))
        at_step = []
        for s in sorted(draw(st.sets(st.integers(max(0, step - 2), last + 2), max_size=12))):
            # Mostly finite: a NaN said at the step leaves the flush's rule nothing to say.
            norm = draw(st.one_of(st.floats(0.1, 10.0), st.floats(0.1, 10.0), values))
            loss = draw(st.one_of(st.none(), st.floats(0.0, 10.0), values))
            at_step.append((s, norm, loss))
        frame = frame_of(draw(rows(step, last)), draw(st.booleans()))
        if draw(st.booleans()):  # text as Python objects (a pandas without Arrow text)
            frame = frame.astype({"name": object, "stat": object})
        out.append((at_step, frame))
        step = last + 1 - draw(st.integers(0, 2))  # a flush may repeat its last steps
    return out


def _said(check: LiveCheck, calls) -> tuple[list, list[str], dict]:
    """What ``check`` returns and warns over ``calls``, and its state after."""
    returned = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradprobeWarning)
        for at_step, frame in calls:
            for s, norm, loss in at_step:
                returned.append(("at_step", check.at_step(s, norm, loss)))
            returned.append(("flush", check(frame)))
    state = {
        "found": check.found,
        "stop": check.take_stop(),
        "said": check._said,
        "at_step": check._at_step,
        "flushed_upto": check._flushed_upto,
        "window": [repr(v) for v in check._spikes.window],  # NaN included, -0.0 told
        "base": check._base,
        "last_spike": check._last_spike,
    }
    return returned, [str(w.message) for w in caught], state


# Steps 3 and 4 were read at the step: the flush leaves step 3's gradient flag to it and
# says step 4's outputs' flags (two names, in the frame's order); step 5 was skipped (its
# NaN loss is the scaler's job); step 6's update ratios tie (the names' order is pandas').
_SEEN_AND_SKIPPED = [
    (
        [(3, 1.0, 2.0), (4, 1.0, None)],
        frame_of(
            [
                (3, "0.weight", "grad_nonfinite", 1.0),
                (4, "1", "error_nonfinite", 2.0),
                (4, "0", "nonfinite", 1.0),
                (5, MODEL_NAME, "skipped", 1.0),
                (5, MODEL_NAME, "loss", np.nan),
                (6, MODEL_NAME, "global_grad_norm", np.inf),
                (6, "0.bias", "update_ratio", 50.0),
                (6, "2.weight", "update_ratio", 2.0),
                (6, "0.weight", "update_ratio", 2.0),
            ],
            sort=False,
        ),
    )
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(_SEEN_AND_SKIPPED, ())
@example([*_SEEN_AND_SKIPPED, ([], _SEEN_AND_SKIPPED[0][1])], ("nonfinite",))
@given(flushes(), st.sampled_from([(), ("nonfinite",), ("exploding", "grad_norm_spike")]))
def test_the_numpy_reading_says_what_the_pandas_reading_said(calls, stop_on) -> None:
    heard_new, heard_old = [], []
    new = LiveCheck(on_finding=heard_new.append, stop_on=stop_on)
    old = PandasLiveCheck(on_finding=heard_old.append, stop_on=stop_on)
    returned_new, warned_new, state_new = _said(new, calls)
    returned_old, warned_old, state_old = _said(old, calls)
    assert returned_new == returned_old
    assert warned_new == warned_old
    assert heard_new == heard_old
    # StopTraining compares by identity: its finding is what must be the same.
    stop_new, stop_old = state_new.pop("stop"), state_old.pop("stop")
    assert (stop_new is None) == (stop_old is None)
    if stop_new is not None:
        assert stop_new.finding == stop_old.finding
    assert state_new == state_old


def test_the_random_flushes_reach_every_rule() -> None:
    """The property above is not vacuous: over examples drawn as it draws them, the flush
    itself says each kind of finding, ``exploding`` by both of its rules."""
    kinds: set[str] = set()
    strategy = flushes()

    @settings(max_examples=100, deadline=None, database=None)
    @given(strategy)
    def collect(calls) -> None:
        check = LiveCheck(warn=False)
        for at_step, frame in calls:
            for s, norm, loss in at_step:
                check.at_step(s, norm, loss)
            for f in check(frame):
                rule = {"update_ratio": ":update", "base": ":growth"}
                kinds.add(f.kind + "".join(v for k, v in rule.items() if k in f.evidence))

    collect()
    assert kinds == {"nonfinite", "grad_norm_spike", "exploding:update", "exploding:growth"}

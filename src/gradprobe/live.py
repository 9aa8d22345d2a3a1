"""Live findings: a NaN, a gradient-norm spike or an explosion said while training runs.

:func:`~gradprobe.diagnose` reads a whole run after training. Some problems should not
wait for it: the step a loss turns NaN, a gradient norm that jumps tenfold, updates as
large as the weights. :class:`LiveCheck` checks them in two places, neither adding a
device sync:

- at the step (:meth:`LiveCheck.at_step`): the step-level rules on the step's global
  gradient norm and logged loss, which the Probe reads on the host through the path of
  the "auto" cadence's spike burst (``step.py``): host values on the CPU, so a NaN or a
  spike at step ``s`` is said inside step ``s``'s ``optimizer.step()``; on a GPU a pinned
  copy read once its CUDA event has completed, a step or so later, at the latest at the
  next flush. Not under torch.distributed or with a ``GradScaler`` (the flush knows the
  combined rows and the skipped steps): there the flush says them;
- at each flush (``__call__``), on the rows the flush has copied to the host (once per
  ``flush_every`` recorded steps, and at ``frame()``/``close()``): the per-layer rules
  (NaN/Inf flags of outputs and error signals, updates as large as the weights), and the
  step-level rules of the steps not read at the step. A finding is said once.

What it finds is said at once, as

- one line of :class:`~gradprobe.hooks.GradprobeWarning` (once per kind: a run whose
  gradients are NaN from step 37 on says so once, not at every step; under DDP on rank
  0 only, while ``on_finding`` and ``stop_on`` act on every rank alike, since every
  rank holds the same combined rows);
- a call of the Probe's ``on_finding(finding)``, with a :class:`~gradprobe.Finding` whose
  ``evidence["step"]`` is the step it was seen at;
- with ``stop_on=("nonfinite", ...)``, :class:`~gradprobe.errors.StopTraining` raised
  from the step boundary (``optimizer.step()`` or ``probe.step()``) that said it.

The rules are :mod:`gradprobe.diagnose`'s own thresholds, applied to the steps seen so far:

- ``nonfinite``: the loss, the global gradient norm (before or after clipping), or a
  NaN/Inf flag of a gradient, an output or an error signal is not finite at a step that
  a ``GradScaler`` did not skip (a skipped step is the scaler doing its job);
- ``grad_norm_spike``: the pre-clip global gradient norm spikes by
  :mod:`gradprobe.spikes`' rule (≥ 10× the median of the finite values among the 20
  recorded steps before it, at least 5 of them), diagnose's; said again after
  ``SPIKE_WINDOW`` steps, not at each step of one episode;
- ``exploding``: a weight's update as large as the weight (‖Δw‖/‖w‖ ≥
  ``UPDATE_RATIO_EXPLODING``, 1), or the global gradient norm ≥ ``EXPLODING_GROWTH``
  (1000) × its median over the first 5 recorded steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd

from .diagnose import (
    EXPLODING_GROWTH,
    SPIKE_WINDOW,
    UPDATE_RATIO_EXPLODING,
    Finding,
)
from .errors import GradprobeError, StopTraining
from .hooks import GradprobeWarning
from .spikes import SpikeWatch, median_of
from .stats import MODEL_NAME

__all__ = ["LIVE_KINDS", "LiveCheck", "StopTraining"]

LIVE_KINDS = ("nonfinite", "grad_norm_spike", "exploding")
# Steps of the global norm before the first whose median is the growth baseline.
_BASE_STEPS = 5
_NONFINITE_FLAGS = ("grad_nonfinite", "nonfinite", "error_nonfinite")


def check_stop_on(stop_on: Iterable[str]) -> tuple[str, ...]:
    """The kinds to stop on, checked against :data:`LIVE_KINDS`."""
    kinds = (stop_on,) if isinstance(stop_on, str) else tuple(stop_on)
    unknown = [k for k in kinds if k not in LIVE_KINDS]
    if unknown:
        raise GradprobeError(
            f"stop_on: {unknown} are not findings said while training",
            f"choose from {list(LIVE_KINDS)}",
        )
    return kinds


class LiveCheck:
    """Reads each flushed frame and says what it finds (see the module docstring)."""

    def __init__(
        self,
        on_finding: Callable[[Finding], Any] | None = None,
        stop_on: Iterable[str] = (),
        warn: bool = True,
    ) -> None:
        if on_finding is not None and not callable(on_finding):
            raise GradprobeError(
                f"on_finding must be callable, got {type(on_finding).__name__}",
                "pass a function that takes one Finding",
            )
        self.on_finding = on_finding
        self.stop_on = check_stop_on(stop_on)
        self.warn = warn
        self.found: list[Finding] = []
        self.stop: Finding | None = None  # the first finding of a stop_on kind, until raised
        self._said: set[str] = set()
        self._spikes = SpikeWatch()
        self._base: list[float] = []
        # Steps whose global norm and loss were read at the step (at_step): the flush's
        # check leaves those to it, and keeps the per-layer rules; and the last step a
        # flush checked (at_step leaves a step the flush has said).
        self._at_step: set[int] = set()
        self._flushed_upto = -1
        self._last_spike = -(10**9)

    # ------------------------------------------------------------ reading a step
    def at_step(self, step: int, grad_norm: float, loss: float | None = None) -> list[Finding]:
        """The step-level rules on one step's host values: ``grad_norm`` (the global
        gradient norm, pre-clip where measured) and the ``loss`` logged for it (a sum of
        its values: non-finite if any is; None if none was logged yet). A step a flush
        has checked already (on a GPU, one whose copy had not landed by then) is left."""
        if step <= self._flushed_upto:
            return []
        self._at_step.add(step)
        new: list[Finding] = []
        bad = [
            n
            for n, v in (("loss", loss), ("global_grad_norm", grad_norm))
            if v is not None and not math.isfinite(v)
        ]
        if bad and "nonfinite" not in self._said:
            new.append(
                Finding(
                    "nonfinite",
                    "critical",
                    (MODEL_NAME,),
                    f"step {step}: NaN/Inf in `{MODEL_NAME}` ({', '.join(sorted(bad))})",
                    {"step": step, "stats": sorted(bad), "live": True},
                )
            )
        f = self._spike_or_growth(step, grad_norm)
        if f is not None:
            new.append(f)
        for f in new:
            self._say(f)
        return new

    # ------------------------------------------------------------ reading a flush
    def __call__(self, frame: pd.DataFrame) -> list[Finding]:
        """Check the rows of one flush; returns (and says) what is new."""
        if frame.empty:
            return []
        new: list[Finding] = []
        cols = _Columns(frame)
        model = cols.name_is(MODEL_NAME)
        skipped = np.unique(cols.step[model & cols.stat_in("skipped") & (cols.value > 0)])
        # Rows of the steps a GradScaler did not skip (a skipped step is the scaler's job).
        kept = ~np.isin(cols.step, skipped) if len(skipped) else np.ones(len(cols.step), bool)
        seen = self._at_step  # said at the step: their global norm, loss and gradients' flags
        last = int(cols.step.max())
        self._flushed_upto = max(self._flushed_upto, last)
        self._at_step = {s for s in seen if s > last}
        seen_steps = np.fromiter(seen, dtype=np.int64, count=len(seen))
        if "nonfinite" not in self._said:
            f = _nonfinite(cols, model, kept, seen_steps)
            if f is not None:
                new.append(f)
        for step, value in _global_norms(cols, model & kept, seen_steps):
            f = self._spike_or_growth(step, value)
            if f is not None:
                new.append(f)
        if "exploding" not in self._said:
            f = _huge_updates(frame, cols)
            if f is not None:
                new.append(f)
        new.sort(key=lambda f: f.evidence["step"])
        for f in new:
            self._say(f)
        return new

    def _spike_or_growth(self, step: int, value: float) -> Finding | None:
        found = None
        median = self._spikes.push(value)  # gradprobe/spikes.py: diagnose's rule
        if not math.isfinite(value):
            return None  # the nonfinite rule says it
        if len(self._base) < _BASE_STEPS:
            self._base.append(value)
        elif "exploding" not in self._said:
            base = median_of(self._base)  # the first steps': fixed once they are in
            if base > 0 and value >= EXPLODING_GROWTH * base:
                found = Finding(
                    "exploding",
                    "critical",
                    (MODEL_NAME,),
                    f"step {step}: the global gradient norm is {value:.3g}, "
                    f"×{value / base:.3g} its median over the first {_BASE_STEPS} recorded "
                    f"steps ({base:.3g})",
                    {"step": step, "grad_norm": value, "base": base, "live": True},
                )
        # Said again after SPIKE_WINDOW steps, not at each step of one episode.
        if found is None and median is not None and step - self._last_spike >= SPIKE_WINDOW:
            self._last_spike = step
            found = Finding(
                "grad_norm_spike",
                "warning",
                (MODEL_NAME,),
                f"step {step}: the global gradient norm jumped to {value:.3g}, "
                f"×{value / median:.3g} the median of the {SPIKE_WINDOW} recorded steps "
                f"before ({median:.3g})",
                {"step": step, "grad_norm": value, "median": median, "live": True},
            )
        return found

    # ------------------------------------------------------------ saying it
    def _say(self, finding: Finding) -> None:
        self.found.append(finding)
        if self.warn and finding.kind not in self._said:
            warnings.warn(f"gradprobe: {finding.summary}", GradprobeWarning, stacklevel=2)
        self._said.add(finding.kind)
        if finding.kind in self.stop_on and self.stop is None:
            self.stop = finding
        if self.on_finding is not None:
            try:
                self.on_finding(finding)
            except Exception as exc:  # the user's callback must not break the flush
                warnings.warn(
                    f"gradprobe: on_finding raised {type(exc).__name__}: {exc}",
                    GradprobeWarning,
                    stacklevel=2,
                )

    def take_stop(self) -> StopTraining | None:
        """The exception to raise for a stop_on finding, once."""
        if self.stop is None:
            return None
        finding, self.stop = self.stop, None
        self.stop_on = ()  # raised once: the user decides what happens next
        return StopTraining(finding)


class _Columns:
    """A flushed frame's columns as NumPy arrays, read once. The text columns as codes
    into their distinct values (``pd.factorize``: one pass in C), so that "the rows of
    these statistics" is a lookup of a few words and an index, not a pass of string
    comparisons over the frame per rule (those made ~2/3 of a flush's live check)."""

    __slots__ = ("name_codes", "names", "stat_codes", "stats", "step", "value")

    def __init__(self, frame: pd.DataFrame) -> None:
        self.step: np.ndarray = frame["step"].to_numpy(dtype=np.int64)
        self.value: np.ndarray = frame["value"].to_numpy(dtype=np.float64)
        # use_na_sentinel=False: a missing word is a word of its own ("nan" as text, as
        # str() of the row's value said it), and every code indexes the words.
        codes, words = pd.factorize(frame["name"].array, use_na_sentinel=False)
        self.name_codes: np.ndarray = codes
        self.names: list[str] = [str(w) for w in words]
        codes, words = pd.factorize(frame["stat"].array, use_na_sentinel=False)
        self.stat_codes: np.ndarray = codes
        self.stats: list[str] = [str(w) for w in words]

    def name_is(self, name: str) -> np.ndarray:
        return _lookup([w == name for w in self.names], self.name_codes)

    def stat_in(self, *stats: str) -> np.ndarray:
        return _lookup([w in stats for w in self.stats], self.stat_codes)


def _lookup(of_word: list[bool], codes: np.ndarray) -> np.ndarray:
    """Each row's ``of_word[code]``, as a boolean mask."""
    return np.array(of_word, dtype=bool)[codes] if of_word else np.zeros(len(codes), bool)


def _global_norms(cols: _Columns, rows: np.ndarray, seen: np.ndarray) -> list[tuple[int, float]]:
    """The pre-clip global gradient norm by step, ascending (else the post-clip one:
    clipping hides what the backward produced), of ``rows`` (the model's, of steps not
    skipped), but for the ``seen`` steps: per step the last value that is not NaN, NaN
    where all are (pandas' ``groupby("step").last()``)."""
    for stat in ("global_grad_norm_preclip", "global_grad_norm"):
        mask = rows & cols.stat_in(stat)
        if not mask.any():
            continue
        order = np.argsort(cols.step[mask], kind="stable")
        steps, values = cols.step[mask][order], cols.value[mask][order]
        unique = np.unique(steps)
        out = np.full(len(unique), np.nan)
        ok = ~np.isnan(values)
        steps, values = steps[ok], values[ok]
        if len(steps):
            last = np.append(steps[1:] != steps[:-1], True)  # the last row of each step
            out[np.searchsorted(unique, steps[last])] = values[last]
        keep = ~np.isin(unique, seen) if len(seen) else slice(None)
        return list(zip(unique[keep].tolist(), out[keep].tolist()))
    return []


def _nonfinite(
    cols: _Columns, model: np.ndarray, kept: np.ndarray, seen: np.ndarray
) -> Finding | None:
    """The first step with a NaN/Inf loss, global norm, or flag (``kept``: the rows of
    steps not skipped; ``seen``: steps whose loss, global norm and gradients were checked
    at the step; their outputs' and error signals' flags are checked here)."""
    rows = kept
    if len(seen):
        rows = rows & ~(np.isin(cols.step, seen) & (model | cols.stat_in("grad_nonfinite")))
    flagged = rows & cols.stat_in(*_NONFINITE_FLAGS) & (cols.value > 0)
    values = (
        rows
        & model
        & cols.stat_in("loss", "global_grad_norm", "global_grad_norm_preclip")
        & ~np.isfinite(cols.value)
    )
    bad = flagged | values
    if not bad.any():
        return None
    step = int(cols.step[bad].min())
    at = cols.step == step
    # The flags' rows first, then the values', each in the frame's order: the names' order.
    at_rows = np.concatenate([np.flatnonzero(flagged & at), np.flatnonzero(values & at)])
    names = tuple(dict.fromkeys(cols.names[c] for c in cols.name_codes[at_rows].tolist()))
    what = sorted({cols.stats[c] for c in cols.stat_codes[at_rows].tolist()})
    shown = ", ".join(f"`{n}`" for n in names[:4]) + (" …" if len(names) > 4 else "")
    return Finding(
        "nonfinite",
        "critical",
        names,
        f"step {step}: NaN/Inf in {shown} ({', '.join(what)})",
        {"step": step, "stats": what, "live": True},
    )


def _huge_updates(frame: pd.DataFrame, cols: _Columns) -> Finding | None:
    """The first step where a weight's update is as large as the weight."""
    rows = (
        cols.stat_in("update_ratio")
        & (cols.value >= UPDATE_RATIO_EXPLODING)
        & np.isfinite(cols.value)
    )
    if not rows.any():
        return None
    rows &= ~_lookup([w.endswith("bias") for w in cols.names], cols.name_codes)
    if not rows.any():
        return None
    step = int(cols.step[rows].min())
    # The few rows of that step as a frame: sorted by pandas as before (ties included).
    at = frame.iloc[np.flatnonzero(rows & (cols.step == step))]
    at = at.sort_values("value", ascending=False)
    top = at.iloc[0]
    return Finding(
        "exploding",
        "critical" if float(top["value"]) >= 10 else "warning",
        tuple(str(n) for n in at["name"]),
        f"step {step}: {len(at)} weight(s) took an update at least as large as the weight "
        f"(‖Δw‖/‖w‖ up to {float(top['value']):.3g} at `{top['name']}`)",
        {"step": step, "update_ratio": float(top["value"]), "live": True},
    )

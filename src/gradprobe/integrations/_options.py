"""What the framework callbacks share: the Probe's keyword options, checked up front."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from ..errors import GradprobeError
from ..probe import Probe

# Chosen by the callbacks themselves from the framework's objects.
_OWN = {"model", "optimizer", "scaler", "store", "every", "stop_on"}


def check_probe_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Reject unknown Probe options at construction, not at the first training step."""
    known = set(inspect.signature(Probe.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - known)
    own = sorted(set(options) & _OWN)
    if unknown:
        raise GradprobeError(
            f"{where}: unknown Probe options {unknown}", f"choose from {sorted(known - _OWN)}"
        )
    if own:
        raise GradprobeError(
            f"{where}: {own} are taken from the trainer",
            "pass store, every and stop_on as arguments, not options",
        )
    return dict(options)


# ---------------------------------------------------------------- what the callbacks share
def note_trainer(probe: Probe, config: dict[str, Any]) -> None:
    """Keep the trainer's configuration in the run's meta (``meta["trainer"]``), so that a
    diagnosis can read what the trainer did (its clipping, warmup, precision...)."""
    clean = {k: _plain(v) for k, v in config.items()}
    probe._add_meta(trainer=clean)


def _plain(value: Any) -> Any:
    """A JSON value: numbers, text, booleans and None as they are, anything else as text
    (an enum's value, a scheduler type)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(getattr(value, "value", value))


# The scalars the callbacks give the trainer's logger at each flushed step, from the rows
# the flush has already brought to the host: a handful a step, not one per layer.
def key_scalars(frame: pd.DataFrame) -> dict[int, dict[str, float]]:
    """``{step: {"gradprobe/<key>": value}}``: the global gradient norm (before and after
    clipping), the largest update ratio, the smallest and largest error signal, the
    largest dead fraction, and how many parameters had NaN/Inf gradients."""
    from ..stats import MODEL_NAME

    out: dict[int, dict[str, float]] = {}

    def put(rows: pd.DataFrame, key: str, how: str) -> None:
        values = rows[np.isfinite(rows["value"].to_numpy())].groupby("step")["value"].agg(how)
        for step, value in values.items():
            out.setdefault(int(step), {})[f"gradprobe/{key}"] = float(value)

    model = frame[frame["name"] == MODEL_NAME]
    for stat in ("global_grad_norm", "global_grad_norm_preclip"):
        put(model[model["stat"] == stat], stat, "last")
    put(frame[frame["stat"] == "update_ratio"], "update_ratio_max", "max")
    put(frame[frame["stat"] == "error_norm"], "error_norm_min", "min")
    put(frame[frame["stat"] == "error_norm"], "error_norm_max", "max")
    put(frame[frame["stat"] == "dead_frac"], "dead_frac_max", "max")
    flags = frame[frame["stat"] == "grad_nonfinite"].assign(value=lambda f: f["value"] > 0)
    put(flags.assign(value=flags["value"].astype(float)), "grad_nonfinite_params", "sum")
    return out


class Stopper:
    """The callbacks' ``stop_on``: records the first live finding of those kinds and passes
    every finding on to the user's own ``on_finding``; the callback then asks its trainer
    to stop (it never raises into the trainer's loop)."""

    def __init__(self, stop_on: Any, on_finding: Callable[[Any], Any] | None) -> None:
        from ..live import check_stop_on

        self.kinds = check_stop_on(stop_on)
        self.user = on_finding
        self.finding: Any = None

    def __call__(self, finding: Any) -> None:
        if self.finding is None and finding.kind in self.kinds:
            self.finding = finding
        if self.user is not None:
            self.user(finding)

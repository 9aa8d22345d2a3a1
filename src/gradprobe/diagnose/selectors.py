"""Selectors: what the detectors (and the plots) read from a run, as the detectors read it.

The weights whose update ratios mean something (:func:`weight_names`), the layers that count
for depth (:func:`is_weight_layer`), the modules whose units can die (:func:`unit_candidates`),
the run's recent state, its loss and its global gradient norm; and the few helpers that put a
number or a list of names into a finding's sentence.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np
import pandas as pd

from ..kinds import kind_of_type_name
from ..run import Run
from ..spikes import running_median
from .thresholds import LOSS_WINDOW


def _g(value: float) -> str:
    """A number for a sentence: 2 significant digits, 0 as 0."""
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2g}"


def _names(names: list[str], limit: int = 4) -> str:
    quoted = [f"`{n}`" for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(quoted) + more


def _table(run: Run, stat: str) -> pd.DataFrame:
    return run.table(stat) if stat in set(run.stats) else pd.DataFrame()


def _recent(table: pd.DataFrame) -> pd.DataFrame:
    """The last half of the recorded steps (at least one): the run's current state."""
    n = len(table)
    return table.iloc[n // 2 :] if n > 1 else table


def weight_names(run: Run) -> list[str]:
    """Weight matrices and kernels (≥ 2 dimensions): biases and norm scales start at 0 or 1,
    so their update ratios say little. For the same reason, weights initialised to 0
    (Fixup's and SkipInit's last layer of a residual branch) are left out: growing from 0,
    ‖Δw‖/‖w‖ is ∞, then about 1/steps, which is growth, not instability."""
    weights = [p["name"] for p in run.meta.get("parameters", []) if len(p.get("shape", [])) >= 2]
    norms = _table(run, "param_norm")
    if norms.empty:
        return weights
    first = norms.iloc[0]
    return [w for w in weights if not (w in first.index and first[w] == 0)]


def _since(series: pd.Series, threshold: float, strict: bool = False) -> int | None:
    """First step of the trailing streak where ``series`` is ≥ (or >) ``threshold``."""
    values = series.dropna()
    ok = (values > threshold) if strict else (values >= threshold)
    if ok.empty or not bool(ok.iloc[-1]):
        return None
    bad = np.nonzero(~ok.to_numpy())[0]
    start = bad[-1] + 1 if len(bad) else 0
    return int(values.index[start])


def norm_modules(run: Run) -> frozenset[str]:
    """The modules that normalise, as the Probe read them from what each module does
    (meta["architecture"]["norms"]: an RMSNorm of a model's own code, whatever its name)."""
    architecture = run.meta.get("architecture") or {}
    return frozenset((architecture.get("norms") or {}).keys())


def is_weight_layer(info: dict[str, Any], norms: Collection[str] = ()) -> bool:
    """A layer of the depth profile: a module with parameters that does not normalise
    (``norms``: :func:`norm_modules`; the class name is the fallback for runs recorded
    before the architecture was)."""
    t = str(info.get("type", ""))
    if info.get("name") in norms:
        return False
    return int(info.get("parameters", 0) or 0) > 0 and kind_of_type_name(t).norm is None


# ---------------------------------------------------------------- depth profile
def _off_signal_path(run: Run) -> tuple[str, ...]:
    """Modules not on the path the error signal takes through depth (meta["architecture"]):
    parallel branches added to another module's output (adapters such as LoRA's A and B),
    and parametrizations (their output is a weight, not a signal)."""
    arch = run.meta.get("architecture") or {}
    return tuple(str(n) for key in ("branches", "parametrizations") for n in arch.get(key) or ())


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _total_grad_norm(run: Run) -> pd.Series:
    # Clipping hides growth from the norm the optimizer sees: read it before clipping.
    preclip = run.model_series("global_grad_norm_preclip")
    if not preclip.empty:
        return preclip.where(np.isfinite(preclip), np.inf)
    table = _table(run, "grad_norm")
    if table.empty:
        return pd.Series(dtype=float)
    values = table.to_numpy(dtype=float)
    # A NaN/Inf gradient is an infinitely large one for this purpose.
    values = np.where(np.isfinite(values), values, np.inf)
    total = np.sqrt(np.nansum(np.square(values), axis=1))
    return pd.Series(total, index=table.index)


def _unit_kind(run: Run, name: str) -> str:
    """'channel' when the module's output is a conv feature map, else 'unit' (features).

    The Probe records what each module's units resolved to (meta ``units``). Runs
    without it: element-wise modules inherit from the nearest earlier layer with weights
    (or a Flatten) in forward order, as norms and pools keep the layout they receive.
    """
    recorded = run.module_info(name).get("units")
    if recorded is not None:
        return "channel" if recorded == "channel" else "unit"
    order = run.modules
    i = order.index(name) if name in order else -1
    for j in range(i, -1, -1):
        info = run.module_info(order[j])
        t = str(info.get("type", ""))
        kind = kind_of_type_name(t)
        if kind.conv:
            return "channel"
        normalises = kind.norm is not None or order[j] in norm_modules(run)
        if t == "Flatten" or (info.get("layout") == "last" and not normalises):
            return "unit"
    return "unit"


def _dead_state(run: Run) -> tuple[pd.Series, pd.DataFrame, str] | None:
    """Current dead fraction per module, the per-batch series, and which statistic decided."""
    per_batch = _table(run, "dead_frac")
    window = _table(run, "dead_window_frac")
    if per_batch.empty and window.empty:
        return None
    if not window.empty:
        # Already "0 in every batch of the last `dead_window` steps": take its latest value.
        current = window.ffill().iloc[-1]
        source = "dead_window_frac"
    else:
        # Without the window, a unit counts as dead if it was 0 in every recent batch.
        current = _recent(per_batch).min()
        source = "dead_frac"
    return current, per_batch if not per_batch.empty else window, source


def unit_candidates(run: Run, names: Iterable[str]) -> list[str]:
    """Activation modules that can die when the model has any; otherwise every module."""
    from ..activations import ACTIVATIONS

    names = list(names)
    acts = [
        n
        for n in names
        if (a := run.module_info(n).get("activation")) in ACTIVATIONS and ACTIVATIONS[a].can_die
    ]
    return acts or names


def _update_medians(run: Run) -> pd.Series:
    updates = _table(run, "update_ratio")
    weights = [w for w in weight_names(run) if w in updates.columns]
    if not weights:
        return pd.Series(dtype=float)
    return _recent(updates[weights]).replace([np.inf, -np.inf], np.nan).median().dropna()


# ---------------------------------------------------------------- unstable training
def _running_median(series: pd.Series) -> pd.Series:
    """The median of the SPIKE_WINDOW values before each one (NaN where too few)."""
    return pd.Series(running_median(series.to_numpy(dtype=float)), index=series.index)


def _steps_text(steps: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f" and {len(steps) - limit} more" if len(steps) > limit else "")


def _loss(run: Run) -> pd.Series:
    return run.model_series("loss")


def _smoothed(loss: pd.Series) -> pd.Series:
    """Running median of LOSS_WINDOW steps, ending at each step (finite losses only)."""
    finite = loss[np.isfinite(loss)]
    return finite.rolling(LOSS_WINDOW, min_periods=1).median()

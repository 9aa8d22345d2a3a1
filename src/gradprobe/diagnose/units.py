"""Units: saturated layers, dead units and dead channels (and the layer that feeds them)."""

from __future__ import annotations

import math

from ..run import Run
from .findings import Finding
from .selectors import (
    _dead_state,
    _names,
    _recent,
    _since,
    _table,
    _unit_kind,
    is_weight_layer,
    norm_modules,
    unit_candidates,
)
from .thresholds import (
    DEAD_CHANNEL_FRAC,
    DEAD_CRITICAL_FRAC,
    DEAD_UNIT_FRAC,
    NEGATIVE_PREACT_SIGMAS,
    SATURATION_CRITICAL,
    SATURATION_FRAC,
)


def detect_saturation(run: Run) -> Finding | None:
    """Layers whose activations sit where f'(z) is almost 0 for much of the batch."""
    table = _table(run, "sat_frac")
    if table.empty:
        return None
    current = _recent(table).median()
    hit = [n for n in run.modules if n in current.index and current[n] >= SATURATION_FRAC]
    if not hit:
        return None
    since = {n: _since(table[n], SATURATION_FRAC) for n in hit}
    worst = max(hit, key=lambda n: current[n])
    severity = "critical" if current[worst] >= SATURATION_CRITICAL else "warning"
    summary = (
        f"{len(hit)} activation layer(s) are saturated: {_names(hit)}; in `{worst}` "
        f"{current[worst]:.0%} of the entries have |f'(z)| below 1% of its maximum "
        f"(threshold {SATURATION_FRAC:.0%})"
        + (f", since step {since[worst]}." if since[worst] is not None else ".")
    )
    return Finding(
        "saturation",
        severity,
        tuple(hit),
        summary,
        {
            "sat_frac": {n: float(current[n]) for n in hit},
            "since_step": since,
            "threshold": SATURATION_FRAC,
        },
    )


def _detect_dead(run: Run, kind: str) -> Finding | None:
    state = _dead_state(run)
    if state is None:
        return None
    current, series, source = state
    want = "channel" if kind == "dead_channels" else "unit"
    threshold = DEAD_CHANNEL_FRAC if want == "channel" else DEAD_UNIT_FRAC
    strict = want == "channel"
    names = [n for n in run.modules if n in current.index and math.isfinite(current[n])]
    names = [n for n in unit_candidates(run, names) if _unit_kind(run, n) == want]
    hit = [n for n in names if (current[n] > threshold if strict else current[n] >= threshold)]
    if not hit:
        return None
    since = {n: _since(series[n], threshold, strict) if n in series.columns else None for n in hit}
    worst = max(hit, key=lambda n: current[n])
    word = "channels" if want == "channel" else "units"
    fed_by = {n: _fed_by(run, n) for n in hit}
    # Only where the layer with weights feeds the activation directly (no norm between):
    # then its recorded output is the activation's input.
    order = run.modules
    direct = {
        n: f for n, f in fed_by.items() if f and n in order and order[order.index(n) - 1] == f
    }
    negative = _negative_inputs(run, direct)
    severity = "critical" if current[worst] >= DEAD_CRITICAL_FRAC else "warning"
    rule = (
        f"0 at every position of every sample over the last "
        f"{run.meta.get('probe', {}).get('dead_window', '?')} recorded steps"
        if source == "dead_window_frac"
        else "0 for every sample of each recent batch"
    )
    summary = (
        f"{len(hit)} layer(s) have dead {word}: {_names(hit)}; in `{worst}` "
        f"{current[worst]:.0%} of the {word} are {rule}"
        + (f", since step {since[worst]}" if since[worst] is not None else "")
        + (f" (fed by `{fed_by[worst]}`)." if fed_by[worst] else ".")
    )
    if negative:
        # What the run measured at the layer feeding them: the evidence, and where to look.
        layer, (mean, std) = next(iter(negative.items()))
        summary += (
            f" Every pre-activation of `{layer}` is negative: mean {mean:.3g}, std {std:.2g} "
            f"(recorded output of `{layer}`): check its bias and initialisation, or the step "
            "size that drove it there."
        )
    return Finding(
        kind,
        severity,
        tuple(hit),
        summary,
        {
            "dead_frac": {n: float(current[n]) for n in hit},
            "since_step": since,
            "fed_by": fed_by,
            "statistic": source,
            "threshold": threshold,
            "negative_preactivation": {
                layer: {"mean": mean, "std": std} for layer, (mean, std) in negative.items()
            },
        },
    )


def _negative_inputs(run: Run, fed_by: dict[str, str]) -> dict[str, tuple[float, float]]:
    """Layers feeding dead units whose recorded outputs (act_mean, act_std; medians over
    the recent steps) lie wholly below 0: ``{layer: (mean, std)}``, most negative first."""
    means, stds = _table(run, "act_mean"), _table(run, "act_std")
    if means.empty or stds.empty:
        return {}
    mean_now, std_now = _recent(means).median(), _recent(stds).median()
    found: dict[str, tuple[float, float]] = {}
    for layer in dict.fromkeys(fed_by.values()):
        if layer not in mean_now.index or layer not in std_now.index:
            continue
        m, sd = float(mean_now[layer]), float(std_now[layer])
        if math.isfinite(m) and math.isfinite(sd) and m < 0 and m + NEGATIVE_PREACT_SIGMAS * sd < 0:
            found[layer] = (m, sd)
    return dict(sorted(found.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-30)))


def _fed_by(run: Run, name: str) -> str | None:
    """The nearest earlier layer with weights: where the dead units' inputs come from."""
    order = run.modules
    if name not in order:
        return None
    norms = norm_modules(run)
    for j in range(order.index(name) - 1, -1, -1):
        if is_weight_layer(run.module_info(order[j]), norms):
            return order[j]
    return None


def detect_dead_units(run: Run) -> Finding | None:
    """Features that output 0 for every sample: no error signal flows back through them."""
    return _detect_dead(run, "dead_units")


def detect_dead_channels(run: Run) -> Finding | None:
    """Conv channels that are 0 at every position of every sample."""
    return _detect_dead(run, "dead_channels")

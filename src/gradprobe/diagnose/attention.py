"""Inside the Transformer: attention logits that grow, attention entropy that collapses,
tokens that become one vector with depth, output logits that drift.

Read per module over steps from the statistics ``attn_logit_max``, ``attn_entropy`` and
``attn_entropy_min`` (per attention module), ``token_cosine`` (per block output) and
``logit_max``, ``logit_z`` (the model's final projection). Each detector compares a
module's recent level (median of the last half of the recorded steps) with its level in
the first quarter of the run, so that what a model was built with is not mistaken for what
training did to it. The thresholds, and why they are where they are, are in
:mod:`gradprobe.diagnose.thresholds`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..run import Run
from .findings import Finding
from .selectors import _g, _loss, _names, _recent, _table
from .thresholds import (
    ATTN_LOGIT_CRITICAL,
    ATTN_LOGIT_GROWTH,
    ATTN_LOGIT_LARGE,
    ENTROPY_COLLAPSE_NATS,
    ENTROPY_CRITICAL_NATS,
    ENTROPY_FALL,
    ENTROPY_LOSS_LEVEL,
    LOGIT_CRITICAL,
    LOGIT_MAX_GROWTH,
    LOGIT_MAX_LARGE,
    LOGIT_Z_DRIFT,
    LOSS_WINDOW,
    RANK_COLLAPSE_COSINE,
    RANK_COLLAPSE_CRITICAL,
    RANK_LOSS_LEVEL,
)

__all__ = [
    "ATTENTION_STATS",
    "detect_attention_entropy_collapse",
    "detect_attention_logit_growth",
    "detect_output_logit_divergence",
    "detect_rank_collapse",
    "has_attention",
]

ATTENTION_STATS = (
    "attn_logit_max",
    "attn_entropy",
    "attn_entropy_min",
    "token_cosine",
    "logit_max",
    "logit_z",
)


def has_attention(run: Run) -> bool:
    """The run's model computes attention (the Probe's architecture reading, or a module
    class named so), or it recorded an attention or output-logit statistic: only then is a
    missing attention statistic a gap worth saying."""
    arch = run.meta.get("architecture") or {}
    if arch.get("attention") or arch.get("kind") == "transformer":
        return True
    if any("Attention" in str(m.get("type", "")) for m in run.meta.get("modules", []) or []):
        return True
    # Not the output logits alone: every classifier's last layer records them (the Probe's
    # final projection), and they are read wherever recorded (output_logit_divergence).
    return bool(set(run.stats) & (set(ATTENTION_STATS) - {"logit_max", "logit_z"}))


def _levels(table: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per module: the median over the first quarter of the recorded steps (at least one),
    and over the last half (the run's current state)."""
    early = table.iloc[: max(1, len(table) // 4)]
    return early.median(), _recent(table).median()


def _first_step(series: pd.Series, hit: Any) -> int | None:
    """The first recorded step at which ``hit(values)`` holds."""
    values = series.dropna()
    mask = np.asarray(hit(values.to_numpy(dtype=float)), dtype=bool)
    return int(values.index[np.argmax(mask)]) if mask.any() else None


def _finite(table: pd.DataFrame) -> pd.DataFrame:
    """Non-finite values as missing: a logit that overflowed says it grew, which the finite
    steps before it say too; nonfinite is its own finding."""
    return table.replace([np.inf, -np.inf], np.nan)


def _in_model_order(run: Run, names: list[str]) -> list[str]:
    """Forward order where the run knows it; otherwise by name with numbers read as
    numbers (``blocks.10`` after ``blocks.9``), so that the deepest block comes last."""
    rank = {n: i for i, n in enumerate(run.modules)}

    def key(name: str) -> tuple[Any, ...]:
        parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
        return (rank.get(name, len(rank)), parts)

    return sorted(names, key=key)


def _loss_level(run: Run) -> float | None:
    """The logged loss's median over the last half of the steps, over its start (the median
    of its first LOSS_WINDOW values); None where it was not logged (or starts at ≤ 0)."""
    loss = _loss(run)
    loss = loss[np.isfinite(loss)]
    if len(loss) <= LOSS_WINDOW:
        return None
    start = float(loss.iloc[:LOSS_WINDOW].median())
    return float(_recent(loss.to_frame()).median().iloc[0]) / start if start > 0 else None


def _loss_sentence(learned: float | None) -> str:
    if learned is None:
        return " The loss was not logged, so whether training suffers is not known."
    return f" Meanwhile the loss stays at {learned:.0%} of its start."


def _severity(learned: float | None, critical: bool) -> str:
    """``info`` where no loss says whether training suffers, else warning or critical."""
    if learned is None:
        return "info"
    return "critical" if critical else "warning"


def detect_attention_logit_growth(run: Run) -> Finding | None:
    """The largest attention logit rises over steps until the softmax is one-hot."""
    table = _finite(_table(run, "attn_logit_max"))
    if table.empty:
        return None
    early, now = _levels(table)
    grown: dict[str, dict[str, Any]] = {}
    entropy = _finite(_table(run, "attn_entropy"))
    ent_early, ent_now = _levels(entropy) if not entropy.empty else (pd.Series(), pd.Series())
    for name in table.columns:
        first, last = float(early[name]), float(now[name])
        if not (math.isfinite(first) and math.isfinite(last)) or first <= 0:
            continue
        if last < ATTN_LOGIT_LARGE or last < ATTN_LOGIT_GROWTH * first:
            continue
        grown[name] = {
            "early": first,
            "recent": last,
            "growth": last / first,
            "largest": float(table[name].max()),
            "first_step": _first_step(table[name], lambda v: v >= ATTN_LOGIT_LARGE),
        }
        if name in ent_now.index and math.isfinite(float(ent_now[name])):
            grown[name].update(
                entropy_early=float(ent_early[name]), entropy_recent=float(ent_now[name])
            )
    if not grown:
        return None
    order = sorted(grown, key=lambda n: -grown[n]["recent"])
    worst = grown[order[0]]
    summary = (
        f"The largest attention logit q·k/√d grew ×{_g(worst['growth'])} in `{order[0]}`, "
        f"from {_g(worst['early'])} in the first quarter of the run to {_g(worst['recent'])} "
        f"(median of the last half; largest {_g(worst['largest'])}): the softmax is near "
        f"one-hot. {len(grown)} of {len(table.columns)} attention module(s) reach ≥ "
        f"{_g(ATTN_LOGIT_LARGE)} after growing ≥ ×{_g(ATTN_LOGIT_GROWTH)}: "
        f"{_names(order)}."
    )
    if "entropy_recent" in worst:
        summary += (
            f" Its attention entropy fell from {_g(worst['entropy_early'])} to "
            f"{_g(worst['entropy_recent'])} nats."
        )
    steps = [s["first_step"] for s in grown.values() if s["first_step"] is not None]
    return Finding(
        "attention_logit_growth",
        "critical" if worst["recent"] >= ATTN_LOGIT_CRITICAL else "warning",
        tuple(order),
        summary,
        {
            "modules": grown,
            "first_step": min(steps) if steps else None,
            "threshold_large": ATTN_LOGIT_LARGE,
            "threshold_growth": ATTN_LOGIT_GROWTH,
        },
    )


def detect_attention_entropy_collapse(run: Run) -> Finding | None:
    """Attention entropy, averaged over a module's heads, falls towards 0 during training."""
    table = _finite(_table(run, "attn_entropy"))
    if table.empty:
        return None
    early, now = _levels(table)
    lowest = _finite(_table(run, "attn_entropy_min"))
    low_now = _recent(lowest).median() if not lowest.empty else pd.Series(dtype=float)
    collapsed: dict[str, dict[str, Any]] = {}
    for name in table.columns:
        first, last = float(early[name]), float(now[name])
        if not (math.isfinite(first) and math.isfinite(last)):
            continue
        if last > ENTROPY_COLLAPSE_NATS or last > ENTROPY_FALL * first:
            continue
        collapsed[name] = {
            "early": first,
            "recent": last,
            "first_step": _first_step(table[name], lambda v: v <= ENTROPY_COLLAPSE_NATS),
        }
        if name in low_now.index and math.isfinite(float(low_now[name])):
            collapsed[name]["lowest_head"] = float(low_now[name])
    if not collapsed:
        return None
    learned = _loss_level(run)
    if learned is not None and learned < ENTROPY_LOSS_LEVEL:
        return None  # one-hot heads in a model that learns: what it attends to, not a collapse
    order = sorted(collapsed, key=lambda n: collapsed[n]["recent"])
    worst = collapsed[order[0]]
    summary = (
        f"Attention entropy collapsed in `{order[0]}`: averaged over its heads and query rows "
        f"it fell from {_g(worst['early'])} nats in the first quarter of the run to "
        f"{_g(worst['recent'])} (median of the last half; 0 = every row one-hot)"
    )
    if "lowest_head" in worst:
        summary += f", its lowest head at {_g(worst['lowest_head'])}"
    summary += (
        f". {len(collapsed)} of {len(table.columns)} attention module(s) are at ≤ "
        f"{_g(ENTROPY_COLLAPSE_NATS)} nats after falling to ≤ {ENTROPY_FALL:.0%} of their "
        f"start: {_names(order)}."
    )
    summary += _loss_sentence(learned)
    severity = _severity(learned, worst["recent"] <= ENTROPY_CRITICAL_NATS)
    steps = [c["first_step"] for c in collapsed.values() if c["first_step"] is not None]
    return Finding(
        "attention_entropy_collapse",
        severity,
        tuple(order),
        summary,
        {
            "modules": collapsed,
            "first_step": min(steps) if steps else None,
            "loss_level": learned,
            "threshold_nats": ENTROPY_COLLAPSE_NATS,
            "threshold_fall": ENTROPY_FALL,
            "threshold_loss_level": ENTROPY_LOSS_LEVEL,
        },
    )


def detect_rank_collapse(run: Run) -> Finding | None:
    """The token vectors of the deepest blocks' outputs point the same way (cosine near 1),
    at the first recorded step or now, while the first block's do not."""
    table = _finite(_table(run, "token_cosine"))
    if table.empty:
        return None
    blocks = _in_model_order(run, [n for n in table.columns if table[n].notna().any()])
    if not blocks:
        return None
    init = table[blocks].apply(lambda c: c.dropna().iloc[0])
    now = _recent(table[blocks]).median()
    found: dict[str, str] = {}
    for when, level in (("init", init), ("recent", now)):
        deepest = blocks[-1]
        if not level[deepest] >= RANK_COLLAPSE_COSINE:
            continue
        # At depth: the tokens converge through the blocks, not in the first one already.
        if len(blocks) > 1 and not level[blocks[0]] < level[deepest]:
            continue
        found[when] = deepest
    if not found:
        return None
    learned = _loss_level(run)
    if learned is not None and learned < RANK_LOSS_LEVEL:
        return None  # similar token directions in a model that learns: anisotropy, not collapse
    when = "recent" if "recent" in found else "init"
    level = now if when == "recent" else init
    collapsed = [n for n in blocks if level[n] >= RANK_COLLAPSE_COSINE]
    where = (
        "now (median of the last half of the steps)"
        if when == "recent"
        else ("at the first recorded step")
    )
    summary = (
        f"Rank collapse: the token vectors of `{blocks[-1]}`'s output have a mean cosine "
        f"similarity of {level[blocks[-1]]:.3f} {where}, against {level[blocks[0]]:.3f} at "
        f"`{blocks[0]}`: with depth the tokens become one vector, and the queries' and "
        f"keys' gradients vanish. {len(collapsed)} of {len(blocks)} block(s) are at ≥ "
        f"{_g(RANK_COLLAPSE_COSINE)}: {_names(collapsed)}."
    )
    if "init" in found and "recent" not in found:
        summary += f" Training lowered it to {now[blocks[-1]]:.3f}."
    summary += _loss_sentence(learned)
    return Finding(
        "rank_collapse",
        _severity(learned, level[blocks[-1]] >= RANK_COLLAPSE_CRITICAL),
        tuple(collapsed),
        summary,
        {
            "modes": sorted(found),
            "blocks": blocks,
            "token_cosine_init": [float(init[n]) for n in blocks],
            "token_cosine_recent": [float(now[n]) for n in blocks],
            "step": int(table.index[0]) if when == "init" else None,
            "loss_level": learned,
            "threshold_cosine": RANK_COLLAPSE_COSINE,
            "threshold_loss_level": RANK_LOSS_LEVEL,
        },
    )


def detect_output_logit_divergence(run: Run) -> Finding | None:
    """The output logits drift: log Z moves far from where it started, or the largest
    logit grows tenfold to a hundred or more."""
    z, top = _finite(_table(run, "logit_z")), _finite(_table(run, "logit_max"))
    names: list[str] = []
    sentences: list[str] = []
    evidence: dict[str, Any] = {"modes": []}
    critical = False
    steps: list[int] = []
    if not z.empty:
        early, now = _levels(z)
        for name in z.columns:
            drift = float(now[name] - early[name])
            if not math.isfinite(drift) or abs(drift) < LOGIT_Z_DRIFT:
                continue
            names.append(name)
            critical |= abs(drift) >= LOGIT_CRITICAL
            start = float(early[name])
            step = _first_step(z[name], lambda v, s=start: np.abs(v - s) >= LOGIT_Z_DRIFT)
            steps += [step] if step is not None else []
            evidence.setdefault("logit_z", {})[name] = {
                "early": start,
                "recent": float(now[name]),
                "drift": drift,
                "first_step": step,
            }
            sentences.append(
                f"The log-partition log Z of `{name}`'s logits moved {drift:+.3g} nats, from "
                f"{_g(start)} in the first quarter of the run to {_g(float(now[name]))} "
                "(median of the last half)."
            )
        if "logit_z" in evidence:
            evidence["modes"].append("logit_z")
    if not top.empty:
        early, now = _levels(top)
        for name in top.columns:
            first, last = float(early[name]), float(now[name])
            if not (math.isfinite(first) and math.isfinite(last)) or first <= 0:
                continue
            if last < LOGIT_MAX_LARGE or last < LOGIT_MAX_GROWTH * first:
                continue
            names += [name] if name not in names else []
            critical |= last >= LOGIT_CRITICAL
            step = _first_step(top[name], lambda v: v >= LOGIT_MAX_LARGE)
            steps += [step] if step is not None else []
            evidence.setdefault("logit_max", {})[name] = {
                "early": first,
                "recent": last,
                "growth": last / first,
                "first_step": step,
            }
            sentences.append(
                f"The largest output logit of `{name}` grew ×{_g(last / first)}, from "
                f"{_g(first)} to {_g(last)}."
            )
        if "logit_max" in evidence:
            evidence["modes"].append("logit_max")
    if not sentences:
        return None
    evidence.update(
        first_step=min(steps) if steps else None,
        threshold_z_drift=LOGIT_Z_DRIFT,
        threshold_max=LOGIT_MAX_LARGE,
        threshold_growth=LOGIT_MAX_GROWTH,
    )
    return Finding(
        "output_logit_divergence",
        "critical" if critical else "warning",
        tuple(names),
        " ".join(sentences)
        + " The softmax ignores a shift of all logits, so the loss does not stop the drift.",
        evidence,
    )

"""The harness of the sentinel's short route's cases (test_sentinel_cases.py,
test_sentinel_wild.py; issue 26).

Each case trains three times on identical models and data: with ``Probe(every="auto")``,
with an ``every=1`` twin, and without a Probe. The references are independent of the
route: training must be bit-identical to the un-probed run, and every row of the
sentinel's statistics must equal the twin's (which goes the general, fully recorded
path at every step) bit for bit, at the same (step, name) pairs: both take the same
``_foreach_norm`` over the same gradients, so no tolerance is needed. Which path each
sentinel step took is read by wrapping the route's entry points: the short route ends
a backward with norms kept (``SentinelRoute.backward_ended``) and writes the step
without :meth:`ParamStats.record_sentinel`, the general path's sentinel.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.recording.clock import AUTO_EVERY, AUTO_FIRST
from gradprobe.recording.params import ParamStats
from gradprobe.recording.sentinel import SentinelRoute
from gradprobe.stats import MODEL_NAME

STEPS = AUTO_EVERY + 8  # the first steps in full, sentinels, one cadence step, sentinels
SENTINEL_STEPS = set(range(AUTO_FIRST, STEPS)) - {AUTO_EVERY}  # (no burst in these runs)
AT = AUTO_FIRST + 5  # a sentinel step where something unusual happens
# What a sentinel step records (docs/recording.md, "Cadence"), and grad_missing, which
# the general path's sentinel writes too.
STATS = (
    "grad_norm",
    "global_grad_norm",
    "global_grad_norm_preclip",
    "nonfinite",
    "clipped",
    "lr",
    "loss",
    "grad_missing",
    "skipped",
)

Attach = Callable[..., Probe | None]


# ---------------------------------------------------------------- the harness
class Paths:
    """Which path each sentinel step of the "auto" Probe took, by step index."""

    def __init__(self) -> None:
        self.short_backward: Counter[int] = Counter()  # backward ends measured on the route
        self.at_step: Counter[int] = Counter()  # the route's step entered ...
        self.armed_at_step: Counter[int] = Counter()  # ... while armed
        self.general: Counter[int] = Counter()  # the general path's sentinel

    def short_steps(self) -> set[int]:
        """Steps written by the short route (armed, and no fallback to the general path)."""
        return {s for s in self.armed_at_step if s not in self.general}


def watch_paths(monkeypatch: pytest.MonkeyPatch) -> Paths:
    """Wrap the route's entry points (undone by ``monkeypatch``): what each step took."""
    seen = Paths()
    backward_ended, at_step = SentinelRoute.backward_ended, SentinelRoute.at_step
    record_sentinel = ParamStats.record_sentinel

    def backward_ended_seen(self: SentinelRoute) -> None:
        armed = self.armed
        backward_ended(self)
        if armed and self._pre is not None:
            seen.short_backward[self.ctx.step_index] += 1

    def at_step_seen(self: SentinelRoute) -> None:
        seen.at_step[self.ctx.step_index] += 1
        if self.armed:
            seen.armed_at_step[self.ctx.step_index] += 1
        at_step(self)

    def record_sentinel_seen(self: ParamStats) -> None:
        seen.general[self.ctx.step_index] += 1
        record_sentinel(self)

    monkeypatch.setattr(SentinelRoute, "backward_ended", backward_ended_seen)
    monkeypatch.setattr(SentinelRoute, "at_step", at_step_seen)
    monkeypatch.setattr(ParamStats, "record_sentinel", record_sentinel_seen)
    return seen


def train(case: Callable[[Attach], nn.Module], every: str | int | None) -> dict[str, Any]:
    """Run ``case`` (its loop calls ``attach(model, optimizer=None, **kw)`` once, which
    makes the Probe, or none for ``every=None``); the frame, the final state, warnings."""
    made: list[Probe] = []

    def attach(model: nn.Module, optimizer: Any = None, **kwargs: Any) -> Probe | None:
        if every is None:
            return None
        made.append(Probe(model, optimizer, every=every, **kwargs))
        return made[-1]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # torch says this once per process (TORCH_WARN_ONCE): whichever run comes first.
        warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True")
        model = case(attach)
        frame = None
        if made:
            frame = made[0].frame()
            made[0].close()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    said = {(w.category.__name__, str(w.message)) for w in caught}
    return {"frame": frame, "state": state, "warnings": said}


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def check(
    case: Callable[[Attach], nn.Module],
    paths: Paths,
    recorded: set[int] | None = None,
    findings: frozenset[str] = frozenset(),
) -> Any:
    """Train ``case`` three ways; training and the sentinel's rows as documented. Returns
    the "auto" frame's sentinel steps (``recorded``: the steps recorded in full, where no
    statistic of those steps only is asked for; ``findings``: the Probe's warnings the
    run should give, as the live check says them)."""
    auto = train(case, "auto")
    after_auto = {k: Counter(v) for k, v in vars(paths).items()}
    full = train(case, 1)
    plain = train(case, None)
    # Only the "auto" Probe goes through the route: the twin never enters it.
    assert vars(paths) == after_auto
    return verify(auto, full, plain, paths, recorded, findings)


def verify(
    auto: dict[str, Any],
    full: dict[str, Any],
    plain: dict[str, Any],
    paths: Paths,
    recorded: set[int] | None = None,
    findings: frozenset[str] = frozenset(),
) -> Any:
    """:func:`_check`'s checks of three runs made."""
    # Training untouched, by either Probe.
    for name, value in plain["state"].items():
        assert torch.equal(auto["state"][name], value), name
        assert torch.equal(full["state"][name], value), name
    # Nothing said that training without a Probe does not say, but the findings asked.
    assert plain["warnings"] <= auto["warnings"] and plain["warnings"] <= full["warnings"]
    said = {m for c, m in auto["warnings"] - plain["warnings"] if c == "GradprobeWarning"}
    assert auto["warnings"] - plain["warnings"] == full["warnings"] - plain["warnings"]
    assert len(said) == len(auto["warnings"] - plain["warnings"]) and said == findings, said
    a, f = auto["frame"], full["frame"]
    # The parameters' and the model's rows (modules have a ``nonfinite`` of their own).
    names = {*f[f.stat == "grad_norm"].name, *a[a.stat == "grad_norm"].name, MODEL_NAME}
    # ("lr/<i>": each param group's, where their rates differ.)
    a = a[(a.stat.isin(STATS) | a.stat.str.startswith("lr/")) & a.name.isin(names)]
    f = f[(f.stat.isin(STATS) | f.stat.str.startswith("lr/")) & f.name.isin(names)]
    got = {(r.step, r.name, r.stat): r.value for r in a.itertuples()}
    ref = {(r.step, r.name, r.stat): r.value for r in f.itertuples()}
    assert set(got) == set(ref), set(got) ^ set(ref)
    differ = {k: (got[k], ref[k]) for k in ref if not _same(got[k], ref[k])}
    assert not differ, differ
    # Which steps were sentinels: those without the recorded steps' param_norm rows.
    frame = auto["frame"]
    if recorded is None:
        recorded = set(frame[frame.stat == "param_norm"].step)
    sentinels = set(frame.step) - recorded
    # The route's step ran at each, once; not at a step the GradScaler skipped (no
    # optimizer step), which is recorded as such.
    skipped = set(frame[(frame.stat == "skipped") & (frame.value == 1)].step)
    assert set(paths.at_step) == sentinels - skipped
    assert all(n == 1 for n in paths.at_step.values())
    return sentinels


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


def batch(gen: torch.Generator, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 8, generator=gen), torch.randn(n, 1, generator=gen)


def log(probe: Probe | None, **values: Any) -> None:
    if probe is not None:
        probe.log(**values)


def taken_everywhere(
    paths: Paths, sentinels: set[int], backwards: int = 1, expected: set[int] = SENTINEL_STEPS
) -> None:
    assert sentinels == expected
    assert paths.short_steps() == sentinels
    assert not paths.general
    assert paths.short_backward == dict.fromkeys(sentinels, backwards)


def never_armed(paths: Paths, sentinels: set[int]) -> None:
    assert not paths.armed_at_step and not paths.short_backward
    assert set(paths.general) == sentinels


class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

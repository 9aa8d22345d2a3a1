"""What a lab experiment is: a question, a grid of run configurations, a table, a verdict.

An :class:`Experiment` is plain data (a frozen dataclass) holding the functions that make
it up, so the registry in :mod:`gradprobe.lab` lists experiments rather than subclasses:

* ``grid(mode, seeds)`` → the :class:`RunConfig` list to train (``mode`` is ``"tiny"``
  for the test suite, ``"quick"`` or ``"full"``);
* ``run(config, store)`` → one :class:`RunResult` (executed in a worker process);
* ``summarize(results)`` → the comparison table (mean and spread over seeds);
* ``verdict(table, results)`` → a :class:`Verdict` whose text is built from the numbers;
* ``figures(table, results, folder)`` → the PNG files it drew.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import GradprobeError

__all__ = [
    "MODES",
    "Check",
    "Experiment",
    "ExperimentResult",
    "RunConfig",
    "RunResult",
    "Verdict",
    "build_verdict",
    "fmt",
    "mean_spread",
    "seeds_for",
]

MODES = ("tiny", "quick", "full")


def _plain(value: Any) -> Any:
    """A JSON-friendly, hashable form of a parameter value (tuples for lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise GradprobeError(
        f"run parameter {value!r} is not a plain value", "use numbers, strings, None"
    )


@dataclass(frozen=True)
class RunConfig:
    """One training run of an experiment: its name, seed and parameters (sorted pairs).

    Frozen and made of plain values, so it is hashable, JSON-serialisable, and its
    content hash is the run id (the folder its probe store is written to).
    """

    experiment: str
    seed: int
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, experiment: str, seed: int, **params: Any) -> RunConfig:
        return cls(experiment, int(seed), tuple(sorted((k, _plain(v)) for k, v in params.items())))

    def __getitem__(self, key: str) -> Any:
        for k, v in self.params:
            if k == key:
                return v
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def as_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "seed": self.seed, **dict(self.params)}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        rest = {k: v for k, v in d.items() if k not in ("experiment", "seed")}
        return cls.make(d["experiment"], d["seed"], **rest)

    @property
    def run_id(self) -> str:
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.experiment}[{inner}, seed={self.seed}]"


@dataclass
class RunResult:
    """What one run produced: scalar metrics and named series (lists of floats)."""

    config: RunConfig
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        """The config's parameters and seed, then the metrics: one row of the raw table."""
        return {**dict(self.config.params), "seed": self.config.seed, **self.metrics}

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.config.run_id,
            "config": self.config.as_dict(),
            "metrics": {k: _json_float(v) for k, v in self.metrics.items()},
            "series": {k: [_json_float(x) for x in v] for k, v in self.series.items()},
            "seconds": round(self.seconds, 3),
        }


def _json_float(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


@dataclass(frozen=True)
class Check:
    """One claim tested per seed: ``held[i]`` is whether it held for the i-th seed."""

    claim: str
    held: tuple[bool, ...]

    @property
    def n_agree(self) -> int:
        return sum(self.held)


@dataclass(frozen=True)
class Verdict:
    """The experiment's conclusion, computed from its table.

    ``agrees_with_source``: the measurement shows what the cited paper claims in a
    majority of seeds for every check. ``passed``: every check held in every seed.
    ``text`` is built from the measured numbers; ``seeds_agree`` counts the seeds in
    which every check held, out of ``seeds_total``.
    """

    passed: bool
    agrees_with_source: bool
    text: str
    seeds_agree: int
    seeds_total: int
    checks: tuple[Check, ...] = ()
    numbers: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "agrees_with_source": self.agrees_with_source,
            "text": self.text,
            "seeds_agree": self.seeds_agree,
            "seeds_total": self.seeds_total,
            "checks": [{"claim": c.claim, "held": list(c.held)} for c in self.checks],
            "numbers": {k: _json_float(v) for k, v in self.numbers.items()},
        }


def build_verdict(
    checks: Sequence[Check], findings: Sequence[str], numbers: dict[str, float] | None = None
) -> Verdict:
    """A :class:`Verdict` from per-seed checks and sentences that carry the measured numbers.

    The summary sentence (how many seeds agree, and which checks failed) is generated
    here, so no experiment writes its conclusion by hand.
    """
    checks = tuple(checks)
    n = max((len(c.held) for c in checks), default=0)
    per_seed = [all(c.held[i] for c in checks if i < len(c.held)) for i in range(n)]
    seeds_agree = sum(per_seed)
    majority = all(c.n_agree * 2 > len(c.held) for c in checks) and bool(checks)
    passed = bool(checks) and all(all(c.held) for c in checks)
    lines = list(findings)
    for c in checks:
        lines.append(
            f"{'✓' if all(c.held) else ('~' if c.n_agree * 2 > len(c.held) else '✗')} "
            f"{c.claim}: holds in {c.n_agree} of {len(c.held)} seeds."
        )
    if majority:
        head = f"Agrees with the source: every check holds in {seeds_agree} of {n} seeds"
        head += "." if passed else " (some checks hold only in a majority of seeds)."
    else:
        failed = [c.claim for c in checks if c.n_agree * 2 <= len(c.held)]
        head = (
            "Disagrees with the source: in our measurement, not in a majority of seeds: "
            + "; ".join(failed)
            + "."
        )
    return Verdict(
        passed, majority, "\n".join([head, *lines]), seeds_agree, n, checks, dict(numbers or {})
    )


@dataclass(frozen=True)
class Experiment:
    """A lab experiment: the question it answers, the source it echoes, and how to run it.

    ``seeds`` are the default numbers of seeds for the modes ``tiny``, ``quick`` and ``full``.
    """

    name: str
    title: str
    question: str
    citation: str
    source: str
    grid: Callable[[str, int], list[RunConfig]]
    run: Callable[[RunConfig, Path | None], RunResult]
    summarize: Callable[[list[RunResult]], pd.DataFrame]
    verdict: Callable[[pd.DataFrame, list[RunResult]], Verdict]
    figures: Callable[[pd.DataFrame, list[RunResult], Path], list[Path]]
    seeds: tuple[int, int, int] = (1, 1, 3)
    notes: str = ""


def seeds_for(exp: Experiment, mode: str, seeds: int | None) -> int:
    """How many seeds a run uses: the given number, or the experiment's default for ``mode``."""
    if mode not in MODES:
        raise GradprobeError(f"unknown lab mode {mode!r}", f"use one of {', '.join(MODES)}")
    if seeds is None:
        return exp.seeds[MODES.index(mode)]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise GradprobeError(f"--seeds must be a whole number ≥ 1, got {seeds!r}", "e.g. --seeds 3")
    return seeds


def mean_spread(
    results: Sequence[RunResult], by: Sequence[str], metrics: Sequence[str]
) -> pd.DataFrame:
    """One row per configuration (``by``): mean and standard deviation over seeds of each
    metric (columns ``m`` and ``m_sd``), and ``seeds``. Rows keep the grid's order."""
    raw = pd.DataFrame([r.row() for r in results])
    if raw.empty:
        return raw
    keys = list(by)
    order = raw[keys].drop_duplicates().reset_index(drop=True)
    grouped = raw.groupby(keys, sort=False, dropna=False)
    means = grouped[list(metrics)].mean()
    # ddof=0: with one seed the spread is 0, not NaN; the seeds column says how many.
    sds = grouped[list(metrics)].std(ddof=0).add_suffix("_sd")
    counts = grouped.size().rename("seeds")
    table = pd.concat([means, sds, counts], axis=1).reset_index()
    table = order.merge(table, on=keys, how="left")
    cols = keys + [c for m in metrics for c in (m, f"{m}_sd")] + ["seeds"]
    return table[cols]


def per_seed(results: Sequence[RunResult]) -> dict[int, list[RunResult]]:
    """Results grouped by seed, seeds in increasing order."""
    out: dict[int, list[RunResult]] = {}
    for r in sorted(results, key=lambda r: r.config.seed):
        out.setdefault(r.config.seed, []).append(r)
    return out


def pick(results: Sequence[RunResult], **params: Any) -> RunResult:
    """The one result whose parameters include ``params``."""
    hits = [r for r in results if all(r.config.get(k) == v for k, v in params.items())]
    if len(hits) != 1:
        raise GradprobeError(f"expected one run with {params}, found {len(hits)}")
    return hits[0]


def fmt(x: float, digits: int = 3) -> str:
    """A number for a sentence: significant digits, scientific when very small or large."""
    if x is None or not math.isfinite(x):
        return "non-finite"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 1, 0)}e}"
    return f"{x:.{digits}g}"


def row_of(table: pd.DataFrame, **params: Any) -> pd.Series:
    """The one table row matching ``params``."""
    mask = np.ones(len(table), dtype=bool)
    for k, v in params.items():
        mask &= (table[k] == v).to_numpy()
    hits = table[mask]
    if len(hits) != 1:
        raise GradprobeError(f"expected one table row with {params}, found {len(hits)}")
    return hits.iloc[0]


@dataclass
class ExperimentResult:
    """An experiment's outcome: its table, verdict, runs, figures and wall time."""

    experiment: Experiment
    mode: str
    table: pd.DataFrame
    verdict: Verdict
    results: list[RunResult]
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    folder: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        e = self.experiment
        return {
            "name": e.name,
            "title": e.title,
            "question": e.question,
            "citation": e.citation,
            "source": e.source,
            "mode": self.mode,
            "seconds": round(self.seconds, 2),
            "verdict": self.verdict.as_dict(),
            "table": json.loads(self.table.to_json(orient="records")),
            "runs": [r.as_dict() for r in self.results],
            "figures": [p.name for p in self.figures],
        }

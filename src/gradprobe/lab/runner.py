"""Run an experiment's grid, in a process pool, and write its results.

Each run of a grid goes to a worker process (``spawn`` start method, one torch thread
each, so runs neither fight over cores nor inherit a parent's thread pool) and comes
back as a :class:`~gradprobe.lab.experiment.RunResult`. Results are put back in grid
order before anything is summarised, so the table does not depend on which worker
finished first. Per experiment the runner writes, under ``out/NAME/``:

* ``results.csv``: the comparison table (mean and spread over seeds);
* ``results.json``: the experiment, the verdict, the table and every run's numbers;
* ``*.png``: its figures; ``runs/<run id>/``: each run's probe store.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from ..errors import GradprobeError
from .experiment import (  # ExperimentResult: re-exported, its old home
    Experiment,
    ExperimentResult,
    RunConfig,
    RunResult,
    seeds_for,
)

__all__ = [
    "ExperimentResult",
    "check_out",
    "default_workers",
    "get_experiment",
    "run_experiment",
    "run_experiments",
    "run_grid",
]


def default_workers() -> int:
    """min(2, CPU count): the lab is sized for a small shared machine."""
    return max(1, min(2, os.cpu_count() or 1))


def get_experiment(name: str) -> Experiment:
    """The registered experiment ``name``, or one clear error listing the known names."""
    from . import EXPERIMENTS

    if name not in EXPERIMENTS:
        raise GradprobeError(
            f"unknown experiment {name!r}", f"use one of: {', '.join(EXPERIMENTS)} (or 'all')"
        )
    return EXPERIMENTS[name]


def check_out(out: str | os.PathLike[str]) -> Path:
    """Create ``out`` if needed and make sure it is a writable directory."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise GradprobeError(
            f"--out {str(path)!r} is a file", "give a directory for the lab results"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GradprobeError(
            f"cannot create --out {str(path)!r} ({exc.strerror})",
            "choose a directory you can write to",
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise GradprobeError(
            f"--out {str(path)!r} is not writable", "choose a directory you can write to"
        )
    return path


def _init_worker() -> None:
    import torch

    # One thread per worker: the pool, not torch, decides how many cores are busy.
    torch.set_num_threads(1)


def _execute(config_json: str, store: str | None) -> RunResult:
    """Run one configuration (in a worker or in-process) and time it."""
    import torch

    torch.set_num_threads(1)
    config = RunConfig.from_dict(json.loads(config_json))
    exp = get_experiment(config.experiment)
    started = time.perf_counter()
    result = exp.run(config, Path(store) if store is not None else None)
    result.seconds = time.perf_counter() - started
    return result


def make_pool(workers: int) -> Executor | None:
    """A spawn-based process pool of ``workers`` processes, or None for in-process runs."""
    if workers < 1:
        raise GradprobeError(f"--workers must be at least 1, got {workers}", "e.g. --workers 2")
    if workers == 1:
        return None
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
    )


def run_grid(
    configs: Sequence[RunConfig],
    *,
    pool: Executor | None = None,
    runs_dir: Path | None = None,
    on_done: Any = None,
) -> list[RunResult]:
    """Run every configuration; results come back in the order of ``configs``."""
    stores = [str(runs_dir / c.run_id) if runs_dir is not None else None for c in configs]
    results: list[RunResult | None] = [None] * len(configs)
    if pool is None:
        for i, (c, s) in enumerate(zip(configs, stores)):
            results[i] = _execute(c.to_json(), s)
            if on_done is not None:
                on_done(results[i])
    else:
        futures = {
            pool.submit(_execute, c.to_json(), s): i
            for i, (c, s) in enumerate(zip(configs, stores))
        }
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            if on_done is not None:
                on_done(results[futures[fut]])
    return [r for r in results if r is not None]


def run_experiment(
    exp: Experiment | str,
    *,
    mode: str = "quick",
    seeds: int | None = None,
    out: str | os.PathLike[str] | None = None,
    workers: int = 1,
    pool: Executor | None = None,
    progress: Any = None,
) -> ExperimentResult:
    """Train ``exp``'s grid, summarise it, compute its verdict; write results if ``out``.

    ``progress`` is a rich ``Progress`` (or None): one task per experiment, advanced as
    runs finish. A ``pool`` may be shared between experiments (``run_experiments`` does).
    """
    exp = get_experiment(exp) if isinstance(exp, str) else exp
    n_seeds = seeds_for(exp, mode, seeds)
    folder = check_out(Path(out) / exp.name) if out is not None else None
    configs = exp.grid(mode, n_seeds)
    started = time.perf_counter()
    task = progress.add_task(exp.name, total=len(configs)) if progress is not None else None

    def advance(_: RunResult) -> None:
        if progress is not None:
            progress.advance(task)

    own_pool = pool is None and workers > 1
    active = make_pool(workers) if own_pool else pool
    try:
        results = run_grid(
            configs, pool=active, runs_dir=folder / "runs" if folder else None, on_done=advance
        )
    finally:
        if own_pool and active is not None:
            active.shutdown()
    table = exp.summarize(results)
    verdict = exp.verdict(table, results)
    figures = exp.figures(table, results, folder) if folder is not None else []
    outcome = ExperimentResult(
        exp, mode, table, verdict, results, figures, time.perf_counter() - started, folder
    )
    if folder is not None:
        table.to_csv(folder / "results.csv", index=False, float_format="%.6g")
        with open(folder / "results.json", "w", encoding="utf-8") as f:
            json.dump(outcome.as_dict(), f, indent=1, default=str)
    return outcome


def run_experiments(
    names: Sequence[str],
    *,
    mode: str = "quick",
    seeds: int | None = None,
    out: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: Any = None,
    report: bool = True,
) -> list[ExperimentResult]:
    """Run several experiments with one shared pool; write the lab report if ``out``."""
    exps = [get_experiment(n) for n in names]
    for e in exps:
        seeds_for(e, mode, seeds)  # validate before any training starts
    root = check_out(out) if out is not None else None
    n_workers = default_workers() if workers is None else workers
    pool = make_pool(n_workers)
    try:
        outcomes = [
            run_experiment(e, mode=mode, seeds=seeds, out=root, pool=pool, progress=progress)
            for e in exps
        ]
    finally:
        if pool is not None:
            pool.shutdown()
    if root is not None and report:
        from .report import write_lab_report

        write_lab_report(outcomes, root / "lab_report.html")
    return outcomes

"""Weights & Biases: a recorded run (or a live Probe) as W&B scalars, and findings as a table.

Scalars are named ``gradprobe/<stat>/<name>`` (``gradprobe/error_norm/fc1``), and the
model's rows ``gradprobe/<stat>`` (``gradprobe/global_grad_norm``); characters outside
``A-Z a-z 0-9 _ - . space / :`` become ``_`` (see :mod:`._trackers`). Each recorded step is
one ``wandb.log`` call with ``step=`` the Probe's step, plus ``gradprobe/step``, which is
declared as the step metric of ``gradprobe/*`` so the charts read against it.

``WandbWriter(probe)`` logs each flush into the open run (``wandb.run``) on rank 0 only;
``export(run)`` starts a run and logs a stored one; ``log_findings(findings)`` adds the
findings as a ``wandb.Table`` (``gradprobe/findings``) and summary entries.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd
import wandb

from ..diagnose import Findings, diagnose
from ..probe import Probe
from ..run import Run, load
from ._trackers import PREFIX, rank, steps_of

__all__ = ["WandbWriter", "export", "log_findings", "write_frame"]

STEP_KEY = f"{PREFIX}/step"
FINDINGS_COLUMNS = ["kind", "severity", "names", "summary", "evidence", "remedies"]


def _declare_step(wandb_run: Any) -> None:
    """Plot ``gradprobe/*`` against the Probe's step, whatever the run's own step is."""
    wandb_run.define_metric(STEP_KEY)
    wandb_run.define_metric(f"{PREFIX}/*", step_metric=STEP_KEY)


def write_frame(wandb_run: Any, frame: pd.DataFrame, *, use_step: bool = True) -> int:
    """Log long-form rows into ``wandb_run``: one ``log`` call per step; returns the steps.

    ``use_step=False`` leaves W&B's own step alone (for a run the user logs to at a
    different cadence; W&B refuses a ``step=`` below its current one); the charts still
    read against ``gradprobe/step``.
    """
    logged = 0
    for step, values in steps_of(frame):
        values[STEP_KEY] = step
        if use_step:
            wandb_run.log(values, step=step)
        else:
            wandb_run.log(values)
        logged += 1
    return logged


def log_findings(findings: Findings, wandb_run: Any = None) -> None:
    """Log findings into ``wandb_run`` (default ``wandb.run``): a table and summary entries.

    The table ``gradprobe/findings`` has one row per finding (evidence and remedies as
    JSON text); the summary gets ``gradprobe/finding_count`` and
    ``gradprobe/finding/<kind>`` (its severity) for each finding.
    """
    wandb_run = wandb_run if wandb_run is not None else wandb.run
    if wandb_run is None:
        raise RuntimeError("no W&B run: call wandb.init() first or pass the run")
    rows = []
    for f in findings:
        d = f.to_dict()
        rows.append(
            [
                d["kind"],
                d["severity"],
                ", ".join(d["names"]),
                d["summary"],
                json.dumps(d["evidence"]),
                json.dumps(d["remedies"]),
            ]
        )
    wandb_run.log({f"{PREFIX}/findings": wandb.Table(columns=FINDINGS_COLUMNS, data=rows)})
    wandb_run.summary[f"{PREFIX}/finding_count"] = len(findings)
    for f in findings:
        wandb_run.summary[f"{PREFIX}/finding/{f.kind}"] = f.severity


def export(run: Run | str | os.PathLike[str], *, findings: bool = True, **init: Any) -> str:
    """Log a recorded run to a new W&B run (``wandb.init(**init)``); returns its id.

    With ``findings`` the run's diagnosis is logged too (:func:`log_findings`).
    """
    if not isinstance(run, Run):
        run = load(run)
    init.setdefault("name", run.name or None)
    wandb_run = wandb.init(**init)
    try:
        _declare_step(wandb_run)
        write_frame(wandb_run, run.frame())
        if findings:
            log_findings(diagnose(run), wandb_run)
        return str(wandb_run.id)
    finally:
        wandb_run.finish()


class WandbWriter:
    """Logs a live Probe's rows to W&B at every flush (``flush_every`` steps).

    Writes into ``wandb_run`` (default: the open ``wandb.run``; without one it starts
    ``wandb.init(**init)`` and finishes it at :meth:`close`). Costs nothing between
    flushes: the rows are already on the host there. Under DDP only rank 0 logs.
    Close the Probe first so its last rows are flushed through the writer.
    """

    def __init__(
        self, probe: Probe, wandb_run: Any = None, *, use_step: bool = True, **init: Any
    ) -> None:
        self.use_step = use_step
        self._owned = False
        self._run: Any = None
        self._remove = None
        if rank() != 0:
            return
        self._run = wandb_run if wandb_run is not None else wandb.run
        if self._run is None:
            self._run = wandb.init(**init)
            self._owned = True
        _declare_step(self._run)
        self._remove = probe.add_listener(self._write)

    @property
    def run(self) -> Any:
        """The W&B run written to (``None`` off rank 0)."""
        return self._run

    def _write(self, frame: pd.DataFrame) -> None:
        if self._run is not None:
            write_frame(self._run, frame, use_step=self.use_step)

    def log_findings(self, findings: Findings) -> None:
        """Log findings (e.g. ``gradprobe.diagnose(probe)``) into this writer's run."""
        if self._run is not None:
            log_findings(findings, self._run)

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None
        if self._run is not None and self._owned:
            self._run.finish()
        self._run = None

    def __enter__(self) -> WandbWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

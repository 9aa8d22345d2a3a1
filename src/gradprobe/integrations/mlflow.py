"""MLflow: a recorded run (or a live Probe) as MLflow metrics, and findings as an artifact.

Metric keys are ``gradprobe/<stat>/<name>`` (``gradprobe/error_norm/fc1``), and the
model's rows ``gradprobe/<stat>`` (``gradprobe/global_grad_norm``). MLflow allows only
``A-Z a-z 0-9 _ - . space / :`` in a key, so every other character becomes ``_``
(``blocks[0].attn`` is ``blocks_0_.attn``; see :mod:`._trackers`). Each value is logged at
``step=`` the Probe's step, in batches (``MlflowClient.log_batch``, at most 1000 per call).

``MlflowWriter(probe)`` logs each flush into the active run (``mlflow.active_run()``) on
rank 0 only; ``export(run)`` logs a stored run to a new MLflow run; ``log_findings``
writes ``gradprobe_findings.json`` as an artifact and tags ``gradprobe.finding.<kind>``
with each finding's severity.
"""

from __future__ import annotations

import os
import time

import mlflow
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ..diagnose import Findings, diagnose
from ..probe import Probe
from ..run import Run, load
from ._trackers import rank, steps_of

__all__ = ["FINDINGS_ARTIFACT", "MlflowWriter", "export", "log_findings", "write_frame"]

FINDINGS_ARTIFACT = "gradprobe_findings.json"
BATCH = 1000  # MLflow's limit on metrics per log_batch call


def write_frame(client: MlflowClient, run_id: str, frame: pd.DataFrame) -> int:
    """Log long-form rows into run ``run_id``, in batches; returns the values logged."""
    timestamp = int(time.time() * 1000)
    metrics = [
        Metric(key, value, timestamp, step)
        for step, values in steps_of(frame)
        for key, value in values.items()
    ]
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + BATCH])
    return len(metrics)


def log_findings(
    findings: Findings, run_id: str | None = None, tracking_uri: str | None = None
) -> None:
    """Write findings into an MLflow run (default: the active one).

    The artifact ``gradprobe_findings.json`` holds ``findings.to_dict()``; a tag
    ``gradprobe.finding.<kind>`` holds each finding's severity, and ``gradprobe.findings``
    their count, so runs can be searched by what was found.
    """
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("no active MLflow run: start one or pass run_id")
        run_id = active.info.run_id
    client = MlflowClient(tracking_uri)
    client.log_text(run_id, findings.to_json(), FINDINGS_ARTIFACT)
    client.set_tag(run_id, "gradprobe.findings", str(len(findings)))
    for f in findings:
        client.set_tag(run_id, f"gradprobe.finding.{f.kind}", f.severity)


def export(
    run: Run | str | os.PathLike[str],
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    findings: bool = True,
) -> str:
    """Log a recorded run to a new MLflow run; returns its run id.

    ``experiment`` names the experiment (created if missing; default MLflow's default);
    with ``findings`` the run's diagnosis is written too (:func:`log_findings`).
    """
    if not isinstance(run, Run):
        run = load(run)
    client = MlflowClient(tracking_uri)
    experiment_id = "0"
    if experiment is not None:
        existing = client.get_experiment_by_name(experiment)
        experiment_id = existing.experiment_id if existing else client.create_experiment(experiment)
    mlflow_run = client.create_run(experiment_id, run_name=run.name)
    run_id = mlflow_run.info.run_id
    status = "FAILED"
    try:
        write_frame(client, run_id, run.frame())
        if findings:
            log_findings(diagnose(run), run_id, tracking_uri)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


class MlflowWriter:
    """Logs a live Probe's rows to MLflow at every flush (``flush_every`` steps).

    Writes into run ``run_id`` (default: ``mlflow.active_run()``; without one it creates
    a run in ``experiment_id`` and ends it at :meth:`close`). Costs nothing between
    flushes: the rows are already on the host there. Under DDP only rank 0 logs. Close
    the Probe first so its last rows are flushed through the writer.
    """

    def __init__(
        self,
        probe: Probe,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        experiment_id: str = "0",
    ) -> None:
        self.run_id: str | None = None
        self._owned = False
        self._remove = None
        self._client = MlflowClient(tracking_uri)
        self.tracking_uri = self._client.tracking_uri
        if rank() != 0:
            return
        if run_id is None:
            active = mlflow.active_run()
            run_id = active.info.run_id if active is not None else None
        if run_id is None:
            run_id = self._client.create_run(experiment_id).info.run_id
            self._owned = True
        self.run_id = run_id
        self._remove = probe.add_listener(self._write)

    def _write(self, frame: pd.DataFrame) -> None:
        if self.run_id is not None:
            write_frame(self._client, self.run_id, frame)

    def log_findings(self, findings: Findings) -> None:
        """Write findings (e.g. ``gradprobe.diagnose(probe)``) into this writer's run."""
        if self.run_id is not None:
            log_findings(findings, self.run_id, self.tracking_uri)

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None
        if self.run_id is not None and self._owned:
            self._client.set_terminated(self.run_id)
        self._owned = False

    def __enter__(self) -> MlflowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

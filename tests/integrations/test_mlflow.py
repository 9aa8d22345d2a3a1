"""MLflow: export a stored run and log a live one into a local file store; read it back
with MLflow's own client and compare with the run's frame and with plain autograd."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")

import mlflow
from _trackers import OddNames, deep_sigmoid, expected_key, sequential, train
from mlflow.tracking import MlflowClient

import gradprobe
from gradprobe.diagnose import Findings
from gradprobe.integrations.mlflow import FINDINGS_ARTIFACT, MlflowWriter, export, log_findings


def check(uri: str, run_id: str, run: gradprobe.Run, model: nn.Module) -> None:
    """Every scalar of the run, read back with MlflowClient, has the frame's steps and values."""
    client = MlflowClient(uri)
    frame = run.frame()
    scalars = frame[~frame.stat.str.startswith("hist_")]
    keys = {expected_key(s, n) for s, n in zip(scalars.stat, scalars.name)}
    assert set(client.get_run(run_id).data.metrics) == keys
    for (stat, name), rows in scalars.groupby(["stat", "name"]):
        history = client.get_metric_history(run_id, expected_key(stat, name))
        got = {m.step: m.value for m in history}
        assert len(got) == len(history), (stat, name)  # one value per step
        assert got == pytest.approx(dict(zip(rows.step, rows.value)), rel=1e-6, nan_ok=True)
    # Independently of the frame: the last step's global gradient norm is that of the real
    # .grad (left in place after the last step), and its loss is a plain forward pass's.
    last = int(scalars.step.max())
    history = client.get_metric_history(run_id, "gradprobe/global_grad_norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert {m.step: m.value for m in history}[last] == pytest.approx(float(norm), rel=1e-5)
    assert [m.step for m in client.get_metric_history(run_id, "gradprobe/loss")] == list(
        range(last + 1)
    )


@pytest.fixture
def uri(tmp_path, monkeypatch) -> str:
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow 3.x keeps the file store only on request (it is "in maintenance mode").
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.mark.parametrize(
    "make", [sequential, OddNames, deep_sigmoid], ids=["sequential", "odd_names", "deep_sigmoid"]
)
def test_export_logs_every_scalar_and_the_findings(tmp_path, uri, make):
    model, _ = train(make, store=tmp_path / "run", steps=6)
    run = gradprobe.load(tmp_path / "run")
    run_id = export(tmp_path / "run", tracking_uri=uri, experiment="gp")
    check(uri, run_id, run, model)
    client = MlflowClient(uri)
    info = client.get_run(run_id).info
    assert info.status == "FINISHED"
    assert client.get_experiment(info.experiment_id).name == "gp"
    findings = gradprobe.diagnose(run)
    assert make is not deep_sigmoid or {"vanishing", "stalled"} <= set(findings.kinds)
    local = client.download_artifacts(run_id, FINDINGS_ARTIFACT, str(tmp_path / "dl"))
    with open(local, encoding="utf-8") as f:
        assert json.load(f) == json.loads(findings.to_json())
    tags = client.get_run(run_id).data.tags
    assert tags["gradprobe.findings"] == str(len(findings))
    assert {k: v for k, v in tags.items() if k.startswith("gradprobe.finding.")} == {
        f"gradprobe.finding.{f.kind}": f.severity for f in findings
    }


def test_odd_names_become_valid_keys(tmp_path, uri):
    train(OddNames, store=tmp_path / "run", steps=2)
    run_id = export(tmp_path / "run", tracking_uri=uri, findings=False)
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert "gradprobe/grad_norm/layers.in_put_.weight" in metrics
    assert "gradprobe/grad_norm/layers.out_1_.bias" in metrics
    assert not [k for k in metrics if re.search(r"[()\[\]]", k)]


@pytest.mark.parametrize("flush_every,steps", [(2, 5), (1, 3), (10, 4)])
def test_live_writer_in_the_active_run_matches_the_stored_run(tmp_path, uri, flush_every, steps):
    with mlflow.start_run() as active:
        model, writer = train(
            store=tmp_path / "run", steps=steps, flush_every=flush_every, live=MlflowWriter
        )
        writer.log_findings(gradprobe.diagnose(gradprobe.load(tmp_path / "run")))
        writer.close()
        assert writer.run_id == active.info.run_id
    check(uri, active.info.run_id, gradprobe.load(tmp_path / "run"), model)
    assert FINDINGS_ARTIFACT in [a.path for a in MlflowClient(uri).list_artifacts(writer.run_id)]


def test_live_writer_without_an_active_run_starts_and_ends_its_own(tmp_path, uri):
    model, writer = train(
        OddNames,
        store=tmp_path / "run",
        stats="full",
        live=lambda p: MlflowWriter(p, tracking_uri=uri),
    )
    assert MlflowClient(uri).get_run(writer.run_id).info.status == "RUNNING"
    writer.close()
    assert MlflowClient(uri).get_run(writer.run_id).info.status == "FINISHED"
    check(uri, writer.run_id, gradprobe.load(tmp_path / "run"), model)


def test_log_findings_needs_a_run(uri):
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_findings(Findings(), None)

"""Weights & Biases (offline): export a stored run and log a live one; read the offline run
back from its ``.wandb`` file and compare with the run's frame and with plain autograd.

wandb 0.31 ships no Python reader for an offline run (the old ``wandb.sdk.internal.datastore``
is gone; ``wandb sync`` reads it in wandb-core). ``records`` parses the file as that reader
did: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of chunks, each
with a CRC-32, a length and a type (full / first / middle / last), joined into
``wandb.proto.wandb_internal_pb2.Record`` messages, CRCs checked.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("wandb", reason="the [wandb] extra is not installed")

import wandb
from _trackers import OddNames, deep_sigmoid, expected_key, sequential, train
from wandb.proto import wandb_internal_pb2

import gradprobe
from gradprobe.diagnose import Findings
from gradprobe.integrations.wandb import WandbWriter, export, log_findings

BLOCK = 32768
HEADER = 7


def records(run_file: Path) -> list[wandb_internal_pb2.Record]:
    data = run_file.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if left < HEADER or kind == 0:  # the rest of a block is padding
            pos += left
            continue
        if pos + HEADER + length > len(data):  # a chunk still being written
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            out.append(pending + chunk)
    parsed = []
    for chunk in out:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        parsed.append(record)
    return parsed


def item_key(item) -> str:
    return "/".join(item.nested_key) or item.key


class Offline:
    """What an offline run wrote: history rows (W&B step, values), the summary, its folder."""

    def __init__(self, root: Path, run_id: str) -> None:
        (self.folder,) = (root / "wandb").glob(f"offline-run-*-{run_id}")
        self.history: list[tuple[int, dict[str, object]]] = []
        self.summary: dict[str, object] = {}
        # run.finish() can return before wandb-core has written the file out: wait for
        # the run's last record, "exit".
        deadline = time.monotonic() + 60
        while True:
            found = records(self.folder / f"run-{run_id}.wandb")
            if any(r.WhichOneof("record_type") == "exit" for r in found):
                break
            assert time.monotonic() < deadline, "the offline run was never finished"
            time.sleep(0.1)
        for record in found:
            kind = record.WhichOneof("record_type")
            if kind == "history":
                values = {item_key(i): json.loads(i.value_json) for i in record.history.item}
                self.history.append((record.history.step.num, values))
            elif kind == "summary":
                for i in record.summary.update:
                    self.summary[item_key(i)] = json.loads(i.value_json)

    def scalars(self) -> dict[str, dict[int, float]]:
        """``gradprobe/*`` scalars by key, as {probe step: value}."""
        out: dict[str, dict[int, float]] = {}
        for _, values in self.history:
            if "gradprobe/step" not in values:
                continue
            step = values["gradprobe/step"]
            for key, value in values.items():
                if (
                    key.startswith("gradprobe/")
                    and key != "gradprobe/step"
                    and not key.startswith(
                        "gradprobe/findings/"  # the findings table's reference
                    )
                ):
                    assert step not in out.setdefault(key, {}), (key, step)  # once per step
                    out[key][step] = value
        return out

    def table(self, key: str) -> dict:
        path = self.summary[f"{key}/path"]
        return json.loads((self.folder / "files" / path).read_text(encoding="utf-8"))


def check(offline: Offline, run: gradprobe.Run, model: nn.Module, *, wandb_steps=True) -> None:
    """Every scalar of the run, read back from the offline file, has the frame's steps and values."""
    frame = run.frame()
    got = offline.scalars()
    want = {
        expected_key(stat, name): dict(zip(rows.step, rows.value))
        for (stat, name), rows in frame.groupby(["stat", "name"])
    }
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, nan_ok=True), key
    if wandb_steps:  # logged at step= the Probe's step
        for step, values in offline.history:
            if "gradprobe/step" in values:
                assert step == values["gradprobe/step"]
    # Independently of the frame: the last step's global gradient norm is that of the real .grad.
    last = int(frame.step.max())
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert got["gradprobe/global_grad_norm"][last] == pytest.approx(float(norm), rel=1e-5)
    assert sorted(got["gradprobe/loss"]) == list(range(last + 1))


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "wandb_root"
    root.mkdir()
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(name, value)
    wandb.teardown()  # W&B keeps the settings of its first run per process: read these
    yield root
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


@pytest.mark.parametrize(
    "make", [sequential, OddNames, deep_sigmoid], ids=["sequential", "odd_names", "deep_sigmoid"]
)
def test_export_logs_every_scalar_and_the_findings(tmp_path, wandb_dir, make):
    model, _ = train(make, store=tmp_path / "run", steps=6)
    run = gradprobe.load(tmp_path / "run")
    run_id = export(tmp_path / "run", project="gp")
    offline = Offline(wandb_dir, run_id)
    check(offline, run, model)
    findings = gradprobe.diagnose(run)
    assert make is not deep_sigmoid or {"vanishing", "stalled"} <= set(findings.kinds)
    table = offline.table("gradprobe/findings")
    assert table["columns"][:4] == ["kind", "severity", "names", "summary"]
    assert [row[:2] for row in table["data"]] == [[f.kind, f.severity] for f in findings]
    assert [json.loads(row[4]) for row in table["data"]] == [
        json.loads(json.dumps(f.to_dict()["evidence"])) for f in findings
    ]
    assert offline.summary["gradprobe/finding_count"] == len(findings)
    assert {k: v for k, v in offline.summary.items() if k.startswith("gradprobe/finding/")} == {
        f"gradprobe/finding/{f.kind}": f.severity for f in findings
    }


def test_odd_names_become_valid_keys(tmp_path, wandb_dir):
    train(OddNames, store=tmp_path / "run", steps=2)
    got = Offline(wandb_dir, export(tmp_path / "run", findings=False)).scalars()
    assert "gradprobe/grad_norm/layers.in_put_.weight" in got
    assert "gradprobe/grad_norm/layers.out_1_.bias" in got
    assert not [k for k in got if re.search(r"[()\[\]]", k)]


@pytest.mark.parametrize("flush_every,steps", [(2, 5), (1, 3), (10, 4)])
def test_live_writer_in_the_open_run_matches_the_stored_run(
    tmp_path, wandb_dir, flush_every, steps
):
    user_run = wandb.init(project="gp")
    model, writer = train(
        store=tmp_path / "run", steps=steps, flush_every=flush_every, live=WandbWriter
    )
    assert writer.run is user_run
    writer.log_findings(gradprobe.diagnose(gradprobe.load(tmp_path / "run")))
    writer.close()
    user_run.finish()
    offline = Offline(wandb_dir, user_run.id)
    check(offline, gradprobe.load(tmp_path / "run"), model)
    assert offline.summary["gradprobe/finding_count"] == 0


def test_live_writer_beside_the_users_own_steps(tmp_path, wandb_dir):
    """The loop logs at W&B's own step every step; the writer leaves that step alone and its
    rows still read against gradprobe/step."""
    user_run = wandb.init(project="gp")
    model, writer = train(
        deep_sigmoid,
        store=tmp_path / "run",
        steps=5,
        flush_every=2,
        live=lambda p: WandbWriter(p, use_step=False),
        after_step=lambda loss: wandb.log({"train/loss": loss.item()}),
    )
    writer.close()
    user_run.finish()
    offline = Offline(wandb_dir, user_run.id)
    check(offline, gradprobe.load(tmp_path / "run"), model, wandb_steps=False)
    assert sum("train/loss" in values for _, values in offline.history) == 5


def test_live_writer_without_an_open_run_starts_and_finishes_its_own(tmp_path, wandb_dir):
    model, writer = train(
        OddNames, store=tmp_path / "run", live=lambda p: WandbWriter(p, project="gp", name="own")
    )
    run_id = writer.run.id
    assert wandb.run is writer.run
    writer.close()
    assert wandb.run is None
    check(Offline(wandb_dir, run_id), gradprobe.load(tmp_path / "run"), model)


def test_log_findings_needs_a_run(wandb_dir):
    assert wandb.run is None
    with pytest.raises(RuntimeError, match="no W&B run"):
        log_findings(Findings())

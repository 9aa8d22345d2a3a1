"""TensorBoard: a recorded run (or a live Probe) as TensorBoard scalars and histograms.

Scalars are tagged ``stat/name`` (``error_norm/3``, ``grad_norm/0.weight``,
``global_grad_norm/(model)``), one point per recorded step. Activation histograms
(``Probe(stats="full")``, stats ``hist_00`` ...) become TensorBoard histograms tagged
``activations/name``: bin edges from the run's meta (``modules[i]["histogram_range"]``
and ``probe["histogram_bins"]``). The Probe clamps outputs into that range, so the
outer bins also hold what lies beyond. The histogram's sum and sum of squares come
from ``act_mean``/``act_std`` where the run has them (exact), else from bin centres.

``export(run, logdir)`` writes a stored run; ``TensorBoardWriter(probe, logdir)``
writes each flush as it happens (on rank 0 only under DDP).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.tensorboard import SummaryWriter

from ..probe import Probe
from ..run import Run, load

__all__ = ["TensorBoardWriter", "export", "histogram_edges"]


def histogram_edges(meta: dict[str, Any], name: str) -> np.ndarray | None:
    """The bin edges of module ``name``'s activation histogram, from a run's meta."""
    bins = int(meta.get("probe", {}).get("histogram_bins") or 0)
    for m in meta.get("modules", []):
        if m.get("name") == name and m.get("histogram_range") and bins:
            lo, hi = m["histogram_range"]
            return np.linspace(float(lo), float(hi), bins + 1)
    return None


def write_frame(writer: SummaryWriter, frame: pd.DataFrame, meta: dict[str, Any]) -> int:
    """Write long-form rows to ``writer``: scalars, then histograms; returns the points written."""
    is_hist = frame["stat"].str.match(r"hist_\d+$")
    scalars = frame[~is_hist]
    for step, name, stat, value in scalars[["step", "name", "stat", "value"]].itertuples(
        index=False
    ):
        writer.add_scalar(f"{stat}/{name}", float(value), int(step))
    written = len(scalars)
    hist = frame[is_hist]
    if hist.empty:
        return written
    moments = scalars[scalars["stat"].isin(["act_mean", "act_std"])].pivot_table(
        index=["step", "name"], columns="stat", values="value", aggfunc="last"
    )
    for (step, name), rows in hist.groupby(["step", "name"], sort=True):
        edges = histogram_edges(meta, str(name))
        if edges is None:
            continue
        counts = np.zeros(len(edges) - 1)
        index = rows["stat"].str.slice(5).astype(int).to_numpy()
        counts[index] = rows["value"].to_numpy()
        num = float(counts.sum())
        if num == 0:
            continue
        if (step, name) in moments.index and not moments.loc[(step, name)].isna().any():
            mean, std = (float(moments.loc[(step, name), s]) for s in ("act_mean", "act_std"))
        else:
            centres = (edges[:-1] + edges[1:]) / 2
            mean = float((centres * counts).sum() / num)
            std = float(np.sqrt(max((centres**2 * counts).sum() / num - mean**2, 0.0)))
        filled = np.nonzero(counts)[0]
        writer.add_histogram_raw(
            f"activations/{name}",
            min=float(edges[filled[0]]),
            max=float(edges[filled[-1] + 1]),
            num=num,
            sum=mean * num,
            sum_squares=(std**2 + mean**2) * num,
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(),
            global_step=int(step),
        )
        written += 1
    return written


def export(run: Run | str | os.PathLike[str], logdir: str | os.PathLike[str]) -> Path:
    """Write a recorded run as TensorBoard event files under ``logdir``; returns ``logdir``."""
    if not isinstance(run, Run):
        run = load(run)
    out = Path(logdir)
    with SummaryWriter(log_dir=str(out)) as writer:
        write_frame(writer, run.frame(), run.meta)
    return out


class TensorBoardWriter:
    """Writes a live Probe's rows to TensorBoard at every flush (``flush_every`` steps).

    Costs nothing between flushes; under DDP only rank 0 writes. ``close()`` (or the
    ``with`` block) closes the event file; close the Probe first so its last rows
    are flushed through the writer.
    """

    def __init__(self, probe: Probe, logdir: str | os.PathLike[str]) -> None:
        self.logdir = Path(logdir)
        self._meta = probe.meta
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._writer = SummaryWriter(log_dir=str(self.logdir)) if rank == 0 else None
        self._remove = probe.add_listener(self._write) if self._writer is not None else None

    def _write(self, frame: pd.DataFrame) -> None:
        if self._writer is not None:
            write_frame(self._writer, frame, self._meta)
            self._writer.flush()

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

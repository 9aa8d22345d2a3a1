"""TensorBoard: a recorded run (or a live Probe) as TensorBoard scalars, histograms and text.

Scalars are tagged ``stat/name`` (``error_norm/3``, ``grad_norm/0.weight``,
``global_grad_norm/(model)``), one point per recorded step. By default only the series
people read are written (:data:`DEFAULT_STATS`: error and gradient norms, update
ratios, the global norm before and after clipping, loss, learning rate), and no series
that never changes (constant, or all zero: a flag that never fired says nothing):
``stats="all"`` writes every statistic, or give a list. Each point's wall time is
when its step closed in training, placed by the run's time anchors
(``meta["wall_time"]``: the first step's close and each flush's last step, recorded by
the host clock; steps between are placed linearly), not when it was exported. The
findings are text: ``gradprobe/findings`` holds the diagnosis, root cause first (the
export, and the live writer at :meth:`TensorBoardWriter.close`), ``gradprobe/live``
what was said while training (a NaN, a spike, an explosion: :mod:`gradprobe.live`),
at its step. Activation histograms
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.tensorboard import SummaryWriter

from ..diagnose import Finding, diagnose
from ..headline import story
from ..probe import Probe
from ..run import Run, load

__all__ = ["DEFAULT_STATS", "TensorBoardWriter", "export", "histogram_edges", "wall_times"]

# The scalars written by default: what people look at to judge gradients and training.
DEFAULT_STATS = (
    "error_norm",
    "grad_norm",
    "update_ratio",
    "global_grad_norm",
    "global_grad_norm_preclip",
    "loss",
    "lr",
)


def _wanted(stats: str | Sequence[str]) -> frozenset[str] | None:
    """The statistics to write (None: all)."""
    if stats == "all":
        return None
    if stats == "default":
        return frozenset(DEFAULT_STATS)
    return frozenset([stats] if isinstance(stats, str) else stats)


def wall_times(meta: dict[str, Any], steps: np.ndarray) -> np.ndarray | None:
    """Each step's wall-clock time (seconds since the epoch) from the run's anchors, or
    None for a run recorded before they were (TensorBoard then stamps the export time)."""
    anchors = np.asarray(meta.get("wall_time") or [], dtype=float).reshape(-1, 2)
    if len(anchors) == 0:
        return None
    at, t = anchors[:, 0], anchors[:, 1]
    steps = np.asarray(steps, dtype=float)
    if len(anchors) == 1:
        return np.full(len(steps), t[0])
    out = np.interp(steps, at, t)
    # Beyond the last anchor (a live flush in progress): at the run's mean rate.
    rate = (t[-1] - t[0]) / max(at[-1] - at[0], 1.0)
    after = steps > at[-1]
    out[after] = t[-1] + (steps[after] - at[-1]) * rate
    return out


def _changing(scalars: pd.DataFrame) -> pd.DataFrame:
    """Drop series (stat, name) whose values never change: all zero, or constant."""
    spread = scalars.groupby(["stat", "name"], sort=False)["value"].agg(
        lambda v: (
            np.unique(v.to_numpy()[~np.isnan(v.to_numpy())]).size > 1
            or bool(np.isnan(v.to_numpy()).any() and np.isfinite(v.to_numpy()).any())
        )
    )
    keep = spread[spread].index
    index = pd.MultiIndex.from_frame(scalars[["stat", "name"]])
    return scalars[index.isin(keep)]


def findings_markdown(text: str) -> str:
    """A plain-text story as TensorBoard markdown (kept as written: a code block)."""
    return "\n".join("    " + line for line in text.splitlines())


def histogram_edges(meta: dict[str, Any], name: str) -> np.ndarray | None:
    """The bin edges of module ``name``'s activation histogram, from a run's meta."""
    bins = int(meta.get("probe", {}).get("histogram_bins") or 0)
    for m in meta.get("modules", []):
        if m.get("name") == name and m.get("histogram_range") and bins:
            lo, hi = m["histogram_range"]
            return np.linspace(float(lo), float(hi), bins + 1)
    return None


def write_frame(
    writer: SummaryWriter,
    frame: pd.DataFrame,
    meta: dict[str, Any],
    stats: str | Sequence[str] = "default",
    *,
    drop_constant: bool = True,
) -> int:
    """Write long-form rows to ``writer``: scalars, then histograms; returns the points written."""
    is_hist = frame["stat"].str.match(r"hist_\d+$")
    scalars = frame[~is_hist]
    wanted = _wanted(stats)
    if wanted is not None:
        scalars = scalars[scalars["stat"].isin(wanted)]
    if drop_constant:
        scalars = _changing(scalars)
    times = wall_times(meta, scalars["step"].to_numpy())
    rows = scalars[["step", "name", "stat", "value"]].itertuples(index=False)
    for i, (step, name, stat, value) in enumerate(rows):
        writer.add_scalar(
            f"{stat}/{name}",
            float(value),
            int(step),
            walltime=None if times is None else float(times[i]),
        )
    written = len(scalars)
    hist_times = wall_times(meta, frame.loc[is_hist, "step"].to_numpy())
    step_time = (
        dict(zip(frame.loc[is_hist, "step"].to_numpy().tolist(), hist_times.tolist()))
        if hist_times is not None
        else {}
    )
    scalars = frame[~is_hist]
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
            walltime=step_time.get(int(step)),
        )
        written += 1
    return written


def export(
    run: Run | str | os.PathLike[str],
    logdir: str | os.PathLike[str],
    stats: str | Sequence[str] = "default",
    findings: bool = True,
) -> Path:
    """Write a recorded run as TensorBoard event files under ``logdir``; returns ``logdir``.

    ``stats``: "default" (:data:`DEFAULT_STATS`), "all", or a list of statistic names;
    series that never change are left out. ``findings``: the diagnosis as text.
    """
    if not isinstance(run, Run):
        run = load(run)
    out = Path(logdir)
    with SummaryWriter(log_dir=str(out)) as writer:
        write_frame(writer, run.frame(), run.meta, stats)
        if findings and not run.empty:
            last = int(run.steps.max())
            times = wall_times(run.meta, np.array([last]))
            writer.add_text(
                "gradprobe/findings",
                findings_markdown(story(diagnose(run))),
                last,
                walltime=None if times is None else float(times[0]),
            )
    return out


class TensorBoardWriter:
    """Writes a live Probe's rows to TensorBoard at every flush (``flush_every`` steps).

    Costs nothing between flushes; under DDP only rank 0 writes. ``close()`` (or the
    ``with`` block) writes the diagnosis as text and closes the event file; close the
    Probe first so its last rows are flushed through the writer (and the diagnosis
    reads the whole run). A series is held back while it has not changed, and written
    (all its points) once it does: a series that never changes is never written.
    What the Probe says while training (:mod:`gradprobe.live`) is written as text
    ``gradprobe/live`` at its step, at the flush that saw it.
    """

    def __init__(
        self,
        probe: Probe,
        logdir: str | os.PathLike[str],
        stats: str | Sequence[str] = "default",
        findings: bool = True,
    ) -> None:
        self.logdir = Path(logdir)
        self._probe = probe
        self._stats = stats
        self._findings = findings
        self._held: dict[tuple[str, str], pd.DataFrame] = {}  # series not changed yet
        self._changed: set[tuple[str, str]] = set()
        self._said = 0
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._writer = SummaryWriter(log_dir=str(self.logdir)) if rank == 0 else None
        self._remove = probe.add_listener(self._write) if self._writer is not None else None

    def _write(self, frame: pd.DataFrame) -> None:
        if self._writer is None:
            return
        meta = self._probe.meta
        write_frame(self._writer, self._release(frame), meta, self._stats, drop_constant=False)
        for finding in self._probe._live.found[self._said :]:
            self._write_live(finding, meta)
        self._said = len(self._probe._live.found)
        self._writer.flush()

    def _release(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The rows to write now: those of series that have changed (with the points held
        back until they did); the others are held."""
        is_hist = frame["stat"].str.match(r"hist_\d+$")
        out = [frame[is_hist]]
        scalars = frame[~is_hist]
        wanted = _wanted(self._stats)
        if wanted is not None:
            # The others pass through: write_frame leaves them out, but the histograms'
            # moments read act_mean and act_std from them.
            out.append(scalars[~scalars["stat"].isin(wanted)])
            scalars = scalars[scalars["stat"].isin(wanted)]
        for key, rows in scalars.groupby(["stat", "name"], sort=False):
            key = (str(key[0]), str(key[1]))
            if key in self._changed:
                out.append(rows)
                continue
            held = pd.concat([self._held[key], rows]) if key in self._held else rows
            if len(_changing(held)):
                self._changed.add(key)
                self._held.pop(key, None)
                out.append(held)
            else:
                self._held[key] = held
        return pd.concat(out) if out else frame.iloc[:0]

    def _write_live(self, finding: Finding, meta: dict[str, Any]) -> None:
        step = int(finding.evidence.get("step", 0))
        times = wall_times(meta, np.array([step]))
        assert self._writer is not None
        self._writer.add_text(
            "gradprobe/live",
            f"**{finding.kind}** ({finding.severity}): {finding.summary}",
            step,
            walltime=None if times is None else float(times[0]),
        )

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None
        if self._writer is not None:
            if self._findings and self._probe.closed:
                try:
                    run = self._probe.run()
                    if not run.empty:
                        last = int(run.steps.max())
                        times = wall_times(run.meta, np.array([last]))
                        self._writer.add_text(
                            "gradprobe/findings",
                            findings_markdown(story(diagnose(run))),
                            last,
                            walltime=None if times is None else float(times[0]),
                        )
                except Exception as exc:  # the diagnosis must not break closing the writer
                    import warnings

                    from ..hooks import GradprobeWarning

                    warnings.warn(
                        f"gradprobe: the diagnosis was not written to TensorBoard "
                        f"({type(exc).__name__}: {exc})",
                        GradprobeWarning,
                        stacklevel=2,
                    )
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

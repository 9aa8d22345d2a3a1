"""Rows: the buffer drained into long-form rows, written to the store or kept, and handed on.

:class:`Rows` flushes (never raising: a failure loses the drained steps' rows, with one
warning, not the run), finalises partials into rows on the host (NumPy), and hands each
flush's rows to the live check and the listeners (live writers).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from functools import partial

import numpy as np
import pandas as pd

from ..buffer import Drained
from ..hooks import warn_once
from ..run import empty_frame, is_normal, load, normalize_frame, text_column
from ..stats import MODEL_NAME, STATISTICS, finalize, logged_mean
from .context import Context

__all__ = ["Rows"]

# Long-form rows of one statistic, as columns: step, name code, stat code, value.
_Rows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class Rows:
    """The flushes, and the rows kept in memory when there is no store."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._frames: list[pd.DataFrame] = []
        self._listeners: list[Callable[[pd.DataFrame], None]] = []
        ctx.on("model_changing", self.flush)  # closed steps have the old widths

    def add_listener(self, listener: Callable[[pd.DataFrame], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def frame(self) -> pd.DataFrame:
        """Every row so far (flushed first)."""
        self.flush(final=True)
        store = self.ctx.store
        if store is not None:
            # With a store the rows live on disk only: a long run must not grow in memory.
            return load(store.path).frame()
        if not self._frames:
            return empty_frame()
        return pd.concat(self._frames, ignore_index=True)

    def flush(self, final: bool = False) -> None:
        """Drain the buffer into rows and write them. Never raises: a failure loses the
        drained steps' rows (one warning), not the run. ``final`` (``frame()``, ``close()``)
        also drains the values logged for the last closed step."""
        ctx = self.ctx
        if not ctx.guard(
            partial(self._flush_rows, final), "a flush (the rows of the steps since the last one)"
        ):
            ctx.guard(ctx.buffer.forget_logged_of_failed_drain, "a flush (logged values)")

    def _flush_rows(self, final: bool = False) -> None:
        ctx = self.ctx
        drained = ctx.buffer.drain(final)
        if drained is None:
            return
        frame = self._to_frame(drained)
        ctx.progress.anchor_flush()
        store = ctx.store
        if store is not None:
            store.append(frame)
            ctx.guard(lambda: store.update_meta(**ctx.progress.of(ctx)), "the store's meta")
        else:
            self._frames.append(frame)
        ctx.guard(partial(ctx.live, frame), "the live check of a flush")
        for listener in list(self._listeners):
            try:
                listener(frame)
            except Exception as exc:  # a writer's failure must not stop training
                warn_once(ctx.failed_where, f"flush listener {listener!r}", exc)

    def _to_frame(self, d: Drained) -> pd.DataFrame:
        """Finalise partials into long-form rows (host side, NumPy): columns per statistic,
        joined as arrays, one DataFrame at the end (a frame per statistic, then a concat,
        cost ~10× as much: text columns are converted once, not once per statistic)."""
        ctx = self.ctx
        slots, param_names = ctx.slots, ctx.param_names
        # Text as codes into a vocabulary until the frame is made (text_column).
        names = [s.name for s in slots] + list(param_names) + [MODEL_NAME]
        module_codes = np.arange(len(slots))
        param_codes = len(slots) + np.arange(len(param_names))
        model_codes = np.array([len(names) - 1])
        stats: list[str] = []
        parts: list[_Rows] = []

        def add(codes: np.ndarray, stat: str, values: np.ndarray, present: np.ndarray) -> None:
            stats.append(stat)
            parts.append(_long(d.steps, codes, len(stats) - 1, values, present))

        module_gap = d.modules["gap"] > 0
        for stat, (values, present) in finalize(d.modules, ctx.stats, "module").items():
            add(module_codes, stat, values, present & ~module_gap)
        param_gap = d.params["param_gap"] > 0
        for stat, (values, present) in finalize(d.params, ctx.stats, "parameter").items():
            add(param_codes, stat, values, present & ~param_gap)
        for stat, (values, present) in finalize(d.model, ctx.stats, "model").items():
            add(model_codes, stat, values, present)
        for stat, steps, values, present in _logged_rows(d.logged):
            stats.append(stat)
            parts.append(_long(steps, model_codes, len(stats) - 1, values, present))
        for stat, (steps, codes, values) in _head_rows(d, ctx.stats, module_gap).items():
            stats.append(stat)
            parts.append((steps, codes, np.full(len(steps), len(stats) - 1), values))
        if d.histograms is not None:
            present = (d.modules["calls"] > 0) & ~module_gap
            for b in range(d.histograms.shape[2]):
                add(module_codes, f"hist_{b:02d}", d.histograms[:, :, b], present)
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return empty_frame()
        steps, name_codes, stat_codes, values = (np.concatenate(column) for column in zip(*parts))
        order = np.argsort(steps, kind="stable")
        columns = {
            "step": steps[order],
            "name": text_column(names, name_codes[order]),
            "stat": text_column(stats, stat_codes[order]),
            "value": values[order],
        }
        frame = pd.DataFrame(columns)
        # Text columns made by text_column are as normalize_frame would make them; its
        # astype was a quarter of a flush. Elsewhere (text as Python objects) it converts.
        return frame if is_normal(columns) else normalize_frame(frame)


def _head_rows(
    d: Drained, wanted: tuple[str, ...], module_gap: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per-head statistics as rows ``<stat>/<h>`` of their module (the head an index in the
    stat column, as ``lr/<i>`` and ``hist_<b>``): ``{stat/h: (steps, name codes, values)}``.
    NaN (nothing measured for that head) is a gap: no row."""
    per_head = [(n, STATISTICS[n].heads) for n in wanted if STATISTICS[n].heads is not None]
    cells: dict[str, tuple[list[int], list[int], list[float]]] = defaultdict(lambda: ([], [], []))
    for (row, slot), table in d.heads.items():
        if module_gap[row, slot]:
            continue
        for stat, column in per_head:
            for h, value in enumerate(table[column].tolist()):
                if not np.isnan(value):
                    entry = cells[f"{stat}/{h}"]
                    entry[0].append(int(d.steps[row]))
                    entry[1].append(slot)
                    entry[2].append(value)
    return {
        stat: (np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64), np.asarray(c))
        for stat, (a, b, c) in cells.items()
    }


def _logged_rows(
    logged: Mapping[tuple[int, str], tuple[float, float]],
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Logged values finalised as their statistic declares (rows of ``(model)``): per
    name, ``(name, steps, values [steps, 1], present [steps, 1])``."""
    by_name: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for (step, name), (total, count) in logged.items():
        by_name[name].append((step, total, count))
    parts = []
    for name, entries in by_name.items():
        steps = np.array([e[0] for e in entries], dtype=np.int64)
        partials = {
            "log_sum": np.array([[e[1]] for e in entries]),
            "log_count": np.array([[e[2]] for e in entries]),
        }
        declared = STATISTICS.get(name)
        fn = declared.logged if declared is not None and declared.logged else logged_mean
        values, present = fn(partials)
        parts.append((name, steps, values, present))
    return parts


def _long(
    steps: np.ndarray, names: np.ndarray, stat: int, values: np.ndarray, present: np.ndarray
) -> _Rows:
    """The present cells of one statistic's ``[steps, names]`` table as rows: step, name
    code (``names``: the code of each column), stat code, value."""
    rows, cols = np.nonzero(present)
    return (
        steps[rows].astype(np.int64),
        names[cols],
        np.full(len(rows), stat, dtype=np.int64),
        values[rows, cols].astype(np.float64),
    )

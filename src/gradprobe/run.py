"""Run: a recorded run, read back from its directory (or taken from a live Probe).

``load(path)`` reads ``meta.json`` and every complete parquet part; temporary files
of a run killed mid-write are ignored, so whatever was flushed is there. Problems
the user can fix (not a run, a corrupt part) raise one clear :class:`GradprobeError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from ._views import reason, view
from .errors import GradprobeError
from .store import FORMAT, PART_GLOB

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "COLUMNS",
    "NonFinite",
    "Run",
    "empty_frame",
    "is_normal",
    "load",
    "normalize_frame",
    "text_column",
]

COLUMNS = ["step", "name", "stat", "value"]


def normalize_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One set of dtypes wherever a frame comes from: int64 steps, text names, float64 values."""
    frame = frame[COLUMNS]
    return frame.astype({"step": np.int64, "name": str, "stat": str, "value": np.float64})


def is_normal(frame: pd.DataFrame | Mapping[str, Any]) -> bool:
    """Whether ``frame`` is already as :func:`normalize_frame` makes it: its columns
    :data:`COLUMNS` in order, int64 steps, float64 values, and text in pandas' string
    dtype (one that holds only text, as :func:`text_column` makes it where pandas keeps
    text in Arrow). ``frame`` may be the dict of arrays a frame is about to be made of
    (what a flush checks: the arrays' dtypes are what the frame's columns get, read
    without pandas making a Series per column). A flush builds its frames so; converting
    them again (a column selection and four ``astype``) was a quarter of a flush."""
    text = _text_dtype()
    if not isinstance(text, pd.StringDtype) or list(frame) != COLUMNS:
        return False
    dtypes = [getattr(frame[c], "dtype", None) for c in COLUMNS]
    return dtypes == [np.dtype(np.int64), text, text, np.dtype(np.float64)]


@cache
def _text_dtype() -> Any:
    """What ``astype(str)`` makes of text in this pandas (≥ 3: an Arrow-backed string)."""
    return pd.Series(["a"]).astype(str).dtype


def text_column(vocabulary: Sequence[str], codes: np.ndarray) -> Any:
    """``vocabulary[codes]`` as the text column :func:`normalize_frame` makes. Where pandas
    keeps text in Arrow, one ``take`` in C++ rather than a Python string per row, which
    ``astype(str)`` converts one by one (~10× slower: most of a Probe's flush)."""
    dtype = _text_dtype()
    if isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow":
        import pyarrow as pa

        words = pa.array(list(vocabulary), type=pa.large_string())
        return pd.array(words.take(pa.array(codes)), dtype=dtype)
    return np.asarray(list(vocabulary), dtype=object)[codes]


def empty_frame() -> pd.DataFrame:
    return normalize_frame(pd.DataFrame({c: [] for c in COLUMNS}))


class NonFinite(NamedTuple):
    """Where a NaN/Inf first appears: ``(step, name, stat)``.

    ``stat`` says where: ``nonfinite`` on a module is its forward output (on a parameter,
    its ``.grad``); ``error_gain`` is the module's own backward (dL/d(output) finite,
    its share of dL/d(input) not: the module's backward made it); ``error_nonfinite``
    is dL/d(output) itself, non-finite as it reached the module from above (the loss,
    or code between the module and the next probed one).
    """

    step: int
    name: str
    stat: str

    @property
    def origin(self) -> str:
        """``forward`` or ``backward``: which pass produced the first NaN/Inf."""
        return "forward" if self.stat == "nonfinite" else "backward"


class Run:
    """Meta and long-form statistics of one run: ``frame()`` has step, name, stat, value."""

    def __init__(self, meta: dict[str, Any], frame: pd.DataFrame, path: Path | None = None) -> None:
        self.meta = meta
        self.path = path
        self._frame = frame.reset_index(drop=True)

    # ---------------------------------------------------------------- views
    def frame(self) -> pd.DataFrame:
        """The long-form table: one row per step, name and statistic."""
        return self._frame.copy()

    @property
    def name(self) -> str:
        return str(self.meta.get("label") or (self.path.name if self.path else "run"))

    @property
    def empty(self) -> bool:
        return self._frame.empty

    @property
    def steps(self) -> np.ndarray:
        return np.unique(self._frame["step"].to_numpy())

    @property
    def stats(self) -> list[str]:
        return sorted(self._frame["stat"].unique().tolist())

    @property
    def modules(self) -> list[str]:
        """Probed modules in forward execution order (input first)."""
        return list(
            self.meta.get("execution_order") or [m["name"] for m in self.meta.get("modules", [])]
        )

    @property
    def parameters(self) -> list[str]:
        return [p["name"] for p in self.meta.get("parameters", [])]

    def module_info(self, name: str) -> dict[str, Any]:
        for m in self.meta.get("modules", []):
            if m["name"] == name:
                return m
        return {}

    def table(self, stat: str, names: list[str] | None = None) -> pd.DataFrame:
        """A wide view of one statistic: rows are steps, columns names in model order."""
        sub = self._frame[self._frame["stat"] == stat]
        wide = sub.pivot_table(index="step", columns="name", values="value", aggfunc="last")
        order = names if names is not None else self._ordered(list(wide.columns))
        return wide.reindex(columns=[n for n in order if n in wide.columns])

    def model_series(self, stat: str) -> pd.Series:
        """A run-level statistic (recorded under ``(model)``: global norms, clipped,
        skipped) by step; empty where it was not recorded."""
        from .stats import MODEL_NAME

        f = self._frame
        sub = f[(f["name"] == MODEL_NAME) & (f["stat"] == stat)]
        return pd.Series(
            sub["value"].to_numpy(dtype=float), index=sub["step"].to_numpy()
        ).sort_index()

    def _ordered(self, names: list[str]) -> list[str]:
        rank = {n: i for i, n in enumerate(self.modules + self.parameters)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))

    def first_nonfinite(self) -> NonFinite | None:
        """Where the first NaN/Inf was born (a :class:`NonFinite`), or ``None``.

        The earliest step; in it, forward outputs first, in execution order (a NaN born
        in forward makes everything after it non-finite). Then the backward pass, from
        the loss down (reverse forward order): the first module whose dL/d(output) is
        non-finite (``error_nonfinite``: it arrived so), or whose dL/d(output) is finite
        but its own share of dL/d(input) is not (a non-finite ``error_gain``: its
        backward made it, as autograd's anomaly mode would say). Parameters last.
        """
        f = self._frame
        values = f["value"].to_numpy(dtype=float)
        counted = f["stat"].isin(["nonfinite", "error_nonfinite"]).to_numpy() & (values > 0)
        input_side = (f["stat"] == "error_gain").to_numpy() & ~np.isfinite(values)
        bad = f[counted | input_side]
        if bad.empty:
            return None
        step = int(bad["step"].min())
        at = bad[bad["step"] == step]
        order = {n: i for i, n in enumerate(self.modules)}
        forward = [n for n in at[at["stat"] == "nonfinite"]["name"] if n in order]
        if forward:
            return NonFinite(step, min(forward, key=order.__getitem__), "nonfinite")
        arrived = set(at[at["stat"] == "error_nonfinite"]["name"])
        made = set(at[at["stat"] == "error_gain"]["name"])
        backward = (arrived | made) & order.keys()
        if backward:
            name = max(backward, key=order.__getitem__)  # the nearest the loss
            return NonFinite(step, name, "error_nonfinite" if name in arrived else "error_gain")
        row = at.iloc[0]
        return NonFinite(step, str(row["name"]), str(row["stat"]))

    # ---------------------------------------------------------------- display
    def __repr__(self) -> str:
        where = f" at {str(self.path)!r}" if self.path else ""
        return (
            f"Run({self.name!r}{where}: {len(self.steps)} steps, {len(self.modules)} modules, "
            f"{len(self._frame)} rows)"
        )

    def plot(
        self,
        name: str = "gradient_flow",
        *,
        ax: Axes | None = None,
        size: tuple[float, float] | None = None,
        **options: Any,
    ) -> Figure:
        """Figure ``name`` of :data:`gradprobe.plots.PLOTS` for this run.

        ``gradient_flow``, ``error_heatmap``, ``activation_histograms``, ``dead_saturated``,
        ``update_ratios``, ``clipping`` or ``loss``. Returns a matplotlib ``Figure`` (a
        notebook shows it inline when it is a cell's value; ``fig.savefig(path)`` writes it);
        with ``ax``, draws on that axes. ``options`` go to the plot (e.g. ``steps=[0, 100]``).
        An unknown name, or a statistic the run did not record, raises
        :class:`GradprobeError`.
        """
        # gradprobe.plots.draw, found by name: matplotlib on first use only, never at import
        return view("plot")(name, self, ax=ax, size=size, **options)

    def _repr_html_(self) -> str:
        """The run in a notebook: findings, key numbers, a gradient-flow figure, a layer table.

        Self-contained (the figure is an inline PNG, no scripts, no external files) and
        bounded in size whatever the run's. Each part that cannot be drawn is replaced by
        one line saying why; should anything else fail, a plain-text repr and the reason.
        Jupyter prints a traceback instead of the output when this raises: it never does.
        Drawn by :func:`gradprobe.html.run_html`, found by name (a run does not import views).
        """
        try:
            return view("run_html")(self)
        except Exception as exc:  # a display must never raise into Jupyter
            return _html_fallback(self, exc)


def _html_fallback(run: Run, exc: BaseException) -> str:
    """The plain-text repr, and one line saying why the HTML could not be made."""
    from html import escape

    try:
        text = repr(run)
    except Exception:  # a repr that fails too: the object's own
        text = object.__repr__(run)
    return (
        f"<pre>{escape(text)}</pre>"
        f"<p>gradprobe could not show this run as HTML ({escape(reason(exc))})</p>"
    )


def load(path: str | os.PathLike[str]) -> Run:
    """Read the run directory ``path`` written by ``Probe(store=path)``."""
    root = Path(path)
    if not root.exists():
        raise GradprobeError(
            f"no run at {str(root)!r}: the path does not exist", "give a run directory"
        )
    if not root.is_dir():
        raise GradprobeError(
            f"{str(root)!r} is a file, not a run directory",
            "give the directory that Probe(store=...) wrote",
        )
    meta_path = root / "meta.json"
    if not meta_path.exists():
        raise GradprobeError(
            f"{str(root)!r} is not a gradprobe run (no meta.json)",
            "give the directory that Probe(store=...) wrote",
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GradprobeError(
            f"{str(meta_path)!r} is not valid JSON ({exc})", "the run is damaged"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GradprobeError(
            f"{str(meta_path)!r} is not a gradprobe run's meta.json",
            "give the directory that Probe(store=...) wrote",
        )
    parts = sorted((root / "stats").glob(PART_GLOB))
    frames = [_read_part(p) for p in parts]
    frame = pd.concat(frames, ignore_index=True) if frames else empty_frame()
    return Run(meta, frame, path=root)


def _read_part(part: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(part)
    except (pa.ArrowException, OSError) as exc:
        raise GradprobeError(
            f"the part {str(part)!r} is corrupt ({type(exc).__name__})",
            "delete that file to load the rest of the run",
        ) from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise GradprobeError(
            f"the part {str(part)!r} lacks the columns {missing}", "it was not written by gradprobe"
        )
    return normalize_frame(table.select(COLUMNS).to_pandas())

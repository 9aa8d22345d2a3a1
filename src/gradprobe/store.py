"""Store: a run directory, streamed to disk, that survives being killed at any moment.

Layout::

    RUN/meta.json                 what was probed, how, with which versions; rewritten atomically
    RUN/stats/part-00000.parquet  long-form rows (step, name, stat, value), one part per flush

Every file is written under a temporary name in the same directory and renamed
into place (``os.replace`` is atomic on POSIX and Windows), so a reader sees either
a whole part or none: a run killed mid-way keeps every flushed step.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import GradprobeError

__all__ = ["FORMAT", "FORMAT_VERSION", "Store", "write_json_atomic"]

FORMAT = "gradprobe-run"
FORMAT_VERSION = 1
PART_GLOB = "part-*.parquet"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_directory(path: Path) -> None:
    """A store path must be a directory we can write, empty or holding an earlier run."""
    if path.exists() and not path.is_dir():
        raise GradprobeError(
            f"store path {str(path)!r} is a file, not a directory",
            "give a directory for the run (it is created if missing)",
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GradprobeError(
            f"cannot create the run directory {str(path)!r} ({exc.strerror})",
            "choose a directory you can write to",
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise GradprobeError(
            f"the run directory {str(path)!r} is not writable",
            "choose a directory you can write to",
        )
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if entries and not (path / "meta.json").exists():
        raise GradprobeError(
            f"{str(path)!r} is not empty and holds no gradprobe run",
            "give a new or empty directory, or the directory of an earlier run to replace it",
        )


class Store:
    """Writes one run directory: ``meta.json`` and atomic parquet parts."""

    def __init__(self, path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
        self.path = Path(path)
        _check_directory(self.path)
        self.stats_dir = self.path / "stats"
        self.stats_dir.mkdir(exist_ok=True)
        # A directory that held an earlier run is replaced, not mixed with it.
        for old in self.stats_dir.glob(PART_GLOB):
            old.unlink()
        self.parts = 0
        self.meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **meta,
            "status": "running",
        }
        try:
            write_json_atomic(self.path / "meta.json", self.meta)
        except OSError as exc:
            raise GradprobeError(
                f"cannot write to the run directory {str(self.path)!r} ({exc.strerror})",
                "choose a directory you can write to",
            ) from None

    def append(self, frame: pd.DataFrame) -> Path | None:
        """Write ``frame`` (columns step, name, stat, value) as the next part."""
        if frame.empty:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        # Names and statistics repeat on every row: dictionary-encode them.
        for column in ("name", "stat"):
            i = table.schema.get_field_index(column)
            table = table.set_column(i, column, table.column(column).dictionary_encode())
        final = self.stats_dir / f"part-{self.parts:05d}.parquet"
        tmp = self.stats_dir / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        self.parts += 1
        return final

    def update_meta(self, **fields: Any) -> None:
        self.meta.update(fields)
        write_json_atomic(self.path / "meta.json", self.meta)

    def close(self, **fields: Any) -> None:
        self.update_meta(**fields, status="closed")

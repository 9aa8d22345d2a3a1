"""The command line's argument checks: each turns a bad value into one clear line
(:class:`~gradprobe.errors.GradprobeError`) before a command does any work, and a
command's output is removed if it fails part-way. Light: no torch, pandas or matplotlib
(`gradprobe --help` must not pay for them)."""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import GradprobeError


def _as_path(text: str, option: str) -> Path:
    if not text or not text.strip() or "\0" in text:
        raise GradprobeError(f"{option} got an empty or invalid path {text!r}", "give a path")
    return Path(text)


def _first_existing(path: Path) -> Path:
    """The path itself or its nearest ancestor that exists: where creation would start."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate
    return Path(path.absolute().anchor)


def _check_can_create_in(folder: Path, target: Path, option: str) -> None:
    """``folder`` (an existing ancestor of ``target``) must be a directory we can write in.

    Permission bits do not stop root (os.access says yes under /proc), so the check
    opens an anonymous temporary file there: nothing visible is created, and it fails
    exactly where creating the real file would.
    """
    if not folder.is_dir():
        raise GradprobeError(
            f"cannot create {option} {str(target)!r}: {str(folder)!r} is a file, not a folder",
            "choose a path under a folder",
        )
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise GradprobeError(
            f"cannot write {option} {str(target)!r}: {str(folder)!r} is not writable "
            f"({exc.strerror or exc})",
            "choose a folder you can write to",
        ) from None


def output_dir(text: str, option: str) -> Path:
    """A folder to write into: an existing writable folder, or one that can be created."""
    path = _as_path(text, option)
    if path.exists() and not path.is_dir():
        raise GradprobeError(
            f"{option} {text!r} is a file, not a folder", f"give a folder, e.g. {option} results"
        )
    _check_can_create_in(_first_existing(path), path, option)
    return path


def output_file(text: str, option: str, *, example: str = "out.html") -> Path:
    """A file to write: not a folder, in a folder that exists or can be created."""
    path = _as_path(text, option)
    if path.is_dir():
        raise GradprobeError(
            f"{option} {text!r} is a folder, not a file",
            f"give a file name in it, e.g. {option} {str(path / example)!r}",
        )
    _check_can_create_in(_first_existing(path.parent), path, option)
    return path


def existing_run_dir(text: str, option: str = "RUN") -> Path:
    """A run directory written by ``Probe(store=...)``: a folder holding meta.json."""
    path = _as_path(text, option)
    hint = "give a run directory written by Probe(store=...)"
    if not path.exists():
        raise GradprobeError(f"{option} {text!r} does not exist", hint)
    if not path.is_dir():
        raise GradprobeError(f"{option} {text!r} is a file, not a run directory", hint)
    if not (path / "meta.json").is_file():
        raise GradprobeError(f"{option} {text!r} is not a run directory (no meta.json)", hint)
    return path


def whole_number(
    text: str, option: str, *, minimum: int, maximum: int | None = None, example: int = 1
) -> int:
    """An integer from ``minimum`` to ``maximum`` given as text; anything else is an error."""
    allowed = f"≥ {minimum}" if maximum is None else f"from {minimum} to {maximum}"
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        raise GradprobeError(
            f"{option} must be a whole number {allowed}, got {text!r}", f"e.g. {option} {example}"
        )
    return value


def positive_int(text: str, option: str, *, example: int = 2) -> int:
    """A count: a whole number ≥ 1."""
    return whole_number(text, option, minimum=1, example=example)


def non_negative_int(text: str, option: str, *, maximum: int | None = None) -> int:
    """A seed or an index: a whole number ≥ 0."""
    return whole_number(text, option, minimum=0, maximum=maximum, example=0)


def finite_float(
    text: str, option: str, *, what: str = "", minimum: float | None = None, example: str = "1"
) -> float:
    """A finite number (not nan/inf), ≥ ``minimum`` if given; ``what`` names it for the reader."""
    named = f"{option} ({what})" if what else option
    allowed = "a finite number" + (f" ≥ {minimum:g}" if minimum is not None else "")
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise GradprobeError(f"{named} must be {allowed}, got {text!r}", f"e.g. {option} {example}")
    return value


@contextlib.contextmanager
def _removed_on_failure(path: Path) -> Iterator[None]:
    """If the command fails, remove what it created at ``path`` (and any folders above it).

    Only what did not exist before is removed: a folder the user already had is kept.
    """
    created: Path | None = None
    if not path.exists():
        created = path.absolute()
        while not created.parent.exists():
            created = created.parent
    try:
        yield
    except BaseException:
        if created is not None and created.is_dir():
            shutil.rmtree(created, ignore_errors=True)
        elif created is not None:
            created.unlink(missing_ok=True)
        raise

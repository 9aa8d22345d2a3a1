"""The one user-facing error type.

Anything the user can fix (a path that is not a run, an unknown activation, a
negative variance, ``every=0``) raises :class:`GradprobeError` with what is wrong
and what to do. The CLI prints it as one line and exits non-zero; library users
get an ordinary exception (a ``ValueError``, so generic handlers still catch it).
"""

from __future__ import annotations

__all__ = ["GradprobeError"]


class GradprobeError(ValueError):
    """A problem with the user's input: ``message`` says what, ``hint`` what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}: {hint}" if hint else message)

    def one_line(self) -> str:
        """The single line the CLI prints."""
        return f"error: {self}"

"""The one user-facing error type.

Anything the user can fix (a path that is not a run, an unknown activation, a
negative variance, ``every=0``) raises :class:`GradprobeError` with what is wrong
and what to do. The CLI prints it as one line and exits non-zero; library users
get an ordinary exception (a ``ValueError``, so generic handlers still catch it).
"""

from __future__ import annotations

__all__ = ["GradprobeError", "StopTraining"]


class GradprobeError(ValueError):
    """A problem with the user's input: ``message`` says what, ``hint`` what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}: {hint}" if hint else message)

    def one_line(self) -> str:
        """The single line the CLI prints."""
        return f"error: {self}"


class StopTraining(Exception):
    """Raised only when asked: ``Probe(..., stop_on=("nonfinite",))`` raises it from the step
    boundary (``optimizer.step()`` or ``probe.step()``) whose flush saw such a finding.

    ``finding`` is the :class:`~gradprobe.Finding` (``finding.evidence["step"]`` is the step
    it was seen at). The step that raised it has been taken: the optimizer has updated the
    weights. The Probe keeps working; catch it around the training loop, save what you
    need, and stop (or go on: it is raised once). The Lightning and Hugging Face callbacks
    never raise it: their ``stop_on`` asks the trainer to stop.
    """

    def __init__(self, finding: object) -> None:
        self.finding = finding
        super().__init__(f"gradprobe stopped training: {getattr(finding, 'summary', finding)}")

"""What the step applies: kept at this path; the component is :mod:`gradprobe.recording.follow`."""

from __future__ import annotations

from .recording.follow import Follow, model_signature

__all__ = ["Follow", "model_signature"]

"""A :class:`Finding`: one diagnosed problem, as data.

It lives in the base layer because both sides use it: the analysis that makes findings
(:mod:`gradprobe.diagnose`, which re-exports it with the rest of the findings model) and
the recording engine, whose ``on_finding`` callback receives them during training, and
which must not import the analysis layer above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["Finding", "Remedy"]


class Remedy(Protocol):
    """What a finding's remedies are (:class:`gradprobe.remedies.RankedRemedy`): named
    here by their one use, so that this layer imports nothing of the remedies'."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Finding:
    """One diagnosed problem: what (``kind``), how bad, where (``names``), the numbers, the fixes."""

    kind: str
    severity: str
    names: tuple[str, ...]
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remedies: tuple[Remedy, ...] = ()  # RankedRemedy, ranked for this finding
    # The story (gradprobe.story): the kind of the root finding that explains this one
    # (None: it is a root), and, for a root, the kinds it explains.
    cause: str | None = None
    consequences: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (see :data:`gradprobe.diagnose.FINDINGS_JSON_SCHEMA`)."""
        return {
            "kind": self.kind,
            "severity": self.severity,
            "names": list(self.names),
            "summary": self.summary,
            "evidence": _jsonable(self.evidence),
            "remedies": [r.to_dict() for r in self.remedies],
            "cause": self.cause,
            "consequences": list(self.consequences),
        }


def _jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become None (JSON has no NaN/Inf)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value if value is None or isinstance(value, str) else str(value)

"""The findings model: a :class:`Finding`, the :class:`Findings` of a run, their order
(:data:`SEVERITIES`, :data:`KIND_ORDER`), the JSON schema, and the note an empty diagnosis shows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from html import escape
from typing import Any

from .._views import view
from ..finding import Finding

SEVERITIES = ("info", "warning", "critical")
_SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}
# Within one severity, causes before consequences.
KIND_ORDER = (
    "nonfinite",
    "exploding",
    "vanishing",
    "saturation",
    "dead_units",
    "dead_channels",
    "stalled",
    "unstable_updates",
    "skipped_steps",
    "clipped",
    "unused_parameters",
    # Inside the Transformer: causes of the unstable training below them.
    "attention_logit_growth",
    "output_logit_divergence",
    "attention_entropy_collapse",
    "rank_collapse",
    "divergence",
    "grad_norm_spike",
    "loss_instability",
    "loss_spike",
    "oscillation",
    "plateau",
)


# ---------------------------------------------------------------- findings
# Finding itself is in the base layer (gradprobe/finding.py): the Probe hands findings to
# on_finding while recording, below this layer. It is re-exported here, as before.


@dataclass(frozen=True)
class Checked:
    """What a diagnosis looked at: recorded steps, probed modules, statistics, detectors run."""

    steps: int
    modules: int
    statistics: tuple[str, ...]
    detectors: tuple[str, ...]


class Findings(list):  # list[Finding]; a plain list subclass so it prints and compares as one
    """The findings of one run, most severe first; shows as a table in a notebook.

    ``run_name`` names the run; ``skipped`` maps detectors that could not run to why
    (a statistic that was not recorded); ``checked`` says what :func:`diagnose` looked
    at (:class:`Checked`), so that an empty list can say what "no problems" covers.
    """

    def __init__(
        self,
        items: Iterable[Finding] = (),
        *,
        run_name: str = "",
        skipped: dict[str, str] | None = None,
        checked: Checked | None = None,
    ) -> None:
        super().__init__(items)
        self.run_name = run_name
        self.skipped = dict(skipped or {})
        self.checked = checked

    @property
    def kinds(self) -> list[str]:
        return [f.kind for f in self]

    def of(self, kind: str) -> Finding | None:
        """The finding of that kind, if any."""
        return next((f for f in self if f.kind == kind), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run_name,
            "findings": [f.to_dict() for f in self],
            "skipped": dict(self.skipped),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def _repr_html_(self) -> str:
        """The findings in a notebook: a table with their numbers and remedies; never raises
        (Jupyter would print a traceback): on failure, the plain repr and the reason."""
        try:
            return view("findings_html")(self)  # gradprobe.html: data does not import views
        except Exception as exc:  # a display must never raise into Jupyter
            return (
                f"<pre>{escape(list.__repr__(self))}</pre><p>gradprobe could not show these "
                f"findings as HTML ({escape(type(exc).__name__)}: {escape(str(exc))})</p>"
            )


def _statistic_names(names: Iterable[str]) -> list[str]:
    """Statistic names for a sentence: the histogram bins ``hist_00``… as one entry."""
    names = list(names)
    bins = [n for n in names if n.startswith("hist_")]
    shown = [n for n in names if not n.startswith("hist_")]
    if bins:
        shown.append(f"hist_* ({len(bins)} bins)")
    return shown


def no_findings_note(findings: Findings) -> str:
    """The sentence shown when nothing was found: what was checked, and what could not be.

    One text for the report (:func:`findings_html`) and ``gradprobe diagnose``, so that
    "no problems found" always says what it covers.
    """
    note = "no problems found"
    checked = findings.checked
    if checked is not None:
        statistics = _statistic_names(checked.statistics)
        note += (
            f" in {checked.steps} recorded step{'s' if checked.steps != 1 else ''}"
            f" of {checked.modules} module{'s' if checked.modules != 1 else ''}:"
            f" {len(checked.detectors)} detectors ({', '.join(checked.detectors)})"
            f" checked {len(statistics)} statistics ({', '.join(statistics)})"
        )
    if findings.skipped:
        note += (
            f"; {len(findings.skipped)} checks skipped ("
            + "; ".join(f"{k}: {v}" for k, v in findings.skipped.items())
            + ")"
        )
    return note


# ---------------------------------------------------------------- JSON schema
FINDINGS_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "gradprobe diagnose --json",
    "type": "object",
    "required": ["run", "findings", "skipped"],
    "additionalProperties": False,
    "properties": {
        "run": {"type": "string"},
        "skipped": {"type": "object", "additionalProperties": {"type": "string"}},
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["kind", "severity", "names", "summary", "evidence", "remedies"],
                "additionalProperties": False,
                "properties": {
                    "kind": {"type": "string", "enum": list(KIND_ORDER)},
                    "severity": {"type": "string", "enum": list(SEVERITIES)},
                    "names": {"type": "array", "items": {"type": "string"}},
                    "summary": {"type": "string", "minLength": 1},
                    "evidence": {"type": "object"},
                    "cause": {"enum": [*KIND_ORDER, None]},  # a kind, or null for a root
                    "consequences": {
                        "type": "array",
                        "items": {"type": "string", "enum": list(KIND_ORDER)},
                    },
                    "remedies": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["key", "name", "why", "code", "score", "fit"],
                            "additionalProperties": False,
                            "properties": {
                                "key": {"type": "string"},
                                "name": {"type": "string"},
                                "why": {"type": "string"},
                                "code": {"type": "string"},
                                "score": {"type": "number"},
                                "fit": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}

"""HTML views: findings and runs in a notebook, and the findings table of the report.

The data objects (:class:`~gradprobe.run.Run`, :class:`~gradprobe.diagnose.Findings`)
reach these through :mod:`gradprobe._views` by name, at call time: a view imports the
data it shows, never the other way round. Every fragment is self-contained (inline CSS
scoped under ``.gp-run``, figures as inline PNG), and a notebook view never raises.
"""

from __future__ import annotations

import base64
import io
import re
import warnings
from html import escape
from typing import Any

import numpy as np
import pandas as pd

from ._views import reason
from .diagnose import Findings, diagnose, key_numbers, no_findings_note
from .plots import draw, missing  # matplotlib itself on first use (gradprobe._mpl)
from .run import Run
from .story import headline

__all__ = [
    "KEY_COLUMNS",
    "NOTEBOOK_CSS",
    "findings_html",
    "findings_notebook_html",
    "inline_code",
    "run_html",
]

# The key numbers of a run (gradprobe.diagnose.key_numbers) as the report's comparison
# table and a notebook label them.
KEY_COLUMNS: dict[str, str] = {
    "steps": "recorded steps",
    "first_last_error_ratio": "error ratio first/last layer",
    "error_factor_per_layer": "error factor per layer",
    "max_dead_frac": "max dead fraction",
    "max_sat_frac": "max saturated fraction",
    "median_update_ratio": "median update ratio",
}

_INLINE_CODE = re.compile(r"`([^`\n]+)`")

# The look of findings and runs in a notebook (Findings/Run._repr_html_): every selector
# under .gp-run, so it styles gradprobe's output and nothing else on the page.
NOTEBOOK_CSS = """<style>
.gp-run table.gp-findings,.gp-run table.gp-table{border-collapse:collapse;font-size:12px;margin:4px 0}
.gp-run th,.gp-run td{border:1px solid #dde1e6;padding:3px 6px;text-align:left;vertical-align:top}
.gp-run td.gp-num{text-align:right;font-variant-numeric:tabular-nums}
.gp-run .gp-findings ol{margin:0;padding-left:16px}
.gp-run .gp-sev{padding:0 6px;border-radius:8px;font-weight:600;color:#fff;background:#2e86c1}
.gp-run .gp-critical .gp-sev{background:#c0392b}.gp-run .gp-warning .gp-sev{background:#d68910}
.gp-run .gp-note,.gp-run .gp-none{color:#5a6572;font-size:12px}
.gp-run h4{margin:10px 0 4px}
</style>"""


def inline_code(text: str) -> str:
    """``text`` as HTML: escaped first, then each Markdown backtick span as ``<code>``.

    Only backtick spans are rendered (finding summaries quote names as `fc1`); any other
    markup in the text stays text.
    """
    return _INLINE_CODE.sub(r"<code>\1</code>", escape(text))


def _code_html(code: str) -> str:
    """A remedy's code: one line inline, several in ``<pre>`` (their line breaks kept)."""
    if "\n" in code.strip():
        return f'<pre class="gp-code">{escape(code.strip())}</pre>'
    return f"<br><code>{escape(code)}</code>"


def findings_html(findings: Findings, *, remedies: int = 3, lead: bool = True) -> str:
    """An HTML table of findings (severity, kind, where, summary, top remedies), each
    consequence marked with the finding it follows from; ``lead``: above it, the story's
    head (the root cause, its one recommended action with its code, what it explains)."""
    if not findings:
        return f'<p class="gp-none">{inline_code(no_findings_note(findings))}</p>'
    rows = []
    head = _lead_html(findings) if lead else ""
    for f in findings:
        where = ", ".join(f"<code>{escape(n)}</code>" for n in f.names[:6])
        if len(f.names) > 6:
            where += f" … (+{len(f.names) - 6})"
        fixes = "".join(
            f"<li><b>{escape(r.name)}</b>: {inline_code(r.why)}{_code_html(r.code)}</li>"
            for r in f.remedies[:remedies]
        )
        because = f"<br><small>follows from <b>{escape(f.cause)}</b></small>" if f.cause else ""
        rows.append(
            f'<tr class="gp-{escape(f.severity)}"><td><span class="gp-sev">{escape(f.severity)}</span></td>'
            f"<td><b>{escape(f.kind)}</b>{because}</td><td>{where}</td><td>{inline_code(f.summary)}</td>"
            f"<td><ol>{fixes}</ol></td></tr>"
        )
    return (
        head
        + '<table class="gp-findings"><thead><tr><th>severity</th><th>finding</th><th>where</th>'
        "<th>what was measured</th><th>remedies, best first</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _lead_html(findings: Findings) -> str:
    """The story's head: the root cause, its one recommended action, its consequences."""
    head = headline(findings)
    root = head.root
    if root is None:
        return ""
    action = ""
    if head.action is not None:
        r = head.action
        action = (
            f"<br>Do this first: <b>{escape(r.name)}</b>: {inline_code(r.why)}"
            f"<pre>{escape(r.code)}</pre>"
        )
    under = [f.kind for f in head.consequences]
    follows = "<br>It explains: " + ", ".join(f"<b>{escape(k)}</b>" for k in under) if under else ""
    return (
        f'<p class="gp-lead">Root cause: <b>{escape(root.kind)}</b> ({escape(root.severity)}): '
        f"{inline_code(root.summary)}{action}{follows}</p>"
    )


def findings_notebook_html(findings: Findings) -> str:
    """Findings in a notebook (``Findings._repr_html_``): the run's name, a count, the table."""
    count = f"{len(findings)} finding{'s' if len(findings) != 1 else ''}"
    name = findings.run_name
    head = f"<p><b>{escape(name)}</b>: {count}</p>" if name else ""
    return f'{NOTEBOOK_CSS}<div class="gp-run">{head}{findings_html(findings)}</div>'


# ---------------------------------------------------------------- a run in a notebook


# What a notebook shows of a run (Run._repr_html_): bounded whatever the run's size.
_HTML_MAX_ROWS = 30  # layers in the per-layer table; a note says how many more there are
_HTML_FIGURE_SIZE = (6.0, 3.0)  # inches
_HTML_FIGURE_DPI = 80  # 480 × 240 px: a PNG of some tens of kB
# Per-module columns, in this order, where recorded (not the histogram bins), then those
# of the module's weight.
_HTML_MODULE_STATS = ("error_norm", "error_gain", "act_mean", "act_std", "sat_frac", "dead_frac")
_HTML_WEIGHT_STATS = ("grad_norm", "update_ratio")
_HTML_STATS = _HTML_MODULE_STATS + _HTML_WEIGHT_STATS


def run_html(run: Run) -> str:
    """A run in a notebook (``Run._repr_html_``): findings, key numbers, a gradient-flow
    figure, a layer table; each part that fails is one line saying why (the caller turns
    any other failure into the plain repr)."""
    parts = [NOTEBOOK_CSS, '<div class="gp-run">', run_head(run)]
    if run.empty:
        parts.append('<p class="gp-note">nothing recorded yet</p>')
    else:
        for title, section in (
            ("Findings", run_findings),
            ("Key numbers", run_key_numbers),
            ("Gradient flow", run_gradient_flow),
            (None, run_layers),
        ):
            if title:
                parts.append(f"<h4>{title}</h4>")
            parts.append(_html_section(section, run, title or "per-layer table"))
    parts.append("</div>")
    return "".join(parts)


def run_head(run: Run) -> str:
    """The run's name, where it is, and how many steps, modules and parameters it holds."""
    steps = run.steps
    span = f" ({steps[0]}–{steps[-1]})" if len(steps) > 1 else ""
    where = f" <code>{escape(str(run.path))}</code>" if run.path else ""
    return (
        f"<p><b>{escape(run.name)}</b>{where}: {len(steps)} recorded "
        f"step{'s' if len(steps) != 1 else ''}{span}, {len(run.modules)} modules, "
        f"{len(run.parameters)} parameters</p>"
    )


def run_findings(run: Run) -> str:
    """The run's findings as a table (its diagnosis, made now)."""
    return findings_html(diagnose(run))


def run_key_numbers(run: Run) -> str:
    """The key numbers of the run (gradprobe.diagnose.key_numbers), one row."""
    numbers = key_numbers(run)
    head = "".join(f"<th>{escape(KEY_COLUMNS.get(k, k))}</th>" for k in numbers)
    cells = "".join(f'<td class="gp-num">{_number(v)}</td>' for v in numbers.values())
    return f'<table class="gp-table"><tr>{head}</tr><tr>{cells}</tr></table>'


def run_gradient_flow(run: Run) -> str:
    """The gradient-flow figure as a small inline PNG, or one line saying why there is none."""
    note = missing("gradient_flow", run)
    if note is not None:
        return f'<p class="gp-note">{escape(note)}</p>'
    fig = draw("gradient_flow", run, size=_HTML_FIGURE_SIZE)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # Long layer names can crowd this small figure; the figure is still drawn,
        # and a warning under every displayed run would be noise.
        warnings.filterwarnings("ignore", "constrained_layout not applied", UserWarning)
        fig.savefig(buf, format="png", dpi=_HTML_FIGURE_DPI)
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="gradient flow of {escape(run.name)}" src="data:image/png;base64,{png}">'


def run_layers(run: Run) -> str:
    """Each probed module at the last step: its statistics and its weight's, one row."""
    f = run.frame()
    last = int(f["step"].max())
    at = f[(f["step"] == last) & f["stat"].isin(_HTML_STATS)]
    wide = at.pivot_table(index="name", columns="stat", values="value", aggfunc="last")
    modules = [n for n in run.modules if n in wide.index]
    shown = modules[:_HTML_MAX_ROWS]
    table = pd.DataFrame(index=pd.Index(shown, name="module"))
    for stat in _HTML_MODULE_STATS:
        if stat in wide.columns:
            table[stat] = wide[stat].reindex(shown).to_numpy()
    for stat in _HTML_WEIGHT_STATS:  # a module's weight, on the module's row
        if stat in wide.columns:
            weights = [f"{n}.weight" if n else "weight" for n in shown]
            table[f"weight {stat}"] = wide[stat].reindex(weights).to_numpy()
    note = (
        f'<p class="gp-note">the first {len(shown)} of {len(modules)} modules; '
        "<code>run.table(stat)</code> has them all</p>"
        if len(modules) > len(shown)
        else ""
    )
    html = table.reset_index().to_html(
        index=False, float_format=lambda v: f"{v:.3g}", na_rep="", classes="gp-table", border=0
    )
    return (
        f"<details><summary>Each module at the last recorded step ({last})</summary>"
        f"{html}{note}</details>"
    )


def _number(value: float) -> str:
    """A number for a table cell: 3 significant digits, whole counts whole, NaN as a dash."""
    if not np.isfinite(value):
        return "–" if np.isnan(value) else str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def _html_section(section: Any, run: Run, what: str) -> str:
    """One part of a run's HTML, or one line saying why it could not be made."""
    try:
        return section(run)
    except Exception as exc:  # one part failing must not hide the others
        return f'<p class="gp-note">{escape(what)} not shown: {escape(reason(exc))}</p>'

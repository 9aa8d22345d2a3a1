"""The lab report: one self-contained HTML page, one section per experiment.

Each section shows the question, the comparison table, the figures (PNG embedded as
base64, so the file needs nothing else and loads no network resource), the computed
verdict and the citation.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .._version import __version__

if TYPE_CHECKING:
    from .experiment import ExperimentResult

__all__ = ["render_lab_report", "write_lab_report"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-top:1px solid #ccc;padding-top:1em}
table{border-collapse:collapse;font-size:12px;margin:.8em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right} th{background:#f4f4f4}
.verdict{padding:.6em 1em;border-radius:6px;white-space:pre-line}
.agree{background:#e9f7ef;border-left:5px solid #2e8b57}
.disagree{background:#fdf0e6;border-left:5px solid #d2691e}
.q{font-style:italic} .cite{font-size:13px;color:#555}
img{max-width:100%;margin:.3em 0} .meta{font-size:12px;color:#666}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _section(o: ExperimentResult) -> str:
    e, v = o.experiment, o.verdict
    cls = "agree" if v.agrees_with_source else "disagree"
    table = o.table.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–", border=0)
    figs = "".join(_img(p) for p in o.figures if p.exists())
    return (
        f'<section id="{html.escape(e.name)}"><h2>{html.escape(e.title)} '
        f"<small>({html.escape(e.name)})</small></h2>"
        f'<p class="q">{html.escape(e.question)}</p>'
        f'<div class="verdict {cls}">{html.escape(v.text)}</div>'
        f"{table}{figs}"
        + (f"<p>{html.escape(e.notes)}</p>" if e.notes else "")
        + f'<p class="cite">Source: {html.escape(e.citation)}</p>'
        f'<p class="meta">mode {html.escape(o.mode)}, {len(o.results)} runs, '
        f"{o.seconds:.1f} s wall</p></section>"
    )


def render_lab_report(outcomes: Sequence[ExperimentResult]) -> str:
    """The report as an HTML string."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = "".join(
        f'<tr><td style="text-align:left"><a href="#{html.escape(o.experiment.name)}">'
        f"{html.escape(o.experiment.name)}</a></td>"
        f"<td>{'agrees' if o.verdict.agrees_with_source else 'disagrees'}</td>"
        f"<td>{o.verdict.seeds_agree}/{o.verdict.seeds_total}</td><td>{o.seconds:.1f}</td></tr>"
        for o in outcomes
    )
    index = (
        "<table><tr><th>experiment</th><th>with the source</th><th>seeds agreeing</th>"
        f"<th>seconds</th></tr>{rows}</table>"
    )
    body = "".join(_section(o) for o in outcomes)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>gradprobe lab</title><style>{_STYLE}</style></head><body>"
        f'<h1>gradprobe lab</h1><p class="meta">gradprobe {__version__}, {when}</p>'
        f"{index}{body}</body></html>"
    )


def write_lab_report(outcomes: Sequence[ExperimentResult], path: str | os.PathLike[str]) -> Path:
    """Write the report to ``path`` (through a temporary file, then renamed)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render_lab_report(outcomes), encoding="utf-8")
    os.replace(tmp, target)
    return target

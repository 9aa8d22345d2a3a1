"""report: one self-contained HTML page for one run, or several side by side.

The page has, in this order: a headline box (per run: what is wrong, what to do, the
consequences; with several runs, which one fixed it: :mod:`gradprobe.headline`), the findings of each run (with their numbers and ranked
remedies), a table of the key numbers of every run, the figures of :mod:`gradprobe.plots`
(several runs side by side, a panel each; line plots share their y axis so they compare
at a glance, and each caption says what its panels share, read from the drawn figure),
and each run's metadata. Figures are embedded as base64 PNG; the page loads nothing from the network
and needs no JavaScript. The report knows nothing of hooks: it reads runs.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from ._mpl import pyplot
from ._version import __version__
from .diagnose import Findings, as_run, diagnose, key_numbers
from .errors import GradprobeError
from .headline import headline_html
from .html import KEY_COLUMNS, findings_html, inline_code  # re-exported: their old home
from .run import Run

__all__ = [
    "KEY_COLUMNS",
    "ReportFigure",
    "axes_facts",
    "comparison_table",
    "inline_code",
    "report",
    "report_figure",
]

# Plots whose panels share a y axis (by construction: sharey=True). Not the images: their
# y axes are layers, which differ between models.
_SHARE_Y = {"gradient_flow", "update_ratios", "dead_saturated", "clipping", "loss"}
_DPI = 110

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
color:#1d232b;background:#f6f7f9;line-height:1.45}
main{max-width:1200px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:32px 0 10px;border-bottom:2px solid #dde1e6;
padding-bottom:4px}h3{font-size:16px;margin:18px 0 8px}
.sub{color:#5a6572;font-size:13px;margin:0 0 18px}
table{border-collapse:collapse;background:#fff;font-size:13px;width:100%;margin:6px 0 14px}
th,td{border:1px solid #dde1e6;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.gp-findings td ol{margin:0;padding-left:18px}.gp-findings td li{margin-bottom:4px}
.gp-findings code,.meta code{font-size:12px;background:#f0f2f5;padding:1px 3px;border-radius:3px}
.gp-sev{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.gp-critical .gp-sev{background:#c0392b}.gp-warning .gp-sev{background:#d68910}.gp-info .gp-sev{background:#2e86c1}
.gp-none{background:#e8f6ee;border:1px solid #b7e1c6;padding:8px 12px;border-radius:4px}
figure{margin:10px 0 22px;background:#fff;border:1px solid #dde1e6;padding:10px;border-radius:4px}
figure img{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{font-size:13px;color:#5a6572;margin-top:6px}
.note{color:#7a4f01;background:#fff6e0;border:1px solid #f1d79a;padding:6px 10px;border-radius:4px;
font-size:13px}
details{margin:4px 0 12px}summary{cursor:pointer;color:#2e5c8a}
pre{background:#fff;border:1px solid #dde1e6;padding:8px;overflow:auto;font-size:12px;max-height:360px}
footer{color:#8a94a0;font-size:12px;margin-top:30px}
.gp-headline{background:#fff;border:2px solid #c0392b;border-radius:6px;padding:6px 16px 10px;margin:8px 0 18px}
.gp-headline h3{margin:10px 0 4px}.gp-headline p{margin:6px 0}
.gp-tag{display:inline-block;padding:0 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff;
background:#2e86c1}.gp-tag.gp-critical{background:#c0392b}.gp-tag.gp-warning{background:#d68910}
.gp-headline code,.gp-findings code{font-size:12px;background:#f0f2f5;padding:1px 3px;border-radius:3px}
pre.gp-code{background:#f6f8fa;margin:4px 0 8px;white-space:pre;max-height:none}
.gp-ok{background:#e8f6ee;border:1px solid #b7e1c6;padding:6px 10px;border-radius:4px}
.gp-fixed{background:#e8f6ee;border:1px solid #b7e1c6;padding:6px 10px;border-radius:4px}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞"
        if value == int(value) and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.3g}"
    return escape(str(value))


def comparison_table(
    runs: Sequence[Run],
    findings: Sequence[Findings],
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per run: its name, ``extra`` columns (e.g. accuracy), key numbers, findings."""
    rows = []
    for run, found in zip(runs, findings):
        row: dict[str, Any] = {"run": run.name}
        row.update((extra or {}).get(run.name, {}))
        numbers = key_numbers(run)
        row.update({KEY_COLUMNS[k]: numbers.get(k, math.nan) for k in KEY_COLUMNS})
        row["findings"] = ", ".join(f.kind for f in found) or "none"
        rows.append(row)
    return rows


def _table_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cls = ' class="num"' if isinstance(v, (int, float)) else ""
            cells.append(f"<td{cls}>{_fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="gp-compare"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class ReportFigure:
    """One figure of the report, before it is encoded: what the page shows for one plot.

    ``figure`` holds a panel per run that can draw the plot (``None`` when none can, or
    when the plot would show nothing; then ``sentence`` says so). ``caption`` is the
    plot's description plus what is true of *this* figure's axes and colour scales, read
    from the drawn figure. ``notes`` names the runs that could not be drawn, and why.
    """

    name: str
    title: str
    figure: Any
    caption: str
    notes: dict[str, str]
    sentence: str | None = None


def _same(values: Sequence[tuple[float, ...]]) -> bool:
    return all(
        all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(v, values[0])) for v in values[1:]
    )


def _colour_mesh(ax: Any) -> Any:
    """A panel's colour-mapped image or mesh (a heatmap drawn with ``pcolormesh`` has no
    image: its columns sit at their steps), the one a colour bar reads."""
    if ax.get_images():
        return ax.get_images()[0]
    meshes = [c for c in ax.collections if c.get_array() is not None and c.get_gid() is None]
    return meshes[-1] if meshes else None


def axes_facts(panels: Sequence[Any]) -> str:
    """What the panels of one figure have in common, read from the drawn axes.

    A caption may claim a shared y axis or a shared colour scale only when every panel's
    y limits and scale (or every image's colour limits) are the same: this reads them
    from the figure, so the caption cannot drift from what is drawn.
    """
    if not panels:
        return ""
    facts = []
    images = [m for m in (_colour_mesh(ax) for ax in panels) if m is not None]
    if images:
        same = _same([tuple(im.get_clim()) for im in images])
        if len(images) == 1:
            facts.append("colour scale as its colour bar shows")
        elif same:
            facts.append("one colour scale for all panels")
        else:
            facts.append("each panel has its own colour scale (read its colour bar)")
    elif len(panels) > 1:
        scales = {ax.get_yscale() for ax in panels}
        if len(scales) == 1 and _same([tuple(ax.get_ylim()) for ax in panels]):
            facts.append("panels share their y axis")
        else:
            facts.append("each panel has its own y axis (read its tick values)")
    # A right-hand axis (ax.twinx(), the loss figure's learning rate) shares x with its panel.
    twins = [
        [t for t in ax.get_shared_x_axes().get_siblings(ax) if t is not ax and t not in panels]
        for ax in panels
    ]
    rights = [t[0] for t in twins if t]
    if len(rights) > 1:
        if len({r.get_yscale() for r in rights}) == 1 and _same([r.get_ylim() for r in rights]):
            facts.append("the right axes share one scale")
        else:
            facts.append("each right axis has its own scale")
    return "; ".join(facts)


def report_figure(name: str, runs: Sequence[Run]) -> ReportFigure:
    """Draw plot ``name`` for ``runs``: a panel per run that can, notes for those that cannot."""
    from . import plots

    spec = plots.PLOTS[name]
    notes = {run.name: note for run in runs if (note := plots.missing(spec, run)) is not None}
    drawable = [r for r in runs if r.name not in notes]
    if not drawable:
        # A sentence for all runs at once (no run logged a loss) instead of a note per run.
        sentence = spec.nothing_to_show(runs) if spec.nothing_to_show else None
        return ReportFigure(name, spec.title, None, "", {} if sentence else notes, sentence)
    sentence = spec.nothing_to_show(drawable) if spec.nothing_to_show else None
    if sentence is not None:
        return ReportFigure(name, spec.title, None, "", notes, sentence)
    plt = pyplot()
    n = len(drawable)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    height = 5.2 if name == "activation_histograms" else 4.0
    width = 7.5 if ncols == 1 else 6.2
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(width * ncols, height * nrows),
        squeeze=False,
        sharey=name in _SHARE_Y,
        layout="constrained",
    )
    flat = axes.ravel()
    options = spec.shared_options(drawable) if spec.shared_options else {}
    for ax, run in zip(flat, drawable):
        spec.fn(run, ax=ax, **options)
        if name in _SHARE_Y:
            ax.yaxis.set_tick_params(which="both", labelleft=True)
    for ax in flat[n:]:
        ax.set_visible(False)
    facts = axes_facts(list(flat[:n]))
    caption = spec.doc + (f"; {facts}" if facts else "")
    return ReportFigure(name, spec.title, fig, caption, notes)


def _figure_html(figure: ReportFigure) -> str:
    """A figure with its caption, or the sentence/note that stands in its place."""
    skipped = "".join(
        f'<p class="note">{escape(run)}: {escape(note)}</p>' for run, note in figure.notes.items()
    )
    head = f"<h3>{escape(figure.title)}</h3>"
    if figure.sentence is not None:
        return f'{head}<p class="gp-none">{escape(figure.sentence)}</p>{skipped}'
    if figure.figure is None:
        first = next(iter(figure.notes.values()), "")
        return f'{head}<p class="note">{escape(first)}</p>'
    return (
        f'{head}<figure><img alt="{escape(figure.title)}" '
        f'src="data:image/png;base64,{_png(figure.figure)}">'
        f"<figcaption>{escape(figure.caption)}</figcaption></figure>{skipped}"
    )


def _meta_html(run: Run) -> str:
    meta = run.meta
    model = meta.get("model", {}) or {}
    probe = meta.get("probe", {}) or {}
    rows = [
        ("label", run.name),
        ("directory", str(run.path) if run.path else "(in memory)"),
        (
            "model",
            f"{model.get('class', '?')}, {model.get('parameters', '?')} parameters, "
            f"{len(run.modules)} probed modules",
        ),
        (
            "recorded steps",
            f"{len(run.steps)} (every {probe.get('every', '?')}; "
            f"last step {int(run.steps.max()) if len(run.steps) else '–'})",
        ),
        ("statistics", ", ".join(probe.get("stats", []))),
        ("theory at init", _theory_line(run)),
        ("created", str(meta.get("created", "?"))),
        ("versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())),
    ]
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    config = json.dumps(meta.get("config") or {}, indent=2, default=str)
    summary = str(model.get("summary", ""))
    return (
        f'<h3>{escape(run.name)}</h3><table class="meta">{body}</table>'
        f"<details><summary>configuration</summary><pre>{escape(config)}</pre></details>"
        f"<details><summary>model</summary><pre>{escape(summary)}</pre></details>"
    )


def _theory_line(run: Run) -> str:
    """The theory's per-layer prediction beside the first recorded step (theory.compare),
    or why there is none."""
    try:
        from .theory.model import compare

        c = compare(run)
    except Exception as exc:  # the report is written whatever the theory makes of the run
        return f"not available ({type(exc).__name__})"
    return c.line if c.covered and c.line else f"no prediction: {c.reason or 'one layer'}"


def report(
    run_or_runs: Any,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the HTML report of one run or several (Runs, Probes or run directories) to ``path``.

    ``extra`` adds columns to the comparison table, keyed by run name (the demo adds
    validation accuracy). ``progress`` is called with a short label after each stage.
    Returns the path written.
    """
    out = Path(path)
    if out.is_dir():
        raise GradprobeError(
            f"{out} is a directory, not a file to write the report to",
            f"give a file name, e.g. {out / 'report.html'}",
        )
    sources = list(run_or_runs) if isinstance(run_or_runs, (list, tuple)) else [run_or_runs]
    if not sources:
        raise GradprobeError("no runs to report", "give at least one run directory")
    runs = [as_run(s) for s in sources]
    empty = [r.name for r in runs if r.empty]
    if empty:
        raise GradprobeError(
            f"the run(s) {empty} have no recorded steps", "train at least one step"
        )
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        # Panels and table rows are labelled by name: make duplicates distinct (on copies,
        # so the caller's runs are left as they were).
        seen: dict[str, int] = {}
        renamed = []
        for r in runs:
            seen[r.name] = seen.get(r.name, 0) + 1
            label = f"{r.name} ({seen[r.name]})" if names.count(r.name) > 1 else r.name
            renamed.append(Run({**r.meta, "label": label}, r.frame(), path=r.path))
        runs = renamed
    findings = [diagnose(r) for r in runs]
    if progress:
        progress("diagnosis")

    from . import plots

    figures = []
    for name in plots.PLOTS:
        figures.append(_figure_html(report_figure(name, runs)))
        if progress:
            progress(name)

    heading = title or ("gradprobe report: " + ", ".join(r.name for r in runs))
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(heading)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{escape(heading)}</h1>",
        f'<p class="sub">{len(runs)} run(s) · generated {escape(_now())} by gradprobe {escape(__version__)}</p>',
        headline_html(runs, findings, extra),
        "<h2>Findings</h2>",
    ]
    for run, found in zip(runs, findings):
        if len(runs) > 1:
            parts.append(f"<h3>{escape(run.name)}</h3>")
        parts.append(findings_html(found, lead=False))
    parts += [
        "<h2>Key numbers</h2>",
        _table_html(comparison_table(runs, findings, extra)),
        "<h2>Figures</h2>",
        *figures,
        "<h2>Runs</h2>",
        *[_meta_html(r) for r in runs],
        "<footer>Self-contained: figures are embedded PNG; nothing is loaded from the network."
        "</footer></main></body></html>",
    ]
    _write_atomically(out, "".join(parts))
    if progress:
        progress("written")
    return out


def _write_atomically(out: Path, text: str) -> None:
    """Write ``text`` to ``out`` through a temporary file in the same folder, then rename.

    A reader never sees half a page, and a write that fails (a full disk, ``out`` a
    directory, an interrupt) leaves nothing behind: neither the temporary file nor the
    folders made for it.
    """
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        # A name of its own (not mkstemp: its file is private to the user, the page is not).
        tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, out)
        tmp = None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        for folder in made:  # innermost first; only those this call made, and only if empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

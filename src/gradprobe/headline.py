"""The headline of a diagnosis: what is wrong, what to do, what follows from it.

Built from :func:`~gradprobe.diagnose` alone, nothing written by hand: ``diagnose``
orders findings root causes first, and a finding's ``cause`` names the kind of the
finding that explains it (``None`` for a root). The headline's root is the first
finding without a cause; its action is the root's first remedy; its consequences are
the findings whose cause is the root's kind; the rest are listed as other findings.

:func:`story` is that headline as text (what the Lightning and Hugging Face callbacks
print at the end of ``fit``); :func:`headline_html` is the box at the top of the report;
:func:`what_fixed_it` compares runs by their findings and final loss/accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from .diagnose import Findings, no_findings_note
from .html import inline_code
from .run import Run
from .story import Headline, headline, story_lines

__all__ = ["Headline", "headline", "headline_html", "story", "what_fixed_it"]


def story(findings: Findings) -> str:
    """The diagnosis as plain text, root cause first: a title line, then the same lines
    ``gradprobe diagnose`` prints (:func:`gradprobe.story.story_lines`), so the CLI, the
    callbacks and the TensorBoard text tell one story in one wording."""
    name = getattr(findings, "run_name", "") or "the run"
    if not findings:
        return f"gradprobe: {name}: {no_findings_note(findings)}"
    return "\n".join(
        [f"gradprobe diagnosis of {name}: {len(findings)} finding(s)", *story_lines(findings)]
    )


# ---------------------------------------------------------------- several runs
def _final(run: Run, stat: str) -> float:
    """The mean of the last quarter (at least one) of a logged model series: one odd last
    batch does not decide which run ended best."""
    try:
        series = run.model_series(stat).dropna()
    except Exception:  # a run without that series
        return math.nan
    if series.empty:
        return math.nan
    tail = series.iloc[-max(1, len(series) // 4) :]
    return float(tail.mean())


def what_fixed_it(
    runs: Sequence[Run],
    findings: Sequence[Findings],
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> str | None:
    """Which of several runs fixed the problem, computed from the runs: the one with the
    fewest findings (critical ones counted first), then the best final accuracy (an
    ``extra`` column whose name has "accuracy", or a logged ``accuracy``) or loss. ``None`` for one run, or when no run has
    fewer findings than another and none ends better."""
    if len(runs) < 2:
        return None
    rows = []
    for run, found in zip(runs, findings):
        critical = sum(f.severity == "critical" for f in found)
        # An accuracy column of the comparison table ("validation accuracy" in the demo).
        columns = (extra or {}).get(run.name, {})
        acc = next(
            (
                float(v)
                for k, v in columns.items()
                if "accuracy" in str(k).lower() and isinstance(v, (int, float))
            ),
            math.nan,
        )
        if math.isnan(acc):
            acc = _final(run, "accuracy")
        rows.append((run, found, critical, acc, _final(run, "loss")))
    by_acc = all(not math.isnan(r[3]) for r in rows)

    def key(r: tuple[Any, ...]) -> tuple[float, ...]:
        quality = -r[3] if by_acc else (r[4] if not math.isnan(r[4]) else math.inf)
        return (r[2], len(r[1]), quality)

    best = min(rows, key=key)
    worst = max(rows, key=key)
    if key(best) == key(worst):
        return None
    run, found, _, acc, loss = best
    parts = [f"`{run.name}`"]
    parts.append(
        "has no findings"
        if not found
        else f"has the fewest findings ({len(found)}: {', '.join(f.kind for f in found)})"
    )
    if by_acc:
        parts.append(f"and the best final accuracy ({acc:.4g})")
    elif not math.isnan(loss):
        ranked = sorted(r[4] for r in rows if not math.isnan(r[4]))
        word = "the lowest" if ranked and loss == ranked[0] else "a"
        parts.append(f"and {word} final loss ({loss:.4g}, mean of its last quarter)")
    others = [
        f"`{r[0].name}`: {len(r[1])} finding(s)"
        + (f", final loss {r[4]:.4g}" if not math.isnan(r[4]) else "")
        for r in rows
        if r[0] is not run
    ]
    return " ".join(parts) + "; " + "; ".join(others) + "."


def _pre(code: str) -> str:
    return f'<pre class="gp-code">{escape(code)}</pre>'


def headline_html(
    runs: Sequence[Run],
    findings: Sequence[Findings],
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The report's headline box: per run what is wrong, what to do, the consequences;
    with several runs, which one fixed it."""
    blocks = []
    for run, found in zip(runs, findings):
        head = f"<h3>{escape(run.name)}</h3>" if len(runs) > 1 else ""
        h = headline(found)
        if h.root is None:
            text = (
                "No problems found (what was checked: see Findings)."
                if not found
                else "No root cause among the findings (see Findings)."
            )
            blocks.append(f'{head}<p class="gp-ok">{escape(text)}</p>')
            continue
        parts = [
            head,
            f'<p class="gp-what"><b>What is wrong</b> <span class="gp-tag gp-{escape(h.root.severity)}">'
            f"{escape(h.root.kind)}</span> {inline_code(h.root.summary)}</p>",
        ]
        if h.action is not None:
            parts.append(
                f'<p class="gp-do"><b>What to do</b>: {escape(h.action.name)}: '
                f"{inline_code(h.action.why)}</p>{_pre(str(h.action.code))}"
            )
        if h.consequences:
            items = "".join(
                f"<li><b>{escape(f.kind)}</b>: {inline_code(f.summary)}</li>"
                for f in h.consequences
            )
            parts.append(f"<p><b>Consequences</b></p><ul>{items}</ul>")
        if h.others:
            parts.append(
                '<p class="gp-others">Also found: '
                + ", ".join(escape(f.kind) for f in h.others)
                + " (see Findings)</p>"
            )
        blocks.append("".join(parts))
    fixed = what_fixed_it(runs, findings, extra)
    if fixed is not None:
        blocks.append(f'<p class="gp-fixed"><b>What fixed it</b>: {inline_code(fixed)}</p>')
    return f'<section class="gp-headline">{"".join(blocks)}</section>'

"""bench/RESULTS.md, one section per bench: replace a section in place, keep every other line.

A section is a heading line (``## Title``) and everything up to the next heading of level
1 or 2 (``### `` sub-headings stay inside it). The benches share this so that each one
rewrites only its own sections.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["write_section"]


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the section headed ``title`` in ``path`` with ``section`` (which starts with
    that heading), or append it; the rest of the file is left as it is."""
    text = path.read_text() if path.exists() else ""
    section = section.rstrip("\n") + "\n"
    start = re.search(rf"^{re.escape(title)}[ \t]*$", text, flags=re.MULTILINE)
    if start is None:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    else:
        end = re.compile(r"^#{1,2} ", flags=re.MULTILINE).search(text, start.end())
        rest = "" if end is None else "\n" + text[end.start() :]
        text = text[: start.start()] + section + rest
    path.write_text(text)

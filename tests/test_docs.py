"""The README tells the truth: its tables list what the registries hold, and CI runs its
test command."""

from __future__ import annotations

import re
from pathlib import Path

from gradprobe import ACTIVATIONS, STATISTICS

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_quick_start_commands():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^bash (scripts/\S+)", quick, flags=re.M)
    assert commands == ["scripts/demo.sh", "scripts/test.sh"]
    for script in commands:
        assert (ROOT / script).exists()
    assert README.index("## Quick start") < README.index("## What it does")


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash scripts/test\.sh$", ci, flags=re.M)


def test_statistics_table_lists_the_registry():
    table = README.split("### Statistics", 1)[1].split("\n### ", 1)[0]
    names = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", table, flags=re.M))
    listed = {n for pair in names for n in pair if n}
    assert listed == set(STATISTICS)


def test_activations_paragraph_names_every_registered_activation():
    section = README.split("### Activations", 1)[1].split("\n## ", 1)[0]
    for name in ACTIVATIONS:
        assert name in section, name

"""Start-up time: `import gradprobe` and the CLI's --help against `import torch` alone.

Each case runs in a fresh Python process (what a user pays once per process). One
untimed round first (fills the OS file cache and writes the .pyc files), then
``--rounds`` timed rounds; each round runs every case once, in an order rotated from
round to round, so that load on a shared machine falls on all cases alike. Reported per
case: the median wall time and its spread (min–max) over the rounds, and against
``import torch`` in the same round: the median paired difference and the ratio of medians.
Also which heavy modules each import leaves in ``sys.modules``.

Targets (issue 10 §4): ``import gradprobe`` within 0.3 s of ``import torch``; ``gradprobe
--help`` and ``gradprobe CMD --help`` under 1 s.

Run:  .venv/bin/python bench/import_time.py [--rounds N] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

HEAVY_MODULES = (
    "torch",
    "torch._dynamo",
    "numpy",
    "pandas",
    "pyarrow",
    "matplotlib",
    "scipy",
    "sklearn",
)
SECTION_TITLE = "## Start-up time (bench/import_time.py)"


@dataclass(frozen=True)
class Case:
    label: str
    argv: list[str]
    target: str = ""  # what it is held to, in words, for the table


def cases(python: str, console_script: str) -> list[Case]:
    return [
        Case("python -c pass", [python, "-c", "pass"]),
        Case("import torch", [python, "-c", "import torch"]),
        Case("import gradprobe", [python, "-c", "import gradprobe"], "≤ torch + 0.3 s"),
        Case("from gradprobe import Probe", [python, "-c", "from gradprobe import Probe"]),
        Case("gradprobe --help", [console_script, "--help"], "< 1 s"),
        Case("gradprobe demo --help", [console_script, "demo", "--help"], "< 1 s"),
    ]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run of ``argv``.

    CPU time is reported beside wall time because on a shared machine the wall time
    also counts the time spent waiting for a core.
    """
    cpu_before = children_cpu_seconds()
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr[-500:]}")
    return elapsed, children_cpu_seconds() - cpu_before


def loaded_heavy_modules(python: str, statement: str) -> list[str]:
    """Which of HEAVY_MODULES are in sys.modules after ``statement``, in a fresh process."""
    code = f"import json, sys\n{statement}\nprint(json.dumps([m for m in {list(HEAVY_MODULES)!r} if m in sys.modules]))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(all_cases: list[Case], rounds: int) -> dict[str, list[tuple[float, float]]]:
    for case in all_cases:  # untimed: file cache and .pyc files
        run_once(case.argv)
    samples: dict[str, list[tuple[float, float]]] = {case.label: [] for case in all_cases}
    for r in range(rounds):
        shift = r % len(all_cases)
        for case in all_cases[shift:] + all_cases[:shift]:
            samples[case.label].append(run_once(case.argv))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return samples


def table(all_cases: list[Case], samples: dict[str, list[tuple[float, float]]], rounds: int) -> str:
    torch_times = [wall for wall, _ in samples["import torch"]]
    torch_median = statistics.median(torch_times)
    lines = [
        SECTION_TITLE,
        "",
        f"torch {version('torch')}, Python {platform.python_version()}, {platform.machine()}, "
        f"shared 2-core machine; each case a fresh process, median of {rounds} interleaved "
        "rounds (rotated order) after one untimed round; spread = min–max; "
        "Δ torch = median of the per-round differences to `import torch`; "
        "CPU s = user + system time of the process (what the wall time would be on an idle core).",
        "",
        "| case | median s | spread s | Δ torch s | × torch | CPU s | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for case in all_cases:
        times = [wall for wall, _ in samples[case.label]]
        cpu = statistics.median(cpu for _, cpu in samples[case.label])
        median = statistics.median(times)
        paired = statistics.median(t - b for t, b in zip(times, torch_times))
        lines.append(
            f"| `{case.label}` | {median:.2f} | {min(times):.2f}–{max(times):.2f} "
            f"| {paired:+.2f} | {median / torch_median:.2f} | {cpu:.2f} | {case.target} |"
        )
    return "\n".join(lines)


def modules_table(python: str) -> str:
    lines = [
        "",
        f"Heavy modules ({', '.join(HEAVY_MODULES)}) in `sys.modules` after each import:",
        "",
        "| statement | heavy modules loaded |",
        "|---|---|",
    ]
    for statement in ("import torch", "import gradprobe", "from gradprobe import Probe"):
        loaded = loaded_heavy_modules(python, statement)
        lines.append(f"| `{statement}` | {', '.join(loaded) or 'none'} |")
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace this bench's section of ``path`` (or append it), leaving the others as they are."""
    text = path.read_text() if path.exists() else ""
    start = text.find(SECTION_TITLE)
    if start < 0:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    else:
        end = text.find("\n## ", start + len(SECTION_TITLE))
        rest = "" if end < 0 else text[end:]
        text = text[:start] + section + "\n" + rest
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--write", default="", help="replace this section of a RESULTS.md")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    python = sys.executable
    console_script = Path(python).parent / "gradprobe"
    if not console_script.exists():
        raise SystemExit(
            f"no console script at {console_script}: run with the Python of the venv that "
            "has gradprobe installed (pip install -e .)"
        )
    all_cases = cases(python, str(console_script))
    samples = measure(all_cases, args.rounds)
    section = table(all_cases, samples, args.rounds) + "\n" + modules_table(python)
    print(section)
    if args.write:
        write_section(Path(args.write), section)


if __name__ == "__main__":
    main()

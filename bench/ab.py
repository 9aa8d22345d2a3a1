"""Compare what a step costs under two versions of gradprobe, in one process, step by step.

Why: a change worth 0.1 ms on a 6–10 ms step (a sentinel step, a hook) is invisible in
rounds of whole-step wall time on a shared machine, which move by ±2–3 % from round to
round. Here the working tree's gradprobe ("new") and another version ("base": a git ref of
this repository, or another checkout's ``src/gradprobe``) run side by side in one
process, each on its own twin of the model beside a plain twin, and the variants take
turns *every step* (order rotated). Each step's time is read as this thread's CPU time
(``time.thread_time``: with ``--threads 1`` all of torch's work runs on it, and time the
machine gives to other processes is not counted) and as wall time. Percentiles of the
per-step times say what a typical step costs; the totals (including every recorded step
of a cadence, every flush and the final ``close()``) say what the run costs.

The base version is imported as a package of its own (``gradprobe_base``: gradprobe's
imports are all relative), so both are live at once and neither sees the other. At the end
the twins' weights are compared: a Probe must leave training bit-identical, so they must
be equal, and the script fails if they are not.

Run:  .venv/bin/python bench/ab.py --base HEAD~1 [--model mlp|cnn] [--every auto|N]
                                    [--steps 500] [--threads 1] [--sentinel-only]
      .venv/bin/python bench/ab.py --base-src ../other/src/gradprobe ...
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import pkgutil
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import MODELS  # bench/ is not a package: its folder is on the path

ROOT = Path(__file__).resolve().parents[1]
BASE_NAME = "gradprobe_base"
PERCENTILES = (0.10, 0.25, 0.50)


def base_package(ref: str | None, src: str | None, into: Path) -> ModuleType:
    """Import another version of gradprobe as ``gradprobe_base`` from ``into``."""
    target = into / BASE_NAME
    if src is not None:
        shutil.copytree(Path(src), target)
    else:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", str(ref), "src/gradprobe"],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise SystemExit(
                f"ab.py: cannot read src/gradprobe at {ref!r} "
                f"({archive.stderr.decode().strip()}); give a git ref of this repository"
            )
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            # the "data" filter (no links out, no devices) exists from Python 3.11.4/3.10.12
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(into / "archive", **safe)  # our own repository's tree
        shutil.move(str(into / "archive" / "src" / "gradprobe"), target)
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module(BASE_NAME)
    finally:
        sys.path.remove(str(into))


def import_all(package: ModuleType) -> None:
    """Import every module of ``package`` now: a module imported lazily during the timed
    steps (at the first flush, say) would charge its one-time compile to one variant."""
    for info in pkgutil.iter_modules(package.__path__):
        # an optional extra that is not installed is not used by the Probe either
        with contextlib.suppress(ImportError):
            importlib.import_module(f"{package.__name__}.{info.name}")


def sentinel_only(package: ModuleType) -> None:
    """No recorded step after the first one, no flush until close: a run of sentinel steps."""
    # The cadence is read where it is defined: gradprobe.recording.clock (a version from
    # before the recording engine's components: gradprobe.step). Set it in both.
    for name in ("recording.clock", "step"):
        try:
            module = importlib.import_module(f"{package.__name__}.{name}")
        except ImportError:
            continue
        module.AUTO_FIRST = 1
        module.AUTO_EVERY = 10**9


class Twin:
    def __init__(self, model: nn.Module, make_probe: Callable[[nn.Module, Any], Any] | None):
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.probe = make_probe(self.model, self.opt) if make_probe else None
        self.thread: list[float] = []
        self.wall: list[float] = []
        self.closing = (0.0, 0.0)

    def step(self, x: torch.Tensor, y: torch.Tensor, timed: bool) -> None:
        start_thread, start_wall = time.thread_time(), time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        if timed:
            self.thread.append(time.thread_time() - start_thread)
            self.wall.append(time.perf_counter() - start_wall)

    def close(self) -> None:
        start_thread, start_wall = time.thread_time(), time.perf_counter()
        if self.probe is not None:
            self.probe.close()
        self.closing = (time.thread_time() - start_thread, time.perf_counter() - start_wall)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def report(twins: dict[str, Twin], args: argparse.Namespace, base_file: str) -> list[str]:
    plain = twins["plain"]
    lines = [
        f"torch {torch.__version__}, {args.threads} thread(s); model {args.model}; "
        f"every={args.every}{' (sentinel steps only)' if args.sentinel_only else ''}; "
        f"{args.steps} timed steps per variant after {args.warm} untimed, interleaved "
        f"step by step; base: {args.base_src or args.base} ({base_file})",
        "",
        "| variant | thread ms p10 | p25 | p50 | wall ms p50 | run total, thread × plain "
        "| run total, wall × plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    totals = {
        name: (sum(t.thread) + t.closing[0], sum(t.wall) + t.closing[1])
        for name, t in twins.items()
    }
    for name, twin in twins.items():
        cells = []
        for q in PERCENTILES:
            ms = quantile(twin.thread, q) * 1e3
            extra = ms - quantile(plain.thread, q) * 1e3
            cells.append(f"{ms:.3f}" + ("" if name == "plain" else f" ({extra:+.3f})"))
        wall = statistics.median(twin.wall) * 1e3
        lines.append(
            f"| {name} | {' | '.join(cells)} | {wall:.3f} "
            f"| {totals[name][0] / totals['plain'][0]:.3f} "
            f"| {totals[name][1] / totals['plain'][1]:.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", help="a git ref of this repository")
    source.add_argument("--base-src", help="another checkout's src/gradprobe folder")
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--every", default="auto", help='"auto" (the default) or a number')
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warm", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sentinel-only", action="store_true")
    args = parser.parse_args(argv)
    every: Any = args.every if args.every == "auto" else int(args.every)
    torch.set_num_threads(args.threads)

    import gradprobe

    with tempfile.TemporaryDirectory() as folder:
        base = base_package(args.base, args.base_src, Path(folder))
        import_all(base)
        import_all(gradprobe)
        if args.sentinel_only:
            sentinel_only(base)
            sentinel_only(gradprobe)
        torch.manual_seed(0)
        model, x, y = MODELS[args.model][1]()
        twins = {
            "plain": Twin(model, None),
            "base": Twin(model, lambda m, o: base.Probe(m, o, every=every)),
            "new": Twin(model, lambda m, o: gradprobe.Probe(m, o, every=every)),
        }
        names = list(twins)
        for i in range(args.warm + args.steps):
            for name in names[i % 3 :] + names[: i % 3]:
                twins[name].step(x, y, timed=i >= args.warm)
        for twin in twins.values():
            twin.close()
        lines = report(twins, args, str(Path(base.__file__).parent))
    weights = [torch.cat([p.detach().reshape(-1) for p in t.model.parameters()]) for t in twins.values()]
    if not all(torch.equal(weights[0], w) for w in weights[1:]):
        raise SystemExit("ab.py: the twins' weights differ: a Probe changed training")
    print("\n".join(lines))
    print("\ntraining bit-identical in all three variants: yes")


if __name__ == "__main__":
    main()

"""Where the Probe's time goes at every=1 (issue 26): cProfile and torch.profiler on the
cases of bench/every_step.py, one thread, CPU.

* **cProfile, timed in this thread's CPU time** (``cProfile.Profile(time.thread_time)``:
  the shared machine's load is not counted) over ``--steps`` steps at every=1, default
  statistics. Per gradprobe function: calls per step, its own Python time per step
  (``tottime``) and the time of the torch calls it makes directly (builtins whose caller
  it is: the ops and their dispatch), so each cost centre is split into Python overhead
  and op time. The whole step, the model's forward/backward/optimizer and the Probe's
  total (the step minus a plain step measured the same way) are given for scale.
* **torch.profiler** (CPU, ``record_shapes``): the aten ops a recorded step launches,
  with a Probe of one statistic group (the groups of bench/every_step.py) minus a plain
  step's: ops per step and per probed module, and which ops (counts, not times: the
  profiler's times are wall times, which a loaded machine distorts).
* **By entry point** (every hook of the Probe runs through ``gradprobe.hooks.Entry``,
  wrapped here; ``Probe.log`` too): calls and inclusive thread time per kind of entry
  point without a profiler, then one step under torch.profiler for the aten ops each
  launches and their self CPU time (wall-clock based: distorted on a loaded machine).
* **Lever #1** (``--parts levers``): the unit counts of every output shape of the case,
  today's ``reduce.unit_nonzero_counts`` against the chunk-summed version, equal counts
  checked, thread CPU time per call.
* **error_gain's graph walk**: the cProfile time of ``consumer_edges`` per step with
  the walks kept (gradprobe/traversals.py) and with every call walking.

Run:  .venv/bin/python bench/profile_every_step.py [--cases mlp,gpt2] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import math
import pstats
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from every_step import CASES, EVERY_1, PLAIN, Mode, Twin, build, steady_cadence
from stat_floors import FLOORS, probed_modules, step_sizes

from gradprobe import Probe


def cprofile_table(case: Any, steps: int, warm: int, keep_walks: bool = True) -> list[str]:
    twin = Twin(EVERY_1, case)
    plain = Twin(PLAIN, case)
    if not keep_walks:
        twin.probe._engine.errors.traversals.keep_walks(False)
    for _ in range(warm):
        twin.step(timed=False)
        plain.step(timed=False)
    # The plain step, for scale (thread time, no profiler).
    start = time.thread_time()
    for _ in range(steps):
        plain.step(timed=False)
    plain_ms = (time.thread_time() - start) / steps * 1e3
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    for _ in range(steps):
        twin.step(timed=False)
    profile.disable()
    twin.close()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total_ms = sum(tt for (_, _, tt, _, _) in stats.values()) / steps * 1e3
    own: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # calls, py, ops
    for (path, _line, name), (_, calls, tt, _, callers) in stats.items():
        if "gradprobe" in path:
            key = f"{Path(path).name}:{name}"
            own[key][0] += calls / steps
            own[key][1] += tt / steps * 1e3
        elif path == "~":  # a builtin: charge its time to each gradprobe caller
            for (c_path, _, c_name), (_, _, c_tt, _) in callers.items():
                if "gradprobe" in c_path:
                    own[f"{Path(c_path).name}:{c_name}"][2] += c_tt / steps * 1e3
    walk = [
        ct / steps * 1e3
        for (path, _, name), (_, _, _, ct, _) in stats.items()
        if "traversals" in path and name == "consumer_edges"
    ]
    probe_py = sum(v[1] for v in own.values())
    probe_ops = sum(v[2] for v in own.values())
    lines = [
        f"{case.label}, every=1, default statistics, {steps} steps profiled after {warm}; "
        f"error_gain walks {'kept' if keep_walks else 'walked at every call'}: the step under "
        f"cProfile {total_ms:.1f} ms (thread CPU, profiler overhead included), a plain step "
        f"{plain_ms:.1f} ms without the profiler; gradprobe's own Python {probe_py:.1f} ms "
        f"+ the torch calls it makes directly {probe_ops:.1f} ms per step; "
        f"`consumer_edges` (the graph walk) {sum(walk):.2f} ms per step.",
        "",
        "| gradprobe function | calls/step | Python ms/step | its direct torch calls ms/step "
        "| share of the Probe's Python + ops |",
        "|---|---:|---:|---:|---:|",
    ]
    ranked = sorted(own.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
    for key, (calls, py, ops) in ranked[:25]:
        share = (py + ops) / (probe_py + probe_ops)
        lines.append(f"| `{key}` | {calls:.0f} | {py:.2f} | {ops:.2f} | {share:.1%} |")
    return lines


def op_counts(twin: Twin) -> Counter[str]:
    """Top-level aten ops of one step, by name (an op called inside another, such as
    ``norm``'s ``linalg_vector_norm``, is not counted again)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        twin.step(timed=False)
    counts: Counter[str] = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def ops_table(case: Any, warm: int) -> list[str]:
    modules = len(probed_modules(case.model))
    plain = Twin(PLAIN, case)
    for _ in range(warm):
        plain.step(timed=False)
    base = op_counts(plain)
    lines = [
        f"{case.label}: {modules} probed modules; a plain step launches {sum(base.values())} "
        "top-level aten ops.",
        "",
        "| statistic(s), alone at every=1 | ops launched per step, over plain | per module "
        "| the ops it adds most (count per step) |",
        "|---|---:|---:|---|",
    ]
    groups = [(label, names) for label, (names, _) in FLOORS.items()]
    groups.append(("all (default statistics)", None))
    from gradprobe.stats import STATISTICS

    for label, names in groups:
        if names is None:
            mode = EVERY_1
        else:
            present = [n for n in names if n in STATISTICS]
            mode = Mode(label, "probe", {"every": 1, "stats": present})
        twin = Twin(mode, case)
        for _ in range(warm):
            twin.step(timed=False)
        counts = op_counts(twin)
        twin.close()
        extra = sum(counts.values()) - sum(base.values())
        added = sorted(((counts[k] - base.get(k, 0), k) for k in counts), reverse=True)
        top = ", ".join(f"`{k[6:]}` {n}" for n, k in added[:5] if n > 0)
        lines.append(f"| {label} | {extra} | {extra / modules:.1f} | {top} |")
    return lines


def hooks_table(case: Any, steps: int, warm: int, mode: Mode = EVERY_1) -> list[str]:
    """Per kind of entry point (gradprobe.hooks.Site.where): calls, inclusive thread time
    (no profiler), and under torch.profiler the aten ops launched inside it and their
    self CPU time. Python ≈ inclusive − ops."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from gradprobe import hooks

    original, log = hooks.Entry.__call__, Probe.log
    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # calls, seconds
    marked = [False]

    def timed(where: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        if marked[0]:
            with record_function(f"gp:{where}"):
                result = fn(*args, **kwargs)
        else:
            result = fn(*args, **kwargs)
        spent[where][0] += 1
        spent[where][1] += time.thread_time() - start
        return result

    hooks.Entry.__call__ = lambda self, *a: timed(self._site.where, original, self, *a)
    Probe.log = lambda self, **kw: timed("probe.log (the user's call)", log, self, **kw)
    try:
        twin, plain = Twin(mode, case), Twin(PLAIN, case)
        for _ in range(warm):
            twin.step(timed=False)
            plain.step(timed=False)
        spent.clear()
        step_ms = plain_ms = 0.0
        for _ in range(steps):  # in turns, as bench/every_step.py
            start = time.thread_time()
            twin.step(timed=False)
            step_ms += (time.thread_time() - start) / steps * 1e3
            start = time.thread_time()
            plain.step(timed=False)
            plain_ms += (time.thread_time() - start) / steps * 1e3
        timing = {k: (v[0] / steps, v[1] / steps * 1e3) for k, v in spent.items()}
        marked[0] = True
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            twin.step(timed=False)
        twin.close()
    finally:
        hooks.Entry.__call__, Probe.log = original, log  # type: ignore[method-assign]
    ops: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # count, self µs
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent, top = event.cpu_parent, True
        while parent is not None and not parent.name.startswith("gp:"):
            top = top and not parent.name.startswith("aten::")
            parent = parent.cpu_parent
        if parent is None:
            continue
        ops[parent.name[3:]][0] += top
        ops[parent.name[3:]][1] += event.self_cpu_time_total
    total = sum(ms for _, ms in timing.values())
    lines = [
        f"{case.label}, {mode.label}: a step {step_ms:.1f} ms (thread CPU, "
        f"{steps} steps, in turns with a plain twin: {plain_ms:.1f} ms), so "
        f"{step_ms - plain_ms:+.1f} ms over plain, of which inside the Probe's entry points "
        f"{total:.1f} ms (the timing wrapper's own cost included); the rest is outside them "
        "(autograd calling the Python hooks, tensors kept alive, caches).",
        "",
        "| entry point | calls/step | thread ms/step (inclusive) | share | aten ops/step "
        "| their self CPU ms (profiler) | Python ms ≈ inclusive − ops |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for where, (calls, ms) in sorted(timing.items(), key=lambda kv: -kv[1][1]):
        count, us = ops.get(where, (0, 0.0))
        lines.append(
            f"| {where} | {calls:.0f} | {ms:.2f} | {ms / total:.1%} | {count:.0f} "
            f"| {us / 1e3:.2f} | {max(ms - us / 1e3, 0.0):.2f} |"
        )
    return lines


def chunk_summed_counts(y: torch.Tensor, unit: int, buffer: torch.Tensor) -> torch.Tensor:
    """Lever #1 of bench/PROFILE.md: ``gradprobe.reduce.unit_nonzero_counts`` with each
    chunk summed over its samples into a float64 accumulator (no clone, no cat, no
    column sum of the whole tensor). Same counts, bit for bit (sums of 0/1)."""
    shape = y.shape
    before, units = math.prod(shape[:unit]), shape[unit]
    after = math.prod(shape[unit + 1 :])
    view = y.view(before, units, after)
    rows = max(1, min(before, buffer.numel() // max(units * after, 1)))
    scratch = buffer.view(-1)[: rows * units * after].view(rows, units, after)
    total = torch.zeros(units, dtype=torch.float64)
    for start in range(0, before, rows):
        chunk = view[start : start + rows]
        out = scratch[: chunk.shape[0]]
        torch.ne(chunk, 0, out=out)
        total += out.sum(dim=(0, 2), dtype=torch.float64)
    return total


def levers_table(case: Any, calls: int) -> list[str]:
    """Lever #1 measured on the case's own output shapes: today's unit counts against the
    chunk-summed ones (equal counts checked), thread CPU time per call."""
    from gradprobe.reduce import _COUNT_CHUNK, unit_nonzero_counts

    buffer = torch.empty(_COUNT_CHUNK)
    lines = [
        "| output shape | calls a step | unit_nonzero_counts, ms | chunk-summed, ms | equal |",
        "|---|---:|---:|---:|---|",
    ]
    shapes = Counter(tuple(s) for s in step_sizes(case).outputs)
    for shape, count in sorted(shapes.items(), key=lambda kv: -math.prod(kv[0])):
        y = torch.randn(shape).clamp_(min=0)  # a ReLU-like output: zeros to count
        unit = len(shape) - 1
        times = []
        for fn in (unit_nonzero_counts, chunk_summed_counts):
            fn(y, unit, buffer)
            start = time.thread_time()
            for _ in range(calls if y.numel() < 1 << 22 else 2):
                result = fn(y, unit, buffer)
            times.append((time.thread_time() - start) / (calls if y.numel() < 1 << 22 else 2))
        equal = torch.equal(
            unit_nonzero_counts(y, unit, buffer), chunk_summed_counts(y, unit, buffer)
        )
        lines.append(
            f"| {list(shape)} | {count} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} "
            f"| {'yes' if equal else 'NO'} |"
        )
        del result
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="mlp,gpt2")
    parser.add_argument("--steps", type=int, default=0, help="profiled steps (MLP 20, GPT-2 2)")
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--gpt2-layers", type=int, default=6)
    parser.add_argument("--gpt2-vocab", type=int, default=50257)
    parser.add_argument("--parts", default="hooks,cprofile,walk,ops")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    out = [f"torch {torch.__version__}, CPU, 1 thread; gradprobe {Probe.__module__}", ""]
    for key in args.cases.split(","):
        if key not in CASES:
            raise SystemExit(f"profile_every_step.py: unknown case {key!r}")
        case = build(key, args)
        steps = args.steps or (2 if key == "gpt2" else 20)
        if "hooks" in parts:
            out += [f"### {key}: by entry point (thread CPU time, no profiler)", ""]
            out += [*hooks_table(copy.copy(case), steps, args.warm), ""]
        if "hooks-cadence" in parts:  # the default cadence's steady state: sentinel steps
            skipped = steady_cadence()
            out += [f"### {key}: the default cadence by entry point (steady state)", ""]
            cadence = Mode(f"default cadence, first {skipped} steps skipped", "probe", {})
            out += [*hooks_table(copy.copy(case), steps, args.warm, cadence), ""]
        if "levers" in parts:
            out += [f"### {key}: unit counts, today's and chunk-summed (lever #1)", ""]
            out += [*levers_table(case, 20), ""]
        if "cprofile" in parts:
            out += [f"### {key}: cProfile (thread CPU time)", ""]
            out += [*cprofile_table(copy.copy(case), steps, args.warm), ""]
        if "walk" in parts:
            out += [f"### {key}: the same, every call walking the graph", ""]
            out += [*cprofile_table(case, steps, args.warm, keep_walks=False)[:1], ""]
        if "ops" in parts:
            out += [f"### {key}: aten ops per recorded step (torch.profiler)", ""]
            out += [*ops_table(case, args.warm), ""]
        print("\n".join(out), flush=True)
        out = []


if __name__ == "__main__":
    main()

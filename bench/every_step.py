"""Everything, every step (issue 26): what the Probe costs at every=1 on a GPT-2 and two
MLPs, statistic by statistic, beside the floor of each statistic's arithmetic.

Cases (CPU; AdamW, lr 1e-4; under a Probe the loss is logged with ``probe.log(loss=...)``):

* ``gpt2``: ``GPT2LMHeadModel`` from a ``transformers`` config (no download): 6 layers, 384
  wide, 6 heads, vocabulary 50257, ``attn_implementation="sdpa"``; token batch 8 × 128,
  its own labels (the model's shifted cross-entropy);
* ``mlp``: the 12×256 tanh MLP of bench/overhead.py, batch 128, cross-entropy;
* ``mlp1024``: the same 12 layers 1024 wide.

Tables (``--tables``: modes, stats and memory by default; ``floors``: the floor columns of
stats alone, without training):

* **modes**: plain; plain + one ``torch._foreach_norm`` over the gradients (the floor of
  any per-step statistic); ``Probe(model, opt)`` (the default cadence: its twin is first
  stepped, untimed, past the cadence's first all-recorded steps, so its rows are its
  steady state; ``--cadence-from-start`` times it from its first step instead, as a
  500-step run's total); every=1 with the default statistics; every=1 with
  ``stats="cheap"``. Each mode trains its own twin of the model (same initial weights,
  its own optimizer) and the twins take turns *every step*, in an order rotated from step
  to step, as in bench/ab.py. Each step's time is read as this thread's CPU time
  (``time.thread_time``: with ``--threads 1``, the default, all of torch's CPU work runs
  on the calling thread, and time the shared machine gives to other processes is not
  counted) and as wall time. p50 of the per-step times is a typical step; the run total
  (every timed step and the Probe's final ``close()``, thread time) is the run. At the end
  the twins' weights are compared: a Probe must leave training bit-identical.
* **stats**: each statistic (or group the Probe computes together) alone,
  ``Probe(stats=[...], every=1)``, against plain: one group at a time, each on its own
  pair of twins (a probed one, a plain one) stepped in turn, so that a GPT-2 needs two
  copies in memory, not thirty. Beside it, the floor of its arithmetic: the bytes it
  must read (each tensor once, from the sizes of one step's tensors: the outputs and
  inputs of the modules a default Probe probes, captured with forward hooks; the
  parameters and gradients), the reductions a hand-written eager version launches
  (computed from the tensor counts; the formulas are in bench/stat_floors.py), and that hand-written
  version's thread time on tensors of those sizes (median of ``--bare-rounds`` rounds).
* **memory**: peak RSS growth in a fresh process per (case, mode): plain, every=1,
  default cadence; the high-water mark restarted after model and data are built
  (``/proc/self/clear_refs``, then ``VmHWM``), as bench/overhead.py.

Short configurations are the default (a GPT-2 step takes ~0.45 s on a quiet 2-core
machine, several seconds on a loaded one): a smoke run of every table, minutes long.

Run:  .venv/bin/python bench/every_step.py                     # short: all tables, all cases
      .venv/bin/python bench/every_step.py --cases mlp --tables modes,stats
Full (the issue's numbers; a quiet machine, ~1-2 hours):
      .venv/bin/python bench/every_step.py --gpt2-steps 20 --mlp-steps 300 \\
          --mlp1024-steps 40 --write bench/RESULTS.md
      .venv/bin/python bench/every_step.py --tables modes --cadence-from-start \\
          --warm 0 --gpt2-steps 500 --mlp-steps 500 --mlp1024-steps 500  # 500-step runs
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from _results import write_section
from overhead import peak_rss_kib, tanh_mlp
from stat_floors import FLOORS, floor_numbers, step_sizes

from gradprobe import Probe

TITLE = "## Everything, every step (bench/every_step.py)"


# ---------------------------------------------------------------- cases
@dataclass
class Case:
    key: str
    label: str
    model: nn.Module
    batch: tuple[Tensor, ...]
    loss: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]


def gpt2_case(layers: int = 6, vocab: int = 50257) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "loss_type=None ... unrecognized": the default loss
    config = GPT2Config(
        n_layer=layers,
        n_embd=384,
        n_head=6,
        n_positions=128,
        vocab_size=vocab,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, vocab, (8, 128))
    return Case(
        "gpt2",
        f"GPT-2 from a config: {layers} layers, 384 wide, vocab {vocab}, seq 128, batch 8, sdpa",
        model,
        (ids,),
        lambda m, b: m(input_ids=b[0], labels=b[0]).loss,
    )


def mlp_case(width: int) -> Case:
    if width == 256:
        model, x, y = tanh_mlp()
    else:
        layers: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
        for _ in range(11):
            layers += [nn.Linear(width, width), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(width, 10))
        x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    return Case(
        "mlp" if width == 256 else f"mlp{width}",
        f"12×{width} tanh MLP, batch 128",
        model,
        (x, y),
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
    )


CASES = ("gpt2", "mlp", "mlp1024")


def build(key: str, args: argparse.Namespace) -> Case:
    torch.manual_seed(0)
    if key == "gpt2":
        return gpt2_case(args.gpt2_layers, args.gpt2_vocab)
    return mlp_case(256 if key == "mlp" else int(key[3:]))


# ---------------------------------------------------------------- twins
@dataclass(frozen=True)
class Mode:
    label: str
    kind: str  # "plain", "floor" or "probe"
    probe: dict[str, Any] = field(default_factory=dict)


PLAIN = Mode("plain", "plain")
FLOOR = Mode("plain + one `_foreach_norm` over the grads (floor)", "floor")
CADENCE = Mode("Probe(model, opt): default cadence", "probe", {})
EVERY_1 = Mode("every=1, default statistics", "probe", {"every": 1})
CHEAP_1 = Mode('every=1, stats="cheap"', "probe", {"every": 1, "stats": "cheap"})
MODES = [PLAIN, FLOOR, CADENCE, EVERY_1, CHEAP_1]
# --modes picks some of them by these names (plain is always timed: the ratios' base).
MODE_NAMES = {"floor": FLOOR, "cadence": CADENCE, "every1": EVERY_1, "cheap1": CHEAP_1}


class Twin:
    def __init__(self, mode: Mode, case: Case) -> None:
        self.mode, self.case = mode, case
        self.model = copy.deepcopy(case.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.probe = Probe(self.model, self.opt, **mode.probe) if mode.kind == "probe" else None
        self.thread: list[float] = []
        self.wall: list[float] = []
        self.closing = 0.0

    def step(self, timed: bool = True) -> None:
        start_thread, start_wall = time.thread_time(), time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.case.loss(self.model, self.case.batch)
        if self.probe is not None:
            self.probe.log(loss=loss)
        loss.backward()
        if self.mode.kind == "floor":
            torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
        self.opt.step()
        if timed:
            self.thread.append(time.thread_time() - start_thread)
            self.wall.append(time.perf_counter() - start_wall)

    def close(self) -> None:
        start = time.thread_time()
        if self.probe is not None:
            self.probe.close()
        self.closing = time.thread_time() - start

    def weights(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])


def take_turns(twins: list[Twin], steps: int, warm: int) -> None:
    """``warm`` untimed then ``steps`` timed steps of every twin, in turns rotated each step.
    Each twin's step ``i`` starts from seed ``i``: the same dropout masks for every twin."""
    for i in range(warm + steps):
        shift = i % len(twins)
        for twin in twins[shift:] + twins[:shift]:
            torch.manual_seed(i)
            twin.step(timed=i >= warm)
    for twin in twins:
        twin.close()
    first = twins[0].weights()
    if not all(torch.equal(first, t.weights()) for t in twins[1:]):
        raise SystemExit("every_step.py: the twins' weights differ: a Probe changed training")


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def steady_cadence() -> int:
    """Make the default cadence skip its first all-recorded steps (bench/ab.py's
    ``sentinel_only`` does the same): its rows are then its steady state, without stepping
    every twin of a GPT-2 past them first. Returns how many it had (0: nothing to do)."""
    try:  # where the cadence reads it (gradprobe.step before the engine's rebuild)
        from gradprobe.recording import clock as step_module
    except ImportError:
        try:
            from gradprobe import step as step_module
        except ImportError:
            return 0
    first = _AUTO_FIRST.setdefault("first", int(getattr(step_module, "AUTO_FIRST", 0)))
    if first > 1:
        step_module.AUTO_FIRST = 1  # step 0 is recorded, in the untimed warm steps
    return first


_AUTO_FIRST: dict[str, int] = {}  # the library's value, before steady_cadence() set it


def modes_table(
    case: Case, steps: int, warm: int, from_start: bool, modes: list[Mode] | None = None
) -> list[str]:
    twins = [Twin(m, case) for m in modes or MODES]
    cadence = next((t for t in twins if t.mode is CADENCE), None)
    skipped = 0 if from_start else steady_cadence()
    take_turns(twins, steps, warm)
    plain = twins[0]
    base_p50, base_total = p50_ms(plain.thread), sum(plain.thread)
    lines = []
    for t in twins:
        ms = p50_ms(t.thread)
        total = (sum(t.thread) + t.closing) / base_total
        over = "" if t is plain else f"{ms - base_p50:+.2f}"
        label = t.mode.label
        if t is cadence and skipped:
            label += f" (steady state: its first {skipped} all-recorded steps skipped)"
        lines.append(
            f"| {case.key} | {label} | {ms:.2f} | {over} | {ms / base_p50:.3f} "
            f"| {total:.3f} | {p50_ms(t.wall):.2f} |"
        )
    return lines


MODES_HEADER = [
    "| case | mode | thread ms/step p50 | over plain, ms | × plain (p50) "
    "| run total × plain (thread CPU, close() counted) | wall ms/step p50 |",
    "|---|---|---:|---:|---:|---:|---:|",
]


def chosen_modes(args: argparse.Namespace) -> list[Mode] | None:
    names = [n for n in args.modes.split(",") if n]
    unknown = [n for n in names if n not in MODE_NAMES]
    if unknown:
        raise SystemExit(
            f"every_step.py: unknown mode(s) {unknown}; choose from {list(MODE_NAMES)}"
        )
    return [PLAIN, *(MODE_NAMES[n] for n in names)] if names else None


# ---------------------------------------------------------------- the floor of each statistic
def floors_table(case: Case, rounds: int) -> list[str]:
    """The floor columns of the stats table alone (no training): quick on a GPT-2."""
    sizes = step_sizes(case)
    lines = [
        f"{case.label}:",
        "",
        "| statistic(s) | floor: bytes read, MiB | floor: eager kernels "
        "| floor: hand-written reduction, ms |",
        "|---|---:|---:|---:|",
    ]
    for label, (_, floor) in FLOORS.items():
        nbytes, kernels, bare = floor_numbers(floor, sizes, rounds)
        cell = "" if bare is None else f"{bare:.2f}"
        lines.append(f"| {label} | {nbytes / 2**20:.1f} | {kernels} | {cell} |")
    return lines


def stats_table(case: Case, steps: int, warm: int, rounds: int, only: list[str]) -> list[str]:
    """``only``: substrings of the group labels to time (all when empty); the "all" row's
    floor still sums every group of the default statistics."""
    from gradprobe.stats import STATISTICS

    sizes = step_sizes(case)
    lines = [
        f"{case.label}: {len(sizes.outputs)} probed outputs "
        f"({sum(s.numel() for s in sizes.outputs) * 4 / 2**20:.1f} MiB), "
        f"{len(sizes.errors)} error signals, {len(sizes.shares)} input shares, "
        f"{len(sizes.gates)} activation inputs, {len(sizes.params)} parameters "
        f"({sum(s.numel() for s in sizes.params) * 4 / 2**20:.1f} MiB), "
        f"{len(sizes.attention)} attention calls, {len(sizes.blocks)} block outputs, "
        f"{len(sizes.logits)} final-projection outputs, float32.",
        "",
        "| statistic(s), alone at every=1 | plain thread ms p50 | over plain, ms "
        "| floor: bytes read, MiB | floor: eager kernels | floor: hand-written reduction, ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    groups = []
    floor_all = [0, 0, 0.0]
    for label, (names, floor) in FLOORS.items():
        present = [n for n in names if n in STATISTICS]
        if names and not present:  # an older base without these statistics
            continue
        numbers = floor_numbers(floor, sizes, rounds)
        if floor.in_all:
            floor_all = [a + (b or 0) for a, b in zip(floor_all, numbers, strict=True)]
        groups.append((label, Mode(label, "probe", {"every": 1, "stats": present}), numbers))
    groups.append(("all (default statistics)", EVERY_1, tuple(floor_all)))
    for label, mode, (nbytes, kernels, bare) in groups:
        if only and not any(part in label for part in only):
            continue
        gc.collect()
        twins = [Twin(PLAIN, case), Twin(mode, case)]
        take_turns(twins, steps, warm)
        base = p50_ms(twins[0].thread)
        over = p50_ms(twins[1].thread) - base
        cells = f"{nbytes / 2**20:.1f} | {kernels} | " + ("" if bare is None else f"{bare:.2f}")
        lines.append(f"| {label} | {base:.2f} | {over:+.2f} | {cells} |")
        del twins
    return lines


# ---------------------------------------------------------------- memory (fresh process)
MEMORY_MODES = {"plain": None, "every=1": {"every": 1}, "default cadence": {}}


def memory_child(key: str, mode: str, steps: int, args: argparse.Namespace) -> None:
    case = build(key, args)
    model = case.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kwargs = MEMORY_MODES[mode]
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark (Linux)
    before = peak_rss_kib()
    probe = Probe(model, opt, **kwargs) if kwargs is not None else None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = case.loss(model, case.batch)
        if probe is not None:
            probe.log(loss=loss)
        loss.backward()
        opt.step()
    if probe is not None:
        probe.close()
    print(json.dumps({"growth_kib": peak_rss_kib() - before, "peak_kib": peak_rss_kib()}))


def memory_table(key: str, steps: int, args: argparse.Namespace) -> list[str]:
    out = {}
    for mode in MEMORY_MODES:
        command = [sys.executable, __file__, "--memory-child", key, mode, str(steps)]
        command += ["--threads", str(args.threads), "--gpt2-layers", str(args.gpt2_layers)]
        command += ["--gpt2-vocab", str(args.gpt2_vocab)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"every_step.py: memory child failed: {done.stderr[-500:]}")
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    plain = out["plain"]
    return [
        f"| {key} | {mode} | {steps} | {m['growth_kib'] / 1024:.1f} "
        f"| {m['growth_kib'] / plain['growth_kib']:.2f} | {m['peak_kib'] / 1024:.0f} "
        f"| {m['peak_kib'] / plain['peak_kib']:.3f} |"
        for mode, m in out.items()
    ]


MEMORY_HEADER = [
    "| case | mode | steps | peak RSS growth, MiB | × plain | peak RSS, MiB | × plain |",
    "|---|---|---:|---:|---:|---:|---:|",
]


# ---------------------------------------------------------------- the run
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="gpt2,mlp,mlp1024")
    parser.add_argument("--tables", default="modes,stats,memory")
    parser.add_argument("--gpt2-steps", type=int, default=3, help="timed steps per twin")
    parser.add_argument("--mlp-steps", type=int, default=40)
    parser.add_argument("--mlp1024-steps", type=int, default=8)
    parser.add_argument("--warm", type=int, default=2, help="untimed steps per twin first")
    parser.add_argument("--cadence-from-start", action="store_true")
    parser.add_argument(
        "--modes",
        default="",
        help="modes table: only these modes beside plain, ','-separated: "
        + ", ".join(MODE_NAMES)
        + " (default: all)",
    )
    parser.add_argument("--bare-rounds", type=int, default=5)
    parser.add_argument(
        "--groups",
        default="",
        help="stats table: time only the groups whose label contains one of these "
        "';'-separated parts (e.g. 'attention;token_cosine;logits;all')",
    )
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpt2-layers", type=int, default=6)
    parser.add_argument("--gpt2-vocab", type=int, default=50257)
    parser.add_argument("--write", default="", help="replace this bench's section of a RESULTS.md")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        key, mode, steps = args.memory_child
        memory_child(key, mode, int(steps), args)
        return
    cases = [c for c in args.cases.split(",") if c]
    tables = {t for t in args.tables.split(",") if t}
    unknown = [c for c in cases if c not in CASES]
    if unknown or not tables <= {"modes", "stats", "floors", "memory"}:
        raise SystemExit(f"every_step.py: unknown case or table: {unknown or sorted(tables)}")
    lines = [
        TITLE,
        "",
        f"torch {torch.__version__}, CPU, {args.threads} thread(s); times are this thread's "
        "CPU time (`time.thread_time`) unless marked wall; method: bench/every_step.py's "
        f"docstring. Warm steps per twin: {args.warm}.",
        "",
    ]
    if "modes" in tables:
        lines += ["### Modes, interleaved step by step", "", *MODES_HEADER]
        for key in cases:
            steps = getattr(args, f"{key}_steps")
            lines += modes_table(
                build(key, args), steps, args.warm, args.cadence_from_start, chosen_modes(args)
            )
        lines += ["", "Training bit-identical in every mode: yes (weights compared).", ""]
    if "stats" in tables:
        lines += ["### Each statistic alone at every=1, beside the floor of its arithmetic", ""]
        for key in cases:
            steps = getattr(args, f"{key}_steps")
            only = [g for g in args.groups.split(";") if g]
            lines += stats_table(build(key, args), steps, args.warm, args.bare_rounds, only)
            lines.append("")
    if "floors" in tables:
        lines += ["### The floor of each statistic's arithmetic alone", ""]
        for key in cases:
            lines += [*floors_table(build(key, args), args.bare_rounds), ""]
    if "memory" in tables:
        lines += ["### Peak memory (a fresh process per case and mode)", "", *MEMORY_HEADER]
        for key in cases:
            lines += memory_table(key, args.memory_steps, args)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(Path(args.write), TITLE, text)


if __name__ == "__main__":
    main()

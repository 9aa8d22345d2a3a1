"""Overhead of the Probe on a training step, measured side by side (issue 12's benchmark).

Two models: a 12×256 tanh MLP (batch 128) and a 6-layer 32-channel CNN (3×32×32, batch
64). CPU, 2 torch threads. Every number is against a plain step measured in the same
interleaved run; targets (issue 12) are printed beside the numbers with ✓/✗.

Method
------
* **Step time** (rows, and the profile). Every mode trains its own twin of the model
  (same initial weights, its own SGD optimizer); a Probe is attached to its twin once and
  stays attached for the whole run, so ``every=k`` cadences and the Probe's flushes
  (every ``flush_every`` recorded steps, the library's default) fall where they would in
  a real run. First, plain steps until step times settle (on this VM a fresh process
  faults its pages in slowly, in system time, for seconds to a minute); then 2 untimed
  plain steps per twin and 1 untimed step under each Probe (first-step set-up); then
  rounds of ``--steps`` steps per mode, timed, interleaved, in an order rotated from round
  to round, so drift and load on the shared machine fall on every mode alike. A mode's
  ms/step = (its timed rounds + its ``close()``, which flushes what is left) / its timed
  steps: the Probe's host copies are all counted. A round over 1.5× the mode's median
  round (a load spike: every round of a mode does the same work) counts as the median
  round. × plain = that over plain's ms/step; the spread is the min–max of the per-round
  ratios to plain.
* **The floor of the work itself** (row "the default statistics' reductions alone"):
  ``bench/bare.py``'s hand-written monitor takes the reductions the default statistics
  need, the cheapest way we know, with nothing around them (no rows, no step close, no
  guards); its results are dropped each step. Between it and plain: what the statistics
  cost on this machine in any eager implementation; between it and the Probe: the
  Probe's own bookkeeping.
* **The default cadence**: ``Probe(model, opt)`` with no ``every`` argument (whatever the
  library's default is when it runs: read from the signature and printed), attached to a
  twin for a long run (500 steps, as the target; fewer with ``--quick``), timed in blocks
  alternating with a plain twin (order ABBA...), construction and the final ``close()``
  included; × plain = probed total / plain total, where a block over 3× its twin's median
  block counts as the median block. How many steps each statistic was recorded on is
  read from ``probe.frame()`` afterwards.
* **Peak memory**: each (model, mode) in a fresh subprocess: the high-water RSS after the
  steps and after ``close()`` minus the RSS before the first step (model, data and
  gradprobe loaded; the high-water mark is restarted there through
  ``/proc/self/clear_refs`` and read as ``VmHWM``: ``ru_maxrss`` would also keep the RSS
  of the process that exec'd the child), against the same for plain; also the bytes the
  Probe itself holds (tensors, NumPy arrays and frames reachable from the Probe object,
  the model's parameters, gradients and optimizer state excluded), read before ``close()``.
* **Profile**: the extra ms/step of ``Probe(stats=[those], every=1)`` over plain, one row
  per statistic group as the Probe computes them (every statistic of
  ``gradprobe.stats.STATISTICS`` is in one row; a new one gets its own), interleaved with
  the rows above. Each row includes the hooks' own cost (the ``none`` row).
* **Parameter statistics vs one bare ``torch._foreach_norm``** over the same gradients:
  the Probe's per-step parameter work called alone (private: its engine's
  ``params.record``, ``Probe._record_params`` before;
  reported as n/a if the engine no longer has it), median of rounds of 50 calls.

With ``--ddp``: plain, the floor, default every=1, cheap every=1 and the default cadence
under DistributedDataParallel on 2 CPU processes (gloo, loopback, 1 thread each, the
batch split between them), both models, the same method; rank 0's times.

Run:  .venv/bin/python bench/overhead.py [--quick] [--write bench/RESULTS.md]
      .venv/bin/python bench/overhead.py --ddp [--quick] [--write bench/RESULTS.md]
``--write`` replaces only this bench's section of the file (plain and ``--ddp`` runs have
one each); ``--section NAME`` writes to a section of its own (e.g. a run of an older
checkout: ``PYTHONPATH=OLD/src .venv/bin/python bench/overhead.py --section before``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from _results import write_section  # bench/, the script's own directory
from bare import BareMonitor  # bench/, the script's own directory
from torch import nn

import gradprobe
from gradprobe import Probe

# ---------------------------------------------------------------- targets (issue 12)
TARGET_DEFAULT = 1.10  # default statistics at every=1, × plain
RESOLVED_BAR = {"mlp": 1.5, "cnn": 1.2}  # issue 12 is not resolved above these (default every=1)
TARGET_CADENCE = 1.03  # the default cadence over a 500-step run
CADENCE_TARGET_STEPS = 500
TARGET_CHEAP = 1.05  # stats="cheap" at every=1
TARGET_PARAMS = 1.5  # parameter statistics, × one bare _foreach_norm
TARGET_MEMORY = 1.05  # peak memory with the Probe, × without

SPIKE = 1.5  # a timed round this much slower than the mode's median round is a load spike
CADENCE_SPIKE = 3.0  # the same for the blocks of the default-cadence run
SETTLE_S = 60.0  # at most this long, plain steps until step times settle (see settle())

TITLE = "## Probe overhead (bench/overhead.py)"
DDP_TITLE = "## Probe overhead under DDP (bench/overhead.py --ddp)"


# ---------------------------------------------------------------- models
def tanh_mlp(batch: int = 128) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    layers: list[nn.Module] = [nn.Linear(64, 256), nn.Tanh()]
    for _ in range(11):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    layers.append(nn.Linear(256, 10))
    return nn.Sequential(*layers), torch.randn(batch, 64), torch.randint(0, 10, (batch,))


def cnn(batch: int = 64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    layers: list[nn.Module] = []
    c = 3
    for _ in range(6):
        layers += [nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True)]
        c = 32
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
    return nn.Sequential(*layers), torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


MODELS: dict[str, tuple[str, Callable[..., tuple[nn.Module, torch.Tensor, torch.Tensor]]]] = {
    "mlp": ("12×256 tanh MLP, batch 128", tanh_mlp),
    "cnn": ("6-layer 32-ch CNN, 3×32×32, batch 64", cnn),
}


# ---------------------------------------------------------------- modes
@dataclass(frozen=True)
class Mode:
    label: str
    kind: str  # "plain", "floor", "snippet", "bare" or "probe"
    probe: dict[str, Any] = field(default_factory=dict)  # Probe kwargs (kind "probe")
    target: float | None = None  # × plain (issue 12)


PLAIN = Mode("plain", "plain")
FLOOR = Mode("plain + one `torch._foreach_norm` over the gradients (floor)", "floor")
SNIPPET = Mode("plain + plot_grad_flow snippet (`.item()` per parameter: mean, max)", "snippet")
BARE = Mode(
    "plain + the default statistics' reductions alone, hand-written (bench/bare.py)", "bare"
)
DEFAULT_1 = Mode("Probe default, every=1", "probe", {"every": 1}, TARGET_DEFAULT)
CHEAP_1 = Mode(
    'Probe stats="cheap", every=1', "probe", {"every": 1, "stats": "cheap"}, TARGET_CHEAP
)
MAIN_MODES = [
    PLAIN,
    FLOOR,
    SNIPPET,
    BARE,
    Mode('Probe stats=["grad_norm"], every=1', "probe", {"every": 1, "stats": ["grad_norm"]}),
    CHEAP_1,
    DEFAULT_1,
    Mode("Probe default, every=10", "probe", {"every": 10}),
]
DDP_MODES = [PLAIN, FLOOR, DEFAULT_1, CHEAP_1]

# Statistics grouped as the Probe computes them (one hook path each); names the library
# no longer has are dropped, and a statistic in no group gets a row of its own.
PROFILE_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("output: act_mean, act_std, zero_frac", ("act_mean", "act_std", "zero_frac")),
    ("nonfinite (outputs and gradients)", ("nonfinite",)),
    ("units: dead_frac, dead_window_frac", ("dead_frac", "dead_window_frac")),
    ("gate: sat_frac, gate_mean", ("sat_frac", "gate_mean")),
    ("error_norm", ("error_norm",)),
    ("error_gain", ("error_gain",)),
    ("error_nonfinite", ("error_nonfinite",)),
    (
        "parameters: grad_norm, param_norm, global_grad_norm",
        ("grad_norm", "param_norm", "global_grad_norm"),
    ),
    ("update_ratio (parameter snapshot)", ("update_ratio",)),
    ("pre-clip: global_grad_norm_preclip, clipped", ("global_grad_norm_preclip", "clipped")),
    (
        "host-side: calls, grad_missing, skipped, loss, lr",
        ("calls", "grad_missing", "skipped", "loss", "lr"),
    ),
]


def profile_modes() -> list[Mode]:
    from gradprobe.stats import STATISTICS

    known = set(STATISTICS)
    modes = [Mode("none (hooks and step boundary only)", "probe", {"every": 1, "stats": []})]
    grouped: set[str] = set()
    for label, names in PROFILE_GROUPS:
        present = [n for n in names if n in known]
        grouped.update(names)
        if present:
            if len(present) < len(names):
                label = f"{label} (present: {', '.join(present)})"
            modes.append(Mode(label, "probe", {"every": 1, "stats": present}))
    for name in STATISTICS:
        if name not in grouped:
            modes.append(Mode(name, "probe", {"every": 1, "stats": [name]}))
    return modes


def default_cadence_label() -> str:
    """``Probe(model, opt)`` and the library's default ``every``, read, not assumed."""
    param = inspect.signature(Probe).parameters.get("every")
    if param is None:
        return "Probe(model, opt), no `every` parameter"
    return f"Probe(model, opt): default every={param.default!r}"


# ---------------------------------------------------------------- one twin per mode
class Twin:
    """A model twin, its optimizer and the step of one mode; a Probe if the mode has one."""

    def __init__(
        self,
        mode: Mode,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.mode = mode
        inner = copy.deepcopy(model)
        self.model = wrap(inner) if wrap is not None else inner
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=1e-3, momentum=0.9)
        self.x, self.y = x, y
        self.probe: Probe | None = None
        self.bare: BareMonitor | None = None
        self.seconds = 0.0
        self.steps = 0
        self.rounds: list[float] = []  # ms/step of each timed round
        self.closing = 0.0  # seconds of the Probe's close() (its last flush)
        self.attaching = 0.0  # seconds of the Probe's construction, where timed

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        if self.mode.kind == "floor":
            torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
        elif self.mode.kind == "snippet":
            for p in self.params:
                if p.grad is not None:
                    p.grad.abs().mean().item()
                    p.grad.abs().max().item()
        self.opt.step()

    def attach(self, **kwargs: Any) -> None:
        if self.mode.kind == "bare":
            self.bare = BareMonitor(self.model, self.opt)
        else:
            self.probe = Probe(self.model, self.opt, **kwargs)

    def time(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.steps += steps
        self.rounds.append(elapsed / steps * 1e3)
        return elapsed

    def close(self) -> float:
        """Close the Probe (its last flush), timed; the seconds count as the mode's."""
        if self.probe is None:
            return 0.0
        start = time.perf_counter()
        self.probe.close()
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.closing += elapsed
        return elapsed

    def clipped_seconds(self, spike: float) -> float:
        """Timed rounds (a round over ``spike`` × the median round counts as the median
        round), plus the Probe's construction and ``close()``."""
        if not self.rounds:
            return self.closing + self.attaching
        median = statistics.median(self.rounds)
        rounds = [min(r, spike * median) for r in self.rounds]
        return sum(rounds) * self.steps / len(rounds) / 1e3 + self.closing + self.attaching

    def spikes_over(self, spike: float) -> int:
        median = statistics.median(self.rounds) if self.rounds else 0.0
        return sum(r > spike * median for r in self.rounds)

    @property
    def ms(self) -> float:
        """ms/step: every timed round and the final ``close()``, over the timed steps; a
        round slower than ``SPIKE`` × the mode's median round counts as the median round
        (a load spike on the shared machine: every round of a mode does the same work)."""
        if not self.rounds:
            return 0.0
        median = statistics.median(self.rounds)
        rounds = [min(r, SPIKE * median) for r in self.rounds]
        timed = sum(rounds) * self.steps / len(rounds)
        return (timed + self.closing * 1e3) / max(self.steps, 1)

    @property
    def spikes(self) -> int:
        if not self.rounds:
            return 0
        median = statistics.median(self.rounds)
        return sum(r > SPIKE * median for r in self.rounds)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def settle(twin: Twin, limit_s: float = SETTLE_S) -> int:
    """Plain steps until 5 in a row are within 25 % of each other (at least 10), at most
    ``limit_s``: on this VM a fresh process's first allocations fault pages in slowly (system
    time), for a few seconds to a minute. Under DDP rank 0 decides for all. Returns steps."""
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        twin.step()
        times.append(time.perf_counter() - t0)
        last = times[-5:]
        done = (len(times) >= 10 and max(last) <= 1.25 * min(last)) or (
            time.perf_counter() - start > limit_s
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(done)])
            torch.distributed.broadcast(flag, 0)
            done = bool(flag.item())
        if done:
            return len(times)


def interleaved(
    build: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]],
    modes: list[Mode],
    rounds: int,
    steps: int,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    warm: int = 2,
) -> dict[str, dict[str, Any]]:
    """ms/step of every mode, its ratio to plain and the spread of the per-round ratios."""
    torch.manual_seed(0)
    model, x, y = build()
    twins = [Twin(m, model, x, y, wrap) for m in modes]
    settled = settle(twins[0])
    for t in twins:
        for _ in range(warm):
            t.step()
        if t.mode.kind in ("probe", "bare"):
            t.attach(**t.mode.probe)
            t.step()  # the first recorded step sets up: not the steady state
    for r in range(rounds):
        shift = r % len(twins)
        for t in twins[shift:] + twins[:shift]:
            barrier()
            t.time(steps)
    for t in twins:
        barrier()
        t.close()
    plain = next(t for t in twins if t.mode.kind == "plain")
    out = {}
    for t in twins:
        ratios = [a / b for a, b in zip(t.rounds, plain.rounds)]
        out[t.mode.label] = {
            "ms": t.ms,
            "ratio": t.ms / plain.ms,
            "spread": (min(ratios), max(ratios)),
            "steps": t.steps,
            "spikes": t.spikes,
            "rounds": len(t.rounds),
            "settled": settled,
            "round_ms": t.rounds,
        }
    return out


def cadence(
    build: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]],
    steps: int,
    block: int,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    warm: int = 2,
    every: Any = None,
) -> dict[str, Any]:
    """``Probe(model, opt)`` with the library's default cadence (or ``every``, if given)
    over ``steps`` steps, timed in blocks alternating (ABBA...) with as many plain steps
    on a twin."""
    torch.manual_seed(0)
    model, x, y = build()
    plain, probed = Twin(PLAIN, model, x, y, wrap), Twin(PLAIN, model, x, y, wrap)
    settle(plain)
    for t in (plain, probed):
        for _ in range(warm):
            t.step()
    barrier()
    start = time.perf_counter()
    # no stats, no flush_every: the defaults; no every either, unless one is given
    probed.attach(**({} if every is None else {"every": every}))
    probed.attaching = time.perf_counter() - start
    probed.seconds += probed.attaching
    blocks = max(steps // block, 1)
    for b in range(blocks):
        for t in (plain, probed) if b % 4 in (0, 3) else (probed, plain):
            barrier()
            t.time(block)
    barrier()
    probed.close()
    recorded: dict[str, int] = {}
    frame = probed.probe.frame() if probed.probe is not None else None
    if frame is not None and len(frame):
        recorded = {str(k): int(v) for k, v in frame.groupby("stat")["step"].nunique().items()}
    ratios = [a / b for a, b in zip(probed.rounds, plain.rounds)]
    # A block over CADENCE_SPIKE × its twin's median block is a load spike: a cadence's
    # own structure (all of the first steps recorded, then fewer) stays well under it.
    plain_s = plain.clipped_seconds(CADENCE_SPIKE)
    probe_s = probed.clipped_seconds(CADENCE_SPIKE)
    return {
        "label": default_cadence_label() if every is None else f"Probe(model, opt, every={every!r})",
        "steps": plain.steps,
        "block": block,
        "plain_s": plain_s,
        "probe_s": probe_s,
        "ratio": probe_s / plain_s,
        "raw_ratio": probed.seconds / plain.seconds,
        "clipped": plain.spikes_over(CADENCE_SPIKE) + probed.spikes_over(CADENCE_SPIKE),
        "spread": (min(ratios), max(ratios)),
        "plain_block_ms": plain.rounds,
        "recorded": recorded,
        "any_recorded": int(frame["step"].nunique()) if frame is not None and len(frame) else 0,
    }


# ---------------------------------------------------------------- parameter statistics
PARAM_STATS = ("grad_norm", "param_norm", "nonfinite", "global_grad_norm")


def param_stats_vs_foreach(
    build: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]], rounds: int
) -> list[dict[str, Any]]:
    """The Probe's per-step parameter work called alone vs one bare ``_foreach_norm``."""
    from gradprobe.stats import STATISTICS

    torch.manual_seed(0)
    model, x, y = build()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = []
    for stats in (["grad_norm"], [s for s in PARAM_STATS if s in STATISTICS]):
        row: dict[str, Any] = {"stats": stats}
        probe = Probe(model, opt, stats=stats, modules=[], every=1)
        try:
            # The engine's parameter statistics (gradprobe/recording/params.py), or an
            # older version's Probe method.
            params = getattr(getattr(probe, "_engine", None), "params", None)
            record = getattr(params, "record", None) or getattr(probe, "_record_params", None)
            discard = getattr(getattr(probe, "buffer", None), "discard_step", None)
            if record is None or discard is None:
                raise AttributeError("Probe._record_params / Probe.buffer.discard_step")
            bare, probed = [], []
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(50):
                    torch._foreach_norm(grads)
                bare.append((time.perf_counter() - start) / 50 * 1e3)
                start = time.perf_counter()
                for _ in range(50):
                    record()
                    discard()
                probed.append((time.perf_counter() - start) / 50 * 1e3)
            row.update(bare=statistics.median(bare), probe=statistics.median(probed))
        except Exception as exc:  # the engine changed: say so, measure nothing wrong
            row["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            probe.close()
        out.append(row)
    return out


# ---------------------------------------------------------------- memory (fresh process)
MEMORY_MODES: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "Probe default, every=1": {"every": 1},
    "Probe(model, opt): default cadence": {},
}


def probe_bytes(probe: Probe, exclude: set[int]) -> dict[str, int]:
    """Bytes of tensors, arrays and frames reachable from the Probe, by attribute.

    Read by introspection (no private name is assumed): storages of the model's own
    parameters, gradients and optimizer state (``exclude``: data pointers) are not counted,
    nor anything behind a module, an optimizer or a weak reference.
    """
    import numpy as np
    import pandas as pd

    seen: set[Any] = set()

    def walk(obj: Any, depth: int) -> int:
        if depth > 12 or id(obj) in seen:
            return 0
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided:
                return 0
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in exclude or ("storage", ptr) in seen:
                return 0
            seen.add(("storage", ptr))
            return storage.nbytes()
        if isinstance(obj, np.ndarray):
            return obj.nbytes
        if isinstance(obj, (pd.DataFrame, pd.Series)):
            usage = obj.memory_usage(deep=True)
            return int(usage.sum() if hasattr(usage, "sum") else usage)
        if isinstance(
            obj, (str, bytes, int, float, bool, type(None), nn.Module, torch.optim.Optimizer)
        ):
            return 0
        if isinstance(obj, dict):
            return sum(walk(k, depth + 1) + walk(v, depth + 1) for k, v in obj.items())
        if isinstance(obj, (list, tuple, set, frozenset)):
            return sum(walk(v, depth + 1) for v in obj)
        module = type(obj).__module__ or ""
        if is_dataclass(obj) or module.startswith("gradprobe"):
            fields = dict(getattr(obj, "__dict__", {}))
            for name in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, name):
                    fields[name] = getattr(obj, name)
            return sum(walk(v, depth + 1) for v in fields.values())
        return 0

    return {name: walk(value, 0) for name, value in vars(probe).items()}


def peak_rss_kib() -> int:
    """The high-water RSS of this process in KiB: ``VmHWM`` (what ``clear_refs`` restarts),
    else ``ru_maxrss``, which under Linux also keeps the RSS of the parent this process was
    exec'd from (a bench process of 1.5 GiB hides every child's own peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(model_key: str, mode: str, steps: int) -> None:
    """In a fresh process: peak RSS growth over ``steps`` steps (and close) of one mode."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, x, y = MODELS[model_key][1]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    kwargs = MEMORY_MODES[mode]
    gc.collect()
    # Importing torch (and torch._dynamo, which the optimizer imports) peaks far above a
    # training step: restart the high-water mark at the current RSS (Linux ≥ 4.0).
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    before = peak_rss_kib()
    probe = Probe(model, opt, **kwargs) if kwargs is not None else None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    held: dict[str, int] = {}
    if probe is not None:
        exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        exclude |= {
            p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None
        }
        for state in opt.state.values():
            exclude |= {
                v.untyped_storage().data_ptr()
                for v in state.values()
                if isinstance(v, torch.Tensor)
            }
        held = {k: v for k, v in probe_bytes(probe, exclude).items() if v}
    stepped = peak_rss_kib()  # before close's flush
    if probe is not None:
        probe.close()
    peak = peak_rss_kib()
    result = {"before_kib": before, "steps_kib": stepped, "peak_kib": peak}
    print(json.dumps({**result, "held": held, "reset": reset}))


def memory_ratio(modes: dict[str, dict[str, Any]], mode: str) -> float | None:
    """Peak RSS growth of ``mode`` over plain's; None where it cannot be read (no reset of
    the high-water mark, or plain's growth under 1 MiB: a ratio of noise)."""
    plain, m = modes["plain"], modes[mode]
    plain_growth = plain["peak_kib"] - plain["before_kib"]
    if not (plain.get("reset") and m.get("reset")) or plain_growth < 1024:
        return None
    return (m["peak_kib"] - m["before_kib"]) / plain_growth


def memory(model_key: str, steps: int) -> dict[str, dict[str, Any]]:
    out = {}
    for mode in MEMORY_MODES:
        done = subprocess.run(
            [sys.executable, __file__, "--memory-child", model_key, mode, str(steps)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"memory child {model_key}/{mode} failed: {done.stderr[-1500:]}")
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- formatting
def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def checked(value: float | None, target: float | None) -> str:
    if value is None or target is None:
        return ""
    return f"≤ {target:.2f}× {mark(value <= target)}"


def source_line() -> str:
    """Which gradprobe was measured: its path, commit and whether src/ had changes."""
    src = Path(gradprobe.__file__).resolve().parent
    described = ""
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        described = f" at {head}" + (" with uncommitted changes in src/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"gradprobe from `{src}`{described}"


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def fmt_spread(spread: tuple[float, float]) -> str:
    return f"{spread[0]:.2f}–{spread[1]:.2f}"


def step_table(results: dict[str, dict[str, dict[str, Any]]], modes: list[Mode]) -> list[str]:
    keys = list(results)
    head = (
        "| mode | "
        + " | ".join(
            f"{k.upper()} ms/step | {k.upper()} × plain | {k.upper()} spread" for k in keys
        )
        + " | target |"
    )
    lines = [head, "|---|" + "---:|---:|---:|" * len(keys) + "---|"]
    for mode in modes:
        cells = []
        verdicts = []
        for k in keys:
            r = results[k][mode.label]
            cells.append(f"{r['ms']:.2f} | {r['ratio']:.2f} | {fmt_spread(r['spread'])}")
            if mode.target is not None:
                verdicts.append(f"{k.upper()} {mark(r['ratio'] <= mode.target)}")
        target = f"≤ {mode.target:.2f}× " + " ".join(verdicts) if mode.target else ""
        lines.append(f"| {mode.label} | " + " | ".join(cells) + f" | {target} |")
    return lines


def recorded_on(recorded: dict[str, int], steps: int) -> str:
    """'N of M steps: names; ...' by number of steps, the largest group unnamed."""
    if not recorded:
        return "nothing"
    groups: dict[int, list[str]] = {}
    for name, n in recorded.items():
        groups.setdefault(n, []).append(name)
    if len(groups) == 1:
        return f"every statistic on {next(iter(groups))} of {steps} steps"
    largest = max(groups, key=lambda n: len(groups[n]))
    parts = [
        f"{n}: " + ("the others" if n == largest else ", ".join(sorted(groups[n])))
        for n in sorted(groups, reverse=True)
    ]
    return f"of {steps} steps, " + "; ".join(parts)


def cadence_length_note(plan: Plan) -> str:
    """Say so where a run is shorter than the target's 500 steps (``--quick``): a cadence
    records all of its first steps, so a short run weighs them more than the target's."""
    short = [f"{k.upper()} {n}" for k, (n, _) in plan.cadence.items() if n < CADENCE_TARGET_STEPS]
    if not short:
        return f"Both runs are {CADENCE_TARGET_STEPS} steps, as the target's. "
    return (
        f"Shorter than the target's {CADENCE_TARGET_STEPS} steps here ({', '.join(short)}): "
        "a cadence records all of its first steps, so these weigh them more than 500 would. "
    )


def cadence_table(*cads: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| model | cadence | steps (blocks) | plain s | probed s | × plain | block spread | statistics recorded on | spikes | target |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for k, c in [(k, c) for cad in cads for k, c in cad.items()]:
        seen = recorded_on(c["recorded"], c["steps"])
        lines.append(
            f"| {k.upper()} | {c['label']} | {c['steps']} ({c['block']}) | {c['plain_s']:.2f} "
            f"| {c['probe_s']:.2f} | {c['ratio']:.3f} | {fmt_spread(c['spread'])} | {seen} "
            f"| {c.get('clipped', 0)} | {checked(c['ratio'], TARGET_CADENCE)} |"
        )
    return lines


def memory_table(mem: dict[str, dict[str, dict[str, Any]]], steps: dict[str, int]) -> list[str]:
    lines = [
        "| model | mode | steps | growth after the steps, MiB | growth after `close()`, MiB "
        "| × plain | peak RSS, MiB | × plain | Probe holds before `close()` | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for k, modes in mem.items():
        plain = modes["plain"]
        for mode, m in modes.items():
            growth = m["peak_kib"] - m["before_kib"]
            stepped = m["steps_kib"] - m["before_kib"]
            ratio = memory_ratio(modes, mode)
            total_ratio = m["peak_kib"] / plain["peak_kib"]
            held = m["held"]
            parts = sorted(((v, n) for n, v in held.items() if v > 0), reverse=True)[:3]
            holds = (
                f"{sum(held.values()) / 1024:.0f} KiB ("
                + ", ".join(f"`{n}` {v / 1024:.0f}" for v, n in parts)
                + ")"
                if held
                else ""
            )
            target = "" if mode == "plain" else checked(ratio, TARGET_MEMORY) or "n/a"
            lines.append(
                f"| {k.upper()} | {mode} | {steps[k]} | {stepped / 1024:.1f} | {growth / 1024:.1f} "
                f"| {fmt(ratio)} "
                f"| {m['peak_kib'] / 1024:.0f} | {total_ratio:.3f} | {holds} | {target} |"
            )
    return lines


def profile_table(results: dict[str, dict[str, dict[str, Any]]], modes: list[Mode]) -> list[str]:
    keys = list(results)
    lines = [
        "| statistic | " + " | ".join(f"{k.upper()} ms" for k in keys) + " |",  # extra ms/step
        "|---|" + "---:|" * len(keys),
    ]
    for mode in [*modes, DEFAULT_1]:
        label = "all (default, every=1)" if mode is DEFAULT_1 else mode.label
        cells = [
            f"{results[k][mode.label]['ms'] - results[k][PLAIN.label]['ms']:+.2f}" for k in keys
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------- the run
@dataclass(frozen=True)
class Plan:
    rounds: int
    steps: dict[str, int]  # per timed round
    cadence: dict[str, tuple[int, int]]  # steps, block
    memory_steps: dict[str, int]
    param_rounds: int
    warm: int  # untimed plain steps per twin before its Probe is attached


FULL = Plan(
    rounds=5,
    steps={"mlp": 20, "cnn": 4},
    # Both over the 500 steps of issue 12's target: a cadence records all of its first
    # steps, so a shorter run would weigh them more than the target's does.
    cadence={"mlp": (500, 50), "cnn": (500, 50)},
    memory_steps={"mlp": 100, "cnn": 12},
    param_rounds=7,
    warm=2,
)
QUICK = Plan(
    rounds=2,
    steps={"mlp": 5, "cnn": 1},
    cadence={"mlp": (100, 25), "cnn": (8, 4)},
    memory_steps={"mlp": 10, "cnn": 2},
    param_rounds=2,
    warm=1,
)


def plan_from(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else FULL
    steps = dict(base.steps)
    if args.steps:
        steps["mlp"] = args.steps
    if args.cnn_steps:
        steps["cnn"] = args.cnn_steps
    return replace(base, rounds=args.rounds or base.rounds, steps=steps)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def disturbed(
    results: dict[str, dict[str, dict[str, Any]]], cad: dict[str, dict[str, Any]]
) -> list[str]:
    """A warning for each run whose plain steps varied by more than ``SPIKE``×: this VM has
    slow phases (tens of seconds to minutes, every step many times slower) that
    interleaving cannot fully cancel. Then run it again."""
    warnings = []
    series = [(f"{k.upper()} rounds", v[PLAIN.label]["round_ms"]) for k, v in results.items()]
    series += [(f"{k.upper()} cadence blocks", c["plain_block_ms"]) for k, c in cad.items()]
    for name, ms in series:
        if ms and max(ms) > SPIKE * min(ms):
            warnings.append(
                f"**Disturbed run**: plain's {name} ranged {min(ms):.1f}–{max(ms):.1f} ms/step "
                "(the shared machine had a slow phase): the ratios below are suspect; run again."
            )
    return warnings


def spikes_note(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    spikes = sum(r["spikes"] for v in results.values() for r in v.values())
    rounds = sum(r["rounds"] for v in results.values() for r in v.values())
    return (
        f"A round slower than {SPIKE}× its mode's median round (a load spike) counts as the "
        f"median round: {spikes} of {rounds} rounds here."
    )


def settle_note(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    settled = ", ".join(
        f"{k.upper()} {next(iter(v.values()))['settled']}" for k, v in results.items()
    )
    return (
        " Before the rounds, plain steps until step times settle (a fresh process faults its "
        f"pages in slowly on this VM): {settled} steps."
    )


def run_single(plan: Plan, title: str) -> str:
    torch.set_num_threads(2)
    source = source_line()  # before the run: the working tree may change during it
    prof = profile_modes()
    steps_res: dict[str, dict[str, dict[str, Any]]] = {}
    cad: dict[str, dict[str, Any]] = {}
    for k, (_, build) in MODELS.items():
        log(
            f"{k}: {len(MAIN_MODES) + len(prof)} modes, {plan.rounds} rounds of {plan.steps[k]} steps"
        )
        steps_res[k] = interleaved(
            build, MAIN_MODES + prof, plan.rounds, plan.steps[k], warm=plan.warm
        )
        log(f"{k}: default cadence, {plan.cadence[k][0]} steps")
        cad[k] = cadence(build, *plan.cadence[k], warm=plan.warm)
    log("parameter statistics vs _foreach_norm")
    params = param_stats_vs_foreach(tanh_mlp, plan.param_rounds)
    mem = {}
    for k in MODELS:
        log(f"{k}: peak memory, {len(MEMORY_MODES)} fresh processes")
        mem[k] = memory(k, plan.memory_steps[k])

    lines = [
        title,
        "",
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"shared 2-core machine; {source}. Models: "
        + "; ".join(f"{k.upper()} = {label}" for k, (label, _) in MODELS.items())
        + ". Method: the docstring of bench/overhead.py. Each mode trains its own twin of the "
        f"model with a Probe attached for the whole run; {plan.rounds} interleaved rounds "
        f"(order rotated per round) of {plan.steps['mlp']} MLP / {plan.steps['cnn']} CNN steps "
        "per mode; ms/step = (timed steps + the Probe's final `close()`) / timed steps, so every "
        "flush is counted; spread = min–max of the per-round ratios to plain. "
        + spikes_note(steps_res)
        + settle_note(steps_res),
        "",
        *(f"{w}\n" for w in disturbed(steps_res, cad)),
        "### Step time",
        "",
        *step_table(steps_res, MAIN_MODES),
        "",
        "### The default cadence over a long run",
        "",
        "One Probe with no `every` argument for the whole run (construction and final `close()` "
        "counted), timed in blocks alternating (ABBA) with a plain twin; × plain = total over "
        f"total, where a block over {CADENCE_SPIKE:.0f}× its twin's median block (a load spike; "
        "column spikes) counts as the median block. "
        + cadence_length_note(plan)
        + "Recorded on: distinct steps with rows of each statistic in `probe.frame()`.",
        "",
        *cadence_table(cad),
        "",
        "### Peak memory (each mode in a fresh process)",
        "",
        "Growth = the high-water RSS after the steps (and after `close()`, whose flush is "
        "counted) minus the RSS before the first step, with model, data and gradprobe loaded; "
        "the high-water mark is restarted there (`/proc/self/clear_refs`), because importing "
        "torch peaks above a training step, and read as `VmHWM` (`ru_maxrss` also keeps the "
        "RSS of the process that started the child). The target is on the growth after `close()`, against "
        "plain's. Peak RSS: the whole process (torch's libraries included). Probe holds: "
        "tensors, arrays and frames reachable from the Probe object before `close()` (the "
        "model's parameters, gradients and optimizer state excluded), KiB by attribute; a copy "
        "made and dropped within a step (the `update_ratio` snapshot) shows in the growth only.",
        "",
        *memory_table(mem, plan.memory_steps),
        "",
        "### What each statistic costs per recorded step (profile)",
        "",
        "Extra ms/step of `Probe(stats=[...], every=1)` over plain, interleaved with the rows "
        "above (same twins, same rounds); every row includes the first one (the hooks and the "
        "step boundary with nothing to compute). Differences of a few tenths of a ms on the "
        "MLP are within the noise of this shared machine (see the spreads above).",
        "",
        *profile_table(steps_res, prof),
        "",
        "### Parameter statistics vs one bare `torch._foreach_norm`",
        "",
    ]
    for row in params:
        stats = ", ".join(row["stats"])
        if "error" in row:
            lines.append(f"- MLP, stats=[{stats}], modules=[]: n/a ({row['error']}).")
        else:
            ratio = row["probe"] / row["bare"]
            lines.append(
                f"- MLP, stats=[{stats}], modules=[]: the Probe's parameter work "
                f"{row['probe']:.3f} ms vs one bare `_foreach_norm` {row['bare']:.3f} ms "
                f"→ {ratio:.2f}× ({checked(ratio, TARGET_PARAMS)})."
            )

    # ---- the targets, in one place
    lines += ["", "### Targets (issue 12)", ""]
    for k in MODELS:
        r = steps_res[k]
        d1 = r[DEFAULT_1.label]["ratio"]
        lines.append(
            f"- {k.upper()} default every=1: {d1:.2f}× (≤ {TARGET_DEFAULT:.2f}× "
            f"{mark(d1 <= TARGET_DEFAULT)}; not resolved above {RESOLVED_BAR[k]:.1f}×: "
            f"{mark(d1 <= RESOLVED_BAR[k])})"
        )
        bare = r[BARE.label]["ratio"]
        lines.append(
            f"- {k.upper()} the default statistics' reductions alone (bench/bare.py), every "
            f"step: {bare:.2f}×: the floor of any eager implementation of them here"
        )
        ch = r[CHEAP_1.label]["ratio"]
        lines.append(f"- {k.upper()} cheap every=1: {ch:.2f}× ({checked(ch, TARGET_CHEAP)})")
        c = cad[k]
        lines.append(
            f"- {k.upper()} default cadence over {c['steps']} steps: {c['ratio']:.3f}× "
            f"({checked(c['ratio'], TARGET_CADENCE)})"
        )
        for mode in list(MEMORY_MODES)[1:]:
            ratio = memory_ratio(mem[k], mode)
            verdict = checked(ratio, TARGET_MEMORY) or "n/a: see the memory table"
            lines.append(f"- {k.upper()} peak memory growth, {mode}: {fmt(ratio)}× ({verdict})")
    for row in params:
        if "error" not in row:
            ratio = row["probe"] / row["bare"]
            lines.append(
                f"- parameter statistics [{', '.join(row['stats'])}] vs one `_foreach_norm`: "
                f"{ratio:.2f}× ({checked(ratio, TARGET_PARAMS)})"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, plan: Plan, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result: dict[str, Any] = {"steps": {}, "cadence": {}}
        for k, (_, build) in MODELS.items():

            def shard(build=build) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
                model, x, y = build()
                n = len(x) // world
                return model, x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]

            wrap = nn.parallel.DistributedDataParallel
            if rank == 0:
                log(
                    f"ddp {k}: {len(DDP_MODES)} modes, {plan.rounds} rounds of {plan.steps[k]} steps"
                )
            result["steps"][k] = interleaved(
                shard, DDP_MODES, plan.rounds, plan.steps[k], wrap, plan.warm
            )
            if rank == 0:
                log(f"ddp {k}: default cadence, {plan.cadence[k][0]} steps")
            result["cadence"][k] = cadence(shard, *plan.cadence[k], wrap=wrap, warm=plan.warm)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ddp(plan: Plan, title: str, world: int = 2) -> str:
    import torch.multiprocessing as mp

    source = source_line()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_ddp_worker, args=(world, port, plan, out), nprocs=world, join=True)
        result = json.loads(Path(out).read_text())
    steps_res = {
        k: {label: {**r, "spread": tuple(r["spread"])} for label, r in v.items()}
        for k, v in result["steps"].items()
    }
    cad = {k: {**c, "spread": tuple(c["spread"])} for k, c in result["cadence"].items()}
    lines = [
        title,
        "",
        f"torch {torch.__version__}, {world} CPU processes (gloo, loopback), 1 thread each, the "
        f"batch split between them (MLP 64, CNN 32 per rank); {source}. Same method as "
        f"above (twins, interleaved rounds, `close()` counted), rank 0's times: {plan.rounds} "
        f"rounds of {plan.steps['mlp']} MLP / {plan.steps['cnn']} CNN steps per mode. "
        + spikes_note(steps_res)
        + settle_note(steps_res),
        "",
        *(f"{w}\n" for w in disturbed(steps_res, cad)),
        *step_table(steps_res, DDP_MODES),
        "",
        "The default cadence (one Probe for the whole run, blocks alternating with a plain twin):",
        "",
        *cadence_table(cad),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds and steps: a smoke run")
    parser.add_argument(
        "--rounds", type=int, default=0, help="interleaved rounds (default 5, quick 2)"
    )
    parser.add_argument("--steps", type=int, default=0, help="MLP steps per round (default 20)")
    parser.add_argument("--cnn-steps", type=int, default=0, help="CNN steps per round (default 4)")
    parser.add_argument(
        "--ddp", action="store_true", help="the main rows under DDP, 2 CPU processes"
    )
    parser.add_argument("--write", default="", help="replace this bench's section of a RESULTS.md")
    parser.add_argument("--section", default="", help="write to a section of its own: TITLE, NAME")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        model_key, mode, steps = args.memory_child
        memory_child(model_key, mode, int(steps))
        return
    plan = plan_from(args)
    title = DDP_TITLE if args.ddp else TITLE
    if args.section:
        title = f"{title}, {args.section}"
    started = time.perf_counter()
    text = run_ddp(plan, title) if args.ddp else run_single(plan, title)
    print(text)
    log(f"done in {time.perf_counter() - started:.0f} s")
    if args.write:
        write_section(Path(args.write), title, text)


if __name__ == "__main__":
    main()

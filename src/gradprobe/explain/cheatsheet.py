"""docs/concepts.md §7 worked out: the activation cheat-sheet, computed for every registered activation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..activations import ACTIVATIONS, Activation
from ..errors import GradprobeError

# The cheat-sheet of docs/concepts.md §7, as data (softmax is not element-wise, so not registered).
CHEAT_SHEET: dict[str, tuple[str, str, str]] = {
    "relu": ("hidden layers", "fast, simple", "dead units"),
    "leaky_relu": ("hidden layers", "avoids dead units", "extra hyper-parameter"),
    "sigmoid": ("binary output", "outputs a probability", "vanishing gradient"),
    "tanh": ("RNNs", "zero-centred, smooth", "vanishing gradient"),
    "softmax": ("multi-class output", "normalised probabilities", "only for the last layer"),
    "silu": ("deep CNNs, NLP", "often better than ReLU", "more compute"),
    "gelu": ("Transformers (BERT, GPT)", "stable training", "more compute"),
}

Interval = tuple[float, float]


@dataclass(frozen=True)
class ActivationFacts:
    """What the numbers say about one registered activation on z ∈ [−zmax, zmax].

    ``saturated``: intervals where 0 < |f'(z)| < 1 % of the maximum (alive but tiny);
    ``dead``: intervals where f'(z) = 0 exactly. An interval reaching the edge of the
    scanned range is reported open-ended (±inf).
    """

    name: str
    zmax: float
    max_derivative: float
    argmax: float
    registry_max_derivative: float
    saturated: list[Interval]
    dead: list[Interval]
    used_in: str
    strength: str
    weakness: str


def _intervals(
    pred: Callable[[np.ndarray], np.ndarray], zmax: float, step: float
) -> list[Interval]:
    """Maximal intervals of [−zmax, zmax] where ``pred`` holds, ends refined by bisection."""
    grid = np.arange(-zmax, zmax + step / 2, step)
    mask = pred(grid)
    out: list[Interval] = []

    def edge(a: float, b: float) -> float:  # pred(a) != pred(b): bisect the switch
        pa = bool(pred(np.array([a]))[0])
        for _ in range(60):
            m = 0.5 * (a + b)
            if bool(pred(np.array([m]))[0]) == pa:
                a = m
            else:
                b = m
        return 0.5 * (a + b)

    i, n = 0, grid.size
    while i < n:
        if not mask[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and mask[j + 1]:
            j += 1
        lo = -math.inf if i == 0 else edge(float(grid[i - 1]), float(grid[i]))
        hi = math.inf if j == n - 1 else edge(float(grid[j]), float(grid[j + 1]))
        out.append((lo, hi))
        i = j + 1
    return out


def _facts(act: Activation, zmax: float, step: float) -> ActivationFacts:
    def d(z: np.ndarray) -> np.ndarray:
        return act.gate(torch.from_numpy(np.asarray(z, dtype=np.float64))).numpy()

    grid = np.arange(-zmax, zmax + step / 2, step)
    values = d(grid)
    k = int(np.argmax(values))
    # refine the maximum by golden-section search around the best grid point
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, e = b - g * (b - a), a + g * (b - a)
        if d(np.array([c]))[0] >= d(np.array([e]))[0]:
            b = e
        else:
            a = c
    arg = 0.5 * (a + b)
    best = float(max(values[k], d(np.array([arg]))[0]))
    arg = arg if best > values[k] else float(grid[k])
    arg = round(arg, 6) + 0.0  # flat maxima (relu: every z > 0) are reported at their start
    small = 0.01 * best
    saturated = _intervals(lambda z: (np.abs(d(z)) < small) & (d(z) != 0), zmax, step)
    dead = _intervals(lambda z: d(z) == 0, zmax, step)
    used, strength, weakness = CHEAT_SHEET.get(act.name, (act.used_in, "", ""))
    return ActivationFacts(
        act.name,
        zmax,
        best,
        float(arg),
        act.max_derivative,
        saturated,
        dead,
        used,
        strength,
        weakness,
    )


def activations(zmax: float = 12.0, step: float = 1e-3) -> list[ActivationFacts]:
    """Concepts §7 computed for every registered activation (default parameters).

    The scan stops at |z| = 12 because beyond about 19 float64 rounds tanh(z) to 1 and
    the registry's 1 − tanh² to exactly 0: a rounding artefact, not a dead unit
    (in float32 that happens already beyond |z| ≈ 9).
    """
    return [_facts(act, zmax, step) for act in ACTIVATIONS.values()]


def plot_activations(path: str | Path, zmax: float = 6.0) -> Path:
    """PNG of every registered activation f (solid) and its derivative f' (dashed)."""
    # Agg unless a backend was chosen (a notebook keeps its own)
    from .._mpl import pyplot as _pyplot

    plt = _pyplot()

    path = Path(path)
    acts = list(ACTIVATIONS.values())
    cols = 4
    rows = math.ceil(len(acts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    z = torch.linspace(-zmax, zmax, 1201, dtype=torch.float64)
    for ax, act in zip(axes.flat, acts):
        ax.plot(z.numpy(), act(z).numpy(), label="f(z)")
        ax.plot(z.numpy(), act.gate(z).numpy(), "--", label="f'(z)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(act.name)
        ax.set_ylim(-2, 3)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(acts) :]:
        ax.axis("off")
    axes.flat[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_figure(
    topic: str, plot: str | Path | None = None, out: str | Path | None = None
) -> Path | None:
    """Write the topic's figure to ``plot``, or to ``out``/<topic>.png; ``None`` if neither.

    Only ``activations`` has a figure; asking another topic for one is an error.
    """
    if plot is None and out is None:
        return None
    if topic != "activations":
        raise GradprobeError(
            f"topic {topic!r} has no figure", "--plot/--out apply to 'activations'"
        )
    if plot is not None:
        path = Path(plot)
    else:
        assert out is not None
        path = Path(out) / "activations.png"
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    return plot_activations(path)


def _fmt_intervals(intervals: list[Interval]) -> str:
    parts = []
    for lo, hi in intervals:
        lo, hi = (0.0 if abs(v) < 1e-9 else v for v in (lo, hi))
        if math.isinf(lo) and math.isinf(hi):
            parts.append("everywhere")
        elif math.isinf(lo):
            parts.append(f"z < {hi:.3g}")
        elif math.isinf(hi):
            parts.append(f"z > {lo:.3g}")
        else:
            parts.append(f"{lo:.3g} < z < {hi:.3g}")
    return ", ".join(parts) or "none"


def render_activations(facts: list[ActivationFacts]) -> list[Any]:
    """Rich renderables for :func:`activations`."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    zmax = facts[0].zmax if facts else 0.0
    sheet = Table(title="activation cheat-sheet (docs/concepts.md §7)")
    for col in ("activation", "used in", "strength", "weakness"):
        sheet.add_column(col)
    for name, (used, strength, weakness) in CHEAT_SHEET.items():
        sheet.add_row(name, used, strength, weakness)
    t = Table(title=escape(f"every registered activation, f' computed on [−{zmax:g}, {zmax:g}]"))
    for col in (
        "activation",
        "max f'",
        "at z",
        "saturated: 0 < |f'| < 1% of max",
        "dead: f' = 0",
    ):
        t.add_column(col)
    for f in facts:
        t.add_row(
            f.name,
            f"{f.max_derivative:.4f}",
            f"{f.argmax:.3g}",
            _fmt_intervals(f.saturated),
            _fmt_intervals(f.dead),
        )
    note = Text(
        "softmax is not element-wise (its Jacobian couples the outputs), so it "
        "has no gate f'(z): use it only on the last layer."
    )
    return [sheet, t, note]

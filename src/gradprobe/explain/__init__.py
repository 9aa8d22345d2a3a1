"""Worked examples of the concepts behind gradprobe (docs/concepts.md), computed live and checked.

Each topic is a function that returns its numbers (a dataclass), so tests and
notebooks can check them; :func:`render` turns one into rich renderables for the
``gradprobe explain TOPIC`` command, which only prints them.

* :func:`backprop` — docs/concepts.md §1: the two-layer sigmoid network's gradients written
  out as Hadamard products, each compared with ``torch.autograd`` in float64, and a
  deep sigmoid chain whose product of per-layer factors vanishes.
* :func:`standardize` — docs/concepts.md §5: X = [100, 50, 10, 5, 1] standardised.
* :func:`channels` — docs/concepts.md §6: ``[batch, channels, height, width]`` through a real
  convolution on digits images, per-channel statistics and a dead channel.
* :func:`activations` — docs/concepts.md §7: the cheat-sheet, with each registered
  activation's maximum derivative, saturated and dead ranges found numerically.
* ``residual`` (:mod:`.residual`) — a residual ReLU net's signal forward and back for
  α = 1 and 1/√L, the backward pass by hand against autograd, beside (1 + α²)^l.
* ``isometry`` (:mod:`.isometry`) — deep tanh and ReLU Jacobians at criticality, Gaussian
  vs orthogonal weights, multiplied out by hand against autograd, their spectrum's
  spread beside Pennington et al.'s prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..activations import ACTIVATIONS, Activation
from ..errors import GradprobeError

__all__ = [
    "TOPICS",
    "ActivationFacts",
    "BackpropExample",
    "ChainLayer",
    "ChannelsExample",
    "StandardizeExample",
    "activations",
    "backprop",
    "channels",
    "compute",
    "plot_activations",
    "render",
    "standardize",
    "write_figure",
]

# ---------------------------------------------------------------- §1 back-propagation


@dataclass(frozen=True)
class ChainLayer:
    """One layer of the deep sigmoid chain, from the top down.

    ``factor`` = w_(l+1) · σ'(z_l) is what dL/dz is multiplied by going from layer l+1
    to layer l; ``product`` is dL/dz_l / dL/dz_depth, the product of the factors so far;
    ``autograd`` the same ratio from ``torch.autograd``.
    """

    layer: int
    z: float
    gate: float
    weight: float
    factor: float
    product: float
    autograd: float


@dataclass(frozen=True)
class BackpropExample:
    """The two-layer network H = σ(W1 X + b1), ŷ = W2 H + b2, L = ½(ŷ − y)², by hand.

    ``tensors`` holds every named quantity (float64 arrays, column convention);
    ``max_abs_diff`` the largest |hand − autograd| per gradient; ``gate_max`` the
    largest σ'(z) (≤ 0.25); ``chain`` the deep sigmoid chain, top layer first, and
    ``chain_below`` the first layer (counting down) where the product falls below
    ``chain_threshold``, or ``None``.
    """

    tensors: dict[str, np.ndarray]
    max_abs_diff: dict[str, float]
    gate_max: float
    chain: list[ChainLayer]
    chain_below: int | None
    chain_threshold: float = 1e-3


# The example's inputs: small hand-picked numbers (the outputs are all computed).
_X = [[0.5], [-1.0], [2.0]]
_W1 = [[0.2, -0.4, 0.1], [0.7, 0.3, -0.5], [-0.3, 0.8, 0.6], [0.05, -0.2, 0.9]]
_B1 = [[0.1], [-0.2], [0.0], [0.3]]
_W2 = [[0.6, -1.1, 0.4, 0.9]]
_B2 = [[0.05]]
_Y = [[1.0]]


def backprop(chain_depth: int = 12, chain_weight: float = 1.0) -> BackpropExample:
    """Concepts §1 computed: every gradient by the chain rule, then checked by autograd.

    dL/dŷ = ŷ − y, dL/dH = W2ᵀ(ŷ − y), dL/dz = dL/dH ∘ σ'(z) with σ'(z) = σ(z)(1 − σ(z)),
    dL/dW1 = dL/dz · Xᵀ, dL/db1 = dL/dz, dL/dW2 = (ŷ − y) Hᵀ, dL/db2 = ŷ − y.
    The chain is ``chain_depth`` scalar layers z_l = w h_(l−1), h_l = σ(z_l) from x = 1
    with all weights ``chain_weight``, read out by ŷ = w h_depth.
    """
    if chain_depth < 2:
        raise GradprobeError(f"chain depth must be at least 2, got {chain_depth}")
    f64 = torch.float64
    X, W1, b1, W2, b2, y = (torch.tensor(v, dtype=f64) for v in (_X, _W1, _B1, _W2, _B2, _Y))

    # By hand, following the formulas of docs/concepts.md §1.
    z = W1 @ X + b1
    H = torch.sigmoid(z)
    y_hat = W2 @ H + b2
    loss = 0.5 * (y_hat - y) ** 2
    dL_dyhat = y_hat - y
    dL_dH = W2.T @ dL_dyhat
    gate = H * (1 - H)
    dL_dz = dL_dH * gate
    dW1 = dL_dz @ X.T
    db1 = dL_dz
    dW2 = dL_dyhat @ H.T
    db2 = dL_dyhat

    # The same network through autograd.
    leaves = [t.clone().requires_grad_(True) for t in (W1, b1, W2, b2)]
    aW1, ab1, aW2, ab2 = leaves
    az = aW1 @ X + ab1
    az.retain_grad()
    aH = torch.sigmoid(az)
    aH.retain_grad()
    a_loss = (0.5 * (aW2 @ aH + ab2 - y) ** 2).sum()
    a_loss.backward()
    pairs = {
        "dL/dH": (dL_dH, aH.grad),
        "dL/dz": (dL_dz, az.grad),
        "dL/dW1": (dW1, aW1.grad),
        "dL/db1": (db1, ab1.grad),
        "dL/dW2": (dW2, aW2.grad),
        "dL/db2": (db2, ab2.grad),
    }
    diffs = {k: float((hand - auto).abs().max()) for k, (hand, auto) in pairs.items()}  # type: ignore[operator]
    diffs["loss"] = abs(float(loss.sum()) - float(a_loss.detach()))

    tensors = {
        "X": X,
        "W1": W1,
        "b1": b1,
        "W2": W2,
        "b2": b2,
        "y": y,
        "z = W1 X + b1": z,
        "H = σ(z)": H,
        "ŷ = W2 H + b2": y_hat,
        "L = ½(ŷ − y)²": loss,
        "dL/dŷ = ŷ − y": dL_dyhat,
        "(ŷ − y) W2ᵀ": dL_dH,
        "σ'(z) = σ(z)(1 − σ(z))": gate,
        "dL/dz = (ŷ − y) W2ᵀ ∘ σ'(z)": dL_dz,
        "dL/dW1 = dL/dz · Xᵀ": dW1,
        "dL/db1 = dL/dz": db1,
        "dL/dW2 = (ŷ − y) Hᵀ": dW2,
        "dL/db2 = ŷ − y": db2,
    }
    chain, below = _sigmoid_chain(chain_depth, chain_weight, 1e-3)
    return BackpropExample(
        tensors={k: v.detach().numpy().copy() for k, v in tensors.items()},
        max_abs_diff=diffs,
        gate_max=float(gate.max()),
        chain=chain,
        chain_below=below,
    )


def _sigmoid_chain(
    depth: int, weight: float, threshold: float
) -> tuple[list[ChainLayer], int | None]:
    f64 = torch.float64
    w = torch.full((depth + 1,), weight, dtype=f64, requires_grad=True)
    h = torch.tensor(1.0, dtype=f64)
    zs = []
    for i in range(depth):
        z_l = w[i] * h
        z_l.retain_grad()
        zs.append(z_l)
        h = torch.sigmoid(z_l)
    y_hat = w[depth] * h
    (0.5 * (y_hat - 0.0) ** 2).backward()
    top = float(zs[-1].grad)  # type: ignore[arg-type]
    rows: list[ChainLayer] = []
    product = 1.0
    below = None
    for i in range(depth - 1, -1, -1):  # top layer first
        z_val = float(zs[i].detach())
        gate = float(torch.sigmoid(zs[i].detach()) * (1 - torch.sigmoid(zs[i].detach())))
        if i == depth - 1:
            factor, wt = 1.0, float("nan")
        else:
            wt = float(w[i + 1].detach())
            factor = wt * gate
            product *= factor
        if below is None and product < threshold:
            below = i + 1
        rows.append(ChainLayer(i + 1, z_val, gate, wt, factor, product, float(zs[i].grad) / top))  # type: ignore[arg-type]
    return rows, below


# ---------------------------------------------------------------- §5 standardisation


@dataclass(frozen=True)
class StandardizeExample:
    """x̂ = (x − μ)/σ for X = [100, 50, 10, 5, 1], and what it does to sigmoid's gate."""

    values: list[float]
    mean: float
    population_variance: float
    sample_variance: float
    population_std: float
    sample_std: float
    standardized: list[float]
    standardized_mean: float
    standardized_std: float
    wrong_variance: float
    wrong_std: float
    sigmoid_gate_raw: list[float]
    sigmoid_gate_standardized: list[float]


def standardize(values: tuple[float, ...] = (100.0, 50.0, 10.0, 5.0, 1.0)) -> StandardizeExample:
    """Concepts §5 computed: mean, population (÷n) and sample (÷(n−1)) variance and std.

    The standardised values use the population σ. The widely copied figures
    σ² = 1600.16 and σ = 40 are kept as ``wrong_*`` for comparison: neither
    definition of the variance gives them.
    """
    x = torch.tensor(values, dtype=torch.float64)
    if x.numel() < 2:
        raise GradprobeError("standardising needs at least two values")
    mean = x.mean()
    pop_var = ((x - mean) ** 2).mean()
    sample_var = ((x - mean) ** 2).sum() / (x.numel() - 1)
    xs = (x - mean) / pop_var.sqrt()

    def gate(t: torch.Tensor) -> list[float]:
        # σ'(x) = σ(x)·σ(−x), not σ(x)(1 − σ(x)): beyond x ≈ 37 float64 rounds σ(x) to 1, and
        # 1 − σ would print σ'(100) as 0 where it is 3.7e-44 (tiny, but not zero).
        return (torch.sigmoid(t) * torch.sigmoid(-t)).tolist()

    return StandardizeExample(
        values=x.tolist(),
        mean=float(mean),
        population_variance=float(pop_var),
        sample_variance=float(sample_var),
        population_std=float(pop_var.sqrt()),
        sample_std=float(sample_var.sqrt()),
        standardized=xs.tolist(),
        standardized_mean=float(xs.mean()),
        standardized_std=float(xs.std(correction=0)),
        wrong_variance=1600.16,
        wrong_std=40.0,
        sigmoid_gate_raw=gate(x),
        sigmoid_gate_standardized=gate(xs),
    )


# ---------------------------------------------------------------- §6 channels


@dataclass(frozen=True)
class ChannelsExample:
    """A conv layer's ``[batch, channels, height, width]`` output and its per-channel view.

    ``channel_stats`` has one dict per output channel (after ReLU): ``filter``,
    ``mean``, ``std``, ``zero_frac`` and ``dead`` (0 at every position of every
    sample). ``dead_channels`` lists the dead ones; channel ``built_dead`` was built
    to die (a large negative bias before the ReLU).
    """

    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    labels: list[int]
    channel_stats: list[dict[str, Any]]
    dead_channels: list[int]
    built_dead: int
    per_channel_input: dict[str, float] = field(default_factory=dict)


def _digits(batch: int) -> tuple[torch.Tensor, list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:batch], dtype=torch.float32) / 16.0
    return images.unsqueeze(1), [int(t) for t in digits.target[:batch]]


def channels(batch: int = 8, dead_bias: float = -100.0) -> ChannelsExample:
    """Concepts §6 computed: 8×8 digit images through Conv2d(1, 4, 3, padding=1) → ReLU.

    The four filters are set by hand so their meaning is visible: a vertical-edge and a
    horizontal-edge (Sobel) filter, a 3×3 average, and the same average with bias
    ``dead_bias``, which no [0, 1] pixel can overcome: that channel is dead.
    """
    if batch < 1:
        raise GradprobeError(f"batch must be at least 1, got {batch}")
    x, labels = _digits(batch)
    conv = torch.nn.Conv2d(1, 4, kernel_size=3, padding=1)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    average = torch.full((3, 3), 1.0 / 9.0)
    names = ["vertical edge", "horizontal edge", "average", f"average, bias {dead_bias:g}"]
    with torch.no_grad():
        conv.weight.copy_(torch.stack([sobel, sobel.T, average, average]).unsqueeze(1))
        conv.bias.copy_(torch.tensor([0.0, 0.0, 0.0, dead_bias]))
        out = torch.relu(conv(x))
    stats = []
    for c in range(out.shape[1]):
        ch = out[:, c]
        stats.append(
            {
                "channel": c,
                "filter": names[c],
                "mean": float(ch.mean()),
                "std": float(ch.std(correction=0)),
                "zero_frac": float((ch == 0).double().mean()),
                "dead": bool((ch == 0).all()),
            }
        )
    return ChannelsExample(
        input_shape=tuple(x.shape),
        weight_shape=tuple(conv.weight.shape),
        output_shape=tuple(out.shape),
        labels=labels,
        channel_stats=stats,
        dead_channels=[s["channel"] for s in stats if s["dead"]],
        built_dead=3,
        per_channel_input={"mean": float(x.mean()), "std": float(x.std(correction=0))},
    )


# ---------------------------------------------------------------- §7 activations


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


# ---------------------------------------------------------------- dispatch and rendering


def _residual() -> Any:
    from .residual import residual

    return residual()


def _isometry() -> Any:
    from .isometry import isometry

    return isometry()


TOPICS: dict[str, Callable[[], Any]] = {
    "backprop": backprop,
    "standardize": standardize,
    "channels": channels,
    "activations": activations,
    "residual": _residual,
    "isometry": _isometry,
}


def compute(topic: str) -> Any:
    """The numbers of one topic (``backprop``, ``standardize``, ``channels``, ``activations``)."""
    if topic not in TOPICS:
        raise GradprobeError(f"unknown topic {topic!r}", f"use one of: {', '.join(TOPICS)}")
    return TOPICS[topic]()


def _fmt(a: np.ndarray) -> str:
    return np.array2string(np.asarray(a), precision=6, suppress_small=False, max_line_width=70)


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


def render(topic: str, result: Any) -> list[Any]:
    """Rich renderables presenting ``result`` (from :func:`compute`) for the terminal."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    if topic == "residual":
        from .residual import render_residual

        return render_residual(result)
    if topic == "isometry":
        from .isometry import render_isometry

        return render_isometry(result)
    if topic == "backprop":
        r: BackpropExample = result
        t = Table(
            title="two-layer network (docs/concepts.md §1), float64, by hand vs torch.autograd"
        )
        t.add_column("quantity")
        t.add_column("value")
        t.add_column("max |hand − autograd|", justify="right")
        keys = {
            "(ŷ − y) W2ᵀ": "dL/dH",
            "dL/dz = (ŷ − y) W2ᵀ ∘ σ'(z)": "dL/dz",
            "dL/dW1 = dL/dz · Xᵀ": "dL/dW1",
            "dL/db1 = dL/dz": "dL/db1",
            "dL/dW2 = (ŷ − y) Hᵀ": "dL/dW2",
            "dL/db2 = ŷ − y": "dL/db2",
            "L = ½(ŷ − y)²": "loss",
        }
        for name, value in r.tensors.items():
            diff = r.max_abs_diff.get(keys.get(name, ""), None)
            t.add_row(name, _fmt(value), "" if diff is None else f"{diff:.1e}")
        note = Text(
            f"largest σ'(z) here: {r.gate_max:.6f} (never above 0.25: "
            "each sigmoid layer shrinks the error signal by at least 4×)"
        )
        c = Table(title="deep sigmoid chain: dL/dz_l = dL/dz_(l+1) · w · σ'(z_l), top layer first")
        for col in ("layer", "z", "σ'(z)", "factor w·σ'(z)", "product", "autograd"):
            c.add_column(col, justify="right")
        for row in r.chain:
            c.add_row(
                str(row.layer),
                f"{row.z:.4f}",
                f"{row.gate:.4f}",
                f"{row.factor:.4f}",
                f"{row.product:.3e}",
                f"{row.autograd:.3e}",
            )
        where = (
            f"the product drops below {r.chain_threshold:g} at layer {r.chain_below}"
            if r.chain_below is not None
            else f"the product stays above {r.chain_threshold:g}"
        )
        return [t, note, c, Text(where)]
    if topic == "standardize":
        s: StandardizeExample = result
        t = Table(title="standardisation x̂ = (x − μ)/σ (docs/concepts.md §5)")
        t.add_column("quantity")
        t.add_column("value", justify="right")
        rows = [
            ("X", str(s.values)),
            ("mean μ", f"{s.mean:.4f}"),
            ("population variance σ² (÷n)", f"{s.population_variance:.4f}"),
            ("population std σ", f"{s.population_std:.4f}"),
            ("sample variance s² (÷(n−1))", f"{s.sample_variance:.4f}"),
            ("sample std s", f"{s.sample_std:.4f}"),
            ("standardised (population σ)", str([round(v, 4) for v in s.standardized])),
            ("mean, std of standardised", f"{s.standardized_mean:.2e}, {s.standardized_std:.4f}"),
        ]
        for row in rows:
            t.add_row(*row)
        g = Table(title="sigmoid gate σ'(x) at the raw and the standardised inputs")
        for col in ("x", "σ'(x)", "x̂", "σ'(x̂)"):
            g.add_column(col, justify="right")
        for x, gx, xs, gxs in zip(
            s.values, s.sigmoid_gate_raw, s.standardized, s.sigmoid_gate_standardized
        ):
            g.add_row(f"{x:g}", f"{gx:.3e}", f"{xs:.4f}", f"{gxs:.4f}")
        warn = Text(
            f"A widely copied version of this example prints σ² = {s.wrong_variance:g} "
            f"and σ = {s.wrong_std:g}: wrong (σ² = {s.population_variance:.2f} with ÷n, "
            f"{s.sample_variance:.2f} with ÷(n−1))."
        )
        return [t, warn, g]
    if topic == "channels":
        ch: ChannelsExample = result
        t = Table(
            title=escape("tensor shapes [batch, channels, height, width] (docs/concepts.md §6)")
        )
        t.add_column("tensor")
        t.add_column("shape")
        t.add_row(f"input: digits {ch.labels}, 1 grey channel", str(list(ch.input_shape)))
        t.add_row("Conv2d(1, 4, 3, padding=1) weight [out, in, kh, kw]", str(list(ch.weight_shape)))
        t.add_row("output after ReLU: one channel per filter", str(list(ch.output_shape)))
        s_tab = Table(title="per-channel statistics over batch, height and width")
        for col in ("channel", "filter", "mean", "std", "zero frac", "dead"):
            s_tab.add_column(col)
        for st in ch.channel_stats:
            s_tab.add_row(
                str(st["channel"]),
                st["filter"],
                f"{st['mean']:.4f}",
                f"{st['std']:.4f}",
                f"{st['zero_frac']:.3f}",
                "DEAD" if st["dead"] else "",
            )
        note = Text(
            f"dead channels: {ch.dead_channels} — zero at every position of every sample,"
            " so no gradient reaches their filter."
        )
        return [t, s_tab, note]
    if topic == "activations":
        facts: list[ActivationFacts] = result
        zmax = facts[0].zmax if facts else 0.0
        sheet = Table(title="activation cheat-sheet (docs/concepts.md §7)")
        for col in ("activation", "used in", "strength", "weakness"):
            sheet.add_column(col)
        for name, (used, strength, weakness) in CHEAT_SHEET.items():
            sheet.add_row(name, used, strength, weakness)
        t = Table(
            title=escape(f"every registered activation, f' computed on [−{zmax:g}, {zmax:g}]")
        )
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
    raise GradprobeError(f"unknown topic {topic!r}", f"use one of: {', '.join(TOPICS)}")

"""docs/concepts.md §1 worked out: a two-layer sigmoid network by hand against autograd."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import GradprobeError


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


def _fmt(a: np.ndarray) -> str:
    return np.array2string(np.asarray(a), precision=6, suppress_small=False, max_line_width=70)


def render_backprop(r: BackpropExample) -> list[Any]:
    """Rich renderables for :func:`backprop`."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title="two-layer network (docs/concepts.md §1), float64, by hand vs torch.autograd")
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

"""Data for the demo and the lab: shipped with scikit-learn or generated, never downloaded.

* :func:`digits`: scikit-learn's bundled 8×8 handwritten digits (1,797 images), split
  into train and validation, standardised with the *training* mean and std (docs/concepts.md §5);
  ``images=True`` keeps the ``[N, 1, 8, 8]`` shape for CNNs (docs/concepts.md §6).
* :func:`adding_problem`: Hochreiter & Schmidhuber's (1997) long-range memory task.
* :func:`synthetic_regression`: a smooth non-linear target for regression sanity checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "adding_problem", "adding_split", "digits", "synthetic_regression"]


@dataclass(frozen=True)
class Split:
    """A train/validation split and what kind of task it is."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    task: str  # "classification" or "regression"
    n_classes: int = 0
    name: str = ""

    @property
    def in_features(self) -> int:
        return (
            int(self.x_train[0].numel()) if self.x_train.dim() > 2 else int(self.x_train.shape[-1])
        )

    @property
    def out_features(self) -> int:
        return self.n_classes if self.task == "classification" else int(self.y_train.shape[-1])


def digits(
    *,
    seed: int = 0,
    val_fraction: float = 0.3,
    standardize: bool = True,
    images: bool = False,
    n_train: int | None = None,
) -> Split:
    """scikit-learn's digits: train/validation split, standardised on the training part.

    Pixels that are constant in the training part (the image borders) keep std 1, so
    they become 0 rather than NaN. ``n_train`` keeps only that many training examples
    (the pre-training experiment needs little labelled data).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = round(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    if n_train is not None:
        train = train[:n_train]
    x_train, x_val = x[train], x[val]
    if standardize:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0
        x_train = (x_train - mean) / std
        x_val = (x_val - mean) / std
    xt, xv = torch.from_numpy(x_train), torch.from_numpy(x_val)
    if images:
        xt, xv = xt.reshape(-1, 1, 8, 8), xv.reshape(-1, 1, 8, 8)
    return Split(
        xt,
        torch.from_numpy(y[train]),
        xv,
        torch.from_numpy(y[val]),
        task="classification",
        n_classes=10,
        name="digits" + ("" if standardize else " (raw)"),
    )


def adding_problem(n: int, length: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The adding problem: sequences ``[n, length, 2]`` of (value, marker); the target is the
    sum of the two values whose marker is 1 (one in each half of the sequence).

    Predicting the mean (1.0) gives MSE ≈ 1/6 ≈ 0.167: the trivial baseline to beat.
    """
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, length, generator=g)
    markers = torch.zeros(n, length)
    half = max(length // 2, 1)
    first = torch.randint(0, half, (n,), generator=g)
    second = torch.randint(half, length, (n,), generator=g) if length > 1 else first
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = (values * markers).sum(dim=1, keepdim=True)
    return x, y


def adding_split(n_train: int, n_val: int, length: int, *, seed: int = 0) -> Split:
    """Train and validation sets of the adding problem, from independent seeds."""
    xt, yt = adding_problem(n_train, length, seed=seed)
    xv, yv = adding_problem(n_val, length, seed=seed + 10_000)
    return Split(xt, yt, xv, yv, task="regression", name=f"adding T={length}")


def synthetic_regression(
    n_train: int = 1024, n_val: int = 512, dim: int = 16, *, seed: int = 0
) -> Split:
    """y = sin(x·a) + 0.5·(x·b)² with Gaussian inputs: smooth, non-linear, known to be learnable."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, generator=g) / dim**0.5
    b = torch.randn(dim, generator=g) / dim**0.5
    x = torch.randn(n_train + n_val, dim, generator=g)
    y = (torch.sin(x @ a) + 0.5 * (x @ b) ** 2).unsqueeze(1)
    return Split(
        x[:n_train], y[:n_train], x[n_train:], y[n_train:], task="regression", name="synthetic"
    )

"""docs/concepts.md §5 worked out: standardisation and the sigmoid gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GradprobeError


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


def render_standardize(s: StandardizeExample) -> list[Any]:
    """Rich renderables for :func:`standardize`."""
    from rich.table import Table
    from rich.text import Text

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

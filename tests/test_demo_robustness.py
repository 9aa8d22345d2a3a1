"""The demo tells every user the same story, whatever their machine.

Another CPU rounds floats differently (another vector width splits every sum
otherwise); that is a perturbation of the training run of about one unit in the last
place, and training the 20-layer ReLU net is chaotic: it turns such a perturbation into
another trajectory. So README states, for seed 0, a range for every number of every row
(measured over 63 perturbed runs, with a margin: README says how), and claims orderings
only where they hold in every run. The demo's models are re-trained here with exactly
the demo's budget under perturbations of that kind (1 vs 2 torch threads, initial
weights changed by 1e-6 relative; scripts/test.sh runs this file again with torch's
kernels forced to AVX2 and scalar code and MKL's compatible path) and larger ones
(another mini-batch order, another seed), and the story must hold under each: the
diagnosis of the baseline finds the same vanishing gradient and picks the same
remedies, every remedy beats the baseline by a wide margin, BatchNorm stays best, and
under the same seed every number lies in README's range.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from gradprobe import diagnose
from gradprobe.demo import (
    BUILDERS,
    DemoConfig,
    baseline_model,
    choose_remedies,
    final_train_loss,
    train_model,
)
from gradprobe.diagnose import key_numbers
from gradprobe.lab.data import digits

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")

# What README promises (its demo section states it, and the ranges below).
REMEDY_MARGIN = 0.5  # every remedy's validation accuracy exceeds the baseline's by this
BASELINE_FINDINGS = "vanishing, stalled, plateau"
# README's range table, column by column: the key of each number in train_demo_models.
COLUMNS = ("acc", "loss", "ratio", "dead")

PERTURBATIONS: dict[str, dict[str, object]] = {
    "2 torch threads": {"threads": 2},
    "initial weights × (1 + 1e-6·N(0,1))": {"jitter": 1e-6},
    "another mini-batch order": {"batch_seed": 1},
    "another seed (split, init, batches)": {"seed": 1},
}
SAME_SEED = ("2 torch threads", "initial weights × (1 + 1e-6·N(0,1))")


def readme_demo_rows() -> dict[str, list[str]]:
    """The demo table in README's Quick start: model label → its printed cells."""
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^model +val\. acc.*?^```", quick, flags=re.M | re.S)
    assert block, "README's Quick start has no demo table"
    rows: dict[str, list[str]] = {}
    for line in block.group(0).splitlines()[1:-1]:
        cells = re.split(r" {2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def readme_demo_ranges() -> dict[str, dict[str, tuple[float, float]]]:
    """README's "what holds on any machine" table: model label → column → (low, high)."""
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^model +val\. acc.*?^```", quick, flags=re.M | re.S)
    ranged = [b for b in blocks if "–" in b]
    assert len(ranged) == 1, "README's Quick start has no table of ranges"
    ranges: dict[str, dict[str, tuple[float, float]]] = {}
    for line in ranged[0].splitlines()[1:-1]:
        label, *cells = re.split(r" {2,}", line.strip())
        assert len(cells) == len(COLUMNS), line
        ranges[label] = {}
        for column, cell in zip(COLUMNS, cells):
            low, high = (float(x) for x in cell.split("–"))
            ranges[label][column] = (low, high)
    return ranges


def assert_in_readme_ranges(numbers: dict[str, dict[str, float]], what: str) -> None:
    ranges = readme_demo_ranges()
    assert list(numbers) == list(ranges), (what, list(numbers), list(ranges))
    for label, row in numbers.items():
        for column in COLUMNS:
            low, high = ranges[label][column]
            assert low <= row[column] <= high, (what, label, column, row[column], (low, high))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def jittered(
    build: Callable[[DemoConfig], nn.Module], scale: float
) -> Callable[[DemoConfig], nn.Module]:
    """``build``, then every parameter multiplied by 1 + scale·N(0, 1) (its own generator)."""

    def build_jittered(cfg: DemoConfig) -> nn.Module:
        model = build(cfg)
        g = torch.Generator().manual_seed(12345)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + scale * torch.randn(p.shape, generator=g))
        return model

    return build_jittered


def train_demo_models(
    *, threads: int = 1, jitter: float = 0.0, seed: int = 0, batch_seed: int | None = None
) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The demo's steps 1–3 without files: (remedy keys chosen, the table's numbers per
    model label, in the demo's order and with its labels)."""
    cfg = DemoConfig(seed=seed)
    data = digits(seed=seed)

    def numbers(build):  # type: ignore[no-untyped-def]
        if jitter:
            build = jittered(build, jitter)
        with torch_threads(threads):
            # Recorded as the demo records every model (the Probe only observes).
            fit = train_model(
                build, cfg, data, batch_seed=batch_seed, probe={"stats": "full", "every": cfg.every}
            )
        key = key_numbers(fit.run)
        row = {
            "acc": fit.final["val_acc"],
            "loss": final_train_loss(fit.run),
            "ratio": key["first_last_error_ratio"],
            "dead": key.get("max_dead_frac", 0.0),
            "findings": ", ".join(diagnose(fit.run).kinds) or "none",
        }
        return row, fit.run

    base, base_run = numbers(baseline_model)
    kind, chosen = choose_remedies(diagnose(base_run), cfg.remedies)
    assert kind == "vanishing"
    table = {f"{cfg.activation} ({cfg.depth} layers, default init)": base}
    for remedy in chosen:
        name, build = BUILDERS[remedy.key]
        label = name if remedy.key in ("relu", "leaky_relu", "silu_gelu") else f"{cfg.activation} → {name}"
        table[label] = numbers(build)[0]
    return [r.key for r in chosen], table


@pytest.fixture(scope="module")
def shipped() -> tuple[list[str], dict[str, dict[str, float]]]:
    return train_demo_models()


def accuracies(table: dict[str, dict[str, float]]) -> dict[str, float]:
    return {label: row["acc"] for label, row in table.items()}


@pytest.mark.slow
@pytest.mark.numerics
def test_readme_states_the_numbers_the_demo_reaches(shipped) -> None:
    _, table = shipped
    print("shipped", {k: {c: round(v[c], 4) for c in COLUMNS} for k, v in table.items()})
    # README's printed table is one run: in the ranges README states.
    printed = readme_demo_rows()
    assert list(printed) == list(readme_demo_ranges())
    assert_in_readme_ranges(
        {
            label: dict(zip(COLUMNS, (float(c) for c in cells[: len(COLUMNS)])))
            for label, cells in printed.items()
        },
        "README's printed table",
    )
    # This machine's run: in the ranges too, with the baseline's findings README names.
    assert_in_readme_ranges(table, "this machine")
    assert next(iter(table.values()))["findings"] == BASELINE_FINDINGS
    assert next(iter(printed.values()))[-1] == BASELINE_FINDINGS
    demo_section = README.split("## What it does", 1)[0]
    assert f"at least {REMEDY_MARGIN:g}" in demo_section and BASELINE_FINDINGS in demo_section


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("perturbation", list(PERTURBATIONS))
def test_the_demo_story_holds_under_perturbation(shipped, perturbation: str) -> None:
    chosen, table = shipped
    chosen_now, table_now = train_demo_models(**PERTURBATIONS[perturbation])  # type: ignore[arg-type]
    print(perturbation, {k: {c: round(v[c], 4) for c in COLUMNS} for k, v in table_now.items()})

    # The diagnosis ranks the same remedies first.
    assert chosen_now == chosen
    # Each remedy beats the baseline by the stated margin, and BatchNorm (the best one on
    # this machine) stays best: README claims both for any machine and seed.
    accuracy, accuracy_now = accuracies(table), accuracies(table_now)
    base = accuracy_now.pop(next(iter(table_now)))
    for label, acc in accuracy_now.items():
        assert acc >= base + REMEDY_MARGIN, (label, acc, base)
    best = max(list(accuracy)[1:], key=accuracy.__getitem__)
    assert "BatchNorm" in best
    assert max(accuracy_now, key=accuracy_now.__getitem__) == best
    assert "vanishing" not in ", ".join(row["findings"] for row in list(table_now.values())[1:])
    if perturbation in SAME_SEED:
        # What another CPU does: every number in the range README states for seed 0.
        assert_in_readme_ranges(table_now, perturbation)
        assert next(iter(table_now.values()))["findings"] == BASELINE_FINDINGS

"""The demo, end to end through the CLI: vanishing found, remedies from the ranking, one helps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from gradprobe import diagnose, load
from gradprobe.cli import main
from gradprobe.demo import BUILDERS, DemoConfig
from gradprobe.remedies import model_profile, rank_remedies
from test_demo_robustness import (
    BASELINE_FINDINGS,
    COLUMNS,
    assert_in_readme_ranges,
    readme_demo_rows,
)


@pytest.mark.slow
@pytest.mark.numerics
def test_demo_finds_vanishing_and_a_remedy_that_helps(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "before / after" in printed and "vanishing" in printed

    rows = list(csv.DictReader((out / "table.csv").open(encoding="utf-8")))
    assert len(rows) == 1 + DemoConfig().remedies
    assert (out / "report.html").stat().st_size > 50_000
    page = (out / "report.html").read_text(encoding="utf-8")
    for row in rows:
        assert row["model"] in page

    # README's demo table has the rows the demo prints, in its order, and every number
    # of this machine's run lies in the range README states for any machine (the
    # robustness test measures those ranges' hold under perturbations); the baseline's
    # findings are README's, no remedy is found vanishing.
    stated = readme_demo_rows()
    assert list(stated) == [row["model"] for row in rows]
    columns = ("val_acc", "final_train_loss", "error_ratio_first_last", "max_dead_frac")
    assert_in_readme_ranges(
        {row["model"]: {c: float(row[k]) for c, k in zip(COLUMNS, columns)} for row in rows},
        "gradprobe demo",
    )
    assert rows[0]["findings"] == BASELINE_FINDINGS == stated[rows[0]["model"]][-1]
    assert not any("vanishing" in row["findings"] for row in rows[1:])

    # Every run recorded its loss at every recorded step (fit logs it), the table's final
    # train loss is the mean of the last five, and the report draws the curves. The
    # baseline learns nothing: its loss stays at chance, ln 10 for ten classes.
    for row in rows:
        losses = load(row["run"]).model_series("loss")
        assert list(losses.index) == list(range(0, DemoConfig().steps, DemoConfig().every))
        assert float(row["final_train_loss"]) == pytest.approx(losses.iloc[-5:].mean())
    assert float(rows[0]["final_train_loss"]) == pytest.approx(math.log(10), abs=0.05)
    assert all(float(r["final_train_loss"]) < math.log(10) - 0.5 for r in rows[1:])
    figure = page.split("<h3>Training loss</h3>", 1)[1].split("<h3>", 1)[0]
    assert "<img" in figure and "learning rate" in figure
    assert "plateau" in rows[0]["findings"]  # and a finding says why the curve is flat

    # Vanishing, measured again from the stored baseline run, not read from the table.
    baseline = load(rows[0]["run"])
    found = diagnose(baseline)
    vanishing = found.of("vanishing")
    assert vanishing is not None
    assert vanishing.evidence["first_last_ratio"] < 1e-6
    assert "vanishing" in rows[0]["findings"]

    # The remedies trained are the ranking's top entries that are a change of model.
    ranked = rank_remedies("vanishing", model_profile(baseline.meta))
    expected = [r.name for r in ranked if r.key in BUILDERS][: DemoConfig().remedies]
    assert [row["remedy"] for row in rows[1:]] == expected
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["acted_on"] == "vanishing"
    assert {"relu", "batchnorm"} <= {r["key"] for r in summary["chosen_remedies"]}

    # At least one remedy beats the baseline on validation accuracy, and lets the
    # error signal reach the first layer (its first/last ratio is no longer vanishing).
    base_acc = float(rows[0]["val_acc"])
    better = [r for r in rows[1:] if float(r["val_acc"]) > base_acc + 0.2]
    assert better
    for r in better:
        assert float(r["error_ratio_first_last"]) > 1e-2
        assert diagnose(load(r["run"])).of("vanishing") is None


def test_fit_logs_each_steps_loss_as_an_unprobed_twin_computes_it() -> None:
    # Independent: the same model, batches, SGD and cosine schedule in a plain loop.
    from gradprobe.lab.data import digits
    from gradprobe.lab.training import fit

    cfg = DemoConfig(depth=3, width=16, steps=12, every=1)
    data = digits(seed=0)
    torch.manual_seed(0)
    twin = BUILDERS["relu"][1](cfg)
    opt = torch.optim.SGD(twin.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    g = torch.Generator().manual_seed(0)
    expected, rates = [], []
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(data.x_train), (cfg.batch_size,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(twin(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        expected.append(loss.item())
    torch.manual_seed(0)
    result = fit(
        BUILDERS["relu"][1](cfg),
        data,
        steps=cfg.steps,
        lr=cfg.lr,
        schedule="cosine",
        probe={"stats": "cheap", "every": 1},
    )
    assert result.run.model_series("loss").to_numpy() == pytest.approx(expected, rel=1e-5)
    assert result.run.model_series("lr").to_numpy() == pytest.approx(rates)
    # Every 3rd step recorded: the loss of exactly those steps, the others dropped.
    torch.manual_seed(0)
    sparse = fit(
        BUILDERS["relu"][1](cfg),
        data,
        steps=cfg.steps,
        lr=cfg.lr,
        schedule="cosine",
        probe={"stats": "cheap", "every": 3},
    )
    losses = sparse.run.model_series("loss")
    assert list(losses.index) == [0, 3, 6, 9]
    assert losses.to_numpy() == pytest.approx(expected[::3], rel=1e-5)


def test_the_demos_warm_up_then_cosine_schedule() -> None:
    """schedule="warmup_cosine": the rate each step used, as fit logs it, against the
    formula written out (linear to the full rate over the first 10% of the steps, then a
    half cosine to 0)."""
    from gradprobe.lab.data import digits
    from gradprobe.lab.training import fit

    cfg = DemoConfig(depth=3, width=16, steps=40, every=1)
    assert DemoConfig().schedule == "warmup_cosine"
    torch.manual_seed(0)
    result = fit(
        BUILDERS["relu"][1](cfg),
        digits(seed=0),
        steps=cfg.steps,
        lr=cfg.lr,
        schedule="warmup_cosine",
        probe={"stats": "cheap", "every": 1},
    )
    warm, rest = 4, 36
    expected = [cfg.lr * (s + 1) / warm for s in range(warm)] + [
        cfg.lr * 0.5 * (1 + math.cos(math.pi * s / rest)) for s in range(rest)
    ]
    assert result.run.model_series("lr").to_numpy() == pytest.approx(expected, rel=1e-12)

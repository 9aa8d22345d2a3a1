"""The demo: see vanishing gradients happen, diagnose them, train the proposed fixes, compare.

1. Train a deep sigmoid MLP (PyTorch's default initialisation) on scikit-learn's digits
   (standardised, train/validation split) under a Probe.
2. :func:`gradprobe.diagnose` it. The remedies come from the diagnosis: the
   ``vanishing`` finding's ranking for this model (or, should vanishing not be found,
   the most severe finding's), keeping those that are a change of model we can build
   (:data:`BUILDERS`), best first.
3. Train each chosen remedy with the same data, seed, optimizer, learning rate and
   number of steps.
4. A before/after table (validation accuracy, final training loss, first/last-layer
   error ratio, dead fraction, findings) and ``report.html`` comparing every run side by
   side, the loss curve of each among its figures.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn

from .diagnose import Findings, diagnose, key_numbers
from .errors import GradprobeError
from .remedies import RankedRemedy
from .report import report

if TYPE_CHECKING:
    from .lab.data import Split
    from .lab.training import FitResult
    from .run import Run

__all__ = ["BUILDERS", "DemoConfig", "DemoResult", "baseline_model", "run_demo", "train_model"]


@dataclass(frozen=True)
class DemoConfig:
    """The demo's fixed budget: every model trains with exactly these settings."""

    depth: int = 20
    width: int = 64
    activation: str = "sigmoid"
    steps: int = 400
    batch_size: int = 64
    optimizer: str = "sgd"  # plain SGD: an adaptive optimiser would itself be a remedy
    lr: float = 0.05
    # A linear warm-up over the first 10% of the steps, then a cosine decay to 0. Why:
    # the 20-layer ReLU net's training is chaotic: a 1e-6 relative change of its initial
    # weights (what another CPU's rounding does) gives another trajectory. With a
    # constant 0.05 its final accuracy ranged over 0.36–0.89; with the cosine decay alone
    # over 0.82–0.90 in 45 of 46 perturbed runs, but a spike in the turbulent first 100
    # steps at the full rate left one at 0.60. With the warm-up: 0.81–0.89 in 63 runs
    # (1e-6 jitters, 1 or 2 threads, AVX-512/AVX2/scalar kernels, MKL's compatible path)
    # and one at 0.73: rarer, milder. The sigmoid baseline, BatchNorm and residual runs
    # are not chaotic: the same numbers to 4 digits under every perturbation. README
    # states ranges (the ReLU row's wide) and the orderings that hold.
    schedule: str | None = "warmup_cosine"
    seed: int = 0
    every: int = 5  # record every 5th step: the statistics cost stays small
    remedies: int = 3


def _mlp(cfg: DemoConfig, **kw: Any) -> nn.Module:
    from .lab.models import mlp

    args: dict[str, Any] = {"depth": cfg.depth, "width": cfg.width, "activation": cfg.activation}
    args.update(kw)
    return mlp(64, 10, **args)


def _residual(cfg: DemoConfig) -> nn.Module:
    from .lab.models import residual_mlp

    return residual_mlp(64, 10, depth=cfg.depth, width=cfg.width, activation=cfg.activation)


# Remedies that are a change of model, as builders of the remedied model. The rest of
# the catalogue (clipping, Adam, a learning-rate schedule, pre-training) changes the
# training itself, so it would not be the same budget: the demo leaves it out.
BUILDERS: dict[str, tuple[str, Callable[[DemoConfig], nn.Module]]] = {
    "relu": ("ReLU + He init", lambda c: _mlp(c, activation="relu", init="he")),
    "leaky_relu": ("Leaky ReLU + He init", lambda c: _mlp(c, activation="leaky_relu", init="he")),
    "silu_gelu": ("SiLU", lambda c: _mlp(c, activation="silu")),
    "xavier_init": ("Xavier init", lambda c: _mlp(c, init="xavier_uniform")),
    "he_init": ("He init", lambda c: _mlp(c, init="he")),
    "batchnorm": ("BatchNorm", lambda c: _mlp(c, norm="batch")),
    "layernorm": ("LayerNorm", lambda c: _mlp(c, norm="layer")),
    "residual": ("residual", _residual),
}


def baseline_model(cfg: DemoConfig) -> nn.Module:
    """The demo's baseline: a deep MLP of ``cfg.activation`` with PyTorch's default init."""
    return _mlp(cfg)


def train_model(
    build: Callable[[DemoConfig], nn.Module],
    cfg: DemoConfig,
    data: Split,
    *,
    seed: int | None = None,
    batch_seed: int | None = None,
    store: str | Path | None = None,
    label: str | None = None,
    config: dict[str, Any] | None = None,
    probe: dict[str, Any] | None = None,
) -> FitResult:
    """Train one of the demo's models with the demo's budget (``cfg``) on ``data``.

    ``seed`` seeds the initialisation and, unless ``batch_seed`` is given, the order of
    the mini-batches (both default to ``cfg.seed``): every model of one demo starts from
    the same random stream. The robustness test varies them one at a time.
    """
    from .lab.training import fit

    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    model = build(cfg)
    return fit(
        model,
        data,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        schedule=cfg.schedule,
        seed=seed if batch_seed is None else batch_seed,
        store=store,
        label=label,
        config=config,
        probe=probe if probe is not None else {"stats": "cheap", "every": cfg.every},
    )


FINAL_LOSS_STEPS = 5  # recorded steps averaged: one step's mini-batch loss is noisy


def final_train_loss(run: Run, last: int = FINAL_LOSS_STEPS) -> float:
    """The run's training loss at the end: the mean of its last ``last`` recorded steps.

    Read from the record (``probe.log(loss=loss)`` in :func:`~gradprobe.lab.training.fit`),
    so it is the loss the report's figure draws; NaN when no loss was logged, and NaN or
    Inf when the training diverged.
    """
    losses = run.model_series("loss")
    return float(losses.iloc[-last:].mean()) if len(losses) else math.nan


@dataclass
class DemoResult:
    """What the demo produced: the table, the baseline's findings, the chosen remedies, files."""

    table: pd.DataFrame
    findings: Findings
    chosen: list[RankedRemedy]
    runs: dict[str, Path]
    report: Path
    seconds: float


Progress = Callable[[str, int, int], None]  # (what, done, total)


def choose_remedies(findings: Findings, limit: int) -> tuple[str, list[RankedRemedy]]:
    """The finding the demo acts on, and its top-ranked remedies that are a model change."""
    if not findings:
        raise GradprobeError(
            "the baseline showed no problem, so there is nothing to remedy",
            "use a deeper or more saturating model (DemoConfig(depth=..., activation=...))",
        )
    # The story's root cause (diagnose puts roots first): what the run's other findings
    # follow from, and what a change of the model must fix.
    target = next((f for f in findings if f.cause is None), findings[0])
    chosen = [r for r in target.remedies if r.key in BUILDERS][:limit]
    return target.kind, chosen


def run_demo(
    out: str | Path = "runs/demo",
    config: DemoConfig | None = None,
    progress: Progress | None = None,
) -> DemoResult:
    """Train, diagnose, remedy, compare; writes run directories, table and report under ``out``."""
    from .lab.data import digits

    cfg = config or DemoConfig()
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small models: one thread is fastest and leaves cores free
    data = digits(seed=cfg.seed)
    total = 2 + cfg.remedies  # baseline, remedies, report

    def train(
        slug: str, label: str, build: Callable[[DemoConfig], nn.Module], remedy: str
    ) -> dict[str, Any]:
        result = train_model(
            build,
            cfg,
            data,
            store=out / slug,
            label=label,
            config={**asdict(cfg), "remedy": remedy, "model": label},
            probe={"stats": "full", "every": cfg.every},
        )
        return {"slug": slug, "label": label, "remedy": remedy, "fit": result}

    def tick(what: str, done: int) -> None:
        if progress:
            progress(what, done, total)

    base_label = f"{cfg.activation} ({cfg.depth} layers, default init)"
    tick(f"training {base_label}", 0)
    trained = [train("baseline", base_label, baseline_model, "none (baseline)")]
    findings = diagnose(trained[0]["fit"].run)
    kind, chosen = choose_remedies(findings, cfg.remedies)
    total = 2 + len(chosen)
    for i, r in enumerate(chosen, start=1):
        name, build = BUILDERS[r.key]
        label = (
            f"{cfg.activation} → {name}"
            if r.key not in ("relu", "leaky_relu", "silu_gelu")
            else name
        )
        tick(f"training {label}", i)
        trained.append(train(f"remedy-{i}-{r.key}", label, build, r.name))

    rows = []
    all_findings = {}
    for t in trained:
        run = t["fit"].run
        found = diagnose(run)
        all_findings[t["label"]] = found
        numbers = key_numbers(run)
        rows.append(
            {
                "model": t["label"],
                "remedy": t["remedy"],
                "val_acc": t["fit"].final.get("val_acc", math.nan),
                "val_loss": t["fit"].final.get("val_loss", math.nan),
                "final_train_loss": final_train_loss(run),
                "error_ratio_first_last": numbers["first_last_error_ratio"],
                "error_factor_per_layer": numbers["error_factor_per_layer"],
                "max_dead_frac": numbers.get("max_dead_frac", math.nan),
                "findings": ", ".join(found.kinds) or "none",
                "seconds": t["fit"].seconds,
                "run": str(out / t["slug"]),
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(out / "table.csv", index=False)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "acted_on": kind,
                "baseline_findings": findings.to_dict(),
                "chosen_remedies": [r.to_dict() for r in chosen],
                "table": json.loads(table.to_json(orient="records")),
            },
            indent=2,
        ),
        encoding="utf-8",
    )

    tick("writing the report", total - 1)
    extra = {
        t["label"]: {"remedy": t["remedy"], "validation accuracy": float(row["val_acc"])}
        for t, row in zip(trained, rows)
    }
    from .run import load

    runs = [load(out / t["slug"]) for t in trained]
    path = report(
        runs,
        out / "report.html",
        extra=extra,
        title=f"gradprobe demo: a {cfg.depth}-layer {cfg.activation} MLP and its remedies",
    )
    tick("done", total)
    return DemoResult(
        table,
        findings,
        chosen,
        {t["label"]: out / t["slug"] for t in trained},
        path,
        time.perf_counter() - started,
    )

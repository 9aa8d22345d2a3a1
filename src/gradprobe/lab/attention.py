"""Experiment ``attention``: attention-logit growth at high learning rates, and QK-layernorm.

Wortsman et al. (2023) reproduce, with small Transformers, instabilities first seen at scale:
at a high learning rate the attention logits grow until the softmax is one-hot and the loss
diverges (Dehghani et al. 2023, ViT-22B); a LayerNorm on the queries and keys
(QK-layernorm) keeps the logits bounded and the model trains over a wider range of rates.
Here, at smaller scale still: a 2-block pre-LN causal Transformer (width 64, 4 heads, in
:mod:`gradprobe.lab.transformer`) learns x[t] = (x[t−1] + x[t−2]) mod 16 by next-token
prediction, with AdamW under warm-up and cosine decay, at peak rates on a log grid: plain,
with QK-layernorm, and with a z-loss (1e-4·(log Z)², Chowdhery et al. 2022) as a third arm,
which acts on the output logits and so should not bound the attention logits. Per run: the
final training loss, the largest attention logit q·k/√d after the causal mask (the Probe's
``attn_logit_max``, the largest over the attention modules at the last recorded step), and
log Z of the output logits (a validation batch, after training).

The verdict is computed from the runs: the range of rates where each arm trains (its final
loss below half of a uniform guess's ln(vocab)), the learning-rate sensitivity (Wortsman et
al.'s: the mean over rates of min(loss, ln vocab) − the best loss of any rate and arm), and
whether QK-layernorm keeps the largest logit below the plain model's at every rate, and
whether the z-loss alone leaves them unbounded.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import figures, measure
from .experiment import (
    Check,
    Experiment,
    RunConfig,
    RunResult,
    Verdict,
    build_verdict,
    fmt,
    mean_spread,
    per_seed,
    pick,
)
from .training import FitResult
from .transformer import (
    CausalTransformer,
    mean_log_partition,
    recurrence_split,
)

NAME = "attention"
ARMS = ("plain", "qk_norm", "z_loss")
LRS = {
    "tiny": (1e-2, 1e-1, 3e-1),
    "quick": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "full": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
}
STEPS = {"tiny": 100, "quick": 150, "full": 400}
VOCAB, LENGTH, WIDTH, DEPTH, HEADS, BATCH = 16, 16, 64, 2, 4, 32
# A run "trains" when its final loss is below half of a uniform guess's ln(vocab).
TRAINS_FRACTION = 0.5
# The z-loss coefficient of PaLM and of Wortsman et al. 2023.
Z_LOSS = 1e-4
# "Does not bound the attention logits": at the highest rate, at least a decade above
# QK-layernorm's (they differ by three to four decades when it holds).
SEPARATE_FACTOR = 10.0


def grid(mode: str, seeds: int) -> list[RunConfig]:
    return [
        RunConfig.make(NAME, s, arm=arm, lr=lr, steps=STEPS[mode])
        for s in range(seeds)
        for arm in ARMS
        for lr in LRS[mode]
    ]


def largest_attention_logit(fit: FitResult) -> float:
    """The largest attention logit of the run, as the Probe recorded it: ``attn_logit_max``
    (q·k/√d after the causal mask, the sampled query rows of each attention module's
    calls on the training batch), the largest over the modules at the last recorded step;
    ∞ where a module's is not finite there (the run diverged), NaN where none was recorded.
    (:func:`~gradprobe.lab.transformer.max_attention_logit` measures the same on a batch
    by itself: the test checks the two against each other.)"""
    frame = fit.run.frame()
    rows = frame[frame["stat"] == "attn_logit_max"]
    if rows.empty:
        return math.nan
    values = rows.loc[rows["step"] == rows["step"].max(), "value"].to_numpy(dtype=float)
    return float(values.max()) if np.isfinite(values).all() else math.inf


def run(config: RunConfig, store: Path | None) -> RunResult:
    split = recurrence_split(2048, 256, LENGTH, VOCAB, seed=config.seed)
    torch.manual_seed(config.seed)
    model = CausalTransformer(
        VOCAB, LENGTH, dim=WIDTH, depth=DEPTH, heads=HEADS, qk_norm=config["arm"] == "qk_norm"
    )
    fit = measure.fit_run(
        config,
        model,
        split,
        store,
        steps=config["steps"],
        stats="cheap",
        optimizer="adamw",
        lr=config["lr"],
        schedule="warmup_cosine",
        batch_size=BATCH,
        z_loss=Z_LOSS if config["arm"] == "z_loss" else 0.0,
    )
    loss = fit.final.get("train_loss", math.nan)
    logit = largest_attention_logit(fit)
    # log Z of the output logits (the Probe's logit_z), on a validation batch.
    log_z = mean_log_partition(model, split.x_val[:64])
    return RunResult(
        config,
        {
            # A run that diverged to NaN/Inf ends at the loss of knowing nothing, or worse.
            "train_loss": loss if math.isfinite(loss) else math.inf,
            "val_acc": fit.final.get("val_acc", math.nan),
            "max_attn_logit": logit,
            "log10_max_attn_logit": measure.log10(logit) if math.isfinite(logit) else math.inf,
            "log_z": log_z if math.isfinite(log_z) else math.inf,
        },
        series={"step": measure.curve(fit, "step"), "train_loss": measure.curve(fit, "train_loss")},
    )


def summarize(results: list[RunResult]) -> pd.DataFrame:
    return mean_spread(
        results,
        ["arm", "lr"],
        ["train_loss", "val_acc", "max_attn_logit", "log10_max_attn_logit", "log_z"],
    )


def _trains(loss: float) -> bool:
    return math.isfinite(loss) and loss < TRAINS_FRACTION * math.log(VOCAB)


def _span(rates: list[float]) -> str:
    if not rates:
        return "no rate"
    return fmt(rates[0]) + " only" if len(rates) == 1 else f"{fmt(min(rates))}–{fmt(max(rates))}"


def sensitivity(losses: dict[float, float], best: float) -> float:
    """Wortsman et al.'s learning-rate sensitivity: the mean over rates of
    min(loss, ln vocab) − ``best`` (a diverged run counts as knowing nothing)."""
    capped = [
        min(v, math.log(VOCAB)) if math.isfinite(v) else math.log(VOCAB) for v in losses.values()
    ]
    return sum(c - best for c in capped) / len(capped)


def verdict(table: pd.DataFrame, results: list[RunResult]) -> Verdict:
    lrs = sorted({float(r.config["lr"]) for r in results})
    wider, bounded, calmer, separate = [], [], [], []
    numbers: dict[str, float] = {}
    for seed, rs in per_seed(results).items():
        loss = {(a, lr): pick(rs, arm=a, lr=lr).metrics["train_loss"] for a in ARMS for lr in lrs}
        logit = {
            (a, lr): pick(rs, arm=a, lr=lr).metrics["max_attn_logit"] for a in ARMS for lr in lrs
        }
        top = {a: max((lr for lr in lrs if _trains(loss[(a, lr)])), default=0.0) for a in ARMS}
        wider.append(top["qk_norm"] > top["plain"])
        bounded.append(all(logit[("qk_norm", lr)] < logit[("plain", lr)] for lr in lrs))
        best = min(v for v in loss.values() if math.isfinite(v))
        sens = {a: sensitivity({lr: loss[(a, lr)] for lr in lrs}, best) for a in ARMS}
        calmer.append(sens["qk_norm"] < sens["plain"])
        # The two instabilities have their own fixes (Wortsman et al. 2023): the z-loss acts
        # on the output logits, not on the attention logits.
        separate.append(logit[("z_loss", lrs[-1])] >= SEPARATE_FACTOR * logit[("qk_norm", lrs[-1])])
        if seed == min(per_seed(results)):
            numbers.update({f"sensitivity_{a}": sens[a] for a in ARMS})
            numbers.update({f"largest_trained_lr_{a}": top[a] for a in ARMS})
    checks = [
        Check(
            "QK-layernorm trains at a higher peak learning rate than the plain model", tuple(wider)
        ),
        Check(
            "QK-layernorm keeps the largest attention logit below the plain model's at every rate",
            tuple(bounded),
        ),
        Check("QK-layernorm's learning-rate sensitivity is lower", tuple(calmer)),
        Check(
            f"a z-loss alone does not bound the attention logits: at the highest rate its largest "
            f"logit is ≥ {SEPARATE_FACTOR:g}× QK-layernorm's",
            tuple(separate),
        ),
    ]
    findings = []
    seeds = int(table["seeds"].iloc[0])
    for a in ARMS:
        sub = table[table["arm"] == a].set_index("lr")
        trained = [lr for lr in lrs if _trains(float(sub.loc[lr, "train_loss"]))]
        findings.append(
            f"{a}, {seeds} seed(s): final loss by peak rate "
            + ", ".join(f"{fmt(lr)}: {fmt(sub.loc[lr, 'train_loss'])}" for lr in lrs)
            + f" (ln vocab = {fmt(math.log(VOCAB))}); trains at {_span(trained)}; largest "
            "attention logit "
            + ", ".join(f"{fmt(lr)}: {fmt(sub.loc[lr, 'max_attn_logit'])}" for lr in lrs)
            + "; log Z of the output logits "
            + ", ".join(f"{fmt(lr)}: {fmt(sub.loc[lr, 'log_z'])}" for lr in lrs)
            + "."
        )
    plain, qk = table[table["arm"] == "plain"], table[table["arm"] == "qk_norm"]
    growth = float(plain["max_attn_logit"].iloc[-1] / plain["max_attn_logit"].iloc[0])
    numbers.update(
        plain_logit_growth=growth,
        qk_norm_logit_growth=float(qk["max_attn_logit"].iloc[-1] / qk["max_attn_logit"].iloc[0]),
    )
    findings.append(
        f"From the lowest rate to the highest, the plain model's largest attention logit grows "
        f"×{fmt(growth)}, QK-layernorm's ×{fmt(numbers['qk_norm_logit_growth'])}; learning-rate "
        f"sensitivity (seed 0) {fmt(numbers['sensitivity_plain'])} plain vs "
        f"{fmt(numbers['sensitivity_qk_norm'])} with QK-layernorm."
    )
    return build_verdict(checks, findings, numbers)


def make_figures(table: pd.DataFrame, results: list[RunResult], folder: Path) -> list[Path]:
    curves = {
        a: (list(sub["lr"]), list(sub["train_loss"]))
        for a, sub in ((a, table[table["arm"] == a]) for a in ARMS)
    }
    logits = {
        a: (list(sub["lr"]), list(sub["max_attn_logit"]))
        for a, sub in ((a, table[table["arm"] == a]) for a in ARMS)
    }
    return [
        figures.line_chart(
            folder,
            "lr_sensitivity",
            curves,
            title="Final training loss by peak learning rate",
            xlabel="peak learning rate (AdamW)",
            ylabel="cross-entropy",
            logx=True,
            hline=math.log(VOCAB),
            hline_label="ln vocab (a uniform guess)",
        ),
        figures.line_chart(
            folder,
            "attention_logits",
            logits,
            title="Largest attention logit after training",
            xlabel="peak learning rate (AdamW)",
            ylabel="max q·k/√d",
            logx=True,
            logy=True,
        ),
    ]


EXPERIMENT = Experiment(
    name=NAME,
    title="Attention-logit growth and QK-layernorm",
    question="Do a small Transformer's attention logits grow until it stops training as the "
    "peak learning rate rises, does QK-layernorm keep them bounded and widen the range of "
    "rates that train, and does a z-loss not?",
    citation="M. Wortsman et al., 'Small-scale proxies for large-scale Transformer training "
    "instabilities', ICLR 2024 (arXiv 2023); M. Dehghani et al., 'Scaling vision transformers to "
    "22 billion parameters', ICML 2023; A. Chowdhery et al., 'PaLM: scaling language modeling "
    "with pathways', 2022 (z-loss).",
    source="Wortsman et al. 2023; Dehghani et al. 2023; Chowdhery et al. 2022",
    grid=grid,
    run=run,
    summarize=summarize,
    verdict=verdict,
    figures=make_figures,
    seeds=(1, 1, 3),
    notes=f"Causal pre-LN Transformer, {DEPTH} blocks, width {WIDTH}, {HEADS} heads, vocab "
    f"{VOCAB}, context {LENGTH}; AdamW, batch {BATCH}, 10% linear warm-up then cosine decay; "
    f"z-loss coefficient {Z_LOSS:g}.",
)

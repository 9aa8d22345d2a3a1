"""Real training runs for the attention and through-time detectors, with the statistics the
Probe does not record yet computed here by hand and written into the run's frame.

Each model trains under a real Probe (its own statistics: update ratios, the loss, error
norms). At every step, on that step's batch and before the optimizer steps, the attention
and output-logit statistics are computed independently of gradprobe: the attention logits
q·k/√d in float64 from each attention module's input (captured by a forward pre-hook on a
separate no-grad forward), their softmax under the causal mask, its entropy in nats; the
token cosines in numpy; logsumexp of the head's logits. For recurrent nets, ‖dL/dh_t‖ from
autograd on a step-by-step unrolled copy of the same forward. Those values become rows
(step, module, stat, value) of the run, as the Probe's will be.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe import Probe
from gradprobe.lab.data import adding_split, digits
from gradprobe.lab.models import RecurrentModel, mlp
from gradprobe.lab.training import WARMUP_FRACTION
from gradprobe.lab.transformer import Attention, CausalTransformer, recurrence_split
from gradprobe.run import Run

torch.set_num_threads(1)
Rows = list[tuple[int, str, str, float]]
VOCAB, CTX = 16, 16


# ---------------------------------------------------------------- by hand
def token_cosine(h: np.ndarray) -> float:
    """Mean cosine similarity between distinct token vectors of each sequence ``[B, T, D]``,
    averaged over the batch (numpy, float64)."""
    h = np.asarray(h, dtype=np.float64)
    unit = h / np.linalg.norm(h, axis=-1, keepdims=True)
    gram = unit @ np.swapaxes(unit, 1, 2)
    t = h.shape[1]
    off = (gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)) / (t * (t - 1))
    return float(off.mean())


def attention_numbers(module: Attention, x: torch.Tensor, causal: bool) -> dict[str, float]:
    """Largest logit after the mask, mean entropy over heads and rows, lowest head's mean."""
    q, k, _ = module.qkv_heads(x)
    logits = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    t = logits.shape[-1]
    if causal:
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(future, -math.inf)
    p = torch.softmax(logits, dim=-1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # [B, H, T]; 0·log 0 = 0
    per_head = ent.mean(dim=(0, 2))
    return {
        "attn_logit_max": float(logits.max()),
        "attn_entropy": float(ent.mean()),
        "attn_entropy_min": float(per_head.min()),
    }


@torch.no_grad()
def by_hand(model: nn.Module, x: torch.Tensor, step: int, causal: bool = True) -> Rows:
    """The attention, token-geometry and output-logit statistics of ``model`` on ``x``."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            hooks.append(
                m.register_forward_pre_hook(
                    lambda mod, args, name=name: inputs.__setitem__(name, args[0])
                )
            )
        if name.startswith("blocks.") and name.count(".") == 1:
            hooks.append(
                m.register_forward_hook(
                    lambda mod, args, out, name=name: outputs.__setitem__(name, out)
                )
            )
        if name == "head":
            hooks.append(
                m.register_forward_hook(lambda mod, args, out: outputs.__setitem__("head", out))
            )
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    rows: Rows = []
    for name, inp in inputs.items():
        numbers = attention_numbers(model.get_submodule(name), inp, causal)
        rows += [(step, name, stat, v) for stat, v in numbers.items()]
    for name, out in outputs.items():
        if name == "head":
            z = torch.logsumexp(out.double(), dim=-1)
            rows += [
                (step, "head", "logit_z", float(z.mean())),
                (step, "head", "logit_max", float(out.max())),
            ]
        else:
            rows.append((step, name, "token_cosine", token_cosine(out.numpy())))
    return rows


def with_rows(run: Run, rows: Rows) -> Run:
    """The run with the hand-computed rows added to its frame."""
    extra = pd.DataFrame(rows, columns=["step", "name", "stat", "value"])
    frame = pd.concat([run.frame(), extra], ignore_index=True)
    frame = frame.astype({"step": np.int64, "value": np.float64})
    return Run(run.meta, frame)


# ---------------------------------------------------------------- transformers
def train_transformer(
    model: nn.Module, lr: float, steps: int, *, warmup: bool = True, causal: bool = True
) -> tuple[Run, Rows]:
    """AdamW on x[t] = x[t−1] + x[t−2] mod 16 under a Probe; the hand-computed rows of
    every step (on that step's batch, before the update)."""
    data = recurrence_split(32 * steps, 1, CTX, VOCAB, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warm = max(int(steps * WARMUP_FRACTION), 1) if warmup else 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
    )
    rows: Rows = []
    with Probe(model, opt) as probe:
        for s in range(steps):
            x, y = data.x_train[s * 32 : (s + 1) * 32], data.y_train[s * 32 : (s + 1) * 32]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            rows += by_hand(model, x, s, causal)
            opt.step()
            sched.step()
            probe.log(loss=loss)
    return probe.run(), rows


class NoResidual(nn.Module):
    """Bidirectional attention blocks without residual connections, LayerNorm after each:
    x = LN(attn(x)). Attention averages the tokens at every block and nothing carries
    them around it, so with depth they become one vector (Dong et al. 2021)."""

    def __init__(self, depth: int, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(CTX, dim)
        self.blocks = nn.ModuleList(_PostNormAttention(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(x).transpose(1, 2)


class _PostNormAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn.qkv_heads(x)
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional
        return self.ln(self.attn.proj(y.transpose(1, 2).reshape(b, t, d)))


@functools.cache
def transformer_case(name: str) -> tuple[Run, Rows]:
    """A named transformer run and its hand-computed rows (see TRANSFORMERS)."""
    torch.manual_seed(0)
    return TRANSFORMERS[name]()


TRANSFORMERS: dict[str, Callable[[], tuple[Run, Rows]]] = {
    # Wortsman et al. 2023's failure: no QK-layernorm, a peak rate far too high.
    "plain_lr_high": lambda: train_transformer(CausalTransformer(VOCAB, CTX), 0.1, 60),
    # the same model at a rate that trains, and with QK-layernorm at the high rate
    "plain_lr_ok": lambda: train_transformer(CausalTransformer(VOCAB, CTX), 3e-3, 60),
    "qk_norm_lr_high": lambda: train_transformer(
        CausalTransformer(VOCAB, CTX, qk_norm=True), 0.1, 60
    ),
    # trained long past fitting a task it can predict exactly: the output logits grow
    "plain_long": lambda: train_transformer(CausalTransformer(VOCAB, CTX), 1e-2, 300),
    # rank collapse with depth: attention blocks without residual connections
    "no_residual": lambda: train_transformer(NoResidual(8), 1e-3, 20, causal=False),
}


# ---------------------------------------------------------------- a classifier's logits
def train_classifier(lr: float, steps: int = 400) -> tuple[Run, Rows]:
    """A 3-layer ReLU MLP on digits (separable: its loss can reach 0), Adam without weight
    decay; logit_z and logit_max of its output layer ``out`` on every step's batch."""
    d = digits(seed=0)
    model = mlp(64, 10, depth=3, width=64, activation="relu", init="he")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    rows: Rows = []
    with Probe(model, opt) as probe:
        for s in range(steps):
            i = torch.randint(0, len(d.x_train), (64,), generator=g)
            out = model(d.x_train[i])
            loss = F.cross_entropy(out, d.y_train[i])
            logits = out.detach().double()
            rows += [
                (s, "out", "logit_z", float(torch.logsumexp(logits, dim=-1).mean())),
                (s, "out", "logit_max", float(logits.max())),
            ]
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss)
    return probe.run(), rows


@functools.cache
def classifier_case(lr: float) -> tuple[Run, Rows]:
    torch.manual_seed(0)
    return train_classifier(lr)


# ---------------------------------------------------------------- through time
def time_rows(model: RecurrentModel, x: torch.Tensor, y: torch.Tensor, step: int) -> Rows:
    """error_time_first/last/slope of the recurrent output, from autograd: ‖dL/dh_t‖ on a
    step-by-step unrolled forward of the same weights (h_t as the next step reads it),
    norms over the batch and features of each position, in float64."""
    pred, hs = model.unrolled(x)
    loss = F.mse_loss(pred, y)
    grads = torch.autograd.grad(loss, hs)
    norms = np.array([float(g.double().norm()) for g in grads])
    quarter = max(1, len(norms) // 4)
    t = np.arange(len(norms), dtype=float)
    slope = float(np.polyfit(t, np.log10(norms), 1)[0])  # decades per step, over t forward
    return [
        (step, "rnn", "error_time_first", float(norms[:quarter].mean())),
        (step, "rnn", "error_time_last", float(norms[-quarter:].mean())),
        (step, "rnn", "error_time_slope", slope),
    ]


def train_recurrent(model: RecurrentModel, length: int, steps: int = 8) -> tuple[Run, Rows]:
    """SGD on the adding problem under a Probe, the loss on the last output only; at every
    step the error-over-time rows of that step's batch, before the update."""
    data = adding_split(32 * steps, 8, length)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rows: Rows = []
    with Probe(model, opt) as probe:
        for s in range(steps):
            x, y = data.x_train[s * 32 : (s + 1) * 32], data.y_train[s * 32 : (s + 1) * 32]
            rows += time_rows(model, x, y, s)
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss)
    return probe.run(), rows


def rnn(scale: float | None) -> RecurrentModel:
    model = RecurrentModel("rnn", 2, 32, 1)
    if scale is not None:  # an orthogonal recurrent matrix × scale
        with torch.no_grad():
            nn.init.orthogonal_(model.rnn.weight_hh_l0, gain=scale)
    return model


@functools.cache
def recurrent_case(name: str) -> tuple[Run, Rows]:
    torch.manual_seed(0)
    return RECURRENT[name]()


RECURRENT: dict[str, Callable[[], tuple[Run, Rows]]] = {
    # a tanh RNN whose recurrent matrix is orthogonal × 0.5: the error halves per step back
    "rnn_contracting": lambda: train_recurrent(rnn(0.5), 40),
    # orthogonal × 1 on short sequences: the error crosses them nearly whole
    "rnn_orthogonal": lambda: train_recurrent(rnn(1.0), 12),
}


def rows_frame(rows: Rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["step", "name", "stat", "value"])


def recent_median(rows: Rows, name: str, stat: str) -> float:
    """The median over the last half of the steps, as the detectors read a current level."""
    f = rows_frame(rows)
    s = f[(f["name"] == name) & (f["stat"] == stat)].sort_values("step")["value"]
    return float(s.iloc[len(s) // 2 :].median()) if len(s) > 1 else float(s.iloc[0])


def early_median(rows: Rows, name: str, stat: str) -> float:
    """The median over the first quarter of the steps (at least one)."""
    f = rows_frame(rows)
    s = f[(f["name"] == name) & (f["stat"] == stat)].sort_values("step")["value"]
    return float(s.iloc[: max(1, len(s) // 4)].median())


def values(rows: Rows, name: str, stat: str) -> Any:
    f = rows_frame(rows)
    return f[(f["name"] == name) & (f["stat"] == stat)].sort_values("step")["value"].to_numpy()

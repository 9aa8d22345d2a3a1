"""Hypothesis strategies for random architectures: MLPs and CNNs of random depth, width,
activation, with or without BatchNorm/LayerNorm/Dropout and residual blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from gradprobe.lab.models import activation_module

ACTIVATION_NAMES = ["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "selu", "silu",
                    "gelu", "softplus", "hardtanh", "softsign"]


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


@dataclass(frozen=True)
class Architecture:
    kind: str  # "mlp" or "cnn"
    depth: int
    width: int
    activation: str
    norm: str  # "none", "batch", "layer"
    dropout: bool
    residual: bool
    inplace: bool
    batch: int

    def build(self) -> nn.Module:
        layers: list[nn.Module] = []
        conv = self.kind == "cnn"
        first = nn.Conv2d(2, self.width, 3, padding=1) if conv else nn.Linear(5, self.width)
        layers.append(first)
        for _ in range(self.depth):
            block: list[nn.Module] = [
                nn.Conv2d(self.width, self.width, 3, padding=1) if conv else nn.Linear(self.width, self.width)
            ]
            if self.norm == "batch":
                block.append(nn.BatchNorm2d(self.width) if conv else nn.BatchNorm1d(self.width))
            elif self.norm == "layer":
                block.append(nn.GroupNorm(1, self.width) if conv else nn.LayerNorm(self.width))
            act = activation_module(self.activation)
            if self.inplace and hasattr(act, "inplace"):
                act.inplace = True
            block.append(act)
            if self.dropout:
                block.append(nn.Dropout2d(0.2) if conv else nn.Dropout(0.2))
            body = nn.Sequential(*block)
            layers.append(Residual(body) if self.residual else body)
        if conv:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        layers.append(nn.Linear(self.width, 3))
        return nn.Sequential(*layers)

    def batch_data(self) -> tuple[Tensor, Tensor]:
        x = torch.randn(self.batch, 2, 5, 5) if self.kind == "cnn" else torch.randn(self.batch, 5)
        return x, torch.randint(0, 3, (self.batch,))


architectures = st.builds(
    Architecture,
    kind=st.sampled_from(["mlp", "cnn"]),
    depth=st.integers(1, 5),
    width=st.integers(2, 9),
    activation=st.sampled_from(ACTIVATION_NAMES),
    norm=st.sampled_from(["none", "batch", "layer"]),
    dropout=st.booleans(),
    residual=st.booleans(),
    inplace=st.booleans(),
    batch=st.integers(2, 9),
)


# ---------------------------------------------------------------- the patterns of real code
# Random models that mix what real training code does to a module: pytree outputs (dicts,
# dataclasses, nested tuples), keyword calls (``linear(input=x)``, ``attn(query=, key=,
# value=)``), a tensor read by two modules, residual adds, a BatchNorm kept in eval(),
# activation checkpointing, a sparse Embedding, a parameter that never gets a gradient.
# tests/test_probe_patterns_properties.py trains them under the Probe and without it.

PATTERN_FEATURES = 3  # input features of every step's [B, T, F] batch
PATTERN_VOCAB = 11  # token ids of the Embedding
PATTERN_CLASSES = 3
BLOCK_KINDS = ("mlp", "residual", "shared", "keyword", "attention", "frozen_batchnorm",
               "checkpoint", "pytree")
OUTPUT_STYLES = ("tensor", "dict", "dataclass", "nested_tuple")
# How a step's gradient is made: one loss; two losses on a retained graph; a gradient
# penalty through torch.autograd.grad(create_graph=True); two micro-batches accumulated.
LOSS_MODES = ("single", "retained", "penalty", "accumulate")


@dataclass
class BlockOutput:
    """A dataclass output, as transformers' ``ModelOutput``: ``hidden`` is what flows on."""

    hidden: Tensor
    pre_activation: Tensor | None = None


def pack_output(style: str, main: Tensor, other: Tensor) -> object:
    """``main`` (the tensor the caller uses) wrapped as ``style``, first in pytree order."""
    if style == "dict":
        return {"features": main, "pre_activation": other}
    if style == "dataclass":
        return BlockOutput(hidden=main, pre_activation=other)
    if style == "nested_tuple":
        ids = torch.zeros(main.shape[:1], dtype=torch.long)  # integers are never "the" output
        return ((ids, main), other)
    return main


def unpack_output(style: str, value: object) -> Tensor:
    if style == "dict":
        return value["features"]  # type: ignore[index]
    if style == "dataclass":
        return value.hidden  # type: ignore[attr-defined]
    if style == "nested_tuple":
        return value[0][1]  # type: ignore[index]
    return value  # type: ignore[return-value]


def _activation(name: str, inplace: bool) -> nn.Module:
    act = activation_module(name)
    if inplace and hasattr(act, "inplace"):
        act.inplace = True
    return act


class MLPBlock(nn.Module):
    def __init__(self, width: int, activation: str, inplace: bool, dropout: bool) -> None:
        super().__init__()
        layers = [nn.Linear(width, width), _activation(activation, inplace)]
        self.body = nn.Sequential(*layers, *([nn.Dropout(0.2)] if dropout else []))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ResidualBlock(MLPBlock):
    """x + f(x): x is read by the body's first Linear and by the add."""

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class SharedInputBlock(nn.Module):
    """One tensor read by two modules (a gated unit): value(x) · act(gate(x))."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.value = nn.Linear(width, width)
        self.gate = nn.Linear(width, width)
        self.act = activation_module(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.value(x) * self.act(self.gate(x))


class KeywordBlock(nn.Module):
    """Submodules called with keyword arguments only: ``linear(input=x)``."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = activation_module(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(input=self.linear(input=x))


class AttentionBlock(nn.Module):
    """Self-attention called as ``attn(query=, key=, value=)``, with a residual add."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2 if width % 2 == 0 else 1, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(query=x, key=x, value=x, need_weights=False)
        return x + out


class FrozenBatchNormBlock(nn.Module):
    """Linear → BatchNorm1d over channels of [B, C, T] → activation; the BatchNorm stays in
    eval() whatever ``train()`` says (frozen statistics, as detection backbones keep them),
    while its weight and bias train."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)
        self.act = activation_module(activation)
        self.norm.eval()

    def train(self, mode: bool = True) -> FrozenBatchNormBlock:
        super().train(mode)
        self.norm.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.linear(x).transpose(1, 2)).transpose(1, 2)
        return self.act(h)


class CheckpointBlock(nn.Module):
    """The body runs under ``torch.utils.checkpoint`` (recomputed inside backward)."""

    def __init__(self, width: int, activation: str, dropout: bool, reentrant: bool) -> None:
        super().__init__()
        layers = [nn.Linear(width, width), activation_module(activation)]
        self.body = nn.Sequential(*layers, *([nn.Dropout(0.2)] if dropout else []))
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.body, x, use_reentrant=self.reentrant)


class PytreeLayer(nn.Module):
    """A layer with parameters of its own (so the Probe hooks it) whose output is a dict,
    a dataclass or a nested tuple: tanh(x Wᵀ + b), with x Wᵀ + b beside it."""

    def __init__(self, width: int, out: int, style: str) -> None:
        super().__init__()
        template = nn.Linear(width, out)  # torch's default initialisation
        self.weight = nn.Parameter(template.weight.detach().clone())
        self.bias = nn.Parameter(template.bias.detach().clone())
        self.style = style

    def forward(self, x: Tensor) -> object:
        z = nn.functional.linear(x, self.weight, self.bias)
        return pack_output(self.style, torch.tanh(z), z)


class PytreeBlock(nn.Module):
    def __init__(self, width: int, style: str) -> None:
        super().__init__()
        self.layer = PytreeLayer(width, width, style)

    def forward(self, x: Tensor) -> Tensor:
        return unpack_output(self.layer.style, self.layer(x))


class PatternModel(nn.Module):
    """stem Linear (+ Embedding of token ids) → blocks → a head returning a pytree.

    ``unused`` is a Linear the forward never calls: its parameters get no gradient.
    """

    def __init__(self, spec: PatternSpec) -> None:
        super().__init__()
        w = spec.width
        self.stem = nn.Linear(PATTERN_FEATURES, w)
        self.embedding = (
            nn.Embedding(PATTERN_VOCAB, w, sparse=spec.embedding == "sparse")
            if spec.embedding != "none"
            else None
        )
        self.blocks = nn.ModuleList(self._block(kind, spec) for kind in spec.blocks)
        self.head = PytreeLayer(w, PATTERN_CLASSES, spec.head_output)
        self.unused = nn.Linear(w, w) if spec.unused_branch else None

    @staticmethod
    def _block(kind: str, spec: PatternSpec) -> nn.Module:
        w, act = spec.width, spec.activation
        if kind == "mlp":
            return MLPBlock(w, act, spec.inplace, spec.dropout)
        if kind == "residual":
            return ResidualBlock(w, act, spec.inplace, spec.dropout)
        if kind == "shared":
            return SharedInputBlock(w, act)
        if kind == "keyword":
            return KeywordBlock(w, act)
        if kind == "attention":
            return AttentionBlock(w)
        if kind == "frozen_batchnorm":
            return FrozenBatchNormBlock(w, act)
        if kind == "checkpoint":
            return CheckpointBlock(w, act, spec.dropout, spec.reentrant)
        return PytreeBlock(w, spec.block_output)

    def forward(self, x: Tensor, ids: Tensor | None = None) -> object:
        h = self.stem(x)
        if self.embedding is not None:
            h = h + self.embedding(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def logits(self, out: object) -> Tensor:
        """The [B, T, classes] logits inside what :meth:`forward` returned."""
        return unpack_output(self.head.style, out)


@dataclass(frozen=True)
class PatternSpec:
    """A model of :class:`PatternModel`, its data and how it is trained."""

    blocks: tuple[str, ...]
    width: int
    activation: str
    inplace: bool
    dropout: bool
    reentrant: bool  # use_reentrant of checkpoint blocks
    block_output: str  # output style of pytree blocks
    head_output: str
    embedding: str  # "none", "dense", "sparse"
    unused_branch: bool
    loss_mode: str
    keyword_call: bool  # model(x=x, ids=ids) rather than model(x, ids)
    optimizer: str  # "sgd", "momentum", "adam"
    shapes: tuple[tuple[int, int], ...]  # (batch, sequence length) of each step
    every: int
    stats: str
    copy_step: int  # the step at which the model is saved, pickled and deep-copied
    copy_after_step: bool  # after optimizer.step() (else between backward and step)
    # Issue 21: the step's backward runs inside optimizer.step(closure); the head is
    # replaced by a fresh one (and its parameters added as a group) before this step's
    # forward (-1: never); the head has an optimizer of its own, stepped after the
    # Probe's (which watches the first).
    closure: bool = False
    replace_step: int = -1
    two_optimizers: bool = False

    def build(self) -> PatternModel:
        return PatternModel(self)

    def batches(self, seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(x [B, T, F], ids [B, T], y [B]) for each step, from their own generator."""
        g = torch.Generator().manual_seed(seed)
        return [
            (
                torch.randn(b, t, PATTERN_FEATURES, generator=g),
                torch.randint(0, PATTERN_VOCAB, (b, t), generator=g),
                torch.randint(0, PATTERN_CLASSES, (b,), generator=g),
            )
            for b, t in self.shapes
        ]


@st.composite
def pattern_specs(draw: st.DrawFn) -> PatternSpec:
    steps = draw(st.integers(2, 4))
    if draw(st.booleans()):  # sequence length and batch size vary from step to step
        shapes = tuple(draw(st.tuples(st.integers(2, 6), st.integers(1, 7))) for _ in range(steps))
    else:
        shapes = ((4, 5),) * steps
    loss_mode = draw(st.sampled_from(LOSS_MODES))
    # What torch itself cannot do, probed or not, under a gradient penalty: a double
    # backward through attention on CPU (no derivative of the fused kernel's backward),
    # torch.autograd.grad through a reentrant checkpoint.
    kinds = [k for k in BLOCK_KINDS if k != "attention"] if loss_mode == "penalty" else BLOCK_KINDS
    blocks = tuple(draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4)))
    reentrant = loss_mode != "penalty" and draw(st.booleans())
    embedding = draw(st.sampled_from(["none", "dense", "sparse"]))
    # Adam takes no sparse gradient (torch raises, probed or not).
    optimizers = ["sgd", "momentum"] + ([] if embedding == "sparse" else ["adam"])
    optimizer = draw(st.sampled_from(optimizers))
    return PatternSpec(
        blocks=blocks,
        width=draw(st.integers(2, 6)),
        activation=draw(st.sampled_from(ACTIVATION_NAMES)),
        inplace=draw(st.booleans()),
        dropout=draw(st.booleans()),
        reentrant=reentrant,
        block_output=draw(st.sampled_from(OUTPUT_STYLES)),
        head_output=draw(st.sampled_from(OUTPUT_STYLES)),
        embedding=embedding,
        unused_branch=draw(st.booleans()),
        loss_mode=loss_mode,
        keyword_call=draw(st.booleans()),
        optimizer=optimizer,
        shapes=shapes,
        every=draw(st.sampled_from([1, 1, 2])),
        stats=draw(st.sampled_from(["cheap", "default", "full"])),
        copy_step=draw(st.integers(0, steps - 1)),
        copy_after_step=draw(st.booleans()),
        closure=draw(st.booleans()),
        replace_step=draw(st.sampled_from([-1, *range(1, steps)])),
        two_optimizers=draw(st.booleans()),
    )

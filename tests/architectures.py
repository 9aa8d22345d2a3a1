"""Real architectures, built from code (no downloaded weights), and their training runs.

Test-only builders for issue 14 §5: a small GPT-2 (``transformers.GPT2Config``), a
ResNet from ``torch.nn`` (with BatchNorm, or without it and with Fixup's branch
scaling), an LSTM language model, and a ViT-style encoder on ``nn.TransformerEncoder``.
Each is trained the way a user trains it (the Probe attached through the optimizer,
the loop unchanged) on generated data, for a few dozen steps, single-threaded, so one
run costs about a second or two.

Data are generated from a fixed rule so the loss can fall: token sequences where each
token is the sum of the two before it mod the vocabulary (a recurrence the models can
learn), and images whose class is the quadrant holding a bright blob.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradprobe import Probe
from gradprobe.run import Run

torch.set_num_threads(1)

VOCAB = 32


# ------------------------------------------------------------------------ data
def token_sequences(n: int, length: int, *, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` tokens with x[t] = (x[t-1] + x[t-2]) mod vocab from two random seeds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, :2] = torch.randint(0, vocab, (n, 2), generator=g)
    for t in range(2, length):
        x[:, t] = (x[:, t - 1] + x[:, t - 2]) % vocab
    return x


def blob_images(n: int, size: int = 16, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 3, size, size]`` noise with a 4×4 blob at a random place; the label is its colour:
    bright in channel 0, 1 or 2 (classes 0–2), or dark in all three (class 3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    y = torch.randint(0, 4, (n,), generator=g)
    corner = torch.randint(0, size - 3, (n, 2), generator=g)
    for i in range(n):
        r, c = int(corner[i, 0]), int(corner[i, 1])
        label = int(y[i])
        channels = slice(label, label + 1) if label < 3 else slice(0, 3)
        x[i, channels, r : r + 4, c : c + 4] += 2.0 if label < 3 else -2.0
    return x, y


# ------------------------------------------------------------------------ models
def gpt2(n_layer: int = 2, n_embd: int = 32, n_head: int = 4, n_positions: int = 32) -> nn.Module:
    """A small GPT-2 (pre-LayerNorm blocks, GELU MLPs) from its config, randomly initialised."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-(BN)-ReLU-conv-(BN), plus the identity, then ReLU."""

    def __init__(self, channels: int, *, batchnorm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batchnorm)
        self.bn2 = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(x + branch)


class ResNet(nn.Module):
    """A CIFAR-style ResNet on ``[N, 3, H, W]``: stem, ``blocks`` basic blocks, pool, classifier.

    ``branch_init``: ``"he"`` initialises every conv with He's fan-in rule (what the
    ResNet paper does, and with BatchNorm what keeps it healthy); ``"fixup"`` scales the
    branch's first conv by blocks^(-1/2) and zeroes its last (Zhang et al. 2019), which
    keeps a net without normalisation at the scale of its input.
    """

    def __init__(
        self,
        blocks: int = 4,
        channels: int = 8,
        classes: int = 4,
        *,
        batchnorm: bool = True,
        branch_init: str = "he",
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=not batchnorm)
        self.stem_bn = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.stem_relu = nn.ReLU()
        self.layers = nn.Sequential(
            *[BasicBlock(channels, batchnorm=batchnorm) for _ in range(blocks)]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if branch_init == "fixup":
            with torch.no_grad():
                for block in self.layers:
                    block.conv1.weight.mul_(blocks**-0.5)
                    block.conv2.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem_relu(self.stem_bn(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class LSTMLanguageModel(nn.Module):
    """Embedding → fused ``nn.LSTM`` → linear read-out of the next token at every position.

    ``forget_bias`` sets the forget gate's bias (both of PyTorch's bias vectors together):
    +1 is Gers et al.'s and Jozefowicz et al.'s recommendation, a large negative value
    makes the cell forget at every step.
    """

    def __init__(
        self,
        hidden: int = 32,
        *,
        forget_bias: float = 1.0,
        layers: int = 1,
        top_forget_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)
        top = f"_l{layers - 1}"
        with torch.no_grad():
            for name, p in self.lstm.named_parameters():
                if name.startswith("bias"):  # gates in PyTorch's order: input, forget, cell, output
                    p.zero_()
                    # ``top_forget_bias``: the last layer's own, the layers below keep theirs
                    top_only = top_forget_bias is not None and name.endswith(top)
                    p[hidden : 2 * hidden] = (top_forget_bias if top_only else forget_bias) / 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


class GRULanguageModel(nn.Module):
    """Embedding → fused ``nn.GRU`` → linear read-out of the next token at every position.

    ``update_bias`` sets the update gate's bias (both vectors together). The update gate z
    is the GRU's carry: h_t = (1 − z)⊙n + z⊙h_{t−1}, so a large *negative* bias (z ≈ 0)
    makes it forget at every step; PyTorch's default (≈ 0) keeps half.
    """

    def __init__(self, hidden: int = 32, *, update_bias: float | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)
        if update_bias is not None:
            with torch.no_grad():  # gates in PyTorch's order: reset, update, new
                self.gru.bias_ih_l0[hidden : 2 * hidden] = update_bias / 2
                self.gru.bias_hh_l0[hidden : 2 * hidden] = update_bias / 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.head(out)


class LSTMCellLanguageModel(nn.Module):
    """The LSTM language model written as a Python loop over an ``nn.LSTMCell``."""

    def __init__(self, hidden: int = 32, *, forget_bias: float = 1.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.head = nn.Linear(hidden, VOCAB)
        with torch.no_grad():
            for p in (self.cell.bias_ih, self.cell.bias_hh):
                p.zero_()
                p[hidden : 2 * hidden] = forget_bias / 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        h = c = x.new_zeros(x.shape[0], self.cell.hidden_size)
        outs = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            outs.append(h)
        return self.head(torch.stack(outs, dim=1))


class ViT(nn.Module):
    """A ViT-style encoder: patch embedding, a class token, learned positions,
    ``nn.TransformerEncoder`` (pre- or post-LayerNorm), and a linear head on the class token."""

    def __init__(
        self,
        depth: int = 2,
        dim: int = 32,
        heads: int = 4,
        *,
        size: int = 16,
        patch: int = 4,
        classes: int = 4,
        norm_first: bool = True,
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=2 * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=norm_first,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


# ------------------------------------------------------------------------ training
def _lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )


def train_lm(
    model: nn.Module,
    *,
    steps: int = 30,
    length: int = 24,
    batch: int = 16,
    lr: float = 3e-3,
    clip: float | None = None,
    config: dict[str, Any] | None = None,
) -> tuple[Run, list[float]]:
    """Adam on next-token prediction of :func:`token_sequences`; the run and the losses."""
    data = token_sequences(batch * steps, length)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return _loop(
        model,
        opt,
        steps,
        lambda s: _lm_loss(model, data[s * batch : (s + 1) * batch]),
        clip,
        config,
    )


def train_classifier(
    model: nn.Module,
    *,
    steps: int = 30,
    batch: int = 32,
    lr: float = 0.05,
    optimizer: str = "sgd",
    warmup: int = 0,
    size: int = 16,
    config: dict[str, Any] | None = None,
) -> tuple[Run, list[float]]:
    """SGD (momentum 0.9) or Adam on :func:`blob_images`; the run and the losses."""
    x, y = blob_images(batch * steps, size)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = None
    if warmup:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))

    def loss_at(s: int) -> torch.Tensor:
        idx = slice(s * batch, (s + 1) * batch)
        return nn.functional.cross_entropy(model(x[idx]), y[idx])

    return _loop(model, opt, steps, loss_at, None, config, sched)


def _loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    loss_at: Callable[[int], torch.Tensor],
    clip: float | None,
    config: dict[str, Any] | None,
    sched: Any = None,
) -> tuple[Run, list[float]]:
    losses: list[float] = []
    model.train()
    with Probe(model, opt, config=config) as probe:
        for s in range(steps):
            opt.zero_grad()
            loss = loss_at(s)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(float(loss.detach()))  # the test's own record, outside any hook
    return probe.run(), losses


def finite_decrease(losses: list[float]) -> float:
    """Mean of the last quarter over the mean of the first quarter (NaN if any loss is not finite)."""
    if not all(math.isfinite(v) for v in losses):
        return math.nan
    q = max(1, len(losses) // 4)
    return sum(losses[-q:]) / sum(losses[:q])


# ------------------------------------------------------------------------ the matrix
DEAD_CONV = "layers.1.conv1"  # the conv whose bias kills its channels in ``resnet_dead_conv``
DEAD_CHANNELS = 4  # of its 8


def _dead_conv_resnet() -> nn.Module:
    """The healthy Fixup ResNet, with half the channels of one conv pushed far below 0 by its bias."""
    model = ResNet(4, batchnorm=False, branch_init="fixup")
    with torch.no_grad():  # far below any pre-activation the conv's weights can make
        model.layers[1].conv1.bias[:DEAD_CHANNELS] = -50.0
    return model


def _seeded(build: Callable[[], tuple[Run, list[float]]]) -> Callable[[], tuple[Run, list[float]]]:
    def run() -> tuple[Run, list[float]]:
        torch.manual_seed(0)
        return build()

    return run


SETTINGS: dict[str, Callable[[], tuple[Run, list[float]]]] = {
    # built to pass
    "gpt2": _seeded(lambda: train_lm(gpt2())),
    "resnet_bn": _seeded(lambda: train_classifier(ResNet(4, batchnorm=True))),
    "resnet_fixup": _seeded(
        lambda: train_classifier(ResNet(8, batchnorm=False, branch_init="fixup"))
    ),
    "lstm_lm": _seeded(lambda: train_lm(LSTMLanguageModel(forget_bias=1.0), lr=1e-2)),
    "vit_preln": _seeded(lambda: train_classifier(ViT(2), optimizer="adam", lr=1e-3)),
    # the post-LN case's control: the same depth and rate, norms first
    "vit_preln_high_lr": _seeded(
        lambda: train_classifier(ViT(8, norm_first=True), optimizer="adam", lr=1e-2)
    ),
    # built to fail
    "resnet_plain_deep": _seeded(
        lambda: train_classifier(ResNet(20, batchnorm=False), lr=1e-3, size=8)
    ),
    "resnet_dead_conv": _seeded(lambda: train_classifier(_dead_conv_resnet())),
    "lstm_forget_negative": _seeded(
        lambda: train_lm(LSTMLanguageModel(forget_bias=-20.0), lr=1e-2, length=96)
    ),
    "vit_postln_high_lr": _seeded(
        lambda: train_classifier(ViT(8, norm_first=False), optimizer="adam", lr=1e-2)
    ),
    # vanishing through time beyond the LSTM: a GRU whose update gate is shut, a
    # cell in a Python loop, and a 2-layer LSTM whose top layer alone forgets
    "gru_update_negative": _seeded(
        lambda: train_lm(GRULanguageModel(update_bias=-20.0), lr=1e-2, length=48)
    ),
    "lstmcell_forget_negative": _seeded(
        lambda: train_lm(LSTMCellLanguageModel(forget_bias=-20.0), lr=1e-2, length=24, steps=20)
    ),
    "lstm2_top_forget_negative": _seeded(
        lambda: train_lm(
            LSTMLanguageModel(layers=2, top_forget_bias=-20.0), lr=1e-2, length=48
        )
    ),
    # ... and their healthy twins
    "gru_lm": _seeded(lambda: train_lm(GRULanguageModel(), lr=1e-2)),
    "lstmcell_lm": _seeded(
        lambda: train_lm(LSTMCellLanguageModel(forget_bias=1.0), lr=1e-2, length=24, steps=20)
    ),
    "lstm2_lm": _seeded(lambda: train_lm(LSTMLanguageModel(layers=2), lr=1e-2, length=48)),
}

HEALTHY = (
    "gpt2",
    "resnet_bn",
    "resnet_fixup",
    "lstm_lm",
    "vit_preln",
    "vit_preln_high_lr",
    "gru_lm",
    "lstmcell_lm",
    "lstm2_lm",
)
# The recurrent module each built-to-forget setting must be named by.
FORGETTING = {
    "lstm_forget_negative": "lstm",
    "gru_update_negative": "gru",
    "lstmcell_forget_negative": "cell",
}


@functools.cache
def setting(name: str) -> tuple[Run, list[float]]:
    """The run (and losses) of a named setting; cached per process."""
    return SETTINGS[name]()

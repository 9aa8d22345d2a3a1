"""Model builders for the demo and the lab, from a few plain arguments.

Names are chosen so that statistics read well: an MLP is ``fc1, act1, …, fcL, actL,
out`` (``bn1``/``ln1`` with normalisation), a CNN ``conv1, bn1, act1, …, pool, out``, a
residual MLP ``inp, blocks.0.{norm,act,fc}, …, head_act, out``. ``depth`` always counts
hidden layers (weights followed by an activation), so "a 20-layer sigmoid MLP" has 20
hidden ``Linear`` + sigmoid pairs and one linear output layer.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..activations import get_activation
from ..errors import GradprobeError

__all__ = [
    "INITS",
    "RecurrentModel",
    "ResidualBlock",
    "activation_module",
    "cnn",
    "init_weights",
    "mlp",
    "recurrent",
    "residual_mlp",
]

_MODULE_FOR = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "hardtanh": nn.Hardtanh,
    "softsign": nn.Softsign,
}

# Weight initialisations by name: what each sets Var(W) to, for a layer of fan-in n.
INITS: dict[str, str] = {
    "default": "PyTorch's nn.Linear/Conv default: U(±1/√n) weights, Var = 1/(3n); U(±1/√n) biases",
    "small": "N(0, 0.01²) weights, zero biases: too small, the signal shrinks every layer",
    "large": "N(0, 4/n) weights, zero biases: too large for tanh, chaotic and exploding",
    "glorot_standard": "Glorot's 'standard' U(±1/√n), Var = 1/(3n), zero biases",
    "xavier_uniform": "Glorot & Bengio 2010: U(±√(6/(n+m))), Var = 2/(n+m), zero biases",
    "xavier_normal": "Glorot & Bengio 2010: N(0, 2/(n+m)), zero biases",
    "he": "He et al. 2015 (Kaiming normal, fan-in, ReLU gain): N(0, 2/n), zero biases",
    "he_uniform": "He et al. 2015 (Kaiming uniform, fan-in, ReLU gain): Var = 2/n, zero biases",
    "lecun": "LeCun normal N(0, 1/n), zero biases (the init SELU expects)",
    "orthogonal": "Saxe et al. 2014: orthogonal weights with the activation's gain, zero biases",
}


def activation_module(name: str) -> nn.Module:
    """A fresh ``nn.Module`` for a registered activation (``swish`` → SiLU)."""
    act = get_activation(name)
    return _MODULE_FOR[act.name]()


def _fan_in(w: Tensor) -> int:
    return int(w.shape[1] * (w[0][0].numel() if w.dim() > 2 else 1))


def init_weights(
    model: nn.Module,
    scheme: str = "default",
    *,
    activation: str = "relu",
    weight_var: float | None = None,
    bias: float | None = None,
) -> nn.Module:
    """Initialise every Linear/Conv layer of ``model`` in place; returns it.

    ``scheme`` is a key of :data:`INITS`. ``weight_var`` (σ_w²) overrides it with
    N(0, σ_w²/fan_in), the convention of mean-field theory. ``bias`` sets every bias
    to that constant (a ReLU net with bias −10 starts dead).
    """
    if scheme not in INITS and weight_var is None:
        raise GradprobeError(f"unknown init {scheme!r}", f"use one of {sorted(INITS)}")
    act = get_activation(activation).name
    gain_name = act if act in ("sigmoid", "tanh", "relu", "leaky_relu", "selu") else "relu"
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        w = m.weight
        with torch.no_grad():
            if weight_var is not None:
                nn.init.normal_(w, 0.0, math.sqrt(weight_var / _fan_in(w)))
            elif scheme == "default":
                m.reset_parameters()
            elif scheme == "small":
                nn.init.normal_(w, 0.0, 0.01)
            elif scheme == "large":
                nn.init.normal_(w, 0.0, math.sqrt(4.0 / _fan_in(w)))
            elif scheme == "glorot_standard":
                bound = 1.0 / math.sqrt(_fan_in(w))
                nn.init.uniform_(w, -bound, bound)
            elif scheme == "xavier_uniform":
                nn.init.xavier_uniform_(w)
            elif scheme == "xavier_normal":
                nn.init.xavier_normal_(w)
            elif scheme == "he":
                nn.init.kaiming_normal_(w, nonlinearity="relu")
            elif scheme == "he_uniform":
                nn.init.kaiming_uniform_(w, nonlinearity="relu")
            elif scheme == "lecun":
                nn.init.normal_(w, 0.0, math.sqrt(1.0 / _fan_in(w)))
            elif scheme == "orthogonal":
                nn.init.orthogonal_(w, gain=nn.init.calculate_gain(gain_name))
            if m.bias is not None:
                if bias is not None:
                    m.bias.fill_(bias)
                elif scheme != "default" or weight_var is not None:
                    m.bias.zero_()
    return model


def _norm(kind: str | None, width: int) -> nn.Module | None:
    if kind in (None, "none"):
        return None
    if kind in ("batch", "batchnorm", "bn"):
        return nn.BatchNorm1d(width)
    if kind in ("layer", "layernorm", "ln"):
        return nn.LayerNorm(width)
    raise GradprobeError(f"unknown normalisation {kind!r}", "use None, 'batch' or 'layer'")


def mlp(
    in_features: int,
    out_features: int,
    *,
    depth: int,
    width: int = 64,
    activation: str = "relu",
    init: str = "default",
    norm: str | None = None,
    weight_var: float | None = None,
    bias: float | None = None,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A plain MLP: ``depth`` × (Linear → [norm] → activation) then a Linear output.

    Normalisation sits between the weights and the activation (Ioffe & Szegedy 2015).
    """
    if depth < 1:
        raise GradprobeError(f"depth must be at least 1, got {depth}", "e.g. depth=20")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    fan_in = in_features
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(fan_in, width)
        norm_layer = _norm(norm, width)
        if norm_layer is not None:
            layers[f"{'bn' if isinstance(norm_layer, nn.BatchNorm1d) else 'ln'}{i}"] = norm_layer
        layers[f"act{i}"] = activation_module(activation)
        if dropout:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        fan_in = width
    layers["out"] = nn.Linear(fan_in, out_features)
    model = nn.Sequential(layers)
    return init_weights(model, init, activation=activation, weight_var=weight_var, bias=bias)


class ResidualBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b): x + scale · fc(act(norm(x))).

    The identity path carries the error signal around the block untouched. ``scale``
    shrinks the residual branch: with 1/√depth the forward signal of a deep stack stays
    O(1) even without normalisation (an unscaled identity around 20 He-initialised ReLU
    blocks grows the activations by orders of magnitude).
    """

    def __init__(self, width: int, activation: str, norm: str | None, scale: float) -> None:
        super().__init__()
        self.norm = _norm(norm, width) or nn.Identity()
        self.act = activation_module(activation)
        self.fc = nn.Linear(width, width)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.fc(self.act(self.norm(x)))


def residual_mlp(
    in_features: int,
    out_features: int,
    *,
    depth: int,
    width: int = 64,
    activation: str = "relu",
    init: str = "default",
    norm: str | None = None,
    scale: float | None = None,
) -> nn.Sequential:
    """A residual MLP: input projection, ``depth`` residual blocks, activation, output.

    ``scale`` defaults to 1/√depth (see :class:`ResidualBlock`).
    """
    if depth < 1:
        raise GradprobeError(f"depth must be at least 1, got {depth}", "e.g. depth=20")
    s = 1.0 / math.sqrt(depth) if scale is None else scale
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["inp"] = nn.Linear(in_features, width)
    layers["blocks"] = nn.Sequential(
        *[ResidualBlock(width, activation, norm, s) for _ in range(depth)]
    )
    layers["head_act"] = activation_module(activation)
    layers["out"] = nn.Linear(width, out_features)
    model = nn.Sequential(layers)
    return init_weights(model, init, activation=activation)


def cnn(
    *,
    in_channels: int = 1,
    n_classes: int = 10,
    channels: int = 16,
    depth: int = 3,
    activation: str = "relu",
    batchnorm: bool = False,
    init: str = "default",
    bias: float | None = None,
) -> nn.Sequential:
    """A small CNN for 8×8 digits: ``depth`` × (3×3 conv → [BatchNorm2d] → act), pool, linear."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_channels
    for i in range(1, depth + 1):
        layers[f"conv{i}"] = nn.Conv2d(c, channels, kernel_size=3, padding=1)
        if batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm2d(channels)
        layers[f"act{i}"] = activation_module(activation)
        c = channels
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flat"] = nn.Flatten()
    layers["out"] = nn.Linear(c, n_classes)
    model = nn.Sequential(layers)
    return init_weights(model, init, activation=activation, bias=bias)


class RecurrentModel(nn.Module):
    """A recurrent layer (``rnn``, ``lstm`` or ``gru``) reading a sequence, and a linear head
    on its last hidden state."""

    def __init__(
        self, kind: str, input_size: int, hidden: int, out_features: int, nonlinearity: str = "tanh"
    ) -> None:
        super().__init__()
        kinds = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
        if kind not in kinds:
            raise GradprobeError(f"unknown recurrent layer {kind!r}", "use 'rnn', 'lstm' or 'gru'")
        extra = {"nonlinearity": nonlinearity} if kind == "rnn" else {}
        self.kind = kind
        self.rnn = kinds[kind](input_size, hidden, batch_first=True, **extra)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def unrolled(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The same prediction as ``forward``, computed one time step at a time, and the
        hidden states h_1 … h_T it passed through.

        Each h_t is the tensor the next step reads, so after ``h_t.retain_grad()`` and a
        backward pass ``h_t.grad`` is dL/dh_t with every path through later steps (with the
        fused sequence call only the last output is used by the loss, and the gradients of
        the earlier outputs would be zero).
        """
        state: Tensor | tuple[Tensor, Tensor] | None = None
        hs: list[Tensor] = []
        for t in range(x.shape[1]):
            out, new_state = self.rnn(x[:, t : t + 1], state)
            h = out[:, 0]
            hs.append(h)
            # The next step reads h itself (and, for an LSTM, the new cell state).
            if isinstance(new_state, tuple):
                state = (h.unsqueeze(0), new_state[1])
            else:
                state = h.unsqueeze(0)
        return self.head(hs[-1]), hs


def recurrent(
    kind: str,
    *,
    input_size: int = 2,
    hidden: int = 64,
    out_features: int = 1,
    recurrent_scale: float | None = None,
) -> RecurrentModel:
    """A :class:`RecurrentModel`; ``recurrent_scale`` makes the recurrent weights an
    orthogonal matrix times that scale (> 1 explodes a plain RNN, Pascanu et al. 2013)."""
    model = RecurrentModel(kind, input_size, hidden, out_features)
    if recurrent_scale is not None:
        with torch.no_grad():
            for name, p in model.rnn.named_parameters():
                if name.startswith("weight_hh"):
                    for chunk in p.split(hidden, dim=0):
                        nn.init.orthogonal_(chunk, gain=recurrent_scale)
    return model

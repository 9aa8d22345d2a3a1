"""What a module is, by its type: one table for recording and for analysis.

The Probe lays out a module's output by its type (features last, or channels in
dimension 1), reads an activation's gate from its output, measures the carry gates of
gated recurrent modules; the architecture and the diagnosis tell norms, convolutions,
recurrent layers, embeddings and attention apart. Each of those facts about a type is
written once, here, as a :class:`ModuleKind` in :data:`KINDS`.

:func:`module_kind` resolves a module by its class's MRO: the most specific class in the
table wins, so a subclass (``nn.ReLU6`` of ``nn.Hardtanh``, a user's ``MyLSTM(nn.LSTM)``,
``SyncBatchNorm``) is what its base is. :func:`kind_of_type_name` answers for a stored run,
which keeps only the type's name (meta ``modules[].type``).

Types of other libraries are known here only by name where their name misleads
(transformers' ``Conv1D`` is a linear layer); what a module of a model's own code does
(an RMSNorm written by hand) is read from its code by :mod:`gradprobe.architecture`.

Where this table deliberately differs from the per-module tables it replaced (pinned by
``tests/test_kinds.py::test_name_lookups_that_differ_from_the_old_tables``; the old
tables are written out there):

- A name *holding* a norm's class name is that norm for every reader: ``LlamaRMSNorm``,
  apex's ``FusedRMSNormAffine`` (rms), ``T5LayerNorm`` (layer). The diagnosis's selectors
  matched prefixes only and missed them; the remedies' profile already matched
  substrings. So does a fused ``LayerNormLinear`` (Transformer Engine), read as a norm as
  both old rules read it.
- ``InstanceNorm*`` and ``LocalResponseNorm`` are norms (families ``instance``, ``local``)
  for the profile too, which knew neither; the architecture knew no ``LocalResponseNorm``.
  :data:`NORM_FAMILIES` gives both their token.
- transformers' ``Conv1D`` (GPT-2's linear layer) is layout ``"last"`` and no convolution;
  the selectors' ``Conv`` prefix rule made it a channel layer.
- A type torch names without the old prefix (``LazyBatchNorm1d``) is what its type is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

__all__ = [
    "KINDS",
    "NORM_FAMILIES",
    "ModuleKind",
    "gate_from_output",
    "kind_of_type_name",
    "module_kind",
    "types_applying",
]

Layout = Literal["last", "channel"]


@dataclass(frozen=True)
class ModuleKind:
    """What a type of module is, as far as gradprobe cares."""

    # Where its output keeps features: "last" ([N, ..., F]), "channel" ([N, C, ...]), or
    # None: element-wise or unknown, it keeps the layout it receives (the Probe's "inherit").
    layout: Layout | None = None
    # The normalisation family: a key of NORM_FAMILIES, or None.
    norm: str | None = None
    # "rnn", "lstm", "gru", or "other" (a subclass of torch's recurrent bases); None if not.
    recurrent: str | None = None
    cell: bool = False  # one time step per call (nn.RNNCell, LSTMCell, GRUCell)
    # Its carried state passes a gate (an LSTM's forget gate, a GRU's update gate): the
    # carry gates of gradprobe.recurrent. nn.RNN's error goes through Wᵀ·tanh' instead.
    carry_gated: bool = False
    conv: bool = False  # a convolution (nn.ConvNd and transposed; not transformers' Conv1D)
    embedding: bool = False
    attention: bool = False  # computes attention itself (nn.MultiheadAttention)
    transformer_layer: bool = False  # a configured Transformer layer (its activation, norm_first)
    # The element-wise function it applies: a name of gradprobe.activations.ACTIVATIONS.
    activation: str | None = None
    # Whose gate f'(z) is a function of the output y = f(z) (ReLU: [y > 0]; tanh: 1 − y²;
    # sigmoid: y(1 − y)), so gate statistics need no second pass: only where the module's
    # forward is the stock one (see gate_from_output).
    gate_from_output: str | None = None


# The norm families, with the class name each is named after (the token remedies look for).
NORM_FAMILIES: dict[str, str] = {
    "batch": "BatchNorm",
    "layer": "LayerNorm",
    "rms": "RMSNorm",
    "group": "GroupNorm",
    "instance": "InstanceNorm",
    "local": "LocalResponseNorm",
}

_LAST = ModuleKind(layout="last")
_CHANNEL = ModuleKind(layout="channel")


def _act(name: str, from_output: bool = False) -> ModuleKind:
    return ModuleKind(activation=name, gate_from_output=name if from_output else None)


def _rnn(family: str, *, layout: Layout | None, cell: bool = False) -> ModuleKind:
    gated = family in ("lstm", "gru")
    return ModuleKind(layout=layout, recurrent=family, cell=cell, carry_gated=gated)


# THE table: (type, kind). A type appears once; a subclass takes its nearest base's kind.
KINDS: tuple[tuple[type[nn.Module], ModuleKind], ...] = (
    # linear maps: features in the last dimension
    (nn.Linear, _LAST),
    (nn.Bilinear, _LAST),
    (nn.Embedding, ModuleKind(layout="last", embedding=True)),
    (nn.EmbeddingBag, ModuleKind(embedding=True)),
    # convolutions and pools: channels in dimension 1
    (nn.modules.conv._ConvNd, ModuleKind(layout="channel", conv=True)),
    (nn.modules.pooling._MaxPoolNd, _CHANNEL),
    (nn.modules.pooling._AvgPoolNd, _CHANNEL),
    (nn.modules.pooling._AdaptiveAvgPoolNd, _CHANNEL),
    (nn.modules.pooling._AdaptiveMaxPoolNd, _CHANNEL),
    # norms
    (nn.modules.batchnorm._BatchNorm, ModuleKind(layout="channel", norm="batch")),
    (nn.modules.instancenorm._InstanceNorm, ModuleKind(layout="channel", norm="instance")),
    (nn.GroupNorm, ModuleKind(layout="channel", norm="group")),
    (nn.LayerNorm, ModuleKind(layout="last", norm="layer")),
    *(((nn.RMSNorm, ModuleKind(layout="last", norm="rms")),) if hasattr(nn, "RMSNorm") else ()),
    (nn.LocalResponseNorm, ModuleKind(norm="local")),
    # recurrent: the fused layers return [.., T, H] (features last); a cell's layout is
    # left to what it receives
    (nn.RNNBase, _rnn("other", layout="last")),
    (nn.RNN, _rnn("rnn", layout="last")),
    (nn.LSTM, _rnn("lstm", layout="last")),
    (nn.GRU, _rnn("gru", layout="last")),
    (nn.RNNCellBase, _rnn("other", layout=None, cell=True)),
    (nn.RNNCell, _rnn("rnn", layout=None, cell=True)),
    (nn.LSTMCell, _rnn("lstm", layout=None, cell=True)),
    (nn.GRUCell, _rnn("gru", layout=None, cell=True)),
    # attention
    (nn.MultiheadAttention, ModuleKind(layout="last", attention=True)),
    (nn.TransformerEncoderLayer, ModuleKind(layout="last", transformer_layer=True)),
    (nn.TransformerDecoderLayer, ModuleKind(layout="last", transformer_layer=True)),
    # element-wise activations (gradprobe.activations.ACTIVATIONS by name)
    (nn.Sigmoid, _act("sigmoid", from_output=True)),
    (nn.Tanh, _act("tanh", from_output=True)),
    (nn.ReLU, _act("relu", from_output=True)),
    (nn.LeakyReLU, _act("leaky_relu")),
    (nn.PReLU, _act("prelu")),
    (nn.ELU, _act("elu")),
    (nn.SELU, _act("selu")),
    (nn.SiLU, _act("silu")),
    (nn.GELU, _act("gelu")),
    (nn.Softplus, _act("softplus")),
    (nn.Hardtanh, _act("hardtanh")),
    (nn.Softsign, _act("softsign")),
)
_BY_TYPE: dict[type, ModuleKind] = dict(KINDS)

# Other libraries' types whose name misleads, by (top-level package, class name).
_FOREIGN: dict[tuple[str, str], ModuleKind] = {
    ("transformers", "Conv1D"): _LAST,  # GPT-2's linear layer: [N, T, F], despite its name
}
_NOTHING = ModuleKind()


def _resolve(cls: type) -> tuple[type | None, ModuleKind]:
    """The table's type that ``cls`` is (the most specific in its MRO), and its kind."""
    for base in cls.__mro__:
        kind = _BY_TYPE.get(base)
        if kind is not None:
            return base, kind
        foreign = _FOREIGN.get((base.__module__.partition(".")[0], base.__name__))
        if foreign is not None:
            return base, foreign
    return None, _NOTHING


def module_kind(module: nn.Module) -> ModuleKind:
    """What ``module`` is, by its type (an empty :class:`ModuleKind` if the table has no base
    of it)."""
    return _resolve(type(module))[1]


def gate_from_output(module: nn.Module) -> str | None:
    """The activation whose gate is read from this module's output (``"relu"``, ``"tanh"``,
    ``"sigmoid"``), or None: only where the module computes exactly its activation, with
    the stock ``forward`` (a subclass may do more)."""
    base, kind = _resolve(type(module))
    if kind.gate_from_output is None or base is None:
        return None
    return kind.gate_from_output if type(module).forward is base.forward else None


def types_applying(activation: str) -> tuple[type[nn.Module], ...]:
    """The table's types that apply ``activation`` (an ACTIVATIONS name)."""
    return tuple(t for t, k in KINDS if k.activation == activation)


def _torch_names() -> dict[str, ModuleKind]:
    """Every class name the table knows: its own types, torch.nn's concrete subclasses
    of them (``Conv2d``, ``BatchNorm1d``, ``ReLU6``), and other libraries' by name."""
    names = {t.__name__: k for t, k in KINDS}
    for obj in vars(nn).values():
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            base, kind = _resolve(obj)
            if base is not None:
                names.setdefault(obj.__name__, kind)
    names.update({name: kind for (_, name), kind in _FOREIGN.items()})
    return names


_BY_NAME = _torch_names()


def kind_of_type_name(name: str) -> ModuleKind:
    """What a module of the class named ``name`` is, for a stored run (which keeps only the
    name). torch's names are exact; other names are read by what they say: a name holding
    a norm's class name (``LlamaRMSNorm``, ``T5LayerNorm``) is that norm, one starting with
    ``Conv`` (``ConvNeXtBlock``) a convolution. Unknown: an empty :class:`ModuleKind`."""
    known = _BY_NAME.get(name)
    if known is not None:
        return known
    # Longest first: "SyncBatchNorm" holds "BatchNorm", "LayerNorm" is in no other token.
    for family, token in sorted(NORM_FAMILIES.items(), key=lambda e: -len(e[1])):
        if token in name:
            return ModuleKind(norm=family)
    if name.startswith("Conv"):
        return ModuleKind(layout="channel", conv=True)
    return _NOTHING

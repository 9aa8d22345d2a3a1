"""The one table of module kinds (gradprobe.kinds) against what the package knew before it.

Module-type knowledge sat in seven tables in five files. They are written out below as
they were (commit 40ebeed), as plain data independent of the new code, and the table must
say what each of them said for every type it listed: torch.nn's classes, the private bases
they named, and subclasses. Where two old tables disagreed (``LocalResponseNorm``: a norm
for the diagnosis, not for the architecture) the new answer is the union, tested by name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn

from gradprobe.activations import ACTIVATIONS, activation_of, recurrent_nonlinearity
from gradprobe.architecture import describe_architecture
from gradprobe.kinds import (
    KINDS,
    NORM_FAMILIES,
    ModuleKind,
    gate_from_output,
    kind_of_type_name,
    module_kind,
)
from gradprobe.recurrent import carry_slots

# ---------------------------------------------------------------- the old tables, verbatim
# probe.py _LAST_DIM_TYPES / _CHANNEL_TYPES (isinstance: subclasses included)
OLD_LAST_DIM = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.Embedding,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.RMSNorm,
)
OLD_CHANNEL = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
# probe.py _GATE_FROM_OUTPUT (with _stock_forward: the base's own forward)
OLD_GATE_FROM_OUTPUT = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
# activations.py ACTIVATIONS[*].module_types (the most specific type in the MRO wins)
OLD_ACTIVATION_TYPES = {
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
# recurrent.py CARRY_TYPES
OLD_CARRY = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)
# architecture.py _NORM_FAMILIES (in order), _RECURRENT, _CONV, embeddings, attention,
# configured Transformer layers
OLD_NORM_FAMILIES = (
    (nn.modules.batchnorm._BatchNorm, "batch"),
    (nn.LayerNorm, "layer"),
    (nn.GroupNorm, "group"),
    (nn.modules.instancenorm._InstanceNorm, "instance"),
    (nn.RMSNorm, "rms"),
)
OLD_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
OLD_CONV = (nn.modules.conv._ConvNd,)
OLD_EMBEDDING = (nn.Embedding, nn.EmbeddingBag)
OLD_ATTENTION = (nn.MultiheadAttention,)
OLD_TRANSFORMER_LAYER = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
# diagnose/selectors.py _NORM_TYPES (by name: startswith); "Conv" prefix for channels
OLD_SELECTOR_NORM_PREFIXES = (
    "BatchNorm",
    "SyncBatchNorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "RMSNorm",
    "LocalResponseNorm",
)
# remedies/profile.py: _RECURRENT, _TRANSFORMER (names), _NORMS (substring), _NORM_TOKEN,
# and "cnn": a name starting with Conv, not transformers' Conv1D
OLD_PROFILE_RECURRENT = {"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"}
OLD_PROFILE_TRANSFORMER = {
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
}
OLD_PROFILE_NORMS = ("LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm", "SyncBatchNorm")
OLD_NORM_TOKEN = {
    "layer": "LayerNorm",
    "rms": "RMSNorm",
    "batch": "BatchNorm",
    "group": "GroupNorm",
}


def _old_layout(cls: type) -> str | None:
    if issubclass(cls, OLD_LAST_DIM):
        return "last"
    if issubclass(cls, OLD_CHANNEL):
        return "channel"
    return None  # "inherit"


def _old_activation(cls: type) -> str | None:
    for base in cls.__mro__:
        for name, t in OLD_ACTIVATION_TYPES.items():
            if base is t:
                return name
    return None


def _old_norm_family(cls: type) -> str | None:
    return next((f for t, f in OLD_NORM_FAMILIES if issubclass(cls, t)), None)


def _bare(cls: type) -> nn.Module:
    """An instance for type look-ups only (no __init__: no sizes to choose)."""
    return object.__new__(cls)


# Every module class torch.nn exports, and the private bases the old tables named.
TORCH_TYPES = sorted(
    {
        obj
        for obj in vars(nn).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj is not nn.Module
    }
    | {t for t, _ in KINDS},
    key=lambda t: t.__name__,
)


@pytest.mark.parametrize("cls", TORCH_TYPES, ids=lambda t: t.__name__)
def test_the_table_says_what_every_old_table_said(cls: type) -> None:
    kind = module_kind(_bare(cls))
    assert kind.layout == _old_layout(cls)
    assert kind.activation == _old_activation(cls)
    assert kind.carry_gated == issubclass(cls, OLD_CARRY)
    assert (kind.recurrent is not None) == issubclass(cls, OLD_RECURRENT)
    assert kind.conv == issubclass(cls, OLD_CONV)
    assert kind.embedding == issubclass(cls, OLD_EMBEDDING)
    assert kind.attention == issubclass(cls, OLD_ATTENTION)
    assert kind.transformer_layer == issubclass(cls, OLD_TRANSFORMER_LAYER)
    # Norms: the architecture's family where it named one; the diagnosis's names; and
    # nothing else called a norm that no old table called one.
    family = _old_norm_family(cls)
    by_name = cls.__name__.startswith(OLD_SELECTOR_NORM_PREFIXES)
    if family is not None:
        assert kind.norm == family
    if by_name:
        assert kind.norm is not None
    if kind.norm is not None:
        assert family is not None or by_name
    # The gate read from the output: the three stock activations only.
    stock = next((n for n, t in OLD_GATE_FROM_OUTPUT.items() if cls is t), None)
    assert gate_from_output(_bare(cls)) == stock


@pytest.mark.parametrize("cls", TORCH_TYPES, ids=lambda t: t.__name__)
def test_the_old_name_rules_agree_with_the_table(cls: type) -> None:
    """The name rules of stored runs (profile, selectors): what they found by name is
    found, and what is found beyond them is what the type is (``LazyConv2d``)."""
    name = cls.__name__
    kind = kind_of_type_name(name)
    if name in OLD_PROFILE_RECURRENT:
        assert kind.recurrent is not None
    assert (kind.attention or kind.transformer_layer) == (name in OLD_PROFILE_TRANSFORMER)
    if name.startswith("Conv") and name != "Conv1D":
        assert kind.conv
    if kind.conv:
        assert issubclass(cls, OLD_CONV)
    if name.startswith(OLD_SELECTOR_NORM_PREFIXES) or any(n in name for n in OLD_PROFILE_NORMS):
        assert kind.norm is not None


def test_the_remedies_norm_tokens_stay() -> None:
    for family, token in OLD_NORM_TOKEN.items():
        assert NORM_FAMILIES[family] == token


def test_the_disagreements_of_the_old_tables_are_settled_as_the_union() -> None:
    # A norm for the diagnosis (by name), unknown to the architecture: now a norm for both.
    assert module_kind(nn.LocalResponseNorm(2)).norm == "local"
    assert describe_architecture(nn.Sequential(nn.LocalResponseNorm(2)))["norms"] == {"0": "local"}
    # A lazy BatchNorm's name does not start with "BatchNorm": the type says what it is.
    assert kind_of_type_name("LazyBatchNorm1d").norm == "batch"


def test_names_of_other_libraries() -> None:
    # The old substring rule (profile) found prefixed norms; the prefix rule (selectors)
    # did not: a norm by name now, whoever asks.
    assert kind_of_type_name("LlamaRMSNorm").norm == "rms"
    assert kind_of_type_name("T5LayerNorm").norm == "layer"
    assert kind_of_type_name("SyncBatchNorm").norm == "batch"
    assert kind_of_type_name("ConvNeXtBlock") == ModuleKind(layout="channel", conv=True)
    assert kind_of_type_name("MyBlock") == ModuleKind()
    transformers = pytest.importorskip("transformers.pytorch_utils")
    conv1d = transformers.Conv1D(4, 3)  # GPT-2's linear layer: [N, T, F]
    assert module_kind(conv1d) == kind_of_type_name("Conv1D") == ModuleKind(layout="last")


@pytest.mark.parametrize("cls", [t for t, _ in KINDS], ids=lambda t: t.__name__)
def test_a_subclass_is_what_its_base_is(cls: type) -> None:
    base = dict(KINDS)[cls]
    sub = type(f"My{cls.__name__}", (cls,), {})
    assert module_kind(_bare(sub)) == base
    # its stock forward: the gate still comes from the output; its own forward: not
    overridden = type(f"Own{cls.__name__}", (cls,), {"forward": lambda self, x: x})
    assert gate_from_output(_bare(sub)) == base.gate_from_output
    assert gate_from_output(_bare(overridden)) is None


@pytest.mark.parametrize("cls", TORCH_TYPES, ids=lambda t: t.__name__)
def test_kind_of_type_name_agrees_with_module_kind(cls: type) -> None:
    assert kind_of_type_name(cls.__name__) == module_kind(_bare(cls))


def test_the_table_is_one_entry_per_type_and_names_known_activations() -> None:
    types = [t for t, _ in KINDS]
    assert len(types) == len(set(types))
    for _, kind in KINDS:
        assert kind.activation is None or kind.activation in ACTIVATIONS
        assert kind.norm is None or kind.norm in NORM_FAMILIES
        assert kind.gate_from_output in (None, kind.activation)
        assert kind.carry_gated <= (kind.recurrent in ("lstm", "gru"))


def test_the_users_of_the_table_read_it() -> None:
    """What the switched modules answer, on real modules."""
    assert activation_of(nn.ReLU6()).name == "hardtanh"
    assert activation_of(nn.LSTM(2, 3)) is None
    assert recurrent_nonlinearity(nn.RNN(2, 3, nonlinearity="relu")) == "relu"
    assert recurrent_nonlinearity(nn.GRU(2, 3)) == "sigmoid gates, tanh cell"
    assert recurrent_nonlinearity(nn.LSTMCell(2, 3)) is None
    modules = [nn.LSTM(2, 3), nn.RNN(2, 3), nn.GRUCell(2, 3), nn.Linear(2, 2), nn.LSTMCell(2, 2)]
    assert carry_slots(list(enumerate(modules))) == {0, 2, 4}
    arch = describe_architecture(
        nn.Sequential(nn.Embedding(5, 4), nn.Conv1d(4, 4, 1), nn.GRU(4, 4), nn.BatchNorm1d(4))
    )
    assert (arch["embeddings"], arch["convolutions"], arch["recurrent"]) == (["0"], ["1"], ["2"])
    assert arch["norms"] == {"3": "batch"}


# ---------------------------------------------------------------- one place, checked
SRC = Path(__file__).resolve().parents[1] / "src" / "gradprobe"
# Left out of the scan: worked examples, experiments and theory build models (they name
# the types they construct), and the table itself.
EXEMPT_DIRS = ("lab", "theory", "explain")
EXEMPT_FILES = {"kinds.py"}
# Modules another change is rewriting; the lead switches them to gradprobe.kinds after the
# merge. Each must still hold a table, so the list only shrinks.
TO_SWITCH: set[str] = set()


def _nn_type(node: ast.AST) -> type | None:
    """The torch.nn class an expression such as ``nn.LSTM`` or
    ``torch.nn.modules.conv._ConvNd`` names, or None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts = [node.id, *reversed(parts)]
    if parts[:2] == ["torch", "nn"]:
        parts = parts[1:]
    if parts[0] != "nn":
        return None
    obj: object = nn
    for part in parts[1:]:
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None


def _structural(cls: type) -> bool:
    k = module_kind(_bare(cls))
    return bool(k.norm or k.recurrent or k.conv or k.embedding or k.attention)


def _type_tables(path: Path) -> list[str]:
    """Tuples of, and isinstance checks against, norm/recurrent/conv/embedding/attention
    types of torch.nn: what the kinds table answers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Tuple):
            candidates = node.elts
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("isinstance", "issubclass")
            and len(node.args) == 2
        ):
            candidates = [node.args[1]]
        else:
            continue
        for e in candidates:
            cls = _nn_type(e)
            if cls is not None and _structural(cls):
                found.append(f"{path.name}:{node.lineno} {cls.__name__}")
    return found


def test_no_other_module_holds_a_table_of_module_types() -> None:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] in EXEMPT_DIRS or str(rel) in EXEMPT_FILES:
            continue
        hits = _type_tables(path)
        if hits:
            found[str(rel)] = hits
    assert set(found) == TO_SWITCH, f"use gradprobe.kinds instead: {found}"


def test_name_lookups_that_differ_from_the_old_tables() -> None:
    """The deliberate differences from the old name rules (listed in kinds.py's
    docstring), each pinned: what the old rule said (from the old tables above), and
    what the one table says now."""

    def old_selector_norm(name: str) -> bool:
        return name.startswith(OLD_SELECTOR_NORM_PREFIXES)

    def old_profile_norm(name: str) -> bool:
        return any(n in name for n in OLD_PROFILE_NORMS)

    # Other libraries' RMSNorms (HF Llama, apex): the prefix rule missed them.
    for name in ("LlamaRMSNorm", "FusedRMSNormAffine"):
        assert not old_selector_norm(name) and old_profile_norm(name)
        assert kind_of_type_name(name) == ModuleKind(norm="rms")
    # InstanceNorm and LocalResponseNorm: norms for the profile too (it knew neither),
    # and the remedies' tokens name them.
    for name, family in (
        ("InstanceNorm2d", "instance"),
        ("LocalResponseNorm", "local"),
        ("MyInstanceNorm", "instance"),
    ):
        assert not old_profile_norm(name) and family not in OLD_NORM_TOKEN
        assert kind_of_type_name(name).norm == family
    assert NORM_FAMILIES["instance"] == "InstanceNorm"
    assert NORM_FAMILIES["local"] == "LocalResponseNorm"
    assert not old_selector_norm("MyInstanceNorm")  # a prefixed name: the substring rule
    # transformers' Conv1D: the selectors' "Conv" prefix made it a channel layer; it is a
    # linear layer, features last, and no convolution.
    assert "Conv1D".startswith("Conv")
    kind = kind_of_type_name("Conv1D")
    assert kind.layout == "last" and not kind.conv and kind.norm is None
    transformers = pytest.importorskip("transformers.pytorch_utils")
    assert module_kind(transformers.Conv1D(4, 3)) == kind

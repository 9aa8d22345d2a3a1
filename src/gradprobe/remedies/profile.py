"""What the ranking needs to know about a model (:class:`ModelProfile`), read from a run's meta.

The architecture (mlp, cnn, rnn, transformer), the activations, and tokens for what is
already in place (module classes, the init, the optimizer, clipping, the norms and where
they sit), so that a remedy already applied is not proposed again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..kinds import NORM_FAMILIES, kind_of_type_name


@dataclass(frozen=True)
class ModelProfile:
    """What the ranking needs to know about a model, read from a run's meta."""

    architecture: str  # "mlp", "cnn", "rnn" or "transformer"
    activations: frozenset[str]
    tokens: frozenset[str]  # module classes, activations, "init:…", "optimizer:…", "clipping"
    optimizer: str = ""  # the class the run stepped ("AdamW"), "" when unknown

    def has(self, token: str) -> bool:
        return token in self.tokens


# Attention modules by class name: nn.MultiheadAttention, and the classes of other
# libraries (transformers' GPT2Attention, BertSelfAttention, LlamaAttention, ...).
_ATTENTION = re.compile(r"Attention")
_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_RESIDUAL_BLOCKS = {"ResidualBlock", "BasicBlock", "Bottleneck", "PreActBlock"}
# Activation modules the Probe does not know by type (they are not subclasses of
# torch's), recognised by class name: transformers' NewGELUActivation, SiLUActivation...
_ACTIVATION_NAMES = (("gelu", re.compile(r"GELU")), ("silu", re.compile(r"SiLU|Swish")))


def _norm_placement(meta: Mapping[str, Any]) -> str | None:
    """`pre_ln` if every attention block runs a norm first, `post_ln` if any does not.

    A block is the parent of an attention module ("encoder.layers.0" for
    "encoder.layers.0.self_attn"); the first of its probed modules in forward order
    tells where its norm sits: x + f(LN(x)) runs LN first, LN(x + f(x)) runs it last.
    """
    types = {str(m.get("name")): str(m.get("type", "")) for m in meta.get("modules", []) or []}
    order = [str(n) for n in meta.get("execution_order") or []]
    blocks = set()
    for name, t in types.items():
        parts = name.split(".")
        # An attention module is probed only if it has parameters of its own
        # (nn.MultiheadAttention); otherwise (GPT2Attention) its children are, under a
        # name segment such as "attn", "self_attn" or "attention".
        at = len(parts) - 1 if _ATTENTION.search(t) else None
        if at is None:
            at = next((i for i, p in enumerate(parts) if _ATTENTION_NAME.search(p)), None)
        if at:
            blocks.add(".".join(parts[:at]))
    placements = set()
    for block in blocks:
        inside = [n for n in order if n.startswith(block + ".")]
        if inside:
            first = types.get(inside[0], "")
            # By name (other libraries prefix their norms: LlamaRMSNorm is one).
            placements.add("pre_ln" if kind_of_type_name(first).norm else "post_ln")
    if not placements:
        return None
    return "post_ln" if "post_ln" in placements else "pre_ln"


def model_profile(meta: Mapping[str, Any]) -> ModelProfile:
    """The architecture, activations and known choices (init, optimizer, norm placement,
    residual connections) of a run's model."""
    modules = meta.get("modules", []) or []
    types = {str(m.get("type", "")) for m in modules}
    summary = str((meta.get("model") or {}).get("summary", ""))
    # Container classes (a ResidualBlock has no parameters of its own, so it is not
    # probed) are visible in the model's repr: "(0): ResidualBlock(".
    types |= set(re.findall(r"\b([A-Z][A-Za-z0-9_]*)\(", summary))
    activations = {str(m["activation"]) for m in modules if m.get("activation")}
    activations |= {a for a, pattern in _ACTIVATION_NAMES if any(pattern.search(t) for t in types)}
    config = meta.get("config") or {}
    tokens = set(types) | activations
    if isinstance(config.get("init"), str):
        tokens.add(f"init:{config['init'].lower()}")
    # The optimizer the Probe saw step (meta["optimizer"]["class"]) wins over what the
    # user's config says.
    optimizer = meta.get("optimizer")
    if isinstance(optimizer, Mapping):
        optimizer = optimizer.get("class")
    if not isinstance(optimizer, str):
        optimizer = config.get("optimizer")
    if isinstance(optimizer, str):
        tokens.add(f"optimizer:{optimizer.lower()}")
    if not any(t.startswith("optimizer:") for t in tokens):
        tokens.add("optimizer:unknown")  # remedies that tune Adam are offered, conditionally
    if config.get("clip_norm") is not None or config.get("clip_value") is not None:
        tokens.add("clipping")
    described = meta.get("architecture")
    if isinstance(described, Mapping) and described.get("kind"):
        # What the model is and does, read by the Probe at attach (gradprobe.architecture).
        arch = str(described["kind"])
        activations |= {str(a) for a in described.get("activations") or ()}
        tokens |= activations
        families = set((described.get("norms") or {}).values())
        # The norm families as the class names remedies look for ("LayerNorm").
        tokens |= {NORM_FAMILIES[f] for f in families if f in NORM_FAMILIES}
        if described.get("residual") or arch == "transformer":
            tokens.add("residual")
        if described.get("attention"):
            tokens.add("attention")
        placement = described.get("norm_placement") or (
            _norm_placement(meta) if arch == "transformer" else None
        )
        if arch == "transformer" and placement:
            tokens.add(str(placement))
        return ModelProfile(arch, frozenset(activations), frozenset(tokens), _optimizer_class(meta))
    # Runs recorded before the Probe described the architecture: read class names.
    kinds = [kind_of_type_name(t) for t in types]
    if any(k.recurrent for k in kinds):
        arch = "rnn"
    elif any(k.attention or k.transformer_layer for k in kinds) or any(
        _ATTENTION.search(t) for t in types
    ):
        arch = "transformer"
    elif any(k.conv for k in kinds):
        arch = "cnn"  # not transformers' Conv1D: GPT-2's linear layer (gradprobe.kinds)
    else:
        arch = "mlp"
    if arch == "transformer" or types & _RESIDUAL_BLOCKS or any("Residual" in t for t in types):
        tokens.add("residual")  # every Transformer block adds its attention and MLP to x
    if arch == "transformer" and (placement := _norm_placement(meta)):
        tokens.add(placement)
    return ModelProfile(arch, frozenset(activations), frozenset(tokens), _optimizer_class(meta))


def _optimizer_class(meta: Mapping[str, Any]) -> str:
    optimizer = meta.get("optimizer")
    name = optimizer.get("class") if isinstance(optimizer, Mapping) else None
    return str(name) if isinstance(name, str) else ""


# torch.optim's classes (a user's own optimizer class cannot be written as torch.optim.X).
_TORCH_OPTIMIZERS = frozenset(
    [
        "SGD",
        "Adam",
        "AdamW",
        "NAdam",
        "RAdam",
        "Adamax",
        "Adagrad",
        "Adadelta",
        "RMSprop",
        "Rprop",
        "ASGD",
        "Adafactor",
    ]
)

"""What the Probe binds: the probed modules (as slots: names, never modules) and the parameters.

Used when a Probe is made and when it follows a model that changed (gradprobe/follow.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..activations import Activation, activation_of
from ..capture import _Slot
from ..errors import GradprobeError
from ..shards import sharded_parameters

__all__ = [
    "DEFAULT_HISTOGRAM_RANGE",
    "ModuleFilter",
    "choose_modules",
    "make_slot",
    "select_modules",
    "trainable_parameters",
]

ModuleFilter = Callable[[str, nn.Module], bool]

# Modules whose outputs keep features in the last dimension ([N, ..., F]) ...
_LAST_DIM_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.Embedding,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# ... and those that keep channels in dimension 1 ([N, C, ...]).
_CHANNEL_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)

DEFAULT_HISTOGRAM_RANGE = (-4.0, 4.0)

# Activations whose gate f'(z) is a function of their output y = f(z), so that the gate
# statistics come from the output statistics (no second pass over z, no f recomputed):
# ReLU: f' = [y > 0]; tanh: f' = 1 − y²; sigmoid: f' = y(1 − y).
_GATE_FROM_OUTPUT = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _layout_of(module: nn.Module) -> str:
    if isinstance(module, _LAST_DIM_TYPES):
        return "last"
    cls = type(module)
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return "last"  # Hugging Face's GPT-2 linear layer: [N, T, F], despite its name
    if isinstance(module, _CHANNEL_TYPES):
        return "channel"
    return "inherit"


def select_modules(model: nn.Module, selection: Sequence[str] | ModuleFilter | None) -> list[_Slot]:
    chosen = choose_modules(model, selection)
    return [make_slot(i, name, module) for i, (name, module) in enumerate(chosen)]


def choose_modules(
    model: nn.Module, selection: Sequence[str] | ModuleFilter | None, strict: bool = True
) -> list[tuple[str, nn.Module]]:
    """The probed modules, in order. ``strict``: a listed name not in the model is an
    error (at construction; when following a changed model it is just not there)."""
    named = list(model.named_modules())
    if selection is None:
        chosen = [
            (n, m)
            for n, m in named
            if not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False))
        ]
    elif callable(selection):
        chosen = [(n, m) for n, m in named if selection(n, m)]
    else:
        wanted = list(selection)
        names = {n for n, _ in named}
        missing = [n for n in wanted if n not in names]
        if missing and strict:
            raise GradprobeError(
                f"no modules named {missing} in the model", "see model.named_modules()"
            )
        chosen = [(n, m) for n, m in named if n in set(wanted)]
    return chosen


def make_slot(i: int, name: str, module: nn.Module) -> _Slot:
    act = activation_of(module)
    hist = act.histogram_range if act else DEFAULT_HISTOGRAM_RANGE
    from_output = act.name if act is not None and _stock_forward(module, act) else None
    inplace = getattr(module, "inplace", False) is True
    return _Slot(
        i, name, type(module).__name__, act, _layout_of(module), hist, from_output, inplace
    )


def _stock_forward(module: nn.Module, act: Activation) -> bool:
    """Whether the module computes exactly its activation (a subclass may do more)."""
    base = _GATE_FROM_OUTPUT.get(act.name)
    return base is not None and type(module).forward is base.forward


def trainable_parameters(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Parameters in order, each once (a shared one under its first name).

    Under FSDP2 each is the sharded ``DTensor`` the optimizer holds, also while a forward
    with ``reshard_after_forward=False`` has left the full one registered on its module.
    """
    sharded = sharded_parameters(model)
    by_module = dict(model.named_modules()) if sharded else {}
    names, params = [], []
    for name, p in model.named_parameters():
        if sharded:
            owner, _, attribute = name.rpartition(".")
            p = sharded.get((id(by_module[owner]), attribute), p)
        names.append(name)
        params.append(p)
    return names, params

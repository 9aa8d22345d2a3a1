"""What the Probe binds: the probed modules (as slots: names, never modules) and the parameters.

Used when a Probe is made and when it follows a model that changed (gradprobe/follow.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..activations import Activation, activation_of
from ..errors import GradprobeError
from ..kinds import gate_from_output, module_kind
from ..shards import sharded_parameters

__all__ = [
    "DEFAULT_HISTOGRAM_RANGE",
    "ModuleFilter",
    "Slot",
    "choose_modules",
    "make_slot",
    "select_modules",
    "trainable_parameters",
]

ModuleFilter = Callable[[str, nn.Module], bool]

DEFAULT_HISTOGRAM_RANGE = (-4.0, 4.0)


@dataclass(frozen=True)
class Slot:
    """A probed module, by name: what the hooks need to know about it."""

    index: int
    name: str
    type: str
    activation: Activation | None
    layout: str  # "last", "channel" or "inherit" (element-wise: like the tensor it received)
    histogram_range: tuple[float, float]
    # The activation's gate read from its output (gradprobe/sites.py), or None: from z.
    gate_from_output: str | None = None
    inplace: bool = False  # an in-place module writes over its input
    # Not probed: a sequence site only (a block, the final projection), whose forward hook
    # measures the sequence statistics and nothing else (gradprobe/recording/sequences.py).
    sequence_only: bool = False


def select_modules(model: nn.Module, selection: Sequence[str] | ModuleFilter | None) -> list[Slot]:
    chosen = choose_modules(model, selection)
    return [make_slot(i, name, module) for i, (name, module) in enumerate(chosen)]


def choose_modules(
    model: nn.Module, selection: Sequence[str] | ModuleFilter | None, strict: bool = True
) -> list[tuple[str, nn.Module]]:
    """The probed modules, in order. ``strict``: a listed name not in the model is an
    error (at construction; when following a changed model it is just not there)."""
    named = list(model.named_modules())
    if selection is None:
        chosen = [(n, m) for n, m in named if _chosen_by_default(m)]
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


def _chosen_by_default(module: nn.Module) -> bool:
    """Every leaf, every module with parameters of its own, and every attention module,
    whose attention calls are attributed to it (recording/attn.py): a class named
    ``…Attention`` (GPT2Attention, LlamaAttention, nanoGPT's CausalSelfAttention: they
    call attention through a table of implementations), or one whose ``forward`` calls
    ``scaled_dot_product_attention`` or ``multi_head_attention_forward`` by name."""
    return (
        not any(True for _ in module.children())
        or any(True for _ in module.parameters(recurse=False))
        or type(module).__name__.endswith("Attention")
        or _calls_attention(type(module))
    )


_ATTENTION_CALLS = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward"})


def _calls_attention(cls: type) -> bool:
    """Whether ``cls.forward``'s code (its nested functions too) names an attention call:
    read from the code object's names, nothing is run."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        code = stack.pop()
        if _ATTENTION_CALLS & set(code.co_names):
            return True
        stack.extend(c for c in code.co_consts if hasattr(c, "co_names"))
    return False


def make_slot(i: int, name: str, module: nn.Module, *, sequence_only: bool = False) -> Slot:
    """What the hooks need to know of module ``module``, from the one table of module
    kinds (gradprobe.kinds): where its output keeps its units ("inherit": element-wise, it
    keeps the layout it receives), and whether its gate is read from its output."""
    act = activation_of(module)
    hist = act.histogram_range if act else DEFAULT_HISTOGRAM_RANGE
    from_output = gate_from_output(module) if act is not None else None
    inplace = getattr(module, "inplace", False) is True
    layout = module_kind(module).layout or "inherit"
    return Slot(
        i, name, type(module).__name__, act, layout, hist, from_output, inplace, sequence_only
    )


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
